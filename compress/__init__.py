"""compress: prune PyTorch image classifiers during training or in one shot.

The pieces a training loop needs::

    from compress import DPF, CubicSchedule

    pruner = DPF(model, CubicSchedule(0.9, 0, int(0.75 * total_steps)), refresh_every=16)
    for x, y in loader:
        optimizer.zero_grad()
        with pruner.pruned():
            loss_fn(model(x), y).backward()
        optimizer.step()
        pruner.step()
"""

from compress.errors import CompressError
from compress.masks import Coverage, magnitude_masks, prunable_weights
from compress.methods import DPF, GMP, MaskPruner, OneShotMagnitude
from compress.schedules import CubicSchedule

__version__ = "0.1.0"

__all__ = ["DPF", "GMP", "CompressError", "Coverage", "CubicSchedule", "MaskPruner",
           "OneShotMagnitude", "magnitude_masks", "prunable_weights"]
