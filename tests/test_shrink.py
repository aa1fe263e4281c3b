"""--method shrink: channels emptied by unstructured pruning are removed, outputs unchanged.

Real small models with chosen channels emptied by hand (incoming or outgoing weights zeroed,
BatchNorm set so that some empty channels hold a non-zero constant)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import compress.methods  # noqa: F401  (registers the methods)
from compress.errors import CompressError
from compress.methods.registry import OneShotRequest, method
from compress.models import build_model
from compress.structured.engine import Structure, rebuild


def shrink(model: nn.Module, shape: tuple[int, ...], **request):
    """Run the registered method; assert the thinner model computes the same outputs."""
    reference = copy.deepcopy(model).eval()
    pruner = method("shrink", "one-shot").build(OneShotRequest(input_shape=shape, **request))
    result = pruner.prune(model)
    assert_same(model, reference, shape)
    return result


def assert_same(model: nn.Module, reference: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(7))
    model.eval()
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-5


def wake_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Trained-looking BatchNorm statistics, so that an empty channel's constant is not 0."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(-0.5 * torch.rand(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.1)  # > 0: ReLU keeps it


def widths(result) -> dict[str, list[int]]:
    return result.structure.widths


def test_resnet20_cuts_empty_channels_and_rebuilds():
    torch.manual_seed(0)
    shape = (3, 16, 16)  # global pooling takes any size; small is fast
    model = build_model("resnet20", 10, shape)
    wake_batchnorm(model)
    block0, block3 = model.stages[0], model.stages[3]
    with torch.no_grad():
        block0.conv1.weight[[1, 3, 5]] = 0  # nothing comes in: constants ReLU(BN(0))
        block0.bn1.bias[1] = -5.0  # ... which is 0 for channel 1: removable
        block3.conv2.weight[:, [2, 7]] = 0  # nothing goes out of block3.conv1's 2 and 7
    result = shrink(model, shape)
    # channels 3 and 5 hold a non-zero constant read by a padded conv: they stay
    assert widths(result) == {"stages.0.conv1": [16, 15], "stages.3.conv1": [32, 30]}
    assert block0.conv1.out_channels == 15 and block3.conv2.in_channels == 30
    assert result.details["removed_channels"] == 3 and result.details["folded_channels"] == 0
    assert result.details["macs"] < result.details["original_macs"]
    assert any("2 constant channels were kept" in note for note in result.notes)

    fresh = build_model("resnet20", 10, shape)
    rebuild(fresh, Structure(result.structure.history), shape)
    fresh.load_state_dict(model.state_dict())
    assert_same(fresh, model, shape)


class ConvNet(nn.Module):
    """Unpadded convs: a bias-free one read by BatchNorm, then a Linear over the flattened map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


def test_constants_fold_into_batchnorm_and_linear_bias():
    torch.manual_seed(0)
    shape = (3, 8, 8)
    model = ConvNet()
    wake_batchnorm(model)
    with torch.no_grad():
        model.conv1.weight[[0, 2, 4]] = 0  # constants: 0 and 2 read by conv2 -> bn2's mean
        model.bn1.bias[4] = -5.0  # channel 4 holds 0
        model.conv2.weight[1] = 0  # a constant over 16 positions -> fc's bias
    result = shrink(model, shape)
    assert widths(result) == {"conv1": [8, 5], "conv2": [6, 5]}
    assert result.details["removed_channels"] == 4 and result.details["folded_channels"] == 3
    assert model.fc.in_features == 5 * 16 and model.conv2.bias is None

    fresh = ConvNet()
    rebuild(fresh, Structure(result.structure.history), shape)
    fresh.load_state_dict(model.state_dict())  # no parameter was added
    assert_same(fresh, model, shape)


def test_lenet5_folds_into_conv_and_linear_biases():
    torch.manual_seed(0)
    shape = (1, 28, 28)
    model = build_model("lenet5", 10, shape)
    conv1, conv2 = model.features[0], model.features[3]
    fc1, fc2 = model.classifier[1], model.classifier[3]
    with torch.no_grad():
        conv1.weight[[2, 4]] = 0
        conv1.bias[2], conv1.bias[4] = 0.7, -1.0  # a constant for conv2's bias, and a zero
        conv2.weight[5] = 0
        conv2.bias[5] = 0.3  # through max-pooling and flattening into fc1's bias
        fc2.weight[:, 7] = 0  # nothing goes out of fc1's unit 7
    result = shrink(model, shape)
    assert widths(result) == {"features.0": [6, 4], "features.3": [16, 15],
                              "classifier.1": [120, 119]}
    assert result.details["folded_channels"] == 2
    assert fc1.in_features == 15 * 25


def test_depthwise_conv_is_a_producer():
    torch.manual_seed(0)
    shape = (4, 8, 8)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    wake_batchnorm(model)
    with torch.no_grad():
        model[0].weight[[0, 1]] = 0
        model[3].weight[0] = 0  # channel 0: empty through the depthwise conv: a constant
        # channel 1: the padded depthwise conv makes the edges differ: not constant, kept
        model[6].weight[:, 2] = 0  # channel 2: nothing goes out
    result = shrink(model, shape)
    assert list(widths(result).values()) == [[8, 6]]  # led by conv 0 or the depthwise conv
    assert model[0].out_channels == model[3].groups == 6 and result.details["folded_channels"] == 1


def test_a_group_keeps_one_channel_when_all_are_empty():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[2].weight.zero_()
    result = shrink(model, (6,))
    assert widths(result) == {"0": [5, 1]}
    assert any("every channel empty" in note for note in result.notes)


def test_layers_that_mix_channels_are_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with torch.no_grad():
        model[3].weight[:, 1] = 0
    result = shrink(model, (3, 8, 8))
    assert result.structure is None and model[0].out_channels == 8
    assert any("1 channel groups were left alone" in note for note in result.notes)


class ChannelMean(nn.Module):
    """Subtracts the mean over channels, which the dependency graph does not see."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv1(x)
        return self.fc(self.conv2(y - y.mean(1, keepdim=True)).mean((2, 3)))


def test_a_cut_that_changes_outputs_is_refused_and_model_untouched():
    torch.manual_seed(0)
    model = ChannelMean()
    with torch.no_grad():
        model.conv2.weight[:, 1] = 0
    before = copy.deepcopy(model.state_dict())
    pruner = method("shrink", "one-shot").build(OneShotRequest(input_shape=(3, 8, 8)))
    with pytest.raises(CompressError, match="changed the outputs"):
        pruner.prune(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dense_model_is_refused():
    model = build_model("lenet5", 10, (1, 28, 28))
    pruner = method("shrink", "one-shot").build(OneShotRequest(input_shape=(1, 28, 28)))
    with pytest.raises(CompressError, match="has no zero weights"):
        pruner.check(model)
    with pytest.raises(CompressError, match="has no zero weights"):
        pruner.prune(model)


def test_scattered_zeros_remove_nothing():
    torch.manual_seed(0)
    model = build_model("lenet5", 10, (1, 28, 28))
    with torch.no_grad():
        model.features[3].weight[0, 0, 0, 0] = 0
    result = shrink(model, (1, 28, 28))
    assert result.structure is None and result.details["removed_channels"] == 0
    assert "the model is unchanged" in result.notes[0]


def test_shrink_takes_no_sparsity():
    with pytest.raises(CompressError, match="no --sparsity"):
        method("shrink", "one-shot").build(OneShotRequest(sparsity=0.5))
