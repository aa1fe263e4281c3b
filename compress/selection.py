"""One selection rule for every method: keep the highest scores, with exact counts.

Scoring (what a method believes matters), granularity (single weights or whole channels)
and the budget (one threshold over everything, or the same share per layer, with a floor)
are kept apart: a method computes ``scores`` and calls `select`, which knows nothing about
where the scores came from.

* Element selection: ``scores`` are full tensors (``|w|`` for magnitude pruning), and
  exactly ``round(sparsity × n)`` entries are dropped (``torch.topk``, ties by index).
* Channel selection: ``scores`` are 1-D, one entry per channel group. Kept counts are
  rounded to a ``multiple`` (hardware-friendly widths) and never fall below ``min_keep``.

``scope="global"`` ranks all entries together; ``"layer"`` drops the same fraction from
each tensor. ``floor`` (global scope) reserves that share of each tensor's best entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SCOPES = ("global", "layer")


def pruned_count(sparsity: float, total: int) -> int:
    """Exact number of entries to remove out of ``total`` at ``sparsity``."""
    return min(total, int(round(sparsity * total)))


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest entries of ``scores`` (same shape)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[torch.topk(scores.flatten(), keep, sorted=False).indices] = True
    return mask.view_as(scores)


def _check(sparsity: float, scope: str) -> None:
    if not (math.isfinite(sparsity) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def least_passing(passes: Callable[[float], bool], low: float, high: float,
                  steps: int) -> float:
    """The least value in [low, high] at which ``passes`` holds, found by ``steps`` halvings
    (``passes`` is taken to hold from some point on); ``high`` when it fails there too."""
    if not passes(high):
        return high
    for _ in range(steps):
        middle = (low + high) / 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high


def round_width(keep: int, width: int, multiple: int, min_keep: int) -> int:
    """``keep`` rounded to the nearest ``multiple`` (ties up), within [min_keep, width].

    A layer narrower than ``multiple`` cannot be made thinner and still be a multiple, so it
    keeps its width when ``keep`` would round to zero."""
    if multiple > 1:
        keep = int(math.floor(keep / multiple + 0.5)) * multiple
        keep = max(keep, min(multiple, width))
    return min(width, max(keep, min_keep))


def select(scores: dict[str, torch.Tensor], sparsity: float, *, scope: str = "global",
           floor: float = 0.0, multiple: int | dict[str, int] = 1,
           min_keep: int = 0) -> dict[str, torch.Tensor]:
    """Boolean keep-masks shaped like ``scores`` that drop the lowest-scored entries.

    Counts are exact when ``multiple == 1`` and ``min_keep == 0``; otherwise each tensor's
    kept count is then rounded by `round_width` (the total moves by the rounding only).
    ``multiple`` may differ per tensor (a dict by name).
    """
    _check(sparsity, scope)
    with torch.no_grad():
        if scope == "layer":
            keeps = {name: s.numel() - pruned_count(sparsity, s.numel())
                     for name, s in scores.items()}
        else:
            keeps = _global_keeps(scores, sparsity, floor)
        multiples = multiple if isinstance(multiple, dict) else dict.fromkeys(scores, multiple)
        keeps = {name: round_width(k, scores[name].numel(), multiples.get(name, 1), min_keep)
                 for name, k in keeps.items()}
        return {name: keep_top(s.detach().float(), keeps[name]) for name, s in scores.items()}


def _global_keeps(scores: dict[str, torch.Tensor], sparsity: float,
                  floor: float) -> dict[str, int]:
    """How many entries of each tensor one global threshold keeps (floor reserved first)."""
    flat = torch.cat([s.detach().flatten().float() for s in scores.values()])
    keep = flat.numel() - pruned_count(sparsity, flat.numel())
    if floor > 0:
        flat = _reserve_floor(flat, scores, floor, keep)
    chosen = keep_top(flat, keep)
    keeps, offset = {}, 0
    for name, s in scores.items():
        keeps[name] = int(chosen[offset:offset + s.numel()].sum())
        offset += s.numel()
    return keeps


def _reserve_floor(flat: torch.Tensor, scores: dict[str, torch.Tensor], floor: float,
                   keep: int) -> torch.Tensor:
    """Scores with each tensor's ``floor`` share of largest entries raised to +inf."""
    reserved = {name: max(1, int(floor * s.numel())) for name, s in scores.items()}
    if sum(reserved.values()) > keep:
        raise ValueError(f"a layer floor of {floor} keeps more entries "
                         f"({sum(reserved.values())}) than the sparsity target allows ({keep})")
    raised, offset = flat.clone(), 0
    for name, s in scores.items():
        segment = raised[offset:offset + s.numel()]
        segment[torch.topk(segment, reserved[name], sorted=False).indices] = float("inf")
        offset += s.numel()
    return raised
