"""One-shot second-order pruning against magnitude, without fine-tuning: MLPNet and resnet20
on Fashion-MNIST.

For each seed a dense model is trained (``compress train-prune --method none``), then each
method prunes it at every sparsity in one sweep process (``compress prune --sparsity
0.5,...``; gradients and Fisher blocks are computed once per sweep) and test top-1 is read
for every level. Methods: MP (global magnitude), WF (WoodFisher), CBS-S (CBS selection, no
update), CBS, MP + CBS-U (magnitude selection, CBS update). Defaults: 1,000 gradient
samples, damping 1e-3 (MLPNet) / 1e-5 (resnet20), blocks of whole rows up to 1,024
weights, 50 randomised starts, ε=1e-4, ρ=10, τ=20; the held-out split is the validation
split (10 % of the training set). Wall time per level and peak memory come from the runs.
BatchNorm statistics are re-estimated on 2,048 training images after each cut (prune's
default); ``--stale-too`` also runs every method with ``--bn-recalibrate 0``, the
statistics the cut left (columns "... stale BN"), to show what the free step is worth.

    .venv/bin/python benchmarks/cbs_mlpnet.py                    # MLPNet, 5 seeds
    .venv/bin/python benchmarks/cbs_mlpnet.py --model resnet20 --seeds 0 \\
        --sparsities 0.5,0.6,0.7,0.8 --methods MP WF CBS --train-samples 12000 --epochs 8 \\
        --stale-too
    .venv/bin/python benchmarks/cbs_mlpnet.py --table           # print the tables again
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from compress_cli import compress_json

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "cbs.json"
METHODS = {"MP": ["--method", "magnitude"], "WF": ["--method", "woodfisher"],
           "CBS-S": ["--method", "cbs-s"], "CBS": ["--method", "cbs"],
           "MP + CBS-U": ["--method", "magnitude", "--update", "cbs"]}
PAPER_MNIST = {  # the authors' MLPNet on MNIST (DESIGN.md section 6), test top-1 %
    "0.9": {"MP": 90.30, "WF": 91.69, "CBS": 93.14},
    "0.95": {"MP": 83.64, "WF": 85.54, "CBS": 88.92},
    "0.98": {"MP": 32.25, "CBS": 55.45, "CBS-S": 66.64},
}


def one_seed(args, seed: int, work: Path) -> dict:
    dense = compress_json("train-prune", "--model", args.model, "--method", "none",
                          "--epochs", args.epochs, "--seed", seed, "--out", work / "dense",
                          *(["--max-train-samples", args.train_samples]
                            if args.train_samples else []))
    rows = {"dense": {"test_top1": dense["test_top1"]}}
    variants = [(name, name, []) for name in args.methods]
    if args.stale_too:
        variants += [(f"{name} stale BN", name, ["--bn-recalibrate", "0"])
                     for name in args.methods]
    for label, name, extra in variants:
        out = work / label.replace(" ", "").replace("+", "_")
        sweep = compress_json("prune", work / "dense", *METHODS[name], "--sparsity",
                              args.sparsities, "--fisher-samples", args.fisher_samples,
                              *extra, "--out", out, "--evaluate")
        rows[label] = {f"{float(s['sparsity']):.4g}": {
            "test_top1": s["test_top1"], "heldout_loss": s.get("heldout_loss"),
            "seconds": s.get("prune_seconds"), "peak_memory_mb": s.get("peak_memory_mb")}
            for s in sweep["runs"]}
    return rows


def tables(results: dict) -> str:
    out = []
    for model, data in results.items():
        seeds = list(data["seeds"].values())
        levels = list(next(iter(seeds[0][m] for m in seeds[0] if m != "dense")).keys())
        methods = [m for m in seeds[0] if m != "dense"]
        dense = [100 * s["dense"]["test_top1"] for s in seeds]
        out.append(f"{model}, dense {statistics.mean(dense):.2f} ± "
                   f"{statistics.stdev(dense) if len(dense) > 1 else 0.0:.2f} "
                   f"({len(seeds)} seed(s)); test top-1 %, one shot, no fine-tuning:\n")
        out.append("| sparsity | " + " | ".join(methods) + " |")
        out.append("|---" * (len(methods) + 1) + "|")
        for level in levels:
            cells = []
            for m in methods:
                vals = [100 * s[m][level]["test_top1"] for s in seeds]
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.2f} ± {std:.2f}")
            out.append(f"| {float(level):.4g} | " + " | ".join(cells) + " |")
        out.append("\nSeconds per level (mean over seeds; the first level of a sweep also "
                   "collects the gradients) and peak memory (MB, largest):\n")
        out.append("| method | " + " | ".join(f"{float(lv):.4g}" for lv in levels) +
                   " | peak MB |")
        out.append("|---" * (len(levels) + 2) + "|")
        for m in methods:
            secs = [statistics.mean(s[m][lv]["seconds"] for s in seeds) for lv in levels]
            peak = max(s[m][lv]["peak_memory_mb"] or 0 for s in seeds for lv in levels)
            out.append(f"| {m} | " + " | ".join(f"{x:.1f}" for x in secs) +
                       (f" | {peak:.0f} |" if peak else " | - |"))
        if model == "mlpnet":
            out.append("\nThe authors' MLPNet on **MNIST** (their table; other data, for "
                       "the margins only): " + "; ".join(
                           f"{lv}: " + ", ".join(f"{m} {v:.2f}" for m, v in row.items())
                           for lv, row in PAPER_MNIST.items()))
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlpnet")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--sparsities", default="0.5,0.6,0.7,0.8,0.9,0.95,0.98")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-samples", type=int, default=None)
    parser.add_argument("--fisher-samples", type=int, default=1000)
    parser.add_argument("--stale-too", action="store_true",
                        help="also run every method without re-estimating BatchNorm")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.table:
        entry = results.setdefault(args.model, {"seeds": {}})
        entry["settings"] = {k: v for k, v in vars(args).items() if k != "table"}
        for seed in args.seeds:
            if str(seed) in entry["seeds"]:
                continue
            with tempfile.TemporaryDirectory(prefix="compress-cbs-") as folder:
                entry["seeds"][str(seed)] = one_seed(args, seed, Path(folder))
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1))
            print(f"{args.model} seed {seed} done", file=sys.stderr, flush=True)
    print(tables(results))


if __name__ == "__main__":
    main()
