"""A Fashion-MNIST classifier through the whole pipeline, with the command line only:

1. train the dense classifier (``pipeline/dense.yaml``);
2. prune it structurally while it keeps training: activation density (``structured.yaml``);
3. prune the thinner network's weights with DPF (``sparse.yaml``);
4. export the dense model, and the result packed in fp32 and packed with int8 quantization;
5. check test top-1 of every file in onnxruntime, and ``bench`` each result against the
   dense file (1 thread, batch 1, interleaved in one process) with a latency budget.

The int8 file is the one to ship when its *validation* top-1 (checked at export) is within
``--int8-tolerance`` points of the fp32 file's; the test split only reports.

    .venv/bin/python samples/fashion_mnist_pipeline.py --out runs/pipeline

Every command is printed before it runs; a finished step is skipped on a second call.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMPRESS = str(Path(sys.executable).parent / "compress")


def compress(*args: object, parse: bool = True) -> dict | None:
    command = [COMPRESS, *map(str, args)]
    print("$ compress " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 3):  # 3: bench's budget missed, reported below
        sys.exit(f"step failed (exit {done.returncode}): {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout) if parse else None


def train(step: str, out: Path, weights: Path | None, overrides: list[str]) -> None:
    if (out / "checkpoint.pt").exists() and (out / "report.md").exists():
        print(f"(kept {out}: already trained)")
        return
    extra = ["--weights", weights / "checkpoint.pt"] if weights else []
    compress("train-prune", "--recipe", HERE / "pipeline" / f"{step}.yaml", *extra,
             *overrides, "--out", out, "--quiet", "--json")


def export(run: Path, path: Path, *extra: str) -> dict:
    return compress("export", run, "--onnx", path, "--overwrite", "--json", *extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pipeline"))
    parser.add_argument("--budget-ms", type=float, default=None,
                        help="p50 budget for bench [default: a third of the dense p50]")
    parser.add_argument("--int8-tolerance", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=None,
                        help="override every step's epochs (a quick try; not the figures)")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-test-samples", type=int, default=None)
    args = parser.parse_args()
    out = args.out
    overrides = [str(x) for flag, value in (("--epochs", args.epochs),
                                             ("--max-train-samples", args.max_train_samples),
                                             ("--max-test-samples", args.max_test_samples))
                 if value is not None for x in (flag, value)]
    train("dense", out / "dense", None, overrides)
    train("structured", out / "structured", out / "dense", overrides)
    train("sparse", out / "sparse", out / "structured", overrides)
    files = {"dense": (out / "dense", out / "dense.onnx", []),
             "thin": (out / "structured", out / "thin.onnx", []),
             "thin+sparse fp32": (out / "sparse", out / "sparse.onnx", []),
             "thin+sparse int8": (out / "sparse", out / "sparse-int8.onnx",
                                  ["--quantize", "int8"])}
    rows = {}
    for name, (run, path, extra) in files.items():
        exported = export(run, path, *extra)  # verifies, measures validation top-1
        top1 = compress("evaluate", path, "--json")
        rows[name] = {"file": str(path), "bytes": path.stat().st_size,
                      "val_top1": exported.get("accuracy", {}).get("onnx_val_top1"),
                      "test_top1": top1["top1"]}
    alone = compress("bench", rows["dense"]["file"], "--threads", 1, "--runs", args.runs,
                     "--json")
    budget = args.budget_ms if args.budget_ms is not None else \
        alone["latency_ms"]["p50"] / 3  # the target: three times faster than dense
    for name in rows:
        if name == "dense":
            continue
        bench = compress("bench", rows[name]["file"], "--against", rows["dense"]["file"],
                         "--threads", 1, "--runs", args.runs, "--budget-ms", budget,
                         "--percentile", "p50", "--json")  # the percentile it prints
        dense_p50 = bench["against"]["latency_ms"]["p50"]
        rows[name]["p50_ms"] = bench["latency_ms"]["p50"]
        rows[name]["speedup"] = dense_p50 / rows[name]["p50_ms"]
        rows[name]["within_budget"] = bench["within_budget"]
        rows["dense"]["p50_ms"] = dense_p50
    int8, fp32 = rows["thin+sparse int8"], rows["thin+sparse fp32"]
    ship = "thin+sparse int8" if (fp32["val_top1"] - int8["val_top1"]) * 100 <= \
        args.int8_tolerance else "thin+sparse fp32"
    dense = rows["dense"]
    print(f"\nbench budget: p50 <= {budget:.3f} ms (1 thread, batch 1)")
    print("\n| file | bytes | size vs dense | test top-1 | p50 (ms, 1 thread) | speed-up "
          "(against dense, same bench) | within budget |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        mark = " (shipped)" if name == ship else ""
        print(f"| {name}{mark} | {r['bytes']:,} | {dense['bytes'] / r['bytes']:.1f}x smaller | "
              f"{100 * r['test_top1']:.2f} | {r['p50_ms']:.3f} | "
              f"{r.get('speedup', 1.0):.2f}x | "
              f"{ {True: 'yes', False: 'no', None: '-'}[r.get('within_budget')]} |")
    (out / "pipeline.json").write_text(json.dumps({"rows": rows, "shipped": ship,
                                                   "budget_ms": budget}, indent=1))


if __name__ == "__main__":
    main()
