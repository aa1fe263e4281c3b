"""DPF against its baselines on Fashion-MNIST, with one training budget for all.

For each model, seed and sparsity it trains:
  dense      `none` for E epochs
  dpf        E epochs, cubic schedule to the target at 75 %, mask refreshed every 16 steps,
             leaky feedback (feedback_decay 0.01, the default)
  dpf-paper  the same with feedback_decay 0: the paper's rule, pruned weights never shrink
  gmp        the same schedule without feedback
  magnitude  dense for E - F epochs, one-shot global magnitude, F epochs of fine-tuning
and reports test top-1 mean ± std over seeds, the wall time of a DPF epoch over a dense
epoch (same process, same data), and the mask flip rate per refresh early and late.

    .venv/bin/python benchmarks/dpf_fashion_mnist.py --epochs 12 --finetune-epochs 3 \
        --seeds 0 1 2 --out benchmarks/results/dpf_fashion_mnist.json

Decisions use the validation split; the test split gives the reported figures only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from compress.pipeline import prune_oneshot, train_prune
from compress.recipe import Recipe


def run_train(tmp: Path, name: str, **recipe_fields) -> tuple[dict, list[dict]]:
    recipe = Recipe(**recipe_fields).validate()
    out = tmp / name
    summary = train_prune(recipe, str(out), show_progress=False)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, events


def flip_rates(events: list[dict]) -> tuple[float, float]:
    """Mean fraction of mask entries flipped per refresh: first and last 10 % of refreshes."""
    flips = [e["flips"] for e in events if e["event"] == "refresh" and e["sparsity"] > 0]
    if not flips:
        return 0.0, 0.0
    k = max(1, len(flips) // 10)
    return statistics.mean(flips[:k]), statistics.mean(flips[-k:])


def epoch_seconds(events: list[dict]) -> float:
    times = [e["seconds"] for e in events if e["event"] == "epoch"]
    return statistics.median(times)


def bench(args: argparse.Namespace) -> list[dict]:
    rows = []
    common = dict(
        data="fashion-mnist",
        epochs=args.epochs,
        lr=args.lr,
        max_train_samples=args.max_train_samples,
        refresh_every=args.refresh_every,
    )
    dpf_extra = dict(
        freeze_at=args.freeze_at, skip_first=args.skip_first, skip_classifier=args.skip_classifier
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for model in args.models:
            for seed in args.seeds:
                tag = f"{model}-s{seed}"
                base = dict(common, model=model, seed=seed)
                dense, dense_events = run_train(tmp, f"{tag}-dense", method="none", **base)
                rows.append(
                    dict(
                        model=model,
                        seed=seed,
                        method="dense",
                        sparsity=0.0,
                        top1=dense["test_top1"],
                        val=dense["val_top1"],
                        epoch_s=epoch_seconds(dense_events),
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
                if args.magnitude:
                    run_train(
                        tmp,
                        f"{tag}-pre",
                        method="none",
                        **dict(base, epochs=args.epochs - args.finetune_epochs),
                    )
                for s in args.sparsities:
                    for method in args.methods:
                        extra = dict(dpf_extra)
                        if method == "dpf-paper":
                            extra["feedback_decay"] = 0.0
                        started = time.perf_counter()
                        summary, events = run_train(
                            tmp,
                            f"{tag}-{method}-{s}",
                            method=method.removesuffix("-paper"),
                            sparsity=s,
                            **base,
                            **extra,
                        )
                        early, late = flip_rates(events)
                        rows.append(
                            dict(
                                model=model,
                                seed=seed,
                                method=method,
                                sparsity=s,
                                top1=summary["test_top1"],
                                val=summary["val_top1"],
                                achieved=summary["sparsity"],
                                epoch_s=epoch_seconds(events),
                                dense_epoch_s=epoch_seconds(dense_events),
                                flips_early=early,
                                flips_late=late,
                                wall_s=time.perf_counter() - started,
                            )
                        )
                        print(json.dumps(rows[-1]), flush=True)
                    if not args.magnitude:
                        continue
                    one = prune_oneshot(
                        str(tmp / f"{tag}-pre"),
                        str(tmp / f"{tag}-mag-{s}"),
                        s,
                        finetune_epochs=args.finetune_epochs,
                        lr=args.lr * args.finetune_lr_scale,
                        seed=seed,
                        show_progress=False,
                    )
                    rows.append(
                        dict(
                            model=model,
                            seed=seed,
                            method="magnitude+ft",
                            sparsity=s,
                            top1=one["test_top1"],
                            val=one["val_top1"],
                            achieved=one["sparsity"],
                            before_ft=one["val_top1_before_finetune"],
                        )
                    )
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    def fmt(values: list[float]) -> str:
        mean = 100 * statistics.mean(values)
        std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.2f} ± {std:.2f}"

    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        dense = [r["top1"] for r in mine if r["method"] == "dense"]
        sparsities = sorted({r["sparsity"] for r in mine if r["method"] != "dense"})
        methods = list(dict.fromkeys(r["method"] for r in mine if r["method"] != "dense"))
        lines += [
            f"**{model}** (dense: {fmt(dense)})",
            "",
            "| sparsity | " + " | ".join(methods) + " |",
            "|---" * (len(methods) + 1) + "|",
        ]
        for s in sparsities:
            cells = [
                fmt([r["top1"] for r in mine if r["method"] == m and r["sparsity"] == s])
                for m in methods
            ]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        for name in ("dpf", "dpf-paper"):
            dpf = [r for r in mine if r["method"] == name]
            if not dpf:
                continue
            ratio = statistics.mean(r["epoch_s"] / r["dense_epoch_s"] for r in dpf)
            early = statistics.mean(r["flips_early"] for r in dpf)
            late = statistics.mean(r["flips_late"] for r in dpf)
            lines += [
                "",
                f"{name}: epoch wall time / dense epoch: {ratio:.3f}; mask flips "
                f"per refresh: {early:.2e} (first 10 % of refreshes) -> {late:.2e} "
                "(last 10 %)",
            ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "lenet300"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--methods", nargs="+", default=["dpf", "dpf-paper", "gmp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-lr-scale", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=Recipe.lr)
    parser.add_argument("--refresh-every", type=int, default=16)
    parser.add_argument("--freeze-at", type=float, default=None)
    parser.add_argument("--skip-first", action="store_true")
    parser.add_argument("--skip-classifier", action="store_true")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument(
        "--no-magnitude",
        dest="magnitude",
        action="store_false",
        help="Skip the one-shot magnitude baseline.",
    )
    parser.add_argument("--out", type=Path, default=None, help="Write all rows as JSON here.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
        )
    print(table(rows))


if __name__ == "__main__":
    main()
