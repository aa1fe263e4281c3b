"""Wall time of a DPF (and GMP) training epoch over a dense one, interleaved in one process.

Epochs of dense, DPF and GMP training alternate (dense, dpf, gmp, dense, dpf, gmp, ...)
on the same data and model, so machine noise hits all three alike; the figure is the
median of per-round ratios. DPF runs at its target sparsity with a refresh every 16 steps
and its leaky feedback, i.e. all of its per-step work.

    .venv/bin/python benchmarks/dpf_overhead.py --models lenet5 lenet300 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from compress import DPF, GMP, CubicSchedule
from compress.data import DataConfig, load_splits
from compress.models import build_model


def epoch_seconds(model, split, optimizer, pruner, generator) -> float:
    started = time.perf_counter()
    model.train()
    for x, y in split.batches(128, shuffle=True, generator=generator):
        optimizer.zero_grad(set_to_none=True)
        if pruner is None:
            F.cross_entropy(model(x), y).backward()
        else:
            with pruner.pruned():
                F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if pruner is not None:
            pruner.step()
    return time.perf_counter() - started


def measure(name: str, rounds: int, sparsity: float) -> dict:
    splits = load_splits(DataConfig())
    steps = rounds * splits.train.num_batches(128)
    runs = {}
    for method in ("dense", "dpf", "gmp"):
        torch.manual_seed(0)
        model = build_model(name, 10, (1, 28, 28))
        schedule = CubicSchedule(sparsity, 0, steps // 2)
        pruner = {"dense": None, "dpf": DPF, "gmp": GMP}[method]
        pruner = pruner(model, schedule, refresh_every=16) if pruner else None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                    weight_decay=5e-4)
        runs[method] = (model, optimizer, pruner, torch.Generator().manual_seed(0))
    times = {m: [] for m in runs}
    for _ in range(rounds):
        for method, (model, optimizer, pruner, gen) in runs.items():
            times[method].append(epoch_seconds(model, splits.train, optimizer, pruner, gen))
    return {
        "model": name,
        "dense_s": statistics.median(times["dense"]),
        "dpf_ratio": statistics.median(d / b for d, b in zip(times["dpf"], times["dense"],
                                                             strict=True)),
        "gmp_ratio": statistics.median(g / b for g, b in zip(times["gmp"], times["dense"],
                                                             strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "lenet300"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds, sparsity {args.sparsity}")
    print("| model | dense epoch (s) | DPF / dense | GMP / dense |")
    print("|---|---|---|---|")
    for name in args.models:
        r = measure(name, args.rounds, args.sparsity)
        print(f"| {name} | {r['dense_s']:.2f} | {r['dpf_ratio']:.3f} | {r['gmp_ratio']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
