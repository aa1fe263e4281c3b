"""Digests of the weights each method gives on a small seeded run: run it before and after
a refactor, and compare the two outputs (a refactor changes no result).

Each training method trains LeNet-5 for 2 epochs on 600 Fashion-MNIST images (seed 3, one
thread); each one-shot method prunes the same dense run and fine-tunes one epoch. Printed:
method, then the first 16 hex digits of the SHA-256 of every checkpoint tensor in name order.

    .venv/bin/python benchmarks/same_weights.py > before.txt
    # ... change the code ...
    .venv/bin/python benchmarks/same_weights.py | diff before.txt -
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch

from compress.checkpoint import load_checkpoint
from compress.pipeline import prune_oneshot, train_prune
from compress.recipe import Recipe

SMALL = dict(max_train_samples=600, max_test_samples=200, batch_size=64)
TRAINING = [("dpf", dict(sparsity=0.8, refresh_every=4)), ("gmp", dict(sparsity=0.8)),
            ("density", dict(probe_samples=128, density_start=0.3, density_every=0.2,
                             density_tolerance=1.0, density_cuts=2, round_to=4)),
            ("dpf-filter", dict(sparsity=0.5, round_to=4)),
            ("dpf-filter", dict(sparsity=0.5, round_to=4, prune_end=1.0))]
ONE_SHOT = [("l1-filter", dict(sparsity=0.5)), ("magnitude", dict(sparsity=0.7)),
            ("cbs", dict(sparsity=0.7, second_order={"fisher_samples": 64, "max_block": 64,
                                                     "heldout_samples": 64, "rmp_trials": 5}))]


def digest(run: Path) -> str:
    state = load_checkpoint(run / "checkpoint.pt").state_dict
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="compress-same-weights-"))
    for i, (method, extra) in enumerate(TRAINING):
        recipe = Recipe(model="lenet5", method=method, epochs=2, seed=3, **SMALL,
                        **extra).validate()
        train_prune(recipe, str(out / str(i)), show_progress=False)
        label = method + (" (cut at the end)" if extra.get("prune_end") == 1.0 else "")
        print(label, digest(out / str(i)), flush=True)
    dense = Recipe(model="lenet5", method="none", epochs=1, seed=3, **SMALL).validate()
    train_prune(dense, str(out / "dense"), show_progress=False)
    for method, options in ONE_SHOT:
        prune_oneshot(str(out / "dense"), str(out / method), method=method, seed=3,
                      show_progress=False, finetune_epochs=1, **options)
        print(method, digest(out / method), flush=True)


if __name__ == "__main__":
    main()
