"""`compress.selection.select`: exact counts, scopes, floors, rounding (pure functions)."""

import pytest
import torch

from compress.selection import pruned_count, round_width, select


def scores():
    torch.manual_seed(0)
    return {"a": torch.rand(40), "b": torch.rand(16) * 10, "c": torch.rand(100)}


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_layer_scope_drops_the_same_share_everywhere(sparsity):
    keep = select(scores(), sparsity, scope="layer")
    for name, s in scores().items():
        assert int((~keep[name]).sum()) == pruned_count(sparsity, s.numel())
        kept, dropped = s[keep[name]], s[~keep[name]]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_global_scope_is_one_threshold_with_an_exact_total(sparsity):
    keep = select(scores(), sparsity, scope="global")
    total = sum(s.numel() for s in scores().values())
    assert sum(int((~m).sum()) for m in keep.values()) == pruned_count(sparsity, total)
    kept = torch.cat([s[keep[n]] for n, s in scores().items()])
    dropped = torch.cat([s[~keep[n]] for n, s in scores().items()])
    assert kept.min() >= dropped.max()


def test_global_floor_keeps_a_share_of_every_tensor():
    s = {"small": torch.full((10,), 0.01), "big": torch.rand(90) + 1}
    plain = select(s, 0.5, scope="global")
    assert int(plain["small"].sum()) == 0
    floored = select(s, 0.5, scope="global", floor=0.2)
    assert int(floored["small"].sum()) == 2
    assert sum(int(m.sum()) for m in floored.values()) == 50


@pytest.mark.parametrize(("keep", "width", "multiple", "floor", "expected"), [
    (12, 64, 8, 0, 16),   # 12 rounds to 16 (ties go up)
    (11, 64, 8, 0, 8),
    (3, 64, 8, 0, 8),     # never below one multiple
    (0, 6, 8, 0, 6),      # a layer narrower than the multiple keeps its width
    (60, 64, 8, 0, 64),
    (5, 64, 1, 0, 5),
    (5, 64, 1, 9, 9),     # the floor wins
    (40, 32, 8, 0, 32),   # never above the width
])
def test_round_width(keep, width, multiple, floor, expected):
    assert round_width(keep, width, multiple, floor) == expected


def test_channel_selection_rounds_each_group_to_the_multiple():
    s = {"a": torch.rand(64), "b": torch.rand(32), "c": torch.rand(24)}
    keep = select(s, 0.5, scope="layer", multiple=8)
    assert [int(m.sum()) for m in keep.values()] == [32, 16, 16]  # 12 rounds up to 16
    for name, m in keep.items():
        assert s[name][m].min() >= s[name][~m].max()


def test_bad_arguments():
    with pytest.raises(ValueError, match="sparsity"):
        select(scores(), 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        select(scores(), float("nan"))
    with pytest.raises(ValueError, match="scope"):
        select(scores(), 0.5, scope="row")
    with pytest.raises(ValueError, match="floor"):
        select(scores(), 0.95, scope="global", floor=0.5)
