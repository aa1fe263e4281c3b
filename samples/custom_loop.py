"""DPF inside your own training loop: three added lines around the usual step.

    .venv/bin/python samples/custom_loop.py --epochs 2 --sparsity 0.9

Uses LeNet-5 on Fashion-MNIST (Debian's dataset-fashion-mnist), but nothing below depends
on compress's own trainer: any model, data loader and optimizer work the same way.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from compress import DPF, CubicSchedule
from compress.data import DataConfig, load_splits
from compress.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--max-train-samples", type=int, default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    splits = load_splits(DataConfig(max_train_samples=args.max_train_samples))
    model = build_model("lenet5", num_classes=10, input_shape=(1, 28, 28))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    steps = args.epochs * splits.train.num_batches(128)

    # 1. a pruner: cubic schedule reaching the target at 75 % of training
    pruner = DPF(model, CubicSchedule(args.sparsity, 0, int(0.75 * steps)), refresh_every=16)

    for epoch in range(args.epochs):
        model.train()
        for x, y in splits.train.batches(128, shuffle=True):
            optimizer.zero_grad()
            with pruner.pruned():  # 2. forward/backward on the pruned weights
                F.cross_entropy(model(x), y).backward()
            optimizer.step()  # the full gradient updates the dense weights
            pruner.step()  # 3. advance the schedule, refresh the mask every 16 steps

        model.eval()
        correct = 0
        with torch.no_grad(), pruner.pruned():  # evaluate pruned; dense weights come back
            for x, y in splits.val.batches(512):
                correct += int((model(x).argmax(1) == y).sum())
        print(f"epoch {epoch + 1}: validation top-1 {correct / len(splits.val):.4f}, "
              f"sparsity {pruner.sparsity:.4f}")

    pruner.apply_masks()  # make the zeros permanent before saving or exporting
    zeros = sum(int((w == 0).sum()) for w in pruner.weights.values())
    total = sum(w.numel() for w in pruner.weights.values())
    print(f"final: {zeros} of {total} prunable weights are zero ({zeros / total:.4f})")


if __name__ == "__main__":
    main()
