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

import itertools
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.data import first_batches
from compress.errors import CompressError
from compress.fisher_stream import GRADIENT_BATCH, FisherStream, least_memory
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
    SwapSettings,
    damped_inverse,
    make_blocks,
    multi_weight_update,
    single_weight_updates,
    swap_pass,
    woodfisher_scores,
)
from compress.selection import keep_top, pruned_count

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
    max_memory_gb: float | None = None  # None: half the memory free when the method starts


def default_damp(model: nn.Module) -> float:
    """The authors' damping: 1e-3 for their MLP, 1e-5 for their conv nets."""
    return 1e-5 if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()) \
        else 1e-3


class SecondOrder(OneShotPruner):
    """Selection and update from the empirical Fisher (module docstring). Under torchrun each
    process computes its share of the gradients (`compress.fisher_stream`)."""

    runs_across_processes = True

    def __init__(self, request: OneShotRequest, options: SecondOrderOptions) -> None:
        super().__init__(request)
        self.options = options
        self.stream: FisherStream | None = None  # reused across the levels of a sweep
        self._inverses: dict[Block, torch.Tensor] = {}  # kept beside the Fisher where both fit

    # -- checks -------------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        o = self.options
        weights = prunable_weights(model, self.request.coverage)
        if not weights:
            raise CompressError("the model has no conv or linear weights to prune")
        if o.fisher_samples < MIN_SAMPLES:
            raise CompressError(f"--fisher-samples {o.fisher_samples} is too few to estimate "
                                f"the Fisher; use at least {MIN_SAMPLES} (default 1000)")
        self._memory_cap(model, self._blocks_of(weights))

    def _blocks_of(self, weights: dict[str, torch.Tensor]) -> list[Block]:
        return make_blocks({n: w.shape for n, w in weights.items()}, self.options.max_block)

    def _memory_cap(self, model: nn.Module, blocks: list[Block]) -> int:
        """Bytes the Fisher blocks may take at once: ``--max-memory-gb``, else half the free
        memory; one line when even one block does not fit."""
        o = self.options
        need = least_memory(blocks, {n: int(p.numel()) for n, p in model.named_parameters()})
        if o.max_memory_gb is not None:
            cap = int(o.max_memory_gb * 2**30)
            if cap < need:
                raise CompressError(f"--max-memory-gb {o.max_memory_gb:g} is below what one "
                                    f"Fisher block needs: at least "
                                    f"{math.ceil(need / 2**30 * 100) / 100:.2f} (or lower "
                                    "--max-block)")
            return cap
        available = _available_memory()
        if available is not None and need > available:
            raise CompressError(f"one Fisher block of {o.max_block} weights needs about "
                                f"{need / 2**30:.2f} GiB and {available / 2**30:.2f} GiB is "
                                "free; lower --max-block")
        return max(need, available // 2) if available is not None else max(need, 8 * 2**30)

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
        stream = self._stream(model, weights, existing, data)
        passes_before = stream.gradient_passes
        damp = self._damp(model)
        heldout = _heldout(data, self.options.heldout_samples)
        dense = {n: w.detach().clone() for n, w in weights.items()}
        pruned, search = self._select(model, weights, dense, existing, stream, sparsity,
                                      heldout)
        self._update(weights, dense, pruned, stream, damp)
        masks = {n: ~p for n, p in pruned.items()}
        passes = stream.gradient_passes - passes_before
        details = {"fisher_samples": self.options.fisher_samples, "damp": damp,
                   "blocks": len(stream.blocks),
                   "largest_block": max(b.size for b in stream.blocks),
                   "fisher_groups": len(stream.groups), "gradient_passes": passes,
                   "processes": self.shard.world,
                   "heldout_loss": _loss(model, heldout),
                   "second_order_seconds": time.perf_counter() - started,
                   "peak_memory_mb": _peak_mb(), **search}
        grouping = f"in {len(stream.groups)} groups ({passes} gradient passes)" \
            if stream.streamed else "all at once"
        notes = [f"{self.options.selection} selection, {self.options.update} update, "
                 f"{len(stream.blocks)} Fisher blocks of at most "
                 f"{details['largest_block']} weights {grouping}, damping {damp:g}, "
                 f"{self.options.fisher_samples} gradient samples over {self.shard.world} "
                 f"process(es); peak memory {details['peak_memory_mb']:.0f} MB"]
        return OneShotResult(masks=masks, notes=notes, details=details)

    def _stream(self, model, weights, existing, data) -> FisherStream:
        if self.stream is not None:
            return self.stream
        o = self.options
        if len(data.train) < o.fisher_samples:
            raise CompressError(f"--fisher-samples {o.fisher_samples} is more than the "
                                f"{len(data.train)} training images there are")
        blocks = self._blocks_of(weights)
        batches = first_batches(data.train, o.fisher_samples, GRADIENT_BATCH)
        self.stream = FisherStream(model, blocks, batches, existing,
                                   self._memory_cap(model, blocks), self.shard,
                                   self.progress)
        return self.stream

    def _damp(self, model: nn.Module) -> float:
        return self.options.damp if self.options.damp is not None else default_damp(model)

    def _inverse(self, block: Block, fisher: torch.Tensor, damp: float) -> torch.Tensor:
        """The block's damped inverse; kept with the Fisher when both fit."""
        if block in self._inverses:
            return self._inverses[block]
        inverse = damped_inverse(fisher, damp)
        if self.stream.keeps_inverses:
            self._inverses[block] = inverse
        return inverse

    def _report(self, stage: str, done: Iterator[int], total: int) -> None:
        """One more block of ``stage`` done (``done`` counts the stage's blocks from 1)."""
        count = next(done)
        if self.progress:
            self.progress(stage, count, total)

    # -- selection ----------------------------------------------------------------------------
    def _select(self, model, weights, dense, existing, stream, sparsity, heldout):
        o = self.options
        count = pruned_count(sparsity, sum(w.numel() for w in dense.values()))
        if o.selection == "magnitude":  # plain global magnitude is CBS's first start
            return _randomised_magnitude(dense, existing, count, trial=0), {}
        if o.selection == "woodfisher":
            scores = {n: torch.zeros(w.numel(), dtype=torch.float64) for n, w in dense.items()}
            damp, done = self._damp(model), itertools.count(1)

            def score(b: Block, fisher: torch.Tensor) -> None:
                w = dense[b.name].flatten()[b.start:b.stop]
                scores[b.name][b.start:b.stop] = woodfisher_scores(
                    w, self._inverse(b, fisher, damp).diagonal())
                self._report("inverse Fisher (blocks)", done, len(stream.blocks))

            stream.each_block(score)
            return _global_lowest({n: s.view_as(dense[n]) for n, s in scores.items()},
                                  existing, count), {}
        return self._cbs_selection(model, weights, dense, existing, stream, count, heldout)

    def _cbs_selection(self, model, weights, dense, existing, stream, count, heldout):
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
        searches = self._block_searches(best, dense, stream)
        chosen, chosen_loss = best, best_loss
        history, stale, swaps_total = [best_loss], 0, 0
        for step in range(o.swaps.max_passes):
            current, swaps = _after_pass(best, searches, step + 1)
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

    def _block_searches(self, start, dense, stream) -> dict[Block, list[tuple]]:
        """Each block's swap passes from ``start`` until one makes no swap: ``[(mask after
        the pass, swaps made), ...]``. A pass depends on its own block alone, so running
        each block's passes group by group gives the masks that interleaved passes over
        all blocks would."""
        searches, done = {}, itertools.count(1)

        def search(b: Block, fisher: torch.Tensor) -> None:
            part = start[b.name].flatten()[b.start:b.stop]
            searches[b] = _search_block(dense[b.name].flatten()[b.start:b.stop], fisher, part,
                                        self.options.swaps)
            self._report("swap search (blocks)", done, len(stream.blocks))

        stream.each_block(search)
        return searches

    # -- update -------------------------------------------------------------------------------
    def _update(self, weights, dense, pruned, stream, damp: float) -> None:
        o = self.options
        flat = {n: w.flatten().clone() for n, w in dense.items()}
        done = itertools.count(1)

        def move(b: Block, fisher: torch.Tensor) -> None:
            part = pruned[b.name].flatten()[b.start:b.stop]
            self._report("weight update (blocks)", done, len(stream.blocks))
            if not part.any():
                return
            inverse = self._inverse(b, fisher, damp)
            block = flat[b.name][b.start:b.stop]
            flat[b.name][b.start:b.stop] = multi_weight_update(block, inverse, part) \
                if o.update == "cbs" else \
                single_weight_updates(block, inverse, part, o.wf_scale)

        if o.update != "none":
            stream.each_block(move)
        with torch.no_grad():
            for name, w in weights.items():
                flat[name][pruned[name].flatten()] = 0.0
                w.copy_(flat[name].view_as(w))


def _search_block(w: torch.Tensor, fisher: torch.Tensor, part: torch.Tensor,
                  settings: SwapSettings) -> list[tuple[torch.Tensor, int]]:
    """One block's swap passes until one makes no swap (or ``max_passes``): the mask after
    each pass that made swaps, and how many it made."""
    if part.all() or not part.any():
        return []
    passes = []
    for _ in range(settings.max_passes):
        part, swaps = swap_pass(w, fisher, part, settings)
        if swaps == 0:
            break
        passes.append((part, swaps))
    return passes


def _after_pass(start: dict[str, torch.Tensor], searches: dict[Block, list[tuple]],
                step: int) -> tuple[dict[str, torch.Tensor], int]:
    """The pruned masks after ``step`` passes over every block, and the swaps of that pass
    (a block that stopped earlier keeps its last mask)."""
    masks = {n: p.clone() for n, p in start.items()}
    swaps = 0
    for b, passes in searches.items():
        if not passes:
            continue
        part, _ = passes[min(step, len(passes)) - 1]
        masks[b.name].view(-1)[b.start:b.stop] = part
        if step <= len(passes):
            swaps += passes[step - 1][1]
    return masks, swaps


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
