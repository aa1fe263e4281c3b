"""One-shot filter pruning by norm (Li et al., "Pruning Filters for Efficient ConvNets").

Each channel group (a filter and everything coupled to it: its BatchNorm, the next layers'
inputs, the other branches of a residual sum) is scored by the L1 (``l1-filter``) or
squared L2 (``l2-filter``) magnitude of all its weights, summed over every coupled layer;
the lowest-scored channels are removed physically, so the network becomes thinner.

Default scope is ``layer``: every group loses the same share of its channels. A single
global ranking of raw norms would compare layers whose weights live on different scales
(their norms grow with fan-in), so ``global`` divides each group's scores by their mean
first; even so it can thin one layer far more than the others, which is why it is opt-in.

``target_macs`` replaces ``sparsity`` by a budget: the channel share is found by bisection
on trial copies so that the pruned model keeps at most that fraction of the dense MACs.
``budget_ms`` meets a latency *measured* in onnxruntime (`export.budget`). By default
(``allocation="latency"``) each group's width comes from a layer table and is corrected by
measurement (`compress.methods.latency_budget`); ``allocation="uniform"`` bisects one
share for every group instead, each trial exported and timed, and reports the curve of
(share, MACs, p50).
"""

from __future__ import annotations

import copy

from torch import nn

from compress.errors import CompressError
from compress.methods.latency_budget import LatencyBudget, LatencySearch, layer_channels
from compress.methods.registry import (
    OneShotPruner,
    OneShotRequest,
    OneShotResult,
    register,
)
from compress.selection import least_passing, pruned_count, select
from compress.stats import count_macs
from compress.structured.cutter import classes_of
from compress.structured.engine import (
    ChannelEngine,
    Structure,
    check_runs,
    count_params,
    fold_blocks,
    position_multiple,
    unfold_blocks,
)
from compress.structured.latency_allocation import check_table

SEARCH_STEPS = 12  # bisection steps for --target-macs: the share is found to 1/4096
BUDGET_STEPS = 6  # bisection steps for --budget-ms (each exports and times a model): 1/64
MAX_SHARE = 0.99


class FilterNorm(OneShotPruner):
    """Remove the channels with the smallest group norm (see module docstring)."""

    def __init__(self, request: OneShotRequest, norm: int) -> None:
        super().__init__(request)
        self.norm = norm

    def plan(self, engine: ChannelEngine, share: float) -> dict[str, list[int]]:
        """Channels to drop per group leader at channel ``share``."""
        r = self.request
        scores = engine.scores(self.norm)
        if not scores:
            protected = ", ".join(engine.names.get(m, "?") for m in
                                  engine.rules.ignored_layers) or "none"
            raise CompressError("the channel engine found no channel it may remove in this "
                                "model: every conv/linear layer is protected or coupled to a "
                                f"protected one (protected: {protected})")
        scope = r.scope or "layer"
        if scope == "global":
            scores = {k: s / s.mean().clamp_min(1e-12) for k, s in scores.items()}
        if r.min_channels is None and scope == "layer":
            for root, s in scores.items():
                if s.numel() - pruned_count(share, s.numel()) < 1:
                    raise CompressError(f"--sparsity {share} would leave layer {root} "
                                        f"({s.numel()} channels) with none; lower --sparsity "
                                        "or set --min-channels")
        groups = {g.root: g for g in engine.groups()}
        # grouped convs, GroupNorm and attention heads: every block loses the same positions,
        # and a position counts `blocks` channels toward the rounding multiple
        positions = {root: fold_blocks(s, groups[root].blocks) for root, s in scores.items()}
        multiples = {root: position_multiple(r.round_to, groups[root].blocks)
                     for root in scores}
        floor = r.min_channels or 1
        try:
            keep = select(positions, share, scope=scope, multiple=multiples, min_keep=1)
        except ValueError as exc:
            raise CompressError(str(exc)) from None
        plan = {}
        for root, mask in keep.items():
            blocks = groups[root].blocks
            dropped = sorted((~mask).nonzero().flatten().tolist(),
                             key=lambda p, s=positions[root]: float(s[p]))
            least = -(-floor // blocks)  # positions that keep at least `floor` channels
            while len(dropped) and mask.numel() - len(dropped) < least:
                dropped.pop()  # the floor takes back the best of the dropped positions
            plan[root] = unfold_blocks(dropped, groups[root].width, blocks)
        return plan

    def check(self, model: nn.Module) -> None:
        """Plan the cut once (without making it), so that a sparsity that would empty a
        layer or a model with nothing to cut is refused before any work is announced, and
        a given latency table that is not this model's too."""
        if self.request.sparsity is not None:
            self.plan(ChannelEngine(model, self.request.input_shape), self.request.sparsity)
        if self.request.latency_table is not None and self.request.allocation == "latency":
            check_table(self.request.latency_table, layer_channels(model))

    def prune(self, model: nn.Module, data=None) -> OneShotResult:
        r = self.request
        original = {"params": count_params(model), "macs": count_macs(model, r.input_shape)[0]}
        share, curve = r.sparsity, []
        if r.target_macs is not None:
            share = self._share_for_macs(model, original["macs"])
        trials, search = [], None
        if r.budget_ms is not None and r.allocation == "uniform":
            share, curve = self._share_for_budget(model)
        elif r.budget_ms is not None:
            search = LatencySearch(
                model, r.input_shape, LatencyBudget(r.budget_ms, r.latency, r.allocation,
                                                    r.latency_table, r.table_maker),
                ChannelEngine(model, r.input_shape).scores(self.norm),
                round_to=r.round_to, min_channels=r.min_channels or 1)
            trials = search.run()
        classes = classes_of(model, r.input_shape)
        engine = ChannelEngine(model, r.input_shape)
        widths = {g.root: g.width for g in engine.groups()}
        drop = search.chosen if search is not None else self.plan(engine, share)
        engine.remove(drop)
        check_runs(model, r.input_shape, classes)
        structure = Structure(engine.history,
                              {root: [widths[root], widths[root] - len(idxs)]
                               for root, idxs in drop.items()}, original)
        macs = count_macs(model, r.input_shape)[0]
        details = {"channel_sparsity": share, "params": count_params(model), "macs": macs,
                   "original_params": original["params"], "original_macs": original["macs"],
                   "mac_ratio": macs / original["macs"] if original["macs"] else None}
        notes = []
        if search is not None:
            details["latency_trials"] = trials
            details["channel_sparsity"] = search.channel_share()
            notes += search.notes()
        if curve:
            details["latency_curve"] = curve
            met = [c for c in curve if c["p50_ms"] <= r.budget_ms]
            notes.append(_budget_note(r.budget_ms, share, curve, bool(met)))
        if r.target_macs is not None and macs > r.target_macs * original["macs"]:
            notes.append(f"--target-macs {r.target_macs} was not reached: the widest cut the "
                         "rounding and floors allow keeps "
                         f"{macs / original['macs']:.3f}")
        return OneShotResult(structure=structure, notes=notes, details=details)

    def _share_for_macs(self, model: nn.Module, dense_macs: int) -> float:
        """The smallest channel share whose cut keeps at most ``target_macs`` of the MACs."""
        target = self.request.target_macs * dense_macs
        return least_passing(lambda share: self._macs_at(model, share) <= target, 0.0,
                             self._max_share(model), SEARCH_STEPS)

    def _max_share(self, model: nn.Module) -> float:
        """The largest share that leaves every group a channel (when no floor is set, the
        per-layer scope refuses shares that would empty a layer)."""
        if self.request.min_channels is not None or (self.request.scope or "layer") != "layer":
            return MAX_SHARE
        widths = [g.width for g in ChannelEngine(model, self.request.input_shape).groups()]
        return min([MAX_SHARE] + [(w - 1) / w for w in widths if w > 1])

    def _share_for_budget(self, model: nn.Module) -> tuple[float, list[dict]]:
        """The smallest channel share whose exported model's measured p50 meets the budget,
        and every trial measured on the way (sorted by share)."""
        budget, curve = self.request.budget_ms, []

        def p50_at(share: float) -> float:
            trial = self._cut_copy(model, share)
            p50 = float(self.request.latency(trial, self.request.input_shape))
            curve.append({"share": round(share, 4), "p50_ms": p50,
                          "macs": count_macs(trial, self.request.input_shape)[0]})
            return p50

        share = 0.0 if p50_at(0.0) <= budget else least_passing(
            lambda s: p50_at(s) <= budget, 0.0, self._max_share(model), BUDGET_STEPS)
        return share, sorted(curve, key=lambda c: c["share"])

    def _macs_at(self, model: nn.Module, share: float) -> int:
        return count_macs(self._cut_copy(model, share), self.request.input_shape)[0]

    def _cut_copy(self, model: nn.Module, share: float) -> nn.Module:
        """A copy of ``model`` with ``share`` of its channels cut (uncut at share 0): the
        trial each step of a budget search measures."""
        trial = copy.deepcopy(model)
        if share > 0:
            engine = ChannelEngine(trial, self.request.input_shape)
            engine.remove(self.plan(engine, share))
        return trial


def _budget_note(budget: float, share: float, curve: list[dict], met: bool) -> str:
    points = ", ".join(f"{c['share']:.3f}: {c['p50_ms']:.3f} ms" for c in curve)
    verdict = f"cut {share:.3f} of the channels to meet it" if met else \
        f"not met even at {share:.3f} of the channels cut"
    return f"--budget-ms {budget}: {verdict}; measured p50 by channel share: {points}"


def _checked(request: OneShotRequest) -> OneShotRequest:
    if request.target_macs is None and request.sparsity is None and request.budget_ms is None:
        raise CompressError("give --sparsity (share of channels removed), --target-macs or "
                            "--budget-ms")
    if request.budget_ms is not None and request.latency is None:
        raise CompressError("--budget-ms needs a latency meter (export.budget.latency_meter)")
    if request.allocation not in ("latency", "uniform"):
        raise CompressError(f"--allocation must be latency or uniform, got "
                            f"{request.allocation!r}")
    if request.budget_ms is not None and request.allocation == "latency" and \
            request.latency_table is None and request.table_maker is None:
        raise CompressError("--budget-ms with --allocation latency needs a layer table "
                            "(latency_table) or a maker of one (export.budget."
                            "layer_table_maker)")
    if request.round_to < 1:
        raise CompressError(f"--round-to must be at least 1, got {request.round_to}")
    if request.min_channels is not None and request.min_channels < 1:
        raise CompressError(f"--min-channels must be at least 1, got {request.min_channels}")
    return request


def _l1(request: OneShotRequest) -> FilterNorm:
    return FilterNorm(_checked(request), norm=1)


def _l2(request: OneShotRequest) -> FilterNorm:
    return FilterNorm(_checked(request), norm=2)


register("l1-filter", _l1)
register("l2-filter", _l2)
