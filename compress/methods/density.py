"""Activation-density pruning (ADP; Foldy-Porto, Venkatesha, Panda, 2020), during training.

A trained ReLU layer whose activations are mostly zero carries fewer channels' worth of
information than it has channels. ADP measures each layer's activation density (the share
of non-zero post-ReLU activations, `compress.structured.activation_density`) on a fixed
probe set from the training split and, at a few points of the run, cuts the layer to
``ceil(density × width)`` channels, keeping the channels whose own density is highest
(ties by the norm of their weights). The network is rebuilt thinner in place, the optimizer
carries on with its state for the kept channels, and the learning-rate schedule continues,
so the rest of training runs (and costs) at the new width.

What the paper states and what is ours (README, "ADP: what is the paper's"):

* paper: density of post-ReLU activations; width ``ceil(density × width)``; keep the
  densest channels; repeat while training until the widths settle; wait for densities to
  settle before the first cut;
* ours (flags, defaults in `compress.recipe.Recipe`): measured in eval mode on
  ``probe_samples`` training images; a measurement every quarter of ``density_every``,
  from just before ``density_start`` until the last cut (a probe pass costs time);
  "settled" = no layer density moved more than ``density_tolerance`` since the previous
  measurement; cuts no earlier than ``density_start`` and no later than ``density_stop``
  (fractions of the run), at least ``density_every`` apart, at most ``density_cuts`` of
  them (or, with ``density_until_settled``, until a cut would change no width); widths
  rounded up to ``round_to`` channels and never below ``min_channels``; channels joined by
  additions or concatenations share one width (they are one group of the engine).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from compress.distributed import from_first_process
from compress.errors import CompressError
from compress.methods.base import TrainingPruner
from compress.methods.latency_budget import LatencyBudget, LatencySearch, layer_channels
from compress.methods.registry import register
from compress.selection import least_passing
from compress.structured.activation_density import (
    DensityReading,
    density_width,
    has_activations,
    measure,
    read_layout,
)
from compress.structured.cutter import TrainingCutter
from compress.structured.engine import fold_blocks, unfold_blocks
from compress.structured.latency_allocation import check_table

MEASUREMENTS_PER_INTERVAL = 4  # densities are read this many times per --density-every
BUDGET_STEPS = 6  # bisection steps on the density scale that meets --budget-ms


@dataclass
class DensityOptions:
    """ADP's settings, built from a recipe (`options_from`), whose declarations hold the
    defaults, so none are repeated here."""

    probe_samples: int
    start: float
    every: float
    stop: float
    cuts: int
    until_settled: bool
    tolerance: float
    round_to: int
    min_channels: int


@dataclass
class DensityEvent:
    """A measurement, and the cut it led to (``widths`` empty when none)."""

    step: int
    layers: dict[str, float]
    channels: dict[str, list[float]]
    change: float | None  # largest layer-density change since the last reading (None: none)
    widths: dict[str, list[int]]
    kind: str = "density"


class ActivationDensity(TrainingPruner):
    """Thins a network while it trains, from its activation densities (module docstring)."""

    name = "density"
    granularity = "channels"
    needs_probe = True

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], total_steps: int,
                 options: DensityOptions) -> None:
        if not has_activations(model):
            raise CompressError("density pruning reads post-ReLU activations, and this model "
                                "has no ReLU, ReLU6, Hardswish or Threshold module")
        self.model = model
        self.options = options
        self.total_steps = total_steps
        self.cutter = TrainingCutter(model, input_shape)
        self.cutter.engine  # noqa: B018 - trace now, so that a model it cannot trace fails early
        interval = max(1, round(options.every * total_steps))
        self.measure_every = max(1, interval // MEASUREMENTS_PER_INTERVAL)
        self.cut_gap = interval
        self.start_step = round(options.start * total_steps)
        self.stop_step = round(options.stop * total_steps)
        self.probe: list[torch.Tensor] = []
        self.step_count = 0
        self.cuts_done = 0
        self.last_cut_step: int | None = None
        self.finished = False
        self.last_reading: DensityReading | None = None
        self.history: list[dict] = []  # per measurement: step, layer densities, widths
        self._layout = None
        self.masks: dict[str, torch.Tensor] = {}  # no masks: the network itself gets thinner
        self.budget: LatencyBudget | None = None
        self.budget_curve: list[dict] = []  # --allocation uniform: p50 by density scale
        self.search: LatencySearch | None = None  # --allocation latency
        self.budget_note = ""

    # -- wiring -------------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer, probe: list[torch.Tensor]) -> None:
        """The optimizer to keep in step with the cuts, and the fixed probe batches."""
        super().attach(optimizer, probe)
        self.probe = probe

    def set_budget(self, budget: LatencyBudget) -> None:
        """A floor on how far to cut: the last cut goes deeper than the densities say when
        the network they give would miss ``budget.budget_ms``. ``allocation="latency"``: the
        density widths are narrowed further where the layer table says time is saved for
        the least density lost (`LatencySearch`, the densities as scores, the density
        widths as ceilings), measured and corrected; ``"uniform"``: every density scaled
        down alike by a bisected factor. The table is made (or checked) here, on the
        starting model, so that a wrong one fails before training."""
        if budget.allocation == "latency":
            if budget.table is None:
                budget.table = budget.table_maker(copy.deepcopy(self.model),
                                                  self.cutter.input_shape)
            check_table(budget.table, layer_channels(self.model))
        self.budget = budget

    # -- the schedule -------------------------------------------------------------------------
    def step(self) -> DensityEvent | None:
        """Call after each optimizer step: measure when due, and cut when due and settled."""
        self.step_count += 1
        o = self.options
        if not o.until_settled and self.cuts_done >= o.cuts:
            self.finished = True  # no cut left: measuring would only cost time
        if self.finished or self.step_count > self.stop_step or \
                self.step_count < self.start_step - self.measure_every or \
                self.step_count % self.measure_every:
            return None
        return self.measure_and_cut()

    def cut_due(self) -> bool:
        o = self.options
        if self.finished or not self.start_step <= self.step_count <= self.stop_step:
            return False
        if not o.until_settled and self.cuts_done >= o.cuts:
            return False
        return self.last_cut_step is None or self.step_count - self.last_cut_step >= self.cut_gap

    def measure_and_cut(self) -> DensityEvent:
        if not self.probe:
            raise CompressError("density pruning needs its probe batches: call attach() first")
        if self._layout is None:
            self._layout = read_layout(self.cutter.engine)
        reading = from_first_process(
            lambda: measure(self.cutter.engine, self.probe, self._layout))
        change = reading.change_from(self.last_reading)
        self.last_reading = reading
        widths: dict[str, list[int]] = {}
        if self.cut_due() and change <= self.options.tolerance:
            widths = self.cutter.cut(self._with_budget(reading))
            if widths:
                self._layout = None  # the cut changed who reads what
                self.cuts_done += 1
                self.last_cut_step = self.step_count
                self.last_reading = None  # the thinner network must settle again
            else:
                self.finished = True  # no width would change: the widths have settled
        event = DensityEvent(self.step_count, reading.layers,
                             {r: [round(float(v), 4) for v in d]
                              for r, d in reading.channels.items()},
                             change if math.isfinite(change) else None, widths)
        self.history.append({"step": self.step_count, "layers": reading.layers,
                             "widths": dict(self._layout.widths) if self._layout else
                             self.cutter.widths(), "cut": bool(widths)})
        return event

    def _last_cut(self) -> bool:
        o = self.options
        return not o.until_settled and self.cuts_done + 1 >= o.cuts

    def _with_budget(self, reading: DensityReading) -> dict[str, list[int]]:
        """The density plan; at the last cut under a budget, every density scaled down by the
        largest factor whose network meets the budget (bisected by `least_passing`, the search
        every budget uses, on the depth ``1 - factor``)."""
        plan = self.plan(reading)
        if self.budget is None or not self._last_cut():
            return plan
        p50 = self.cutter.latency_after(plan, self.budget.latency)
        self.budget_curve = [{"scale": 1.0, "p50_ms": p50}]
        if p50 <= self.budget.budget_ms:
            return plan
        if self.budget.allocation == "latency":
            return self._latency_plan(reading, plan)
        trials: dict[float, dict[str, list[int]]] = {}

        def meets(depth: float) -> bool:
            """Whether the densities scaled by ``1 - depth`` give a network within budget.
            Depth 1 (scale 0: every layer at its floor) is what is left when no other depth
            meets it, and is not measured."""
            if depth == 1.0:
                return True
            scale = 1.0 - depth  # exact: the bisection only visits multiples of 2**-steps
            trials[scale] = trial = self.plan(reading, scale=scale)
            p50 = self.cutter.latency_after(trial, self.budget.latency)
            self.budget_curve.append({"scale": scale, "p50_ms": p50})
            return p50 <= self.budget.budget_ms

        scale = 1.0 - least_passing(meets, 0.0, 1.0, BUDGET_STEPS)
        return trials[scale] if scale in trials else self.plan(reading, scale=0.0)

    def _latency_plan(self, reading: DensityReading,
                      plan: dict[str, list[int]]) -> dict[str, list[int]]:
        """The density plan narrowed by the layer table until the measured p50 meets the
        budget; the narrowest widths the floors allow when the table says it cannot be."""
        groups = {g.root: g for g in self.cutter.engine.groups()}
        norms = self.cutter.engine.scores(2)
        scores = {root: density.float() + 1e-6 * norms[root] / norms[root].max().clamp_min(
            1e-12) for root, density in reading.channels.items()}  # ties by the larger norm
        start = {root: (groups[root].width - len(plan.get(root, []))) // groups[root].blocks
                 for root in scores}
        o = self.options
        self.search = LatencySearch(self.model, self.cutter.input_shape, self.budget, scores,
                                    round_to=o.round_to, min_channels=o.min_channels,
                                    start=start, thinned=self.cuts_done > 0)
        try:
            self.search.run()
        except CompressError as exc:  # unreachable: the floors are as near as it gets
            self.budget_note = f"{exc}; the narrowest widths were kept"
            return self.search.plan(self.search.allocate(0.0).kept, scores)
        return self.search.chosen

    # -- the width rule -----------------------------------------------------------------------
    def plan(self, reading: DensityReading, scale: float = 1.0) -> dict[str, list[int]]:
        """Channels to drop per group: width from the layer density, densest channels kept
        (ties by the group's L2 norm), whole positions of every block in grouped layers."""
        o = self.options
        groups = {g.root: g for g in self.cutter.engine.groups()}
        norms = self.cutter.engine.scores(2)
        drop = {}
        for root, density in reading.channels.items():
            group = groups[root]
            keep = density_width(scale * float(density.mean()), group.width,
                                 round_to=o.round_to,
                                 floor=o.min_channels, blocks=group.blocks)
            positions = fold_blocks(density, group.blocks)
            ties = fold_blocks(norms[root], group.blocks)
            drop[root] = unfold_blocks(_lowest(positions, ties, keep // group.blocks),
                                       group.width, group.blocks)
        return drop

    # -- results ------------------------------------------------------------------------------
    @property
    def sparsity(self) -> float:
        """Share of the original prunable channels removed so far."""
        return self.cutter.removed_share()

    def pruned_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict:
        last = self.last_reading
        return {"method": self.name, "step_count": self.step_count,
                "cuts_done": self.cuts_done, "last_cut_step": self.last_cut_step,
                "finished": self.finished, "history": self.history,
                "last_reading": None if last is None else
                {r: d.clone() for r, d in last.channels.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.cuts_done = int(state["cuts_done"])
        self.last_cut_step = state["last_cut_step"]
        self.finished = bool(state["finished"])
        self.history = list(state["history"])
        last = state.get("last_reading")
        self.last_reading = None if last is None else DensityReading(dict(last))

    def summary(self) -> dict:
        widths = self.cutter.widths()
        found = {"cuts": self.cuts_done, "widths": widths,
                 "channels_removed_share": self.sparsity,
                 "measurements": len(self.history)}
        if self.search is not None:
            found["latency_trials"] = self.search.trials
            found["notes"] = self.search.notes() + ([self.budget_note] if self.budget_note
                                                    else [])
        elif self.budget is not None:
            found["budget_curve"] = self.budget_curve
            points = ", ".join(f"x{c['scale']:.3f}: {c['p50_ms']:.3f} ms"
                               for c in self.budget_curve)
            if points:
                found["notes"] = [f"--budget-ms {self.budget.budget_ms}: p50 measured at the last "
                                  f"cut by density scale: {points}"]
            if self.cuts_done < self.options.cuts and not self.options.until_settled:
                found["notes"] = [f"--budget-ms {self.budget.budget_ms}: only {self.cuts_done} of "
                                  f"{self.options.cuts} cut(s) happened (the densities did not "
                                  "settle in time), so the budget floor was not applied"]
        return found


def _lowest(density: torch.Tensor, norm: torch.Tensor, keep: int) -> list[int]:
    """Positions outside the ``keep`` densest (ties broken by the larger norm)."""
    order = sorted(range(density.numel()), key=lambda i: (-float(density[i]), -float(norm[i]), i))
    return sorted(order[keep:])


def options_from(recipe) -> DensityOptions:
    return DensityOptions(
        probe_samples=recipe.probe_samples, start=recipe.density_start,
        every=recipe.density_every, stop=recipe.density_stop, cuts=recipe.density_cuts,
        until_settled=recipe.density_until_settled, tolerance=recipe.density_tolerance,
        round_to=recipe.round_to, min_channels=recipe.min_channels or 1)


def _build(model: nn.Module, recipe, total_steps: int) -> ActivationDensity:
    return ActivationDensity(model, tuple(recipe.input_shape), total_steps,
                             options_from(recipe))


register("density", _build)
