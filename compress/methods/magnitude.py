"""One-shot global magnitude pruning of a trained model, then an optional fine-tune.

The mask is computed once from the trained weights and never changes; fine-tuning works
like `GMP` with a constant schedule (pruned weights stay at zero), see `FixedMask`.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import CompressError
from compress.masks import Coverage, mask_sparsity, prunable_weights
from compress.methods.gmp import GMP
from compress.methods.registry import (
    OneShotPruner,
    OneShotRequest,
    OneShotResult,
    register,
)
from compress.schedules import constant_schedule


class OneShotMagnitude(GMP):
    """Prune ``sparsity`` of the smallest weights now; keep that mask for good (the Python
    API's pruner; the registered one-shot method, `MagnitudeOneShot`, applies it once)."""

    name = "magnitude"

    def __init__(self, model: nn.Module, sparsity: float, *, scope: str = "global",
                 coverage: Coverage = Coverage(), layer_floor: float = 0.0) -> None:
        super().__init__(model, constant_schedule(sparsity), refresh_every=1, scope=scope,
                         coverage=coverage, freeze_step=0, layer_floor=layer_floor)


class FixedMask(GMP):
    """Hold given keep-masks during fine-tuning: pruned weights get no gradient and stay 0."""

    name = "fixed-mask"

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor],
                 coverage: Coverage = Coverage()) -> None:
        super().__init__(model, constant_schedule(mask_sparsity(masks)), refresh_every=1,
                         coverage=coverage, freeze_step=0)
        missing = set(self.weights) - set(masks)
        if missing:
            raise ValueError(f"no mask for {sorted(missing)}")
        self.masks = {n: masks[n].to(torch.bool).to(self.weights[n].device)
                      for n in self.weights}
        self._sync_mask_cache()
        self.history = []
        self.after_refresh()

    def refresh_due(self) -> bool:
        return False

    @classmethod
    def from_zeros(cls, model: nn.Module, coverage: Coverage = Coverage()) -> FixedMask:
        """Masks that keep every non-zero prunable weight (a sparse model stays sparse)."""
        masks = {n: w.detach() != 0 for n, w in prunable_weights(model, coverage).items()}
        return cls(model, masks, coverage)


class MagnitudeOneShot(OneShotPruner):
    """Global (or per-layer) magnitude masks at exactly the requested sparsity: the mask of
    `OneShotMagnitude`, whose construction also zeroes the pruned weights."""

    def prune(self, model: nn.Module, data=None) -> OneShotResult:
        r = self.request
        weights = prunable_weights(model, r.coverage)
        if not weights:
            raise CompressError("the model has no conv or linear weights to prune")
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        total = sum(w.numel() for w in weights.values())
        if zeros / total > r.sparsity:
            raise CompressError(f"the model is already {zeros / total:.4f} sparse, more than "
                                f"--sparsity {r.sparsity}; one-shot pruning only removes "
                                "weights")
        try:
            pruner = OneShotMagnitude(model, r.sparsity, scope=r.scope or "global",
                                      coverage=r.coverage, layer_floor=r.layer_floor)
        except ValueError as exc:
            raise CompressError(str(exc)) from None
        return OneShotResult(masks=pruner.masks, notes=[f"coverage: {r.coverage.describe()}"])


def _build(request: OneShotRequest) -> OneShotPruner:
    """Plain magnitude; with ``--update cbs|woodfisher`` the second-order ablation (magnitude
    selection, then the weights that stay are moved)."""
    update = (request.second_order or {}).get("update") or "none"
    if update != "none":
        from compress.methods.cbs import SecondOrder, options_from

        return SecondOrder(request, options_from(request, "magnitude", update))
    return MagnitudeOneShot(request)


register("magnitude", _build)
