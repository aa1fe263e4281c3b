"""File size of exported models, and what packing costs at load and at run time.

For DPF LeNet-5 and magnitude-pruned ResNet-20 (both on Fashion-MNIST) at sparsity 0.9,
0.95 and 0.98 it exports: dense (--pack none), bitmask with fp32, fp16 and int8 values,
and reports the gzip -9 size of the dense file and an entropy bound: per prunable tensor
``N * H(sparsity) + nnz * 32`` bits (mask entropy plus fp32 values), plus 32 bits per
parameter that is not prunable. Packed fp32 values are exact but may take fewer than 32
bits (exponent-coded, see export/packing.py); the table gives the bits they take.
It then opens packed and dense fp32 files in onnxruntime (1 thread, batch 1) alternately
and reports session start time and p50 latency side by side, as ratios measured in the
same run.

A second table holds every packed file against general-purpose compressors of its
unpacked twin (the same graph with the same weights stored dense: for fp16 and int8
values the decoded, rounded weights; for ``--quantize int8`` the unpacked QDQ export):
``xz -9`` and ``zstd -19``, the two strongest a user would reach for. The packed file
loads as it is; the compressed twin must be decompressed first.

Sizes do not depend on how well a model is trained, so models train briefly here:
LeNet-5 with DPF for 2 epochs on the full training set; ResNet-20 dense for 1 epoch on
5,000 images, then one-shot global magnitude pruning (no fine-tuning).

    .venv/bin/python benchmarks/export_size.py
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import math
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from compress.checkpoint import load_checkpoint
from compress.pipeline import prune_oneshot, train_prune
from compress.recipe import Recipe
from export.onnx_export import export_checkpoint
from export.ort import load_onnxruntime
from export.packing import read_stream
from export.session import open_session
from export.verify import decoded_copy

ort = load_onnxruntime()  # with its telemetry off (export/ort.py)


def entropy_bound_bytes(run: Path) -> tuple[float, float]:
    """(the whole bound, its mask-entropy part), in bytes."""
    ckpt = load_checkpoint(run)
    masks = ckpt.masks or {}
    bits = mask_bits = 0.0
    for name, tensor in ckpt.state_dict.items():
        if not tensor.is_floating_point() or name.endswith(("running_mean", "running_var")):
            continue
        if name in masks:
            n, nnz = tensor.numel(), int(masks[name].sum())
            p = nnz / n
            h = 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
            bits += n * h + nnz * 32
            mask_bits += n * h
        else:
            bits += tensor.numel() * 32
    return bits / 8, mask_bits / 8


def stored_stream(path: Path) -> tuple[int, int, int]:
    """(bytes of the packed mask in the file, depth of its occupancy tree, bits per stored
    fp32 value: 32, or 24 + the exponent index width)."""
    stream = read_stream(onnx.load(str(path)))
    bits = 24 + stream.exponent_width if stream.exponent_width else 32
    return stream.mask_bytes, stream.levels, bits


def xz9(data: bytes) -> int:
    return len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def zstd19(data: bytes) -> int | None:
    """zstd -19 of ``data`` with Debian's zstd tool (None where it is not installed)."""
    try:
        done = subprocess.run(["zstd", "-19", "-c", "-q"], input=data, capture_output=True,
                              check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return len(done.stdout)


def twin_bytes(packed: Path) -> bytes:
    """The unpacked twin of a packed file: its decoded weights stored dense."""
    return decoded_copy(onnx.load(str(packed))).SerializeToString()


COMPRESSOR_HEAD = ("| model | sparsity | values | packed | xz -9 of twin | zstd -19 of twin | "
                   "packed / xz | smaller than both |\n|---|---|---|---|---|---|---|---|")


def compressor_rows(model: str, sparsity: float, files: dict[str, Path],
                    twins: dict[str, bytes]) -> list[str]:
    rows = []
    for name, twin in twins.items():
        packed = files[name].stat().st_size
        xz, zstd = xz9(twin), zstd19(twin)
        best = min(xz, zstd if zstd is not None else xz)
        zstd_text = f"{zstd:,}" if zstd is not None else "-"
        rows.append(f"| {model} | {sparsity} | {name} | {packed:,} | {xz:,} | "
                    f"{zstd_text} | {packed / xz:.3f} | "
                    f"{'yes' if packed < best else 'NO'} |")
    return rows


def session(path: Path) -> tuple[ort.InferenceSession, float]:
    started = time.perf_counter()
    s = open_session(path, threads=1)
    return s, time.perf_counter() - started


def compare_runtime(packed: Path, dense: Path, shape, rounds: int, runs: int) -> dict:
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    starts = {"packed": [], "dense": []}
    latencies = {"packed": [], "dense": []}
    for _ in range(rounds):
        for name, path in (("packed", packed), ("dense", dense)):
            s, seconds = session(path)
            starts[name].append(seconds)
            feed = {s.get_inputs()[0].name: x}
            for _ in range(20):
                s.run(None, feed)
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feed)
                latencies[name].append(time.perf_counter() - t)
    p50 = {k: statistics.median(v) * 1e3 for k, v in latencies.items()}
    start = {k: statistics.median(v) * 1e3 for k, v in starts.items()}
    return {"start_ms": start, "p50_ms": p50, "p50_ratio": p50["packed"] / p50["dense"],
            "start_overhead_ms": start["packed"] - start["dense"]}


def make_runs(tmp: Path, sparsities: list[float]) -> dict[tuple[str, float], Path]:
    runs = {}
    for s in sparsities:
        out = tmp / f"lenet5-dpf-{s}"
        train_prune(Recipe(model="lenet5", method="dpf", sparsity=s, epochs=2).validate(),
                    str(out), show_progress=False)
        runs[("lenet5 DPF", s)] = out
    dense = tmp / "resnet20-dense"
    train_prune(Recipe(model="resnet20", method="none", epochs=1,
                       max_train_samples=5000).validate(), str(dense), show_progress=False)
    for s in sparsities:
        out = tmp / f"resnet20-mag-{s}"
        prune_oneshot(str(dense), str(out), s, show_progress=False)
        runs[("resnet20 magnitude", s)] = out
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}; latency: 1 thread, batch 1, {args.rounds} "
          f"alternating rounds of {args.runs} runs after 20 warm-up runs\n")
    print("| model | sparsity | dense | gzip dense | packed fp32 | fp16 | int8 | entropy bound "
          "| fp32 / bound | fp32 value bits | mask / its entropy (tree levels) "
          "| start packed / dense (ms) | p50 packed / dense (ms) | p50 ratio |")
    print("|---" * 14 + "|")
    against = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for (model, s), run in make_runs(tmp, args.sparsities).items():
            files = {}
            for name, pack, values in (("dense", "none", "fp32"), ("fp32", "bitmask", "fp32"),
                                       ("fp16", "bitmask", "fp16"), ("int8", "bitmask", "int8")):
                path = tmp / f"{run.name}-{name}.onnx"
                export_checkpoint(run, path, pack=pack, values=values, verify=False)
                files[name] = path
            for name, pack in (("qdq-int8", "bitmask"), ("qdq-int8 twin", "none")):
                path = tmp / f"{run.name}-{name.replace(' ', '-')}.onnx"
                export_checkpoint(run, path, pack=pack, quantize="int8", verify=False)
                files[name] = path
            twins = {name: twin_bytes(files[name]) for name in ("fp32", "fp16", "int8")}
            twins["qdq-int8"] = files["qdq-int8 twin"].read_bytes()
            against += compressor_rows(model, s, files, twins)
            size = {k: p.stat().st_size for k, p in files.items()}
            gz = len(gzip.compress(files["dense"].read_bytes(), compresslevel=9))
            bound, mask_entropy = entropy_bound_bytes(run)
            mask, levels, value_bits = stored_stream(files["fp32"])
            shape = load_checkpoint(run).data.input_shape
            rt = compare_runtime(files["fp32"], files["dense"], shape, args.rounds, args.runs)

            def kb(n: float) -> str:
                return f"{n / 1024:.1f} KiB"

            print(f"| {model} | {s} | {kb(size['dense'])} | {kb(gz)} | {kb(size['fp32'])} "
                  f"({size['fp32'] / size['dense']:.3f}) | {kb(size['fp16'])} | "
                  f"{kb(size['int8'])} ({size['int8'] / size['dense']:.3f}) | {kb(bound)} | "
                  f"{size['fp32'] / bound:.3f} | {value_bits} | "
                  f"{mask / mask_entropy:.2f} ({levels}) | "
                  f"{rt['start_ms']['packed']:.1f} / "
                  f"{rt['start_ms']['dense']:.1f} | {rt['p50_ms']['packed']:.3f} / "
                  f"{rt['p50_ms']['dense']:.3f} | {rt['p50_ratio']:.3f} |", flush=True)
    print("\n" + COMPRESSOR_HEAD)
    print("\n".join(against))


if __name__ == "__main__":
    main()
