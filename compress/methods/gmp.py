"""Gradual magnitude pruning without feedback (Zhu & Gupta, 2017): the DPF baseline.

Same schedule and refreshes as `DPF`, but a pruned weight is set to zero, gets no
gradient and no momentum, so it can never grow back: masks only ever shrink.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from compress.methods.base import MaskPruner, schedule_options
from compress.methods.registry import register


class GMP(MaskPruner):
    """Pruned weights stay at exactly zero."""

    name = "gmp"

    def after_refresh(self) -> None:
        self._zero_pruned()

    @contextmanager
    def pruned(self) -> Iterator[None]:
        yield
        for name, w in self.weights.items():
            if w.grad is not None:
                w.grad.mul_(self._float_masks[name])

    def after_optimizer_step(self) -> None:
        self._zero_pruned()

    def _zero_pruned(self) -> None:
        with torch.no_grad():
            for name, w in self.weights.items():
                w.mul_(self._float_masks[name])


def _build(model, recipe, total_steps: int) -> GMP:
    schedule, options = schedule_options(recipe, total_steps)
    return GMP(model, schedule, **options)


register("gmp", _build)
register("none", lambda model, recipe, total_steps: None)
