"""Second-order pieces for one-shot pruning: per-sample gradients, empirical Fisher blocks,
and the optimal-brain-surgeon weight updates that CBS and WoodFisher build on.

The loss near trained weights ``w`` is modelled by the empirical Fisher
``F = (1/N) Σ g gᵀ`` of per-sample gradients ``g`` (damped: ``F_λ = F + λI``). ``F`` is never
formed for the whole network: weights are split into blocks of whole output rows (a
neuron's or a filter's weights, several rows per block up to ``max_block`` weights) and
``F`` is taken block-diagonal, so memory grows with the block size, not with the model.
Everything inside a block is computed in float64.

* `per_sample_gradients`: ``vmap(grad(loss))`` with `torch.func`, the model in eval mode
  (BatchNorm on its running statistics), gradients masked by an existing mask.
* `fisher_of` / `damped_inverse`: a block's Fisher ``GᵀG / N`` and ``(F + λI)⁻¹`` by
  Cholesky; `compress.fisher_stream` sums ``GᵀG`` batch by batch instead of keeping ``G``,
  so memory grows with d², not with the number of samples.
* `multi_weight_update` (CBS-U): remove the weights ``P`` together and move the others so
  that the modelled loss rises least: solve ``[F_λ⁻¹]_PP z = w_P`` and set
  ``δw = −F_λ⁻¹[:, P] z``; the pruned weights land on zero exactly (they are set to it).
* `woodfisher_scores` / `single_weight_updates`: WoodFisher's ``w_q² / [F_λ⁻¹]_qq`` and the
  sum of each pruned weight's own OBS update, scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress.modes import eval_mode


@dataclass(frozen=True)
class Block:
    """Weights ``start:stop`` (flat, C order) of parameter ``name``."""

    name: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def make_blocks(shapes: dict[str, torch.Size], max_block: int) -> list[Block]:
    """Blocks of whole output rows, at most ``max_block`` weights each (a row longer than
    that is cut into chunks)."""
    if max_block < 1:
        raise ValueError(f"max_block must be at least 1, got {max_block}")
    blocks = []
    for name, shape in shapes.items():
        total = int(torch.Size(shape).numel())
        row = total // shape[0] if len(shape) > 0 and shape[0] else total
        step = max(1, max_block // row) * row if row <= max_block else max_block
        blocks += [Block(name, s, min(s + step, total)) for s in range(0, total, step)]
    return blocks


def per_sample_gradients(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor,
                         masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Gradient of each sample's cross-entropy with respect to parameters ``names``:
    ``{name: (batch, numel)}``, computed with the model in eval mode."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    chosen = {n: params[n] for n in names}

    def loss(selected: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**params, **selected}, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    with eval_mode(model):
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(chosen, x, y)
    flat = {}
    for n in names:
        g = grads[n].reshape(len(x), -1)
        if masks is not None and n in masks:
            g = g * masks[n].reshape(1, -1).to(g.dtype)
        flat[n] = g.detach()
    return flat


def fisher_of(gradients: torch.Tensor) -> torch.Tensor:
    """The empirical Fisher ``GᵀG / N`` (float64, d × d) of per-sample gradients ``G``
    (N × d)."""
    g = gradients.to(torch.float64)
    return g.T @ g / len(g)


def damped_inverse(fisher: torch.Tensor, damp: float) -> torch.Tensor:
    """``(F + damp·I)⁻¹`` by Cholesky (float64). The damping makes ``F + damp·I`` positive
    definite even with fewer samples than weights (``F`` of rank N)."""
    if damp <= 0:
        raise ValueError(f"damping must be positive, got {damp}")
    damped = fisher.to(torch.float64).clone()
    damped.diagonal().add_(damp)
    return torch.cholesky_inverse(torch.linalg.cholesky(damped))


def multi_weight_update(w: torch.Tensor, inverse: torch.Tensor,
                        pruned: torch.Tensor) -> torch.Tensor:
    """The block's weights after removing ``pruned`` (bool) together, the others moved to
    minimise ``δwᵀ F_λ δw`` under ``w_P + δw_P = 0``; pruned entries exactly zero."""
    w64 = w.to(torch.float64).flatten()
    idx = pruned.flatten().nonzero().flatten()
    if idx.numel() == 0:
        return w.clone()
    sub = inverse[idx][:, idx]
    z = torch.cholesky_solve(w64[idx].unsqueeze(1), torch.linalg.cholesky(sub)).squeeze(1)
    new = w64 - inverse[:, idx] @ z
    new[idx] = 0.0
    return new.to(w.dtype).view_as(w)


def woodfisher_scores(w: torch.Tensor, inverse_diagonal: torch.Tensor) -> torch.Tensor:
    """WoodFisher's saliency ``w_q² / [F_λ⁻¹]_qq``: the modelled loss of removing q alone."""
    return w.to(torch.float64).flatten() ** 2 / inverse_diagonal


def single_weight_updates(w: torch.Tensor, inverse: torch.Tensor, pruned: torch.Tensor,
                          scale: float = 1.0) -> torch.Tensor:
    """WoodFisher's update: the sum of each pruned weight's own OBS update
    ``−F_λ⁻¹ e_q w_q / [F_λ⁻¹]_qq``, times ``scale``; pruned entries then set to zero."""
    w64 = w.to(torch.float64).flatten()
    idx = pruned.flatten().nonzero().flatten()
    if idx.numel() == 0:
        return w.clone()
    new = w64 - scale * inverse[:, idx] @ (w64[idx] / inverse.diagonal()[idx])
    new[idx] = 0.0
    return new.to(w.dtype).view_as(w)


def removal_cost(w: torch.Tensor, fisher: torch.Tensor, pruned: torch.Tensor) -> float:
    """CBS's selection objective ``w_Pᵀ F_PP w_P``: the modelled loss of zeroing ``P``
    without moving the other weights."""
    wp = torch.where(pruned.flatten(), w.to(torch.float64).flatten(), 0.0)
    return float(wp @ fisher @ wp)


@dataclass(frozen=True)
class SwapSettings:
    """CBS's local search: a swap must lower the cost by at least ``epsilon`` (absolute, in
    the units of ``w_Pᵀ F w_P`` with F averaged over samples); the ``i``-th pruned weight
    (by α) is tried against the remaining weights ranked ``i ± rho`` (by β); a pass ends
    after ``tau`` pruned weights found no partner. The paper's values."""

    epsilon: float = 1e-4
    rho: int = 10
    tau: int = 20
    max_passes: int = 100


def _alpha_beta(w: torch.Tensor, fisher: torch.Tensor, pruned: torch.Tensor,
                u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α_i: the cost saved by keeping pruned i; β_j: the cost added by pruning kept j."""
    diag = fisher.diagonal()
    alpha = 2 * w * u - w * w * diag
    beta = 2 * w * u + w * w * diag
    return torch.where(pruned, alpha, torch.nan), torch.where(pruned, torch.nan, beta)


def swap_gain(w: torch.Tensor, fisher: torch.Tensor, pruned: torch.Tensor, i: int,
              j: int) -> float:
    """Change of ``w_Pᵀ F w_P`` when pruned ``i`` is kept and kept ``j`` pruned instead:
    ``β_j − α_i − 2 w_i F_ij w_j`` (negative = better)."""
    w64, mask = w.to(torch.float64).flatten(), pruned.flatten()
    u = fisher @ torch.where(mask, w64, 0.0)
    alpha, beta = _alpha_beta(w64, fisher, mask, u)
    return float(beta[j] - alpha[i] - 2 * w64[i] * fisher[i, j] * w64[j])


def swap_pass(w: torch.Tensor, fisher: torch.Tensor, pruned: torch.Tensor,
              settings: SwapSettings = SwapSettings()) -> tuple[torch.Tensor, int]:
    """One pass of swaps (first improvement in a window, the paper's order); returns the new
    pruned mask (same count) and how many swaps were made. Every swap lowers the cost.

    The pruned weights are visited by decreasing α, each tried against the kept weights
    ranked ``i ± rho`` by β, and the pass ends at the ``tau + 1``-th visit that finds no
    partner. Between two swaps α and β do not change, so the visits up to the next swap
    (at most ``tau + 1`` of them) are tried at once, as one small matrix of gains."""
    w64, mask = w.to(torch.float64).flatten(), pruned.flatten().clone()
    u = fisher @ torch.where(mask, w64, 0.0)
    alpha, beta = _alpha_beta(w64, fisher, mask, u)
    order_p = mask.nonzero().flatten()[torch.argsort(alpha[mask], descending=True)]
    order_r = (~mask).nonzero().flatten()[torch.argsort(beta[~mask])]
    if len(order_p) == 0 or len(order_r) == 0:
        return mask.view_as(pruned), 0
    window = _windows(len(order_p), len(order_r), settings.rho)
    used = torch.zeros_like(mask)
    rank = swaps = misses = 0
    while rank < len(order_p):
        visits = slice(rank, min(len(order_p), rank + settings.tau - misses + 1))
        i = order_p[visits]
        positions, valid = window[0][visits], window[1][visits]
        j = order_r[positions]
        gain = beta[j] - alpha[i].unsqueeze(1) - 2 * w64[i].unsqueeze(1) * fisher[
            i.unsqueeze(1), j] * w64[j]
        hits = valid & ~used[j] & (gain <= -settings.epsilon)
        found = hits.any(dim=1)
        if not found.any():
            break  # the visits left find no partner: the pass ends within them
        first = int(found.to(torch.int8).argmax())
        misses += first
        pi, pj = int(i[first]), int(j[first, int(hits[first].to(torch.int8).argmax())])
        mask[pi], mask[pj] = False, True
        used[pi] = used[pj] = True
        u += fisher[:, pj] * w64[pj] - fisher[:, pi] * w64[pi]
        alpha, beta = _alpha_beta(w64, fisher, mask, u)
        swaps += 1
        rank += first + 1
    return mask.view_as(pruned), swaps


def _windows(visits: int, partners: int, rho: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the k-th visit, the positions ``max(0, k − rho) .. k + rho`` among the partners
    (clipped to their number), as a (visits × 2·rho+1) matrix and which entries are real."""
    starts = (torch.arange(visits) - rho).clamp(min=0)
    positions = starts.unsqueeze(1) + torch.arange(2 * rho + 1).unsqueeze(0)
    ends = (torch.arange(visits) + rho + 1).clamp(max=partners).unsqueeze(1)
    valid = positions < ends
    return positions.clamp(max=partners - 1), valid


def swap_search(w: torch.Tensor, fisher: torch.Tensor, pruned: torch.Tensor,
                settings: SwapSettings = SwapSettings()) -> tuple[torch.Tensor, int]:
    """Passes of `swap_pass` until one makes no swap (or ``max_passes``)."""
    total = 0
    for _ in range(settings.max_passes):
        pruned, swaps = swap_pass(w, fisher, pruned, settings)
        total += swaps
        if swaps == 0:
            break
    return pruned, total
