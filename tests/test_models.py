import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from compress.errors import CompressError
from compress.models import REGISTRY, build_model


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_registered_models_forward(name, shape):
    model = build_model(name, 7, shape)
    model.eval()
    assert model(torch.zeros(2, *shape)).shape == (2, 7)


def test_mlpnet_is_784_40_20_10_without_biases():
    model = build_model("mlpnet", 10, (1, 28, 28))
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(40, 784), (20, 40), (10, 20)]


def test_cifar_resnet_sizes():
    count = lambda n: sum(p.numel() for p in build_model(n, 10, (3, 32, 32)).parameters())  # noqa: E731
    assert 0.26e6 < count("resnet20") < 0.30e6
    assert count("resnet20") < count("resnet32") < count("resnet56")
    assert 1.4e6 < count("wrn-28-2") < 1.6e6


def test_every_registered_model_may_be_named_by_a_file():
    from compress.model_specs import REGISTERED_NAMES

    assert set(REGISTERED_NAMES) == set(REGISTRY)


def test_mobilenetv2_for_32x32_keeps_the_resolution_the_imagenet_strides_would_lose():
    model = build_model("mobilenetv2-32", 10, (3, 32, 32)).eval()
    assert 2.2e6 < sum(p.numel() for p in model.parameters()) < 2.3e6
    assert model.features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (4, 4)
    gray = build_model("mobilenetv2-32", 10, (1, 28, 28)).eval()
    assert gray.features[0][0].in_channels == 1


def test_torchvision_resnet18_trains_a_step_on_fashion_mnist(fmnist_small):
    model = build_model("torchvision.models:resnet18", 10, (1, 28, 28))
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10
    x, y = next(fmnist_small.train.batches(16))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.fc.weight.detach().clone()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.fc.weight)


def test_user_factory_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""
        from torch import nn
        def make(num_classes, in_channels=3):
            return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("mynets:make", 4, (1, 12, 12))
    assert model(torch.zeros(1, 1, 12, 12)).shape == (1, 4)
    with pytest.raises(CompressError, match="no callable"):
        build_model("mynets:NOT_CALLABLE", 4, (1, 12, 12))
    sys.modules.pop("mynets", None)


@pytest.mark.parametrize("spec, message", [
    ("resnet1000", "unknown model"),
    ("no_such_module_xyz:make", "cannot import"),
    ("torchvision.models:nope", "no callable"),
])
def test_bad_model_specs(spec, message):
    with pytest.raises(CompressError, match=message):
        build_model(spec, 10, (1, 28, 28))


def test_a_failing_forward_leaves_the_model_in_the_mode_it_was_in():
    """Counting MACs or classes runs the model in eval mode; a forward that raises must
    not leave a training run in eval mode."""
    from compress.stats import count_macs
    from compress.structured.cutter import classes_of

    model = build_model("lenet5", 10, (1, 28, 28)).train()
    for probe in (count_macs, classes_of):
        with pytest.raises(RuntimeError):
            probe(model, (3, 5, 5))  # not the shape the model takes
        assert model.training
