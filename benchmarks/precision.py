"""Training time per epoch in fp32 against bf16 autocast (``--precision``) on this CPU.

Each model is trained dense (``compress train-prune --method none``) on the first
``--train-samples`` Fashion-MNIST training images for ``--epochs`` epochs in each precision,
the precisions alternating so that both see the same machine; reported: seconds per epoch
of the training passes (the summary's ``train_seconds`` / epochs, no evaluation), their
ratio, and test top-1 on the first ``--test-samples`` test images.

    .venv/bin/python benchmarks/precision.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from compress_cli import compress_json, pair_table

RESULTS = Path("benchmarks/results/precision.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet20", "vgg-small"])
    parser.add_argument("--train-samples", type=int, default=6000)
    parser.add_argument("--test-samples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="compress-precision-") as work:
        for model in args.models:
            row = {"model": model}
            for precision in ("fp32", "bf16"):
                summary = compress_json(
                    "train-prune", "--model", model, "--method", "none", "--epochs",
                    args.epochs, "--max-train-samples", args.train_samples,
                    "--max-test-samples", args.test_samples, "--threads", args.threads,
                    "--precision", precision, "--out", Path(work) / f"{model}-{precision}")
                row[precision] = {"epoch_seconds": summary["train_seconds"] / args.epochs,
                                  "test_top1": summary["test_top1"]}
            rows.append(row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    print(f"{args.train_samples} images, {args.epochs} epochs, {args.threads} threads")
    print(pair_table(rows, "fp32", "bf16", ("fp32", "bf16")))

if __name__ == "__main__":
    main()
