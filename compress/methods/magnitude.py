"""One-shot global magnitude pruning of a trained model, then an optional fine-tune.

The mask is computed once from the trained weights and never changes; fine-tuning works
like `GMP` with a constant schedule (pruned weights stay at zero).
"""

from __future__ import annotations

from torch import nn

from compress.masks import Coverage
from compress.methods.gmp import GMP
from compress.schedules import constant_schedule


class OneShotMagnitude(GMP):
    """Prune ``sparsity`` of the smallest weights now; keep that mask for good."""

    name = "magnitude"

    def __init__(self, model: nn.Module, sparsity: float, *, scope: str = "global",
                 coverage: Coverage = Coverage(), layer_floor: float = 0.0) -> None:
        super().__init__(model, constant_schedule(sparsity), refresh_every=1, scope=scope,
                         coverage=coverage, freeze_step=0, layer_floor=layer_floor)
