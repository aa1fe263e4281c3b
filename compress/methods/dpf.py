"""Dynamic Pruning with Feedback (Lin, Stich, Barba, Dmitriev, Jaggi, ICLR 2020).

The dense weights ``w`` live for the whole run. Forward and backward use ``m ⊙ w``, but
the gradient, taken at the pruned point, is applied in full to the dense ``w``: weights
that are pruned keep learning and can come back at the next refresh (the "feedback").
Masks are recomputed every ``p`` steps from the dense magnitudes. Optimizer state and
weight decay act on the dense weights, because the optimizer only ever sees them.

This is done by swapping tensors, not by re-parametrising modules: inside `pruned()` each
parameter points at a masked copy ``m ⊙ w``; on exit it points at the dense tensor again,
gradients untouched. Any model and any optimizer work unchanged, and the exported model
carries no pruning machinery.

``feedback_decay`` (default 0.01) shrinks the dense value of each *pruned* weight by that
fraction after every optimizer step, so the feedback remembers roughly the last
``1 / feedback_decay`` steps instead of all of them. Without it (``feedback_decay=0``, the
paper's rule) a pruned weight whose gradient keeps one sign grows without any check from
the loss, re-enters far too large, and at high sparsity the churn of such weights made
LeNet-5 on Fashion-MNIST lose 3 points to GMP at 98 % sparsity and, with a shorter
schedule, diverge (see README, "DPF: what we found"). Kept weights are never decayed
beyond the optimizer's own weight decay.

Each refresh also records ``pruned_max``, the largest dense magnitude among the weights the
outgoing mask pruned, next to ``kept_max``, the largest among those it kept: how far the
feedback let a pruned weight grow before it was ranked again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from compress.methods.base import MaskPruner, Refresh, schedule_options
from compress.methods.registry import register


@dataclass
class DPFRefresh(Refresh):
    """A refresh with the dense magnitudes under the mask it replaced."""

    pruned_max: float = 0.0
    kept_max: float = 0.0


class DPF(MaskPruner):
    """Straight-through masks: pruned weights get the full gradient."""

    name = "dpf"

    def __init__(self, *args, feedback_decay: float = 0.01, **kwargs) -> None:
        if not 0.0 <= feedback_decay < 1.0:
            raise ValueError(f"feedback_decay must be in [0, 1), got {feedback_decay}")
        self.feedback_decay = feedback_decay
        self._pruned_buffers: dict[str, torch.Tensor] = {}  # masked copies, reused per step
        super().__init__(*args, **kwargs)

    def refresh(self) -> DPFRefresh:
        pruned_max, kept_max = self._magnitudes()
        event = DPFRefresh(**vars(super().refresh()), pruned_max=pruned_max, kept_max=kept_max)
        self.history[-1] = event
        return event

    @torch.no_grad()
    def _magnitudes(self) -> tuple[float, float]:
        """Largest dense |w| among the pruned and among the kept weights of the current mask."""
        pruned, kept = 0.0, 0.0
        for name, w in self.weights.items():
            magnitude, mask = w.detach().abs(), self.masks[name]
            kept = max(kept, float(torch.where(mask, magnitude, 0.0).max()))
            if not mask.all():
                pruned = max(pruned, float(torch.where(mask, 0.0, magnitude).max()))
        return pruned, kept

    def after_refresh(self) -> None:
        # per-entry multiplier: 1 on kept weights, 1 - decay on pruned ones
        self._decay_factors = {n: 1.0 - self.feedback_decay * (1.0 - m)
                               for n, m in self._float_masks.items()}

    def after_optimizer_step(self) -> None:
        if self.feedback_decay > 0.0:
            with torch.no_grad():
                for name, w in self.weights.items():
                    w.mul_(self._decay_factors[name])

    @contextmanager
    def pruned(self) -> Iterator[None]:
        # Point each parameter at a masked copy, then back at the dense tensor: one pass
        # over the weights, and autograd keeps an untouched tensor for backward.
        dense = {n: w.data for n, w in self.weights.items()}
        buffers = self._pruned_buffers
        for name, w in self.weights.items():
            buf = buffers.get(name)
            if buf is None or buf.shape != w.shape or buf.device != w.device \
                    or buf.dtype != w.dtype:
                buf = buffers[name] = torch.empty_like(w.data)
            torch.mul(dense[name], self._float_masks[name], out=buf)
            w.data = buf
        self._pruned_buffers = buffers
        try:
            yield
        finally:
            for name, w in self.weights.items():
                w.data = dense[name]

    def state_dict(self) -> dict:
        """Masks and telemetry, plus the dense weights a resumed run needs for its feedback
        (the checkpoint's weights are the pruned ones)."""
        return {**super().state_dict(),
                "dense_weights": {n: w.detach().clone() for n, w in self.weights.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict({**state, "history": []})
        self.history = [DPFRefresh(**h) if "pruned_max" in h else Refresh(**h)
                        for h in state["history"]]
        dense = state.get("dense_weights") or {}
        with torch.no_grad():
            for name, w in self.weights.items():
                if name in dense:
                    w.copy_(dense[name])


def _build(model, recipe, total_steps: int) -> DPF:
    schedule, options = schedule_options(recipe, total_steps)
    return DPF(model, schedule, feedback_decay=recipe.feedback_decay, **options)


register("dpf", _build)
