"""``--budget-ms`` with ``--allocation latency``: each channel group's width chosen from a
layer table, then corrected by measuring the exported model until its p50 meets the budget.

The table's prediction (`compress.structured.latency_allocation`) is scaled to the measured
p50 of the uncut model, so that what the table leaves out (pooling, reshapes, the runtime's
per-call overhead) is carried as a share. Each trial cuts a copy of the model to the
allocated widths, exports and times it (the budget's latency meter); while the measured p50
is over the budget, the target handed to the allocation is lowered (`_next_target`: by the
ratio of budget to measurement, or further where the last two trials' line says so), up to
`MAX_TRIALS` times. Every trial's predicted and measured p50 is
reported.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import CompressError
from compress.stats import count_macs
from compress.structured.engine import (
    ChannelEngine,
    fold_blocks,
    position_multiple,
    unfold_blocks,
)
from compress.structured.latency_allocation import (
    GroupLayers,
    LatencyModel,
    allocate,
    check_table,
)

MAX_TRIALS = 5


@dataclass
class LatencyBudget:
    """What a latency budget needs: the p50 (ms) to meet, a meter ((model, input shape) ->
    p50 ms, `export.budget.latency_meter`), and for ``allocation="latency"`` a layer table,
    given or made by ``table_maker`` ((model, input shape) -> table)."""

    budget_ms: float
    latency: Callable
    allocation: str = "latency"
    table: dict | None = None
    table_maker: Callable | None = None


@dataclass
class LatencyTools:
    """How a training run measures for its budget (the caller's meter and table, or table
    maker), until its recipe, perhaps read back on resume, says the budget."""

    latency: Callable
    table: dict | None = None
    table_maker: Callable | None = None


def layer_channels(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every conv and linear layer's (input, output) channels, by module name."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            found[name] = (module.in_channels, module.out_channels)
        elif isinstance(module, nn.Linear):
            found[name] = (module.in_features, module.out_features)
    return found


class LatencySearch:
    """Widths for ``budget.budget_ms`` from a layer table (see the module). ``scores``: the
    method's own score of each channel of the groups it may narrow (root -> one value per
    channel, higher is kept first); ``start``: positions each group keeps before the search
    narrows it further (default: all), so a method can hand over its own widths as a
    ceiling; ``thinned``: the model may be narrower than the one the table was made for (an
    earlier cut), the table's grid covering its widths."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], budget: LatencyBudget,
                 scores: dict[str, torch.Tensor], *, round_to: int = 1,
                 min_channels: int = 1, start: dict[str, int] | None = None,
                 thinned: bool = False) -> None:
        self.model, self.shape, self.budget = model, tuple(input_shape), budget
        self.chosen: dict[str, list[int]] = {}
        self.trials: list[dict] = []
        self.met = False
        self.table_source = "given" if budget.table_maker is None else "made here"
        if not scores:
            raise CompressError("the channel engine found no channel it may remove in this "
                                "model")
        engine = ChannelEngine(model, self.shape)
        self.groups = {g.root: g for g in engine.groups() if g.root in scores}
        layers = layer_channels(model)
        table = budget.table if budget.table is not None else \
            budget.table_maker(copy.deepcopy(model), self.shape)
        check_table(table, layers, thinned=thinned)
        self.latency_model = LatencyModel(table, layers, {
            root: (group.width, _group_layers(engine, root, layers))
            for root, group in self.groups.items()})
        self.blocks = {root: g.blocks for root, g in self.groups.items()}
        self.step = {root: position_multiple(round_to, b) for root, b in self.blocks.items()}
        self.floor = {root: max(1, math.ceil(min_channels / b))
                      for root, b in self.blocks.items()}
        self.start = start
        self.scores = scores
        self.dense_predicted = self.latency_model.predict(
            {root: g.width for root, g in self.groups.items()})
        self.scale = 1.0  # measured ms per predicted ms, set by `run`
        self.target = self.dense_predicted  # in the table's ms, corrected by `run`

    def run(self) -> list[dict]:
        """Search, leaving the chosen cut in `chosen` and the corrected target (in the
        table's ms) in `target`; returns the trials."""
        budget = self.budget.budget_ms
        dense_ms, macs = self._measure({})  # a copy: the model may be in mid-training
        self.scale = dense_ms / self.dense_predicted
        self.trials.append({"trial": 0, "predicted_ms": dense_ms, "measured_ms": dense_ms,
                            "macs": macs})
        if dense_ms <= budget and self.start is None:
            self.met = True
            return self.trials
        least = self.allocate(0.0).predicted_ms * self.scale
        if least > budget:
            raise CompressError(f"--budget-ms {budget:g} cannot be met: the latency table "
                                f"predicts {least:.3f} ms at the narrowest widths the floors "
                                f"allow (the uncut model measures {dense_ms:.3f} ms)")
        self.target = budget / self.scale
        self.correct(self.scores, MAX_TRIALS)
        return self.trials

    def correct(self, scores: dict[str, torch.Tensor], trials: int,
                stage: str | None = None) -> None:
        """Allocate at `target`, measure, and lower the target by budget / measured until
        the measured p50 meets the budget (at most ``trials`` trials; ``stage`` labels them
        in `trials`)."""
        budget = self.budget.budget_ms
        for _ in range(trials):
            found = self.allocate(self.target, scores)
            plan = self.plan(found.kept, scores)
            measured, macs = self._measure(plan)
            self.trials.append({"trial": len(self.trials), **({"stage": stage} if stage else {}),
                                "predicted_ms": found.predicted_ms * self.scale,
                                "measured_ms": measured, "macs": macs,
                                "kept": {k: v * self.blocks[k] for k, v in found.kept.items()}})
            self.chosen = plan
            self.met = measured <= budget
            if self.met or found.predicted_ms > self.target:
                break  # met, or the floors stop the allocation short: no narrower cut
            self.target = self._next_target()

    def _next_target(self) -> float:
        """The lower of two corrections: the target scaled by budget / measured, and the
        predicted time where the line through the last two trials (predicted against
        measured) reaches the budget. The line carries what the table cannot see and does
        not shrink with the widths (quantize and dequantize steps of an int8 file, the
        runtime's per-call cost), which the ratio alone approaches only slowly."""
        budget = self.budget.budget_ms
        (p1, m1), (p2, m2) = [(t["predicted_ms"] / self.scale, t["measured_ms"])
                              for t in self.trials[-2:]]
        lowered = self.target * budget / m2
        if p1 <= p2 or m1 <= m2:
            return lowered  # no usable slope (noise, or the floors)
        slope = max((m1 - m2) / (p1 - p2), 0.1 * self.scale)
        return max(0.0, min(lowered, p2 - (m2 - budget) / slope))

    def allocate(self, target: float, scores: dict[str, torch.Tensor] | None = None):
        """The widths (positions kept per group) whose predicted latency meets ``target``
        (the table's ms), by ``scores`` (default: the search's)."""
        scores = self.scores if scores is None else scores
        positions = {root: fold_blocks(s, self.blocks[root]) for root, s in scores.items()}
        return allocate(self.latency_model, positions, target, self.step, self.floor,
                        self.blocks, start=self.start)

    def plan(self, kept: dict[str, int], scores: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        """Channels to cut per group: its lowest-scored positions beyond ``kept``."""
        found = {}
        for root, values in scores.items():
            positions = fold_blocks(values, self.blocks[root])
            drop = torch.argsort(positions)[: len(positions) - kept[root]]
            found[root] = unfold_blocks(sorted(drop.tolist()), self.groups[root].width,
                                        self.blocks[root])
        return found

    def _measure(self, plan: dict[str, list[int]]) -> tuple[float, int]:
        trial = copy.deepcopy(self.model)
        ChannelEngine(trial, self.shape).remove({r: i for r, i in plan.items() if i})
        return float(self.budget.latency(trial, self.shape)), count_macs(trial, self.shape)[0]

    def channel_share(self) -> float:
        """The share of the groups' channels the chosen cut removes."""
        total = sum(g.width for g in self.groups.values())
        return sum(len(v) for v in self.chosen.values()) / total if total else 0.0

    def notes(self) -> list[str]:
        points = "; ".join(f"trial {t['trial']}{' (' + t['stage'] + ')' if 'stage' in t else ''}"
                           f": predicted {t['predicted_ms']:.3f} ms, measured "
                           f"{t['measured_ms']:.3f} ms" for t in self.trials)
        verdict = "met" if self.met else "not met (the last trial is kept)"
        return [f"--budget-ms {self.budget.budget_ms:g} {verdict}, widths allocated by a "
                f"latency table ({self.table_source}); {points}"]


def _group_layers(engine: ChannelEngine, root: str,
                  layers: dict[str, tuple[int, int]]) -> GroupLayers:
    """The conv and linear layers whose outputs, and whose inputs, group ``root`` is."""
    found = GroupLayers()
    for name, out, _ in engine.members(root):
        if name in layers:
            (found.outputs if out else found.inputs).append(name)
    return found
