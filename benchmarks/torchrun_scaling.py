"""Training time in one process against two under torchrun, on the same cores.

Each model is trained with DPF (``--sparsity 0.9``) for ``--epochs`` epochs on the first
``--train-samples`` Fashion-MNIST images: once in one process with ``--threads`` threads
and a batch of 2·B, once as two torchrun processes (Gloo) with batch B each and
``--threads`` split between them, the runs alternating per model. Both take the same
optimisation steps (README's torchrun contract); reported: the summary's training seconds
per epoch, the ratio, and test top-1 on the first ``--test-samples`` test images. On one
machine this measures what the process group costs, not what several machines gain.

    .venv/bin/python benchmarks/torchrun_scaling.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from compress_cli import COMPRESS, compress_json, pair_table

RESULTS = Path("benchmarks/results/torchrun_scaling.json")


def torchrun_json(*args: object) -> dict:
    """Two processes' summary (printed by the first)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "--no-python", COMPRESS, *map(str, args), "--json",
               "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun failed: {done.stderr[:1500]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet20"])
    parser.add_argument("--train-samples", type=int, default=6000)
    parser.add_argument("--test-samples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="per process (B)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="compress-torchrun-") as work:
        for model in args.models:
            common = ["train-prune", "--model", model, "--method", "dpf", "--sparsity", "0.9",
                      "--epochs", args.epochs, "--max-train-samples", args.train_samples,
                      "--max-test-samples", args.test_samples]
            one = compress_json(*common, "--batch-size", 2 * args.batch_size, "--threads",
                                args.threads, "--out", Path(work) / f"{model}-1")
            two = torchrun_json(*common, "--batch-size", args.batch_size, "--threads",
                                max(1, args.threads // 2), "--out", Path(work) / f"{model}-2")
            rows.append({"model": model, **{
                name: {"epoch_seconds": s["train_seconds"] / args.epochs,
                       "test_top1": s["test_top1"], "processes": s["processes"]}
                for name, s in (("one", one), ("two", two))}})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    print(f"{args.train_samples} images, {args.epochs} epochs, {args.threads} threads in all")
    print(pair_table(rows, "one", "two", ("1 process", "2 processes")))

if __name__ == "__main__":
    main()
