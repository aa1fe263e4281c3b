"""DPF's exact rule against GMP on a BatchNorm network: ResNet-20 on a Fashion-MNIST slice.

Three methods, one process per run (``compress train-prune ... --json --quiet``):

* ``dpf``        DPF with the default leaky feedback (``--feedback-decay 0.01``);
* ``dpf-paper``  DPF with ``--feedback-decay 0``: the paper's rule, pruned weights keep the
                 full gradient and never shrink;
* ``gmp``        the same cubic schedule without feedback;

at each sparsity, seed and training setting. A setting is a recipe and a length:

* ``default``    our recipe (lr 0.05, weight decay 5e-4, cosine schedule), each of
                 ``--epochs``;
* ``paper-sgd``  the paper's CIFAR ResNet choices where they differ from ours (lr 0.2,
                 weight decay 1e-4, lr x0.1 at 50 % and 75 % of training), each of
                 ``--paper-epochs``, for ``--paper-methods`` (default: the paper's rule
                 and gmp). Both recipes use batch 128, Nesterov momentum 0.9, the
                 target reached at 75 % of training and no mask refresh after it.

Every run uses the same training slice (``--train-samples`` images of the training set, the
validation split is 10 % of it) and the full test set. Recorded per run: test and
validation top-1, the fraction of mask entries flipped per refresh (first and last 10 % of
the refreshes while pruning), and for the DPF rows the largest dense magnitude among the
pruned weights at any refresh next to the largest kept one. Choices are made on the
validation split; the test split is only reported.

    .venv/bin/python benchmarks/dpf_resnet.py            # runs what the json lacks (or failed)
    .venv/bin/python benchmarks/dpf_resnet.py --table    # the README table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "dpf_resnet.json"
COMPRESS = str(Path(sys.executable).parent / "compress")
METHODS = ("dpf", "dpf-paper", "gmp")
RECIPES = {
    "default": [],
    "paper-sgd": ["--lr", "0.2", "--weight-decay", "1e-4", "--lr-schedule", "step",
                  "--momentum", "0.9"],
}


def key(recipe: str, epochs: int, sparsity: float, method: str, seed: int) -> str:
    return f"{recipe}/e{epochs}/s{sparsity}/{method}/seed{seed}"


def command(recipe: str, epochs: int, sparsity: float, method: str, seed: int,
            args: argparse.Namespace, out: Path) -> list[str]:
    cmd = [COMPRESS, "train-prune", "--model", "resnet20", "--data", "fashion-mnist",
           "--max-train-samples", str(args.train_samples), "--batch-size", "128",
           "--method", method.removesuffix("-paper"), "--sparsity", str(sparsity),
           "--epochs", str(epochs), "--seed", str(seed), *RECIPES[recipe],
           # the papers' global threshold, as the table was measured (before the 1 % floor
           # became the default)
           "--layer-floor", "0", "--out", str(out), "--json", "--quiet"]
    if method == "dpf-paper":
        cmd += ["--feedback-decay", "0"]
    return cmd


def telemetry(events: list[dict]) -> dict:
    """Flips per refresh while pruning and the dense magnitudes the refreshes recorded."""
    refreshes = [e for e in events if e["event"] == "refresh" and e["target_sparsity"] > 0]
    flips = [e["flips"] for e in refreshes]
    k = max(1, len(flips) // 10)
    found = {"refreshes": len(refreshes),
             "flips_early": statistics.mean(flips[:k]) if flips else None,
             "flips_late": statistics.mean(flips[-k:]) if flips else None}
    if refreshes and "pruned_max" in refreshes[0]:
        peak = max(refreshes, key=lambda e: e["pruned_max"])
        found.update(pruned_max=peak["pruned_max"], pruned_max_step=peak["step"],
                     kept_max_then=peak["kept_max"],
                     kept_max=max(e["kept_max"] for e in refreshes),
                     pruned_max_last=refreshes[-1]["pruned_max"])
    return found


def one_run(spec: tuple, args: argparse.Namespace) -> dict:
    recipe, epochs, sparsity, method, seed = spec
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="compress-dpfres-") as folder:
        out = Path(folder) / "run"
        cmd = command(recipe, epochs, sparsity, method, seed, args, out)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        row = {"recipe": recipe, "epochs": epochs, "sparsity": sparsity, "method": method,
               "seed": seed, "wall_s": round(time.perf_counter() - started, 1),
               "load_before": load, "load_after": os.getloadavg()[0]}
        if done.returncode != 0:
            return {**row, "error": done.stderr[-800:]}
        summary = json.loads(done.stdout)
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {**row, "test_top1": summary["test_top1"], "val_top1": summary["val_top1"],
            "achieved": summary["sparsity"], "train_seconds": summary.get("train_seconds"),
            **telemetry(events)}


def grid(args: argparse.Namespace) -> list[tuple]:
    settings = [("default", e, args.methods) for e in args.epochs] + [
        ("paper-sgd", e, args.paper_methods) for e in args.paper_epochs]
    return [(recipe, epochs, s, m, seed) for seed in args.seeds
            for recipe, epochs, methods in settings for s in args.sparsities for m in methods]


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def table(results: dict) -> str:
    runs = list(results["runs"].values())
    settings = list(dict.fromkeys((r["recipe"], r["epochs"], r["sparsity"]) for r in runs))
    settings.sort(key=lambda s: (s[0] != "default", s[2], s[1]))
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    lines = ["| recipe | epochs | sparsity | " + " | ".join(methods)
             + " | dpf-paper − gmp | dpf − gmp | seeds |",
             "|---|---|---|" + "---|" * (len(methods) + 3)]
    for recipe, epochs, sparsity in settings:
        mine = [r for r in runs if (r["recipe"], r["epochs"], r["sparsity"])
                == (recipe, epochs, sparsity)]
        top1 = {m: [r["test_top1"] for r in mine if r["method"] == m and "error" not in r]
                for m in methods}
        failed = {m: sum(1 for r in mine if r["method"] == m and "error" in r) for m in methods}
        cells = [fmt(top1[m]) + (f" ({failed[m]} failed)" if failed[m] else "")
                 for m in methods]
        gaps = []
        for m in ("dpf-paper", "dpf"):
            pairs = [(a["test_top1"], b["test_top1"]) for a in mine for b in mine
                     if a["method"] == m and b["method"] == "gmp" and a["seed"] == b["seed"]
                     and "error" not in a and "error" not in b]
            gaps.append(f"{100 * statistics.mean(x - y for x, y in pairs):+.2f}"
                        if pairs else "-")
        seeds = min(len(v) for v in top1.values() if v)  # the fewest any method has
        lines.append(f"| {recipe} | {epochs} | {sparsity} | " + " | ".join(cells)
                     + f" | {' | '.join(gaps)} | {seeds} |")
    lines += ["", "Test top-1 (%), mean ± std over seeds; the gaps are means of per-seed "
              "differences.", "",
              "| recipe | epochs | sparsity | method | val top-1 | flips/refresh, first 10 % "
              "| last 10 % | largest pruned \\|w\\| (step) | largest kept \\|w\\| then |",
              "|---|---|---|---|---|---|---|---|---|"]
    for recipe, epochs, sparsity in settings:
        for m in methods:
            mine = [r for r in runs if (r["recipe"], r["epochs"], r["sparsity"], r["method"])
                    == (recipe, epochs, sparsity, m) and "error" not in r]
            if not mine:
                continue
            val = fmt([r["val_top1"] for r in mine])
            early = statistics.mean(r["flips_early"] for r in mine)
            late = statistics.mean(r["flips_late"] for r in mine)
            if mine[0].get("pruned_max") is not None:
                peak = max(mine, key=lambda r: r["pruned_max"])
                grown = (f"{peak['pruned_max']:.3g} ({peak['pruned_max_step']}) | "
                         f"{peak['kept_max_then']:.3g}")
            else:
                grown = "0 (no feedback) | -"
            lines.append(f"| {recipe} | {epochs} | {sparsity} | {m} | {val} | {early:.2e} | "
                         f"{late:.2e} | {grown} |")
    lines += ["", "Flips: fraction of the mask that changed per refresh, means over seeds. "
              "Largest pruned |w|: the largest dense magnitude among the weights a refresh "
              "found pruned, over all refreshes and seeds, with the largest kept magnitude "
              "at that refresh."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", nargs="*", type=int, default=[5, 10],
                        help="lengths trained with the default recipe")
    parser.add_argument("--paper-epochs", nargs="*", type=int, default=[10],
                        help="lengths trained with the paper's lr, weight decay and steps")
    parser.add_argument("--paper-methods", nargs="*", default=["dpf-paper", "gmp"],
                        choices=METHODS, help="methods trained with the paper's recipe")
    parser.add_argument("--train-samples", type=int, default=6000)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--table", action="store_true", help="print the table and exit")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    path = args.results
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    if not args.table:
        settings = {"train_samples": args.train_samples, "model": "resnet20",
                    "data": "fashion-mnist", "batch_size": 128}
        if results.get("settings", settings) != settings:
            sys.exit(f"{path} holds runs with other settings {results['settings']}; "
                     "use another --results")
        results["settings"] = settings
        todo = [s for s in grid(args) if "test_top1" not in results["runs"].get(key(*s), {})]
        print(f"{len(todo)} runs to do", file=sys.stderr, flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(one_run, s, args): s for s in todo}
            for future in as_completed(futures):
                row = future.result()
                results["runs"][key(*futures[future])] = row
                path.parent.mkdir(exist_ok=True)
                path.write_text(json.dumps(results, indent=1))
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
