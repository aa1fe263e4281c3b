"""Cutting channels in the middle of training: the model, its optimizer and the record.

A pruner that thins a network while it trains (`density`, `dpf-filter`) owns one
`TrainingCutter`. Each `cut` removes channels through the channel engine, points the
optimizer at the new parameters with its momentum cut the same way (so the learning rate
schedule and the optimizer carry on as if nothing but the channels had gone), checks the
thinner model still runs, and extends the `Structure` a checkpoint stores.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import CompressError
from compress.modes import eval_mode
from compress.stats import count_macs
from compress.structured.engine import (
    ChannelEngine,
    Structure,
    check_runs,
    count_params,
    move_optimizer_state,
)


@dataclass
class CutEvent:
    """Channels cut at ``step``: ``widths[root] = [before, after]``."""

    step: int
    sparsity: float
    widths: dict[str, list[int]]
    kind: str = "cut"


class TrainingCutter:
    """Channel cuts of one training run (see module docstring)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        self.model = model
        self.input_shape = tuple(input_shape)
        self.optimizer: torch.optim.Optimizer | None = None
        self._engine: ChannelEngine | None = None
        self.original = {"params": count_params(model),
                         "macs": count_macs(model, self.input_shape)[0]}
        self.structure: Structure | None = None  # the cuts made by this process
        self.classes: int | None = None
        self.start_widths: dict[str, int] = {}

    @property
    def engine(self) -> ChannelEngine:
        """The engine, traced once on first use; torch-pruning's graph follows every cut."""
        if self._engine is None:
            self._engine = ChannelEngine(self.model, self.input_shape)
            self.start_widths = self.widths()
            if not self.start_widths:
                raise CompressError("the channel engine found no channel it may remove in "
                                    "this model")
        return self._engine

    def widths(self) -> dict[str, int]:
        return {g.root: g.width for g in self.engine.groups()}

    def cut(self, drop: dict[str, list[int]]) -> dict[str, list[int]]:
        """Remove ``drop[root]`` channels of each group; return the widths [before, after]."""
        drop = {root: idxs for root, idxs in drop.items() if idxs}
        if not drop:
            return {}
        if self.classes is None:
            self.classes = classes_of(self.model, self.input_shape)
        before = dict(self.model.named_parameters())
        widths = self.widths()
        kept = self.engine.remove(drop)
        if self.optimizer is not None:
            move_optimizer_state(self.optimizer, before, self.model, kept)
        check_runs(self.model, self.input_shape, self.classes)
        changed = {root: [widths[root], widths[root] - len(idxs)]
                   for root, idxs in drop.items()}
        record = Structure(list(self.engine.history), {}, dict(self.original))
        first = {} if self.structure is None else self.structure.widths
        record.widths = {**first, **{r: [first.get(r, w)[0], w[1]]
                                     for r, w in changed.items()}}
        self.structure = record
        return changed

    def latency_after(self, drop: dict[str, list[int]],
                      latency: Callable[[nn.Module, tuple[int, ...]], float]) -> float:
        """The p50 (ms) ``latency`` measures for the model with ``drop`` cut, on a copy."""
        trial = copy.deepcopy(self.model)
        engine = ChannelEngine(trial, self.input_shape)
        engine.remove({root: idxs for root, idxs in drop.items() if idxs})
        return float(latency(trial, self.input_shape))

    def removed_share(self) -> float:
        """Share of the prunable channels this run has cut so far."""
        start = sum(self.start_widths.values())
        return 1.0 - sum(self.widths().values()) / start if start else 0.0

    def macs(self) -> int:
        return count_macs(self.model, self.input_shape)[0]


def classes_of(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """How many outputs the model gives (a cut must not change it)."""
    with eval_mode(model), torch.no_grad():
        out = model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    return int(out.shape[-1])
