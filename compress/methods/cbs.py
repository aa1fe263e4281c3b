"""One-shot second-order pruning: the Combinatorial Brain Surgeon (Yu et al., ICML 2022) and
WoodFisher (Singh & Alistarh, NeurIPS 2020), with their ablations.

The loss near the trained weights is modelled by the empirical Fisher of per-sample
gradients, block-diagonal over blocks of whole rows (`compress.second_order`). Then:

* **selection** — which weights go, with the exact global count:
  ``magnitude`` (smallest ``|w|``), ``woodfisher`` (smallest ``w_q² / [F_λ⁻¹]_qq``) or
  ``cbs``: the best of ``rmp_trials`` randomised magnitude masks (trial 0 is plain global
  magnitude; trial t shuffles the weights with seed t into about √d chunks and keeps each
  chunk's largest), then passes of swaps between pruned and kept weights that lower
  ``w_Pᵀ F w_P`` (undamped F) inside each block; after every pass the held-out loss is
  measured, and the mask with the lowest held-out loss over all passes (the randomised
  start included) is kept;
* **update** — how the weights that stay move: ``cbs`` (all pruned weights of a block
  removed together, `multi_weight_update`), ``woodfisher`` (the sum of single-weight
  updates, scaled by ``wf_scale``) or ``none``.

``cbs`` = cbs selection + cbs update, ``cbs-s`` = cbs selection alone, ``woodfisher`` =
woodfisher selection + update; ``magnitude --update cbs|woodfisher`` is the ablation with
magnitude selection. "Held-out" is the validation split carved from the training set, never
the test split. Pruned weights are exactly zero afterwards.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.data import first_batches
from compress.errors import CompressError
from compress.masks import magnitude_scores, prunable_weights
from compress.methods.registry import (
    OneShotPruner,
    OneShotRequest,
    OneShotResult,
    register,
)
from compress.modes import eval_mode
from compress.second_order import (
    Block,
    FisherBlock,
    SwapSettings,
    make_blocks,
    multi_weight_update,
    per_sample_gradients,
    single_weight_updates,
    swap_pass,
    woodfisher_scores,
)
from compress.selection import keep_top, pruned_count

GRADIENT_BATCH = 32
PATIENCE = 5  # passes without a better held-out loss before the search stops
MIN_SAMPLES = 16


@dataclass
class SecondOrderOptions:
    selection: str = "cbs"  # magnitude | woodfisher | cbs
    update: str = "cbs"  # cbs | woodfisher | none
    fisher_samples: int = 1000
    damp: float | None = None  # None: 1e-3 for networks without convs, 1e-5 with
    max_block: int = 1024
    rmp_trials: int = 50
    swaps: SwapSettings = field(default_factory=SwapSettings)
    wf_scale: float = 1.0
    heldout_samples: int = 1000


def default_damp(model: nn.Module) -> float:
    """The authors' damping: 1e-3 for their MLP, 1e-5 for their conv nets."""
    return 1e-5 if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()) \
        else 1e-3


class Blocks:
    """Per-block gradients, Fisher and damped inverse, computed once and shared by every
    sparsity of a sweep."""

    def __init__(self, blocks: list[Block], gradients: dict[Block, torch.Tensor],
                 damp: float) -> None:
        self.blocks, self.damp = blocks, damp
        self.fisher_blocks = {b: FisherBlock(gradients[b]) for b in blocks}
        self._fisher: dict[Block, torch.Tensor] = {}
        self._inverse: dict[Block, torch.Tensor] = {}

    def fisher(self, block: Block) -> torch.Tensor:
        if block not in self._fisher:
            self._fisher[block] = self.fisher_blocks[block].fisher()
        return self._fisher[block]

    def inverse(self, block: Block) -> torch.Tensor:
        if block not in self._inverse:
            self._inverse[block] = self.fisher_blocks[block].inverse(self.damp)
        return self._inverse[block]


class SecondOrder(OneShotPruner):
    """Selection and update from the empirical Fisher (module docstring)."""

    def __init__(self, request: OneShotRequest, options: SecondOrderOptions) -> None:
        super().__init__(request)
        self.options = options
        self.cache: Blocks | None = None  # reused across the levels of a sweep

    # -- checks -------------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        o = self.options
        weights = prunable_weights(model, self.request.coverage)
        if not weights:
            raise CompressError("the model has no conv or linear weights to prune")
        if o.fisher_samples < MIN_SAMPLES:
            raise CompressError(f"--fisher-samples {o.fisher_samples} is too few to estimate "
                                f"the Fisher; use at least {MIN_SAMPLES} (default 1000)")
        total = sum(w.numel() for w in weights.values())
        need = o.fisher_samples * total * 4 + 4 * o.max_block ** 2 * 8
        available = _available_memory()
        if available is not None and need > available:
            raise CompressError(f"the gradients of {o.fisher_samples} samples for {total:,} "
                                f"weights and blocks of {o.max_block} need about "
                                f"{need / 2**30:.1f} GiB and {available / 2**30:.1f} GiB is "
                                "free; lower --fisher-samples or --max-block")

    # -- the work -----------------------------------------------------------------------------
    def prune(self, model: nn.Module, data=None) -> OneShotResult:
        if data is None:
            raise CompressError(f"{self.options.selection} pruning needs training data")
        started = time.perf_counter()
        weights = prunable_weights(model, self.request.coverage)
        existing = {n: w.detach() != 0 for n, w in weights.items()}
        sparsity = self.request.sparsity
        total = sum(w.numel() for w in weights.values())
        if sum(int((~m).sum()) for m in existing.values()) / total > sparsity:
            raise CompressError(f"the model is already sparser than --sparsity {sparsity}; "
                                "one-shot pruning only removes weights")
        cache = self._blocks(model, weights, existing, data)
        heldout = _heldout(data, self.options.heldout_samples)
        dense = {n: w.detach().clone() for n, w in weights.items()}
        pruned, search = self._select(model, weights, dense, existing, cache, sparsity, heldout)
        self._update(weights, dense, pruned, cache)
        masks = {n: ~p for n, p in pruned.items()}
        details = {"fisher_samples": self.options.fisher_samples, "damp": cache.damp,
                   "blocks": len(cache.blocks),
                   "largest_block": max(b.size for b in cache.blocks),
                   "heldout_loss": _loss(model, heldout),
                   "second_order_seconds": time.perf_counter() - started,
                   "peak_memory_mb": _peak_mb(), **search}
        notes = [f"{self.options.selection} selection, {self.options.update} update, "
                 f"{len(cache.blocks)} Fisher blocks of at most "
                 f"{details['largest_block']} weights, damping {cache.damp:g}, "
                 f"{self.options.fisher_samples} gradient samples; peak memory "
                 f"{details['peak_memory_mb']:.0f} MB"]
        return OneShotResult(masks=masks, notes=notes, details=details)

    def _blocks(self, model, weights, existing, data) -> Blocks:
        if self.cache is not None:
            return self.cache
        o = self.options
        if len(data.train) < o.fisher_samples:
            raise CompressError(f"--fisher-samples {o.fisher_samples} is more than the "
                                f"{len(data.train)} training images there are")
        blocks = make_blocks({n: w.shape for n, w in weights.items()}, o.max_block)
        chunks: dict[Block, list[torch.Tensor]] = {b: [] for b in blocks}
        seen = 0
        for x, y in first_batches(data.train, o.fisher_samples, GRADIENT_BATCH):
            grads = per_sample_gradients(model, list(weights), x, y, existing)
            for b in blocks:
                chunks[b].append(grads[b.name][:, b.start:b.stop].clone())
            seen += len(y)
            if self.progress:
                self.progress("gradients", seen, o.fisher_samples)
        damp = o.damp if o.damp is not None else default_damp(model)
        self.cache = Blocks(blocks, {b: torch.cat(c) for b, c in chunks.items()}, damp)
        return self.cache

    # -- selection ----------------------------------------------------------------------------
    def _select(self, model, weights, dense, existing, cache, sparsity, heldout):
        o = self.options
        count = pruned_count(sparsity, sum(w.numel() for w in dense.values()))
        if o.selection == "magnitude":  # plain global magnitude is CBS's first start
            return _randomised_magnitude(dense, existing, count, trial=0), {}
        if o.selection == "woodfisher":
            scores = {n: torch.zeros(w.numel(), dtype=torch.float64) for n, w in dense.items()}
            for k, b in enumerate(cache.blocks):
                w = dense[b.name].flatten()[b.start:b.stop]
                scores[b.name][b.start:b.stop] = woodfisher_scores(
                    w, cache.inverse(b).diagonal())
                if self.progress:
                    self.progress("inverse Fisher (blocks)", k + 1, len(cache.blocks))
            return _global_lowest({n: s.view_as(dense[n]) for n, s in scores.items()},
                                  existing, count), {}
        return self._cbs_selection(model, weights, dense, existing, cache, count, heldout)

    def _cbs_selection(self, model, weights, dense, existing, cache, count, heldout):
        o = self.options
        best, best_loss, losses = None, math.inf, []
        for trial in range(max(1, o.rmp_trials)):
            mask = _randomised_magnitude(dense, existing, count, trial)
            loss = _masked_loss(model, weights, dense, mask, heldout)
            losses.append(loss)
            if loss < best_loss:
                best, best_loss = mask, loss
            if self.progress:
                self.progress("randomised starts", trial + 1, o.rmp_trials)
        chosen, chosen_loss, current = best, best_loss, best
        history, stale, swaps_total = [best_loss], 0, 0
        for step in range(o.swaps.max_passes):
            current, swaps = self._swap_all(current, dense, cache)
            swaps_total += swaps
            if swaps == 0:
                break
            loss = _masked_loss(model, weights, dense, current, heldout)
            history.append(loss)
            if self.progress:
                self.progress("swap passes", step + 1, o.swaps.max_passes)
            if loss < chosen_loss:
                chosen, chosen_loss, stale = current, loss, 0
            else:
                stale += 1
                if stale >= PATIENCE:
                    break
        return chosen, {"rmp_losses": losses, "pass_losses": history, "swaps": swaps_total,
                        "selected_heldout_loss": chosen_loss}

    def _swap_all(self, pruned, dense, cache) -> tuple[dict[str, torch.Tensor], int]:
        new = {n: p.clone() for n, p in pruned.items()}
        swaps = 0
        for b in cache.blocks:
            flat = new[b.name].view(-1)
            part = flat[b.start:b.stop]
            if part.all() or not part.any():
                continue
            w = dense[b.name].flatten()[b.start:b.stop]
            found, made = swap_pass(w, cache.fisher(b), part, self.options.swaps)
            flat[b.start:b.stop] = found
            swaps += made
        return new, swaps

    # -- update -------------------------------------------------------------------------------
    def _update(self, weights, dense, pruned, cache) -> None:
        o = self.options
        done = 0
        with torch.no_grad():
            for name, w in weights.items():
                flat = dense[name].flatten().clone()
                for b in (b for b in cache.blocks if b.name == name):
                    part = pruned[name].flatten()[b.start:b.stop]
                    done += 1
                    if self.progress and o.update != "none":
                        self.progress("weight update (blocks)", done, len(cache.blocks))
                    if o.update == "none" or not part.any():
                        continue
                    if o.update == "cbs":
                        flat[b.start:b.stop] = multi_weight_update(
                            flat[b.start:b.stop], cache.inverse(b), part)
                    else:
                        flat[b.start:b.stop] = single_weight_updates(
                            flat[b.start:b.stop], cache.inverse(b), part, o.wf_scale)
                flat[pruned[name].flatten()] = 0.0
                w.copy_(flat.view_as(w))


def _global_lowest(scores: dict[str, torch.Tensor], existing: dict[str, torch.Tensor],
                   count: int) -> dict[str, torch.Tensor]:
    """Pruned masks: the ``count`` lowest scores overall, already-zero weights first."""
    flat = torch.cat([torch.where(existing[n], s.double(), -math.inf).flatten()
                      for n, s in scores.items()])
    keep = keep_top(flat, flat.numel() - count)
    out, offset = {}, 0
    for n, s in scores.items():
        out[n] = ~keep[offset:offset + s.numel()].view_as(s)
        offset += s.numel()
    return out


def _randomised_magnitude(dense: dict[str, torch.Tensor], existing: dict[str, torch.Tensor],
                          count: int, trial: int) -> dict[str, torch.Tensor]:
    """Trial 0: global magnitude. Trial t: the weights shuffled (seed t) into ~√d chunks,
    each chunk pruned by magnitude in proportion, the exact total kept. Both rank the scores
    of `magnitude_scores`; the already-zero weights go first (one ranking over every layer
    with ``existing`` honoured, which `magnitude_masks` has no notion of)."""
    scores = magnitude_scores(dense)
    if trial == 0:
        return _global_lowest(scores, existing, count)
    flat = torch.cat([torch.where(existing[n], s.double(), -1.0).flatten()
                      for n, s in scores.items()])
    d = flat.numel()
    order = torch.randperm(d, generator=torch.Generator().manual_seed(trial))
    chunks = max(1, min(int(math.isqrt(d)), 1000))
    pruned = torch.zeros(d, dtype=torch.bool)
    taken = seen = 0
    for part in order.chunk(chunks):  # cumulative rounding: exact total, never over a chunk
        seen += part.numel()
        take = round(count * seen / d) - taken
        if take > 0:
            pruned[part[torch.topk(flat[part], take, largest=False).indices]] = True
        taken += take
    out, offset = {}, 0
    for n, s in scores.items():
        out[n] = pruned[offset:offset + s.numel()].view_as(s)
        offset += s.numel()
    return out


def _heldout(data, samples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``samples`` images of the validation split (held out from training)."""
    batches = first_batches(data.val, samples)
    if not batches:
        raise CompressError("CBS chooses its mask on the validation split, and it is empty; "
                            "set --val-fraction above 0")
    return batches


@torch.no_grad()
def _loss(model: nn.Module, batches) -> float:
    total, seen = 0.0, 0
    with eval_mode(model):
        for x, y in batches:
            total += float(F.cross_entropy(model(x), y, reduction="sum"))
            seen += len(y)
    return total / max(1, seen)


def _masked_loss(model, weights, dense, pruned, batches) -> float:
    """Held-out loss with ``pruned`` zeroed (no update), the weights restored afterwards."""
    with torch.no_grad():
        for n, w in weights.items():
            w.copy_(torch.where(pruned[n], torch.zeros_like(w), dense[n]))
        loss = _loss(model, batches)
        for n, w in weights.items():
            w.copy_(dense[n])
    return loss


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


SWAP_KEYS = ("epsilon", "rho", "tau")  # `SwapSettings` fields, given flat (as flags are)


def options_from(request: OneShotRequest, selection: str, update: str) -> SecondOrderOptions:
    """The method's options from the request's ``second_order`` mapping (the fields of
    `SecondOrderOptions`, with `SwapSettings`' given flat or as ``swaps``)."""
    extra = dict(request.second_order or {})
    swaps = {key: extra.pop(key) for key in SWAP_KEYS if key in extra}
    if swaps:
        extra["swaps"] = SwapSettings(**swaps)
    return SecondOrderOptions(selection=selection, update=extra.pop("update", None) or update,
                              **extra)


def _builder(selection: str, update: str) -> Callable[[OneShotRequest], SecondOrder]:
    def build(request: OneShotRequest) -> SecondOrder:
        if request.sparsity is None:
            raise CompressError("give --sparsity (share of prunable weights removed)")
        return SecondOrder(request, options_from(request, selection, update))
    return build


register("cbs", _builder("cbs", "cbs"))
register("cbs-s", _builder("cbs", "none"))
register("woodfisher", _builder("woodfisher", "woodfisher"))
