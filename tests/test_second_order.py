"""The second-order pieces CBS and WoodFisher stand on, checked against brute force."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.second_order import (
    SwapSettings,
    damped_inverse,
    fisher_of,
    make_blocks,
    multi_weight_update,
    per_sample_gradients,
    removal_cost,
    single_weight_updates,
    swap_gain,
    swap_pass,
    swap_search,
)


class LeastSquaresBlock:
    """A block's Fisher and damped inverse from its per-sample gradients."""

    def __init__(self, g: torch.Tensor) -> None:
        self.size = g.shape[1]
        self._fisher = fisher_of(g)

    def fisher(self) -> torch.Tensor:
        return self._fisher

    def inverse(self, damp: float) -> torch.Tensor:
        return damped_inverse(self._fisher, damp)


def least_squares_block(samples: int = 40, size: int = 12, seed: int = 0):
    """Per-sample gradients of a tiny least-squares problem, and trained-looking weights."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(samples, size, generator=gen, dtype=torch.float64)
    w = torch.randn(size, generator=gen, dtype=torch.float64)
    return LeastSquaresBlock(g), w


@pytest.mark.parametrize("samples", [40, 5])  # more samples than weights, and fewer (rank 5)
def test_damped_inverse_equals_the_direct_inverse(samples):
    block, _ = least_squares_block(samples)
    direct = torch.linalg.inv(block.fisher() + 1e-2 * torch.eye(block.size,
                                                                 dtype=torch.float64))
    assert torch.allclose(block.inverse(1e-2), direct, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("samples", [40, 5])
def test_multi_weight_update_is_the_constrained_optimum_with_exact_zeros(samples):
    block, w = least_squares_block(samples)
    damp = 1e-2
    h = block.fisher() + damp * torch.eye(block.size, dtype=torch.float64)
    pruned = torch.zeros(block.size, dtype=torch.bool)
    pruned[[1, 4, 5, 9]] = True
    new = multi_weight_update(w, block.inverse(damp), pruned)
    assert (new[pruned] == 0).all()  # exactly
    # brute force: minimise dwᵀ H dw with dw_P = -w_P over the free entries R
    r, p = (~pruned).nonzero().flatten(), pruned.nonzero().flatten()
    dw_r = torch.linalg.solve(h[r][:, r], h[r][:, p] @ w[p])
    assert torch.allclose(new[r], w[r] + dw_r, atol=1e-9)


def test_woodfisher_update_of_one_weight_equals_the_multi_weight_update():
    block, w = least_squares_block()
    inverse = block.inverse(1e-2)
    pruned = torch.zeros(block.size, dtype=torch.bool)
    pruned[3] = True
    assert torch.allclose(single_weight_updates(w, inverse, pruned),
                          multi_weight_update(w, inverse, pruned), atol=1e-12)
    half = single_weight_updates(w, inverse, pruned, scale=0.5)
    assert half[3] == 0 and not torch.allclose(half, w)


def test_swap_gain_equals_the_recomputed_change_of_the_cost():
    block, w = least_squares_block()
    fisher = block.fisher()
    pruned = torch.zeros(block.size, dtype=torch.bool)
    pruned[:5] = True
    before = removal_cost(w, fisher, pruned)
    for i in range(5):
        for j in range(5, block.size):
            after = pruned.clone()
            after[i], after[j] = False, True
            assert swap_gain(w, fisher, pruned, i, j) == pytest.approx(
                removal_cost(w, fisher, after) - before, abs=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_a_swap_never_increases_the_cost_and_keeps_the_count(seed):
    block, w = least_squares_block(60, 30, seed)
    fisher = block.fisher()
    pruned = torch.zeros(block.size, dtype=torch.bool)
    pruned[torch.randperm(block.size, generator=torch.Generator().manual_seed(seed))[:18]] = True
    cost = removal_cost(w, fisher, pruned)
    settings = SwapSettings(epsilon=1e-9, rho=30, tau=30)
    mask = pruned
    for _ in range(10):
        mask, swaps = swap_pass(w, fisher, mask, settings)
        assert int(mask.sum()) == 18
        new_cost = removal_cost(w, fisher, mask)
        assert new_cost <= cost + 1e-12
        cost = new_cost
        if swaps == 0:
            break
    found, total = swap_search(w, fisher, pruned, settings)
    assert total > 0 and removal_cost(w, fisher, found) < removal_cost(w, fisher, pruned)


def test_blocks_are_whole_rows_up_to_the_limit():
    blocks = make_blocks({"a": torch.Size([40, 784]), "b": torch.Size([10, 3, 3, 3])},
                         max_block=2000)
    a = [b for b in blocks if b.name == "a"]
    assert all(b.size == 2 * 784 for b in a[:-1]) and sum(b.size for b in a) == 40 * 784
    assert [b.size for b in blocks if b.name == "b"] == [270]
    long_rows = make_blocks({"c": torch.Size([2, 5000])}, max_block=2000)
    assert max(b.size for b in long_rows) == 2000 and sum(b.size for b in long_rows) == 10000


def test_per_sample_gradients_equal_a_loop_of_single_backward_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    model[1].running_mean.uniform_(-0.5, 0.5)  # eval mode: running statistics are used
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    names = ["0.weight", "4.weight"]
    mask = {"4.weight": (torch.rand(3, 144) > 0.5)}
    batch = per_sample_gradients(model, names, x, y, mask)
    assert model.training  # the caller's mode is given back
    model.eval()
    params = dict(model.named_parameters())
    for k in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[k:k + 1]), y[k:k + 1]).backward()
        assert torch.allclose(batch["0.weight"][k], params["0.weight"].grad.flatten(),
                              atol=1e-6)
        expected = (params["4.weight"].grad * mask["4.weight"]).flatten()
        assert torch.allclose(batch["4.weight"][k], expected, atol=1e-6)


def looped_swap_pass(w, fisher, pruned, settings):
    """The swap pass written as the paper states it, one visit and one partner at a time:
    the reference the batched `swap_pass` must reproduce exactly."""
    w64, mask = w.to(torch.float64).flatten(), pruned.flatten().clone()

    def alpha_beta():
        u = fisher @ torch.where(mask, w64, 0.0)
        diag = fisher.diagonal()
        return (torch.where(mask, 2 * w64 * u - w64 * w64 * diag, torch.nan),
                torch.where(mask, torch.nan, 2 * w64 * u + w64 * w64 * diag))

    alpha, beta = alpha_beta()
    order_p = mask.nonzero().flatten()[torch.argsort(alpha[mask], descending=True)]
    order_r = (~mask).nonzero().flatten()[torch.argsort(beta[~mask])]
    used, swaps, misses = set(), 0, 0
    for rank, i in enumerate(order_p.tolist()):
        found = next((j for j in order_r[max(0, rank - settings.rho):
                                         rank + settings.rho + 1].tolist()
                      if j not in used and beta[j] - alpha[i] - 2 * w64[i] * fisher[i, j]
                      * w64[j] <= -settings.epsilon), None)
        if found is None:
            misses += 1
            if misses > settings.tau:
                break
            continue
        mask[i], mask[found] = False, True
        used.update((i, found))
        alpha, beta = alpha_beta()
        swaps += 1
    return mask.view_as(pruned), swaps


@pytest.mark.parametrize("seed", range(12))
def test_the_batched_swap_pass_makes_the_swaps_of_the_looped_one(seed):
    gen = torch.Generator().manual_seed(seed)
    size = [12, 40, 90][seed % 3]
    block, w = least_squares_block(30 + seed, size, seed)
    share = [0.2, 0.5, 0.8, 0.95][seed % 4]
    pruned = torch.zeros(size, dtype=torch.bool)
    pruned[torch.randperm(size, generator=gen)[:max(1, int(share * size))]] = True
    settings = SwapSettings(epsilon=[1e-9, 1e-3, 0.05][seed % 3], rho=[1, 3, 10][seed % 3],
                            tau=[0, 2, 20][(seed // 3) % 3])
    fisher = block.fisher()
    for _ in range(4):
        expected, count = looped_swap_pass(w, fisher, pruned, settings)
        got, made = swap_pass(w, fisher, pruned, settings)
        assert made == count and torch.equal(got, expected)
        pruned = got


def test_fisher_groups_fit_the_cap_and_a_cap_below_one_block_names_the_least():
    from compress.errors import CompressError
    from compress.fisher_stream import (
        block_bytes,
        gradient_bytes,
        inversion_bytes,
        least_memory,
        plan_groups,
    )

    shapes = {"a": torch.Size([64, 3, 3, 3]), "b": torch.Size([128, 64, 3, 3]),
              "c": torch.Size([10, 128])}
    sizes = {n: int(s.numel()) for n, s in shapes.items()}
    blocks = make_blocks(shapes, max_block=600)
    cap = 4 * least_memory(blocks, sizes)
    groups = plan_groups(blocks, sizes, cap)
    assert [b for g in groups for b in g.blocks] == blocks and len(groups) > 1
    for group in groups:
        cost = sum(block_bytes(b) for b in group.blocks) + \
            sum(gradient_bytes(sizes[n]) for n in group.names) + \
            max(inversion_bytes(b) for b in group.blocks)
        assert cost <= cap
    assert len(plan_groups(blocks, sizes, 10**12)) == 1
    with pytest.raises(CompressError, match="at least"):
        plan_groups(blocks, sizes, least_memory(blocks, sizes) - 1)
