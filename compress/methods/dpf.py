"""Dynamic Pruning with Feedback (Lin, Stich, Barba, Dmitriev, Jaggi, ICLR 2020).

The dense weights ``w`` live for the whole run. Forward and backward use ``m ⊙ w``, but
the gradient, taken at the pruned point, is applied in full to the dense ``w``: weights
that are pruned keep learning and can come back at the next refresh (the "feedback").
Masks are recomputed every ``p`` steps from the dense magnitudes. Optimizer state and
weight decay act on the dense weights, because the optimizer only ever sees them.

This is done by swapping tensors, not by re-parametrising modules: inside `pruned()` the
parameters hold ``m ⊙ w``; on exit the dense values are put back, gradients untouched.
Any model and any optimizer work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from compress.methods.base import MaskPruner


class DPF(MaskPruner):
    """Straight-through masks: pruned weights get the full gradient."""

    feedback = True
    name = "dpf"

    @contextmanager
    def pruned(self) -> Iterator[None]:
        if not hasattr(self, "_dense_buffers"):
            self._dense_buffers = {n: torch.empty_like(w) for n, w in self.weights.items()}
        with torch.no_grad():
            for name, w in self.weights.items():
                self._dense_buffers[name].copy_(w)
                w.mul_(self._float_masks[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, w in self.weights.items():
                    w.copy_(self._dense_buffers[name])

    def dense_state(self) -> dict[str, torch.Tensor]:
        """The dense weights, which a resumed run needs to keep its feedback."""
        return {n: w.detach().clone() for n, w in self.weights.items()}
