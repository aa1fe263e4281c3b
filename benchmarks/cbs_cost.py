"""Time and peak memory of one-shot CBS on ImageNet-sized networks (torchvision ResNet-18
and ResNet-50), with the Fisher blocks computed in groups under ``--max-memory-gb``.

Cost only: the networks are randomly initialised and fed synthetic images (uniform noise,
random labels), since what the second-order step costs depends on the weights' count and
shapes, not on their values. Each model runs in a process of its own, so that its peak
resident memory (``ru_maxrss``) is its own; the stages' seconds come from the method's
progress reports. Accuracy is not measured here: `tests/test_cbs.py` checks on MLPNet that
grouped blocks give the masks and weights of the all-at-once path.

    .venv/bin/python benchmarks/cbs_cost.py                       # ResNet-18 and ResNet-50
    .venv/bin/python benchmarks/cbs_cost.py --models resnet18 --max-block 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path("benchmarks/results/cbs_cost.jsonl")


def synthetic_splits(samples: int, side: int, classes: int, seed: int = 0):
    """Noise images as a `compress.data.Splits`: the train split feeds the gradients, the
    validation split the held-out losses."""
    import torch

    from compress.data import Splits, TensorSplit
    from compress.dataconfig import DataConfig

    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> TensorSplit:
        images = torch.randint(0, 256, (n, 3, side, side), generator=gen, dtype=torch.uint8)
        labels = torch.randint(0, classes, (n,), generator=gen)
        return TensorSplit(images, labels, [0.5] * 3, [0.25] * 3)

    config = DataConfig(name="synthetic", input_shape=(3, side, side), num_classes=classes)
    return Splits(split(samples), split(samples), split(16), config)


def measure(args: argparse.Namespace, name: str) -> dict:
    """One model, in this process: prune once and report what it cost."""
    import torch
    import torchvision

    from compress.masks import prunable_weights
    from compress.methods import method
    from compress.methods.registry import OneShotRequest

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = getattr(torchvision.models, name)(weights=None, num_classes=args.classes).eval()
    splits = synthetic_splits(args.samples, args.side, args.classes)
    request = OneShotRequest(sparsity=args.sparsity, second_order={
        "fisher_samples": args.samples, "max_block": args.max_block,
        "max_memory_gb": args.max_memory_gb, "rmp_trials": args.rmp_trials,
        "heldout_samples": args.samples})
    pruner = method(args.method, "one-shot").build(request)
    stages: dict[str, float] = {}
    last = [0.0]

    def progress(stage: str, done: int, total: int) -> None:
        """The time since the previous report goes to this report's stage."""
        now = time.perf_counter()
        key = stage.split(" (group")[0]
        stages[key] = stages.get(key, 0.0) + now - last[0]
        last[0] = now

    pruner.progress = progress
    pruner.check(model)
    started = last[0] = time.perf_counter()
    result = pruner.prune(model, splits)
    seconds = time.perf_counter() - started
    weights = prunable_weights(model, request.coverage)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    d = result.details
    return {"model": name, "method": args.method, "weights": total,
            "sparsity": zeros / total, "samples": args.samples, "side": args.side,
            "max_block": args.max_block, "max_memory_gb": args.max_memory_gb,
            "rmp_trials": args.rmp_trials, "threads": args.threads,
            "blocks": d["blocks"], "groups": d["fisher_groups"],
            "gradient_passes": d["gradient_passes"], "seconds": seconds,
            "stages": stages,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "torch": torch.__version__}


def table(rows: list[dict]) -> str:
    lines = ["| model | weights | blocks (≤ max) | groups | gradient passes | gradients s | "
             "swap search s | update s | total s | peak memory GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["stages"]
        lines.append(f"| {r['model']} | {r['weights'] / 1e6:.1f} M | {r['blocks']:,} "
                     f"({r['max_block']}) | {r['groups']} | {r['gradient_passes']} | "
                     f"{s.get('gradients', 0):.0f} | {s.get('swap search (blocks)', 0):.0f} | "
                     f"{s.get('weight update (blocks)', 0):.0f} | {r['seconds']:.0f} | "
                     f"{r['peak_rss_gb']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--method", default="cbs")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--side", type=int, default=64, help="synthetic image side (pixels)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--max-block", type=int, default=256)
    parser.add_argument("--max-memory-gb", type=float, default=12.0)
    parser.add_argument("--rmp-trials", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: one model
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args, args.one)))
        return
    rows = []
    for name in args.models:
        child = [sys.executable, __file__, "--one", name] + [
            part for key, value in vars(args).items() if key not in ("models", "one")
            for part in (f"--{key.replace('_', '-')}", str(value))]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
