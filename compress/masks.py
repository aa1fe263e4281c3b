"""Which weights may be pruned, and magnitude masks with exact counts.

Rules, stated once and used by every method:

* Prunable tensors are the ``weight`` of ``Conv1d/2d/3d`` and ``Linear`` modules.
* Biases and normalisation layers are never pruned.
* The first conv/linear layer (the one that sees the input) and the classifier (the last
  linear or conv layer in module order) are prunable by default; either can be left dense
  with ``skip_first`` / ``skip_classifier``.
* "Sparsity" is always the fraction of zeros among the prunable weights; the count of
  pruned weights is ``round(sparsity * n)`` exactly, with ``torch.topk`` breaking ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.selection import select

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
DEFAULT_LAYER_FLOOR = 0.01  # a global threshold keeps at least 1 % of every layer


@dataclass(frozen=True)
class Coverage:
    """Which layers a pruner touches."""

    skip_first: bool = False
    skip_classifier: bool = False

    def describe(self) -> str:
        first = "dense" if self.skip_first else "pruned"
        last = "dense" if self.skip_classifier else "pruned"
        return (f"conv/linear weights; first layer {first}, classifier {last}; "
                "biases and norm layers never pruned")


def prunable_layers(model: nn.Module, coverage: Coverage = Coverage()) -> dict[str, nn.Module]:
    """Conv and linear modules whose weights may be pruned, by qualified name."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    if not layers:
        return {}
    chosen = dict(layers)
    if coverage.skip_first:
        chosen.pop(layers[0][0], None)
    if coverage.skip_classifier:
        chosen.pop(layers[-1][0], None)
    return chosen


def prunable_weights(model: nn.Module, coverage: Coverage = Coverage()) -> dict[str, nn.Parameter]:
    """The weight parameters of `prunable_layers`, keyed ``"<module>.weight"``."""
    return {f"{name}.weight": m.weight for name, m in prunable_layers(model, coverage).items()}


def layer_floor_for(floor: float | None, sparsity: float | None) -> float:
    """The floor a global threshold uses: ``floor`` when given (0 is the papers' exact
    rule), else 1 % of each layer, or half of what the sparsity leaves when that is less.
    A global threshold empties small layers at high sparsity otherwise, and an emptied layer
    makes the network's output constant."""
    if floor is not None:
        return floor
    return min(DEFAULT_LAYER_FLOOR, (1.0 - (sparsity or 0.0)) / 2)


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float,
                    scope: str = "global", layer_floor: float = 0.0) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that remove the smallest ``|w|`` at exactly ``sparsity``.

    ``scope="global"`` ranks all tensors together (one threshold); ``"layer"`` removes the
    same fraction from each tensor. ``layer_floor`` (global scope) makes every tensor keep
    at least that fraction of its weights (and at least one): its largest ones are kept
    first, the rest of the budget goes by the global ranking, so the total is still exact.
    A global threshold would otherwise empty a small layer at high sparsity.
    """
    return select(magnitude_scores(weights), sparsity, scope=scope, floor=layer_floor)


def magnitude_scores(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``|w|`` of each tensor (detached): the score every magnitude selection ranks by, here
    and in CBS's starts (`compress.methods.cbs`), which select from it their own way."""
    return {name: w.detach().abs() for name, w in weights.items()}


def mask_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of pruned entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0


def flip_fraction(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> float:
    """Fraction of mask entries that changed between two refreshes."""
    total = sum(m.numel() for m in new.values())
    flips = sum(int((old[k] != new[k]).sum()) for k in new)
    return flips / total if total else 0.0


def canonical_zeros(tensor: torch.Tensor) -> torch.Tensor:
    """Turn ``-0.0`` into ``+0.0`` (``w * mask`` leaves negative zeros behind)."""
    return torch.where(tensor == 0, torch.zeros_like(tensor), tensor)
