"""A fuzzing campaign against every reader of files a user may be handed: thousands of
damaged variants of packed LeNet-5 and ResNet-20 exports through `inspect`, `evaluate` and
`bench`, with the digest check on and off (``--ignore-digest``); of a run's checkpoint (its
bytes, and the entries inside its archive rewritten with valid checksums) through `inspect`
and `evaluate`; and of its recipe through the recipe reader and its checks.

Each variant applies one to three random mutations (`tests/corruption.py`: bit flips, byte
overwrites, truncation, huge varints, zeroed and duplicated runs) to a real export. A
reader passes when it exits 0 or 2 and, on 2, prints exactly one line, within
``CALL_LIMIT_S``. Reported: exit codes
per reader, failures (with the mutation that caused them), the slowest single call, and
the peak resident memory of each worker process (the readers run in-process, as the test
suite runs them, so a worker's peak bounds every call it made).

    .venv/bin/python benchmarks/fuzz_readers.py --variants 1000 --workers 2
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))

READERS = {"inspect": ("inspect",), "evaluate": ("evaluate", "--max-test-samples", "64"),
           "bench": ("bench", "--runs", "3", "--warmup", "1")}
CHECKPOINT_READERS = {"inspect": ("inspect",),
                      "evaluate": ("evaluate", "--max-test-samples", "64")}
CALL_LIMIT_S = 60.0  # a call slower than this counts as a failure
ARCHIVE_ENTRIES = ("data.pkl", "/data/0", "byteorder")


def make_files(folder: Path) -> dict[str, Path]:
    """Packed exports of a briefly trained DPF LeNet-5 and a magnitude-pruned ResNet-20."""
    from compress.pipeline import prune_oneshot, train_prune
    from compress.recipe import Recipe
    from export.onnx_export import export_checkpoint

    small = dict(max_train_samples=1000, max_test_samples=200, epochs=1)
    train_prune(Recipe(model="lenet5", method="dpf", sparsity=0.9, **small).validate(),
                str(folder / "lenet5"), show_progress=False)
    train_prune(Recipe(model="resnet20", method="none", **small).validate(),
                str(folder / "resnet20-dense"), show_progress=False)
    prune_oneshot(str(folder / "resnet20-dense"), str(folder / "resnet20"), 0.9,
                  show_progress=False)
    files = {}
    for name, quantize in (("lenet5", "none"), ("resnet20", "none"), ("lenet5", "int8")):
        path = folder / f"{name}-{quantize}.onnx"
        export_checkpoint(folder / name, path, pack="bitmask", quantize=quantize,
                          values="fp32", verify=False)
        files[path.stem] = path
    files["checkpoint"] = folder / "lenet5" / "checkpoint.pt"
    files["recipe"] = folder / "lenet5" / "recipe.yaml"
    return files


def _variant(kind: str, source: bytes, seed: int) -> tuple[bytes, list]:
    """A damaged copy of ``source``: its bytes mutated, or for ``checkpoint-archive`` one
    entry of its zip archive mutated and the archive written anew (valid checksums)."""
    import io
    import zipfile

    from corruption import mutate, random_mutations

    rng = random.Random(seed)
    mutations = random_mutations(rng)
    if kind != "checkpoint-archive":
        return mutate(source, mutations), mutations
    entry = rng.choice(ARCHIVE_ENTRIES)
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(source)) as original, \
            zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for info in original.infolist():
            data = original.read(info.filename)
            archive.writestr(info.filename, mutate(data, mutations)
                             if info.filename.endswith(entry) else data)
    return buffer.getvalue(), [entry, *mutations]


def _read_recipe(path: Path) -> tuple[int, str]:
    """The recipe reader as `train-prune --recipe` runs it: (exit code it would give, text)."""
    from compress.errors import CompressError
    from compress.recipe import load_recipe

    try:
        load_recipe(path).validate()
        return 0, ""
    except CompressError as exc:
        return 2, str(exc)
    except Exception as exc:  # what the campaign is looking for
        return 1, f"{type(exc).__name__}: {exc}"


def worker(job: tuple[int, list[tuple[str, int]], dict[str, str], str]) -> dict:
    """Run its share of variants; return counts, failures, the slowest call, peak RSS."""
    from typer.testing import CliRunner

    from cli.app import app

    index, variants, files, folder = job
    runner = CliRunner()
    codes, failures, slowest = collections.Counter(), [], (0.0, "")
    sources = {name: Path(path).read_bytes() for name, path in files.items()}
    for source, seed in variants:
        kind = source if source in ("recipe", "checkpoint", "checkpoint-archive") else "onnx"
        original = sources["checkpoint" if kind == "checkpoint-archive" else source]
        data, mutations = _variant(kind, original, seed)
        target = Path(folder) / f"variant-{index}" / ("recipe.yaml" if kind == "recipe" else
                                                      "checkpoint.pt" if "checkpoint" in kind
                                                      else "model.onnx")
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(data)
        for label, call in _calls(kind, target, runner, app):
            started = time.perf_counter()
            code, lines = call()
            seconds = time.perf_counter() - started
            label = f"{kind}: {label}"
            codes[(label, code)] += 1
            if seconds > slowest[0]:
                slowest = (seconds, f"{label} on {source} seed {seed}")
            if code not in (0, 2) or (code == 2 and len(lines) != 1) or \
                    seconds > CALL_LIMIT_S:
                failures.append({"reader": label, "source": source, "seed": seed,
                                 "mutations": mutations, "exit": code,
                                 "seconds": round(seconds, 1), "output": lines[-3:]})
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"codes": [[k[0], k[1], v] for k, v in codes.items()], "failures": failures,
            "slowest": slowest, "peak_rss_mib": peak_mib}


def _calls(kind: str, target: Path, runner, app):
    """(label, call) for every reader of a file of ``kind``; a call gives (exit, lines)."""
    def cli(args: tuple[str, ...]):
        def call():
            result = runner.invoke(app, [args[0], str(target), *args[1:]])
            return result.exit_code, result.output.strip().splitlines()
        return call

    if kind == "recipe":
        def recipe():
            code, text = _read_recipe(target)
            return code, text.splitlines()
        return [("recipe", recipe)]
    if kind != "onnx":
        return [(reader, cli(args)) for reader, args in CHECKPOINT_READERS.items()]
    return [(reader + (" --ignore-digest" if extra else ""), cli((*args, *extra)))
            for reader, args in READERS.items() for extra in ((), ("--ignore-digest",))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "fuzz_readers.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="compress-fuzz-") as name:
        folder = Path(name)
        files = {k: str(v) for k, v in make_files(folder).items()}
        kinds = sorted(files) + ["checkpoint-archive"]
        variants = [(rng.choice(kinds), rng.randrange(2**31)) for _ in range(args.variants)]
        shares = [variants[i::args.workers] for i in range(args.workers)]
        started = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(worker, [(i, share, files, name)
                                        for i, share in enumerate(shares)])
        wall = time.perf_counter() - started
    codes = collections.Counter()
    for r in results:
        for reader, code, count in r["codes"]:
            codes[(reader, code)] += count
    failures = [f for r in results for f in r["failures"]]
    slowest = max(r["slowest"] for r in results)
    summary = {"variants": args.variants, "seed": args.seed, "wall_seconds": wall,
               "files": kinds, "call_limit_seconds": CALL_LIMIT_S,
               "codes": {f"{k[0]} exit {k[1]}": v
                                                 for k, v in sorted(codes.items())},
               "failures": failures, "slowest_call_seconds": slowest[0],
               "slowest_call": slowest[1],
               "peak_rss_mib_per_worker": [round(r["peak_rss_mib"]) for r in results]}
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print("| reader | exit 0 | exit 2 | other |\n|---|---|---|---|")
    for reader in sorted({k[0] for k in codes}):
        other = sum(v for (r, c), v in codes.items() if r == reader and c not in (0, 2))
        print(f"| {reader} | {codes[(reader, 0)]} | {codes[(reader, 2)]} | {other} |")
    print(f"\n{args.variants} variants of {', '.join(kinds)}; {len(failures)} "
          f"failures; slowest call {slowest[0]:.2f} s ({slowest[1]}); peak RSS per worker "
          f"{summary['peak_rss_mib_per_worker']} MiB; {wall:.0f} s wall")


if __name__ == "__main__":
    main()
