"""A fuzzing campaign against every reader of exported files: thousands of damaged variants
of packed LeNet-5 and ResNet-20 exports through `inspect`, `evaluate` and `bench`, with the
digest check on and off (``--ignore-digest``).

Each variant applies one to three random mutations (`tests/corruption.py`: bit flips, byte
overwrites, truncation, huge varints, zeroed and duplicated runs) to a real export. A
reader passes when it exits 0 or 2 and, on 2, prints exactly one line. Reported: exit codes
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
    return files


def worker(job: tuple[int, list[tuple[str, int]], dict[str, str], str]) -> dict:
    """Run its share of variants; return counts, failures, the slowest call, peak RSS."""
    from corruption import mutate, random_mutations
    from typer.testing import CliRunner

    from cli.app import app

    index, variants, files, folder = job
    runner = CliRunner()
    codes, failures, slowest = collections.Counter(), [], (0.0, "")
    sources = {name: Path(path).read_bytes() for name, path in files.items()}
    target = Path(folder) / f"variant-{index}.onnx"
    for source, seed in variants:
        mutations = random_mutations(random.Random(seed))
        target.write_bytes(mutate(sources[source], mutations))
        for reader, args in READERS.items():
            for extra in ((), ("--ignore-digest",)):
                started = time.perf_counter()
                result = runner.invoke(app, [args[0], str(target), *args[1:], *extra])
                seconds = time.perf_counter() - started
                lines = result.output.strip().splitlines()
                label = reader + (" --ignore-digest" if extra else "")
                codes[(label, result.exit_code)] += 1
                if seconds > slowest[0]:
                    slowest = (seconds, f"{label} on {source} seed {seed}")
                if result.exit_code not in (0, 2) or (result.exit_code == 2 and
                                                      len(lines) != 1):
                    failures.append({"reader": label, "source": source, "seed": seed,
                                     "mutations": mutations, "exit": result.exit_code,
                                     "output": lines[-3:]})
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"codes": [[k[0], k[1], v] for k, v in codes.items()], "failures": failures,
            "slowest": slowest, "peak_rss_mib": peak_mib}


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
        variants = [(rng.choice(sorted(files)), rng.randrange(2**31))
                    for _ in range(args.variants)]
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
               "files": sorted(files), "codes": {f"{k[0]} exit {k[1]}": v
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
    print(f"\n{args.variants} variants of {', '.join(sorted(files))}; {len(failures)} "
          f"failures; slowest call {slowest[0]:.2f} s ({slowest[1]}); peak RSS per worker "
          f"{summary['peak_rss_mib_per_worker']} MiB; {wall:.0f} s wall")


if __name__ == "__main__":
    main()
