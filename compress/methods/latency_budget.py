"""``--budget-ms`` with ``--allocation latency``: each channel group's width chosen from a
layer table, then corrected by measuring the exported model until its p50 meets the budget.

The table's prediction (`compress.structured.latency_allocation`) is scaled to the measured
p50 of the uncut model, so that what the table leaves out (pooling, reshapes, the runtime's
per-call overhead) is carried as a share. Each trial cuts a copy of the model to the
allocated widths, exports and times it (the request's latency meter); while the measured p50
is over the budget, the target handed to the allocation is lowered by the ratio of budget
to measurement, up to `MAX_TRIALS` times. Every trial's predicted and measured p50 is
reported.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from compress.errors import CompressError
from compress.methods.registry import OneShotRequest
from compress.stats import count_macs
from compress.structured.engine import (
    ChannelEngine,
    ChannelGroup,
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
    """Widths for ``request.budget_ms`` from a layer table (see the module); ``norm`` scores
    the channels as the method does (1: L1, 2: squared L2)."""

    def __init__(self, model: nn.Module, request: OneShotRequest, norm: int) -> None:
        self.model, self.request, self.norm = model, request, norm
        self.chosen: dict[str, list[int]] = {}
        self.trials: list[dict] = []
        self.met = False
        self.table_source = "given" if request.latency_table is not None else "made here"
        self._widths: dict[str, int] = {}

    def run(self) -> list[dict]:
        """Search, leaving the chosen cut in `chosen`; returns the trials."""
        r = self.request
        shape = r.input_shape
        engine = ChannelEngine(self.model, shape)
        groups = {g.root: g for g in engine.groups()}
        scores = engine.scores(self.norm)
        if not scores:
            raise CompressError("the channel engine found no channel it may remove in this "
                                "model")
        layers = layer_channels(self.model)
        table = r.latency_table if r.latency_table is not None else \
            r.table_maker(self.model, shape)
        check_table(table, layers)
        model = LatencyModel(table, layers, {
            root: (groups[root].width, _group_layers(engine, root, layers))
            for root in scores})
        positions = {root: fold_blocks(s, groups[root].blocks) for root, s in scores.items()}
        blocks = {root: groups[root].blocks for root in scores}
        step = {root: position_multiple(r.round_to, blocks[root]) for root in scores}
        floor = {root: max(1, math.ceil((r.min_channels or 1) / blocks[root]))
                 for root in scores}
        self._widths = {root: groups[root].width for root in scores}
        dense_ms = float(r.latency(self.model, shape))
        scale = dense_ms / model.predict(self._widths)
        self.trials.append({"trial": 0, "predicted_ms": dense_ms, "measured_ms": dense_ms,
                            "macs": count_macs(self.model, shape)[0]})
        if dense_ms <= r.budget_ms:
            self.met = True
            return self.trials
        least = allocate(model, positions, 0.0, step, floor, blocks).predicted_ms * scale
        if least > r.budget_ms:
            raise CompressError(f"--budget-ms {r.budget_ms:g} cannot be met: the latency table "
                                f"predicts {least:.3f} ms at the narrowest widths the floors "
                                f"allow (the uncut model measures {dense_ms:.3f} ms)")
        target = r.budget_ms / scale
        for trial in range(1, MAX_TRIALS + 1):
            found = allocate(model, positions, target, step, floor, blocks)
            plan = _plan(found.kept, positions, groups)
            measured, macs = self._measure(plan)
            self.trials.append({"trial": trial, "predicted_ms": found.predicted_ms * scale,
                                "measured_ms": measured, "macs": macs,
                                "kept": {k: v * blocks[k] for k, v in found.kept.items()}})
            self.chosen = plan
            if measured <= r.budget_ms:
                self.met = True
                break
            if found.predicted_ms > target:
                break  # the floors stop the allocation short of its target: no narrower cut
            target *= r.budget_ms / measured
        return self.trials

    def _measure(self, plan: dict[str, list[int]]) -> tuple[float, int]:
        trial = copy.deepcopy(self.model)
        ChannelEngine(trial, self.request.input_shape).remove(plan)
        return float(self.request.latency(trial, self.request.input_shape)), \
            count_macs(trial, self.request.input_shape)[0]

    def channel_share(self) -> float:
        """The share of the groups' channels the chosen cut removes."""
        total = sum(self._widths.values())
        return sum(len(v) for v in self.chosen.values()) / total if total else 0.0

    def notes(self) -> list[str]:
        points = "; ".join(f"trial {t['trial']}: predicted {t['predicted_ms']:.3f} ms, "
                           f"measured {t['measured_ms']:.3f} ms" for t in self.trials)
        verdict = "met" if self.met else f"not met in {MAX_TRIALS} trials (the last is kept)"
        return [f"--budget-ms {self.request.budget_ms:g} {verdict}, widths allocated by a "
                f"latency table ({self.table_source}); {points}"]


def _group_layers(engine: ChannelEngine, root: str,
                  layers: dict[str, tuple[int, int]]) -> GroupLayers:
    """The conv and linear layers whose outputs, and whose inputs, group ``root`` is."""
    found = GroupLayers()
    for name, out, _ in engine.members(root):
        if name in layers:
            (found.outputs if out else found.inputs).append(name)
    return found


def _plan(kept: dict[str, int], positions: dict[str, torch.Tensor],
          groups: dict[str, ChannelGroup]) -> dict[str, list[int]]:
    """Channels to cut per group: its lowest-scored positions beyond ``kept``."""
    plan = {}
    for root, scores in positions.items():
        drop = torch.argsort(scores)[: len(scores) - kept[root]].tolist()
        plan[root] = unfold_blocks(sorted(drop), groups[root].width, groups[root].blocks)
    return plan
