"""Does cutting channels buy onnxruntime time in proportion to the MACs it removes?

For each model it exports the unpruned network and `l1-filter` cuts at channel shares
0.25 / 0.5 / 0.75, with widths rounded to multiples of 8 (the default) and not rounded
(``--round-to 1``), and times each cut interleaved with the unpruned export in one process
(onnxruntime, batch 1, 1 thread by default). Reported: MAC ratio (torch's flop counter),
measured p50 ratio, and their quotient (1.0 = time falls exactly as MACs do; the target is
at most 1.3). Latency does not depend on the weights' values, so the models are untrained
(seeded) on synthetic data of each model's input size.

    .venv/bin/python benchmarks/structured_latency.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from compress.pipeline import prune_oneshot, train_prune
from compress.recipe import Recipe
from export.onnx_export import export_checkpoint
from export.ort import load_onnxruntime
from export.runtime.latency import cpu_name, measure

ort = load_onnxruntime()  # with its telemetry off (export/ort.py)

MODELS = {  # name: input shape
    "resnet20": (3, 32, 32),
    "vgg-small": (3, 32, 32),
    "torchvision.models:mobilenet_v3_small": (3, 64, 64),
}
SYNTHETIC = dict(data="synthetic", num_classes=10, max_train_samples=64, max_test_samples=32)


def dense_export(model: str, shape: tuple[int, ...], root: Path, seed: int) -> Path:
    run = root / "dense"
    recipe = Recipe(model=model, method="none", epochs=1, batch_size=32, lr=1e-3, seed=seed,
                    input_shape=list(shape), **SYNTHETIC).validate()
    train_prune(recipe, str(run), show_progress=False)
    path = root / "dense.onnx"
    export_checkpoint(run, path, pack="none")
    return path


def cut_export(dense_run: Path, share: float, round_to: int, root: Path) -> tuple[Path, dict]:
    run = root / f"cut-{share}-{round_to}"
    summary = prune_oneshot(str(dense_run), str(run), share, method="l1-filter",
                            round_to=round_to, show_progress=False)
    path = root / f"cut-{share}-{round_to}.onnx"
    export_checkpoint(run, path, pack="none")
    return path, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--shares", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}; {cpu_name()}; batch 1; {args.threads} thread(s); "
          f"{args.runs} timed runs per model in alternating blocks after 20 warm-up runs; "
          f"seed {args.seed}\n")
    print("| model (input) | channels removed | round to | MAC ratio | params ratio | "
          "p50 ratio | p50 / MAC ratio | dense p50 (ms) |")
    print("|---" * 8 + "|")
    for model in args.models:
        shape = MODELS[model]
        with tempfile.TemporaryDirectory() as tmp_name:
            root = Path(tmp_name)
            dense = dense_export(model, shape, root, args.seed)
            for share in args.shares:
                for round_to in (8, 1):
                    path, summary = cut_export(root / "dense", share, round_to, root)
                    results, _ = measure([dense, path], threads=args.threads, runs=args.runs)
                    dense_p50 = results[0].latency()["p50"]
                    ratio = results[1].latency()["p50"] / dense_p50
                    params = summary["params"] / summary["original_params"]
                    print(f"| {model.split(':')[-1]} ({'x'.join(map(str, shape))}) | {share} | "
                          f"{round_to} | {summary['mac_ratio']:.3f} | {params:.3f} | "
                          f"{ratio:.3f} | {ratio / summary['mac_ratio']:.2f} | "
                          f"{dense_p50:.3f} |", flush=True)


if __name__ == "__main__":
    main()
