"""DPF with whole channels as the unit (``dpf-filter``; Lin et al., ICLR 2020, the filter
variant), removed physically once the mask is final.

Each channel group of the channel engine (a filter and everything whose output it shares:
its norm layer, the other branches of a residual sum) is scored by the root mean square of
its *dense* output-side weights (the norm of the filters divided by their size, so that
wide and narrow layers compare in one global ranking). The cubic schedule, the refresh
period, the straight-through mask and the feedback to pruned channels are DPF's
(`compress.methods.dpf`): forward and backward see the masked network, the full gradient
reaches the dense values of pruned channels, and a channel can come back.

A masked channel has its filters *and* its norm layer's scale and shift at zero, so it
outputs exactly zero and removing it changes nothing. (Masking the filter alone would leave
BatchNorm normalising an all-zero channel: its output would be the shift, and the gradient
to the filter would be scaled by ``1/sqrt(eps)``.) Because the scale is masked, the filters
of a pruned channel receive no gradient through the loss; its scale and shift do, and they
decide whether it returns.

Once the mask is frozen (``freeze_at``, by default when the schedule reaches its target) the
masked channels are cut through the engine, with the optimizer's state, so the last part of
training and the exported model run on the thinner dense network.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.distributed import from_first_process
from compress.methods.base import Refresh, schedule_options
from compress.methods.dpf import DPF
from compress.methods.latency_budget import MAX_TRIALS, LatencyBudget, LatencySearch
from compress.methods.registry import register
from compress.schedules import CubicSchedule
from compress.selection import least_passing, select
from compress.structured.cutter import CutEvent, TrainingCutter
from compress.structured.engine import fold_blocks, position_multiple, unfold_blocks

BUDGET_STEPS = 6  # halvings of the channel share searched for --budget-ms
MAX_BUDGET_SHARE = 0.95
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm,
          nn.InstanceNorm2d)


class DPFFilter(DPF):
    """Straight-through channel masks, then a physical cut (see module docstring)."""

    name = "dpf-filter"
    granularity = "channels"

    def __init__(self, model: nn.Module, schedule: CubicSchedule,
                 input_shape: tuple[int, ...], *, refresh_every: int = 16,
                 scope: str = "layer", feedback_decay: float = 0.01,
                 freeze_step: int | None = None, round_to: int = 8,
                 min_channels: int = 1, share_is_floor: bool = True) -> None:
        """``share_is_floor``: the schedule's final share is a floor under a budget's cut
        (a --sparsity was given); False: the budget alone decides how far to cut."""
        self.round_to, self.min_channels = round_to, min_channels
        self.cutter = TrainingCutter(model, input_shape)
        self.removed = False
        self.budget_curve: list[dict] = []  # p50 by channel share, --allocation uniform
        self.search: LatencySearch | None = None  # --budget-ms, --allocation latency
        self.share_is_floor = share_is_floor
        super().__init__(model, schedule, refresh_every=refresh_every, scope=scope,
                         feedback_decay=feedback_decay, freeze_step=freeze_step)

    def maskable_weights(self) -> dict[str, nn.Parameter]:
        """The parameters of every layer whose output carries a maskable group's channels;
        sets the groups, their slices and all-kept channel masks on the way."""
        self.groups = {g.root: g for g in self.cutter.engine.groups()}
        self.slices = self._output_slices()
        self.keep = {root: torch.ones(g.width, dtype=torch.bool) for root, g in
                     self.groups.items() if root in self.slices}
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in sorted({n for s in self.slices.values()
                                              for n, _, _ in s})}

    def _output_slices(self) -> dict[str, list[tuple[str, int, torch.Tensor]]]:
        """Per group: (parameter, dimension, index of each channel) of every layer whose
        output carries the group's channels. Groups with another kind of output layer (an
        attention block, say) cannot be masked exactly and are left alone."""
        modules = dict(self.model.named_modules())
        found = {}
        for root in self.groups:
            slices, maskable = [], True
            for name, is_out, idxs in self.cutter.engine.members(root):
                module = modules[name]
                if not is_out or not list(module.parameters(recurse=False)):
                    continue
                if not isinstance(module, (*_CONV, nn.Linear, *_NORMS)):
                    maskable = False
                    break
                index = torch.as_tensor(idxs)
                for pname, _ in module.named_parameters(recurse=False):
                    slices.append((f"{name}.{pname}" if name else pname, 0, index))
            if maskable and slices:
                found[root] = slices
        return found

    # -- scoring and masking ------------------------------------------------------------------
    def channel_scores(self) -> dict[str, torch.Tensor]:
        """Root mean square of each channel's dense output-side weights."""
        scores = {}
        with torch.no_grad():
            for root, slices in self.slices.items():
                total = torch.zeros(self.groups[root].width)
                count = 0
                for name, dim, index in slices:
                    part = self.weights[name].detach().index_select(dim, index.to(
                        self.weights[name].device)).float().cpu()
                    total += part.pow(2).flatten(1).sum(1) if part.dim() > 1 else part.pow(2)
                    count += part[0].numel() if part.dim() > 1 else 1
                scores[root] = (total / count).sqrt()
        return scores

    def refresh(self) -> Refresh:
        target = self.schedule(self.step_count)
        scores = self.channel_scores()
        if self.search is not None:
            drop = self._latency_drop(scores)
        else:
            drop = self._share_drop(scores, target)
        keep = {}
        for root, dropped in drop.items():
            keep[root] = torch.ones(self.groups[root].width, dtype=torch.bool)
            keep[root][dropped] = False
        flips = sum(int((keep[r] != self.keep[r]).sum()) for r in keep) / \
            max(1, sum(k.numel() for k in keep.values()))
        self.keep = keep
        self.masks = self._parameter_masks()
        self._sync_mask_cache()
        event = Refresh(self.step_count, self.sparsity if self.search is not None else target,
                        self.sparsity, flips)
        self.history.append(event)
        self.after_refresh()
        return event

    def _share_drop(self, scores: dict[str, torch.Tensor], share: float,
                    scope: str | None = None) -> dict[str, list[int]]:
        """The lowest-scored ``share`` of the channels (per layer or globally, by scope)."""
        positions = {r: fold_blocks(s, self.groups[r].blocks) for r, s in scores.items()}
        multiples = {r: position_multiple(self.round_to, self.groups[r].blocks)
                     for r in scores}
        chosen = select(positions, share, scope=scope or self.scope, multiple=multiples,
                        min_keep=self.min_channels)
        return {root: unfold_blocks((~mask).nonzero().flatten().tolist(),
                                    self.groups[root].width, self.groups[root].blocks)
                for root, mask in chosen.items()}

    def _latency_drop(self, scores: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        """Widths allocated by the layer table at this step's predicted latency: the cubic
        ramp taken from the uncut model's prediction down to the search's target."""
        s, search = self.schedule, self.search
        progress = CubicSchedule(1.0, s.start_step, s.end_step)(self.step_count)
        target = search.dense_predicted - progress * (search.dense_predicted - search.target)
        return search.plan(search.allocate(target, scores).kept, scores)

    def _parameter_masks(self) -> dict[str, torch.Tensor]:
        masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in self.weights.items()}
        for root, slices in self.slices.items():
            dropped = (~self.keep[root]).nonzero().flatten()
            for name, dim, index in slices:
                masks[name].index_fill_(dim, index[dropped].to(masks[name].device), False)
        return masks

    def set_budget(self, budget: LatencyBudget) -> None:
        """Cut at least as far as ``budget`` needs. ``allocation="latency"``: widths from
        the layer table (`LatencySearch`), the target found by measuring cuts of the
        starting model, ramped in predicted ms and corrected again by measurement before the
        final cut; ``"uniform"``: the final channel share raised to the least (bisected,
        every layer cut alike) whose network meets the budget."""
        if budget.allocation == "uniform":
            self._uniform_budget(budget)
            return
        scores = self.channel_scores()
        search = LatencySearch(self.model, self.cutter.input_shape, budget, scores,
                               round_to=self.round_to, min_channels=self.min_channels)
        search.run()
        if self.share_is_floor:  # a --sparsity given as well may ask for a deeper cut
            share = self._share_drop({r: torch.arange(len(v), dtype=torch.float32)
                                      for r, v in scores.items()},
                                     self.schedule.final_sparsity, scope="layer")
            search.target = min(search.target, search.latency_model.predict(
                {r: self.groups[r].width - len(share.get(r, [])) for r in search.groups}))
        self.search = search

    def _uniform_budget(self, budget: LatencyBudget) -> None:
        def p50(share: float) -> float:
            scores = {r: torch.arange(g.width, dtype=torch.float32)
                      for r, g in self.groups.items() if r in self.slices}
            keep = select(scores, share, scope="layer", multiple={
                r: position_multiple(self.round_to, self.groups[r].blocks)
                for r in scores}, min_keep=self.min_channels)
            drop = {r: (~k).nonzero().flatten().tolist() for r, k in keep.items()}
            value = self.cutter.latency_after(drop, budget.latency)
            self.budget_curve.append({"share": round(share, 4), "p50_ms": value})
            return value

        self.budget_curve = []
        if self.share_is_floor and p50(self.schedule.final_sparsity) <= budget.budget_ms:
            return
        high = least_passing(lambda share: p50(share) <= budget.budget_ms, 0.0,
                             MAX_BUDGET_SHARE, BUDGET_STEPS)
        if high > self.schedule.final_sparsity or not self.share_is_floor:
            s = self.schedule
            self.schedule = CubicSchedule(high, s.start_step, s.end_step, s.initial_sparsity)

    @property
    def sparsity(self) -> float:
        """Share of the masked groups' channels that are pruned (or were cut)."""
        if self.removed:
            return self.cutter.removed_share()
        total = sum(k.numel() for k in self.keep.values())
        return 1.0 - sum(int(k.sum()) for k in self.keep.values()) / total if total else 0.0

    # -- the physical cut ---------------------------------------------------------------------
    def step(self):
        event = super().step()
        if event is None and not self.removed and self.step_count > self.freeze_step:
            return self.finalize()
        return event

    def finalize(self) -> CutEvent | None:
        """Cut the masked channels (once); an event with the new widths, or None."""
        if self.removed:
            return None
        if self.search is not None:
            self._final_correction()
        self.apply_masks()
        drop = from_first_process(
            lambda: {root: (~k).nonzero().flatten().tolist() for root, k in self.keep.items()})
        sparsity = self.sparsity
        widths = self.cutter.cut(drop)
        self._forget_masks()
        return CutEvent(self.step_count, sparsity, widths)

    def _final_correction(self) -> None:
        """Measure the widths the trained scores give at the target and, while over the
        budget, lower the target and allocate again (`LatencySearch.correct`)."""
        scores = self.channel_scores()
        self.search.correct(scores, MAX_TRIALS, stage="final")
        self.keep = {}
        for root, dropped in self.search.chosen.items():
            self.keep[root] = torch.ones(self.groups[root].width, dtype=torch.bool)
            self.keep[root][dropped] = False
        self.masks = self._parameter_masks()
        self._sync_mask_cache()

    def _forget_masks(self) -> None:
        self.removed = True
        self.weights, self.masks, self._float_masks, self._decay_factors = {}, {}, {}, {}
        self._pruned_buffers = {}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "removed": self.removed,
                "final_sparsity": self.schedule.final_sparsity,  # a budget may have raised it
                "keep": {r: k.clone() for r, k in self.keep.items()},
                **({"latency_target": self.search.target, "latency_trials": self.search.trials}
                   if self.search is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        s = self.schedule
        self.schedule = CubicSchedule(float(state.get("final_sparsity", s.final_sparsity)),
                                      s.start_step, s.end_step, s.initial_sparsity)
        if self.search is not None and "latency_target" in state:
            self.search.target = float(state["latency_target"])
            self.search.trials = list(state["latency_trials"])
        if state.get("removed"):
            self.step_count = int(state["step_count"])
            self.history = [Refresh(**h) for h in state["history"]]
            self._forget_masks()
            return
        super().load_state_dict(state)
        self.keep = {r: k.to(torch.bool) for r, k in state["keep"].items()}

    def summary(self) -> dict:
        found = {"channels_removed_share": self.sparsity, "cuts": int(self.removed),
                 "widths": self.cutter.widths()}
        if self.share_is_floor or self.search is None:
            found["target_channel_sparsity"] = self.schedule.final_sparsity
        if self.search is not None:
            found["latency_trials"] = self.search.trials
            found["notes"] = self.search.notes()
        if self.budget_curve:
            found["budget_curve"] = self.budget_curve
            points = ", ".join(f"{c['share']:.3f}: {c['p50_ms']:.3f} ms"
                               for c in sorted(self.budget_curve, key=lambda c: c["share"]))
            found["notes"] = [f"--budget-ms: final channel share "
                              f"{self.schedule.final_sparsity:.3f}; p50 measured by share "
                              f"(every layer cut alike): {points}"]
        return found


def _build(model: nn.Module, recipe, total_steps: int) -> DPFFilter:
    schedule, options = schedule_options(recipe, total_steps)
    return DPFFilter(model, schedule, tuple(recipe.input_shape),
                     refresh_every=options["refresh_every"], scope=recipe.scope or "layer",
                     feedback_decay=recipe.feedback_decay, freeze_step=options["freeze_step"],
                     round_to=recipe.round_to, min_channels=recipe.min_channels or 1,
                     share_is_floor=recipe.sparsity is not None or recipe.budget_ms is None)


register("dpf-filter", _build)
