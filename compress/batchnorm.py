"""BatchNorm statistics re-estimated on training images: forward passes only, no training.

A model's running means and variances are an average over training steps, so they lag the
weights: after a one-shot cut they describe a network that no longer exists, and after a
short run they may not have caught up (torchvision's MobileNetV3 and EfficientNets update
them with momentum 0.01, a hundred-step memory). Re-estimating them the way evaluation
reads them fixes both at the cost of a few forward passes: every BatchNorm's statistics
are reset and then averaged over the given images with equal weight (``momentum=None``),
with every other layer in evaluation mode (no dropout) and the same forward evaluation
uses (masks applied, for DPF).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

SEED = 0  # the images drawn for the estimate


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def slow_statistics(model: nn.Module, momentum: float = 0.05) -> bool:
    """Whether some BatchNorm of ``model`` updates its statistics slower than ``momentum``
    per step (their estimate lags far behind a short run)."""
    return any(m.momentum is not None and m.momentum < momentum for m in batch_norms(model))


def reestimate(model: nn.Module, batches: Iterable[torch.Tensor],
               device: torch.device | None = None) -> int:
    """Recompute every BatchNorm's running statistics on ``batches`` (see the module);
    returns the images used (0, and nothing changed, without BatchNorm)."""
    norms = batch_norms(model)
    if not norms:
        return 0
    device = device or next(model.parameters()).device
    momenta = [m.momentum for m in norms]
    was_training = model.training
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: every image counts alike
        norm.train()
    seen = 0
    try:
        with torch.no_grad():
            for x in batches:
                model(x.to(device))
                seen += len(x)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
    return seen


def training_images(split, samples: int, batch_size: int = 128) -> Iterable[torch.Tensor]:
    """``samples`` images of a training split drawn with a fixed seed (every class, not the
    first folder), unaugmented, in batches."""
    generator = torch.Generator().manual_seed(SEED)
    chosen = torch.randperm(len(split), generator=generator)[:samples]
    return (x for x, _ in split.subset(chosen, augment=False).batches(batch_size))
