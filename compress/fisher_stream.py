"""Fisher blocks whose memory grows with the block, not with the model, and whose gradients
may come from several processes.

No per-sample gradient is kept: each batch's gradients are folded into the blocks' sums
``Σ g gᵀ`` (float64, d × d per block) and dropped, so the number of samples costs time, not
memory. The blocks are processed in **groups** that fit ``max_memory`` bytes (the Fisher
blocks, one block's inversion, and the per-sample gradients of one batch in flight); a
model whose blocks all fit is one group, computed once and kept (every level of a sweep
reuses it, and its inverses too where they fit beside it), otherwise each group's gradients
are recomputed whenever the group is needed, a gradient pass per group and stage. The
model's own activations come on top of the cap.

Under ``torchrun`` every process takes an interleaved share of the same gradient batches
and the blocks' sums are added across processes (``all_reduce``), so two processes give the
one-process Fisher up to the order of float64 additions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compress.distributed import SINGLE, Shard, add_across_processes
from compress.errors import CompressError
from compress.second_order import Block, per_sample_gradients

GRADIENT_BATCH = 32
FLOAT64, FLOAT32 = 8, 4
GRADIENT_COPIES = 3  # per-sample gradients of a batch: vmap's result, a slice, a float64 copy


@dataclass(frozen=True)
class Group:
    """Blocks processed together: their parameters' per-sample gradients are computed in one
    pass over the gradient batches."""

    blocks: tuple[Block, ...]

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(b.name for b in self.blocks))


def block_bytes(block: Block) -> int:
    """A block's Fisher (float64), kept while its group is used."""
    return block.size ** 2 * FLOAT64


def inversion_bytes(block: Block) -> int:
    """What inverting one block takes besides its Fisher: the damped copy, its Cholesky
    factor and the inverse."""
    return 3 * block.size ** 2 * FLOAT64


def gradient_bytes(numel: int) -> int:
    """One batch of per-sample gradients of a parameter with ``numel`` weights."""
    return GRADIENT_BATCH * numel * FLOAT32 * GRADIENT_COPIES


def least_memory(blocks: list[Block], sizes: dict[str, int]) -> int:
    """The smallest cap that works: the costliest single block with its parameter's
    gradients."""
    return max(block_bytes(b) + inversion_bytes(b) + gradient_bytes(sizes[b.name])
               for b in blocks)


def plan_groups(blocks: list[Block], sizes: dict[str, int], max_memory: int) -> list[Group]:
    """Consecutive blocks gathered while their cost (`block_bytes`, `gradient_bytes` of every
    parameter they touch, and the largest `inversion_bytes`) stays within ``max_memory``."""
    need = least_memory(blocks, sizes)
    if need > max_memory:
        raise CompressError(f"--max-memory-gb {max_memory / 2**30:.2f} is below what one Fisher "
                            f"block needs: at least {math.ceil(need / 2**30 * 100) / 100:.2f} "
                            "(or lower --max-block)")
    groups, current, cost, names, spare = [], [], 0, set(), 0
    for b in blocks:
        extra = block_bytes(b) + (0 if b.name in names else gradient_bytes(sizes[b.name]))
        if current and cost + extra + max(spare, inversion_bytes(b)) > max_memory:
            groups.append(Group(tuple(current)))
            current, cost, names, spare = [], 0, set(), 0
            extra = block_bytes(b) + gradient_bytes(sizes[b.name])
        current.append(b)
        cost += extra
        spare = max(spare, inversion_bytes(b))  # one block is inverted at a time
        names.add(b.name)
    groups.append(Group(tuple(current)))
    return groups


class FisherStream:
    """The empirical Fisher ``(1/N) Σ g gᵀ`` of every block, group by group.

    ``batches`` are the gradient samples (all processes hold the same list; process r uses
    batches r, r + world, ...); ``masks`` zero the gradients of weights already pruned."""

    def __init__(self, model: torch.nn.Module, blocks: list[Block], batches: list,
                 masks: dict[str, torch.Tensor], max_memory: int, shard: Shard = SINGLE,
                 progress: Callable[[str, int, int], None] | None = None) -> None:
        sizes = {n: int(p.numel()) for n, p in model.named_parameters()}
        self.model, self.blocks, self.batches, self.masks = model, blocks, batches, masks
        self.groups = plan_groups(blocks, sizes, max_memory)
        self.samples = sum(len(y) for _, y in batches)
        self.shard, self.progress = shard, progress
        self.gradient_passes = 0
        self._kept: dict[Block, torch.Tensor] | None = None
        # with one group, the inverses are kept beside the Fishers if both fit
        self.keeps_inverses = not self.streamed and sum(
            block_bytes(b) for b in blocks) * 2 + least_memory(blocks, sizes) <= max_memory

    @property
    def streamed(self) -> bool:
        """True when the blocks do not fit at once and are recomputed group by group."""
        return len(self.groups) > 1

    def each_block(self, work: Callable[[Block, torch.Tensor], None]) -> None:
        """``work(block, fisher)`` for every block, group by group; a group's Fishers are
        let go before the next group is computed (one group: computed once and kept)."""
        if self._kept is not None:
            for block, fisher in self._kept.items():
                work(block, fisher)
            return
        for k, group in enumerate(self.groups):
            fishers = self._compute(group, k)
            if not self.streamed:
                self._kept = fishers
            for block in group.blocks:
                work(block, fishers[block])
            del fishers

    def _compute(self, group: Group, index: int) -> dict[Block, torch.Tensor]:
        sums = {b: torch.zeros(b.size, b.size, dtype=torch.float64) for b in group.blocks}
        mine = self.batches[self.shard.rank::self.shard.world]
        stage = "gradients" if not self.streamed else \
            f"gradients (group {index + 1} of {len(self.groups)})"
        for done, (x, y) in enumerate(mine, 1):
            grads = per_sample_gradients(self.model, group.names, x, y, self.masks)
            for b in group.blocks:
                g = grads[b.name][:, b.start:b.stop].to(torch.float64)
                sums[b].addmm_(g.T, g)
            del grads
            if self.progress:
                self.progress(stage, done, len(mine))
        for b in group.blocks:  # one block at a time: no second copy of the group
            add_across_processes(self.shard, sums[b])
        self.gradient_passes += 1
        return {b: s.div_(self.samples) for b, s in sums.items()}
