import pytest
import torch
from torch import nn

from compress.masks import (
    Coverage,
    canonical_zeros,
    flip_fraction,
    magnitude_masks,
    prunable_weights,
)
from compress.models import build_model
from compress.selection import pruned_count


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.95, 0.98, 0.999])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_masks_remove_exact_counts(sparsity, scope):
    torch.manual_seed(0)
    weights = {"a": torch.randn(37, 11), "b": torch.randn(5, 3, 3, 3), "c": torch.randn(101)}
    masks = magnitude_masks(weights, sparsity, scope)
    total = sum(w.numel() for w in weights.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    if scope == "global":
        assert pruned == pruned_count(sparsity, total)
    else:
        for name, w in weights.items():
            assert int((~masks[name]).sum()) == pruned_count(sparsity, w.numel())


def test_global_mask_keeps_largest_magnitudes():
    weights = {"a": torch.tensor([0.1, -5.0, 0.3]), "b": torch.tensor([[-0.2, 4.0], [0.05, 1.0]])}
    masks = magnitude_masks(weights, 4 / 7)
    assert masks["a"].tolist() == [False, True, False]
    assert masks["b"].tolist() == [[False, True], [False, True]]


def test_ties_still_give_exact_counts():
    weights = {"a": torch.ones(100), "b": torch.ones(50)}
    masks = magnitude_masks(weights, 0.9)
    assert sum(int(m.sum()) for m in masks.values()) == 15


def test_bad_sparsity_and_scope():
    with pytest.raises(ValueError):
        magnitude_masks({"a": torch.ones(3)}, 1.0)
    with pytest.raises(ValueError):
        magnitude_masks({"a": torch.ones(3)}, 0.5, scope="row")


def test_coverage_rules_on_lenet5():
    model = build_model("lenet5", 10, (1, 28, 28))
    every = prunable_weights(model)
    assert list(every) == ["features.0.weight", "features.3.weight", "classifier.1.weight",
                           "classifier.3.weight", "classifier.5.weight"]
    inner = prunable_weights(model, Coverage(skip_first=True, skip_classifier=True))
    assert list(inner) == ["features.3.weight", "classifier.1.weight", "classifier.3.weight"]
    assert not any(name.endswith("bias") for name in every)


def test_norm_layers_are_never_prunable():
    model = build_model("resnet20", 10, (3, 32, 32))
    names = prunable_weights(model)
    assert names and all(isinstance(model.get_submodule(n.rsplit(".", 1)[0]),
                                    nn.Conv2d | nn.Linear) for n in names)


def test_flip_fraction_and_canonical_zeros():
    old = {"a": torch.tensor([True, False, True, True])}
    new = {"a": torch.tensor([True, True, False, True])}
    assert flip_fraction(old, new) == 0.5
    w = torch.tensor([-1.0, 2.0]) * torch.tensor([0.0, 1.0])
    assert torch.signbit(w[0])
    assert not torch.signbit(canonical_zeros(w)[0])


def test_layer_floor_keeps_a_share_of_every_layer_and_the_exact_total():
    torch.manual_seed(0)
    weights = {"big": torch.randn(200, 100), "small": torch.randn(10, 10) * 1e-3}
    plain = magnitude_masks(weights, 0.9)
    assert not plain["small"].any()  # the tiny layer is emptied by one global threshold
    floored = magnitude_masks(weights, 0.9, layer_floor=0.05)
    assert int(floored["small"].sum()) == 5
    total = sum(int(m.sum()) for m in floored.values())
    assert total == sum(int(m.sum()) for m in plain.values())  # same exact budget
    kept_small = weights["small"].abs()[floored["small"]]
    assert kept_small.min() >= weights["small"].abs()[~floored["small"]].max()
    with pytest.raises(ValueError, match="layer floor"):
        magnitude_masks(weights, 0.99, layer_floor=0.05)
