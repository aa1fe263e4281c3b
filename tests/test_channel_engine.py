"""The channel engine on real torch and torchvision models (small configurations)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.densenet import DenseNet
from torchvision.models.vision_transformer import VisionTransformer

from compress.errors import CompressError
from compress.models import build_model
from compress.selection import select
from compress.structured.engine import (
    ChannelEngine,
    Structure,
    move_optimizer_state,
    rebuild,
)


def _tiny_densenet() -> nn.Module:
    return DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                    num_classes=10)


def _tiny_vit() -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=10)


MODELS = {
    "resnet20": (lambda: build_model("resnet20", 10, (3, 32, 32)), (3, 32, 32)),
    "densenet": (_tiny_densenet, (3, 32, 32)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
                           (3, 32, 32)),
    "shufflenet_v2": (lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10),
                      (3, 32, 32)),
    "vit": (_tiny_vit, (3, 32, 32)),
}


def _drop_half(engine: ChannelEngine, round_to: int = 8) -> dict[str, list[int]]:
    keep = select(engine.scores(1), 0.5, scope="layer", multiple=round_to, min_keep=1)
    return {root: (~m).nonzero().flatten().tolist() for root, m in keep.items()}


def _silence_outgoing(engine: ChannelEngine, drop: dict[str, list[int]]) -> None:
    """Zero every weight that reads the channels about to be cut, in every coupled layer:
    the network then computes the same function with or without them."""
    modules = dict(engine.model.named_modules())
    with torch.no_grad():
        for root, idxs in drop.items():
            if not idxs:
                continue
            module = modules[root]
            pruner = engine.graph.get_pruner_of_module(module)
            group = engine.graph.get_pruning_group(module, pruner.prune_out_channels, idxs)
            for dep, member_idxs in group:
                layer = dep.target.module
                reads = not engine.graph.is_out_channel_pruning_fn(dep.handler)
                if reads and isinstance(layer, nn.Conv2d | nn.Linear) and \
                        getattr(layer, "groups", 1) == 1:
                    layer.weight[:, member_idxs] = 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_coupled_layers_shrink_together_and_reload(name):
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory().eval()
    x = torch.randn(3, *shape)
    engine = ChannelEngine(model, shape)
    groups = engine.groups()
    assert groups, "the engine found nothing to cut"
    before = sum(p.numel() for p in model.parameters())
    engine.remove(_drop_half(engine))
    out = model(x)
    assert out.shape == (3, 10)  # the classifier's outputs never change
    assert torch.isfinite(out).all()
    assert sum(p.numel() for p in model.parameters()) < 0.8 * before
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 3  # the input channels never change
    fresh = factory().eval()
    rebuild(fresh, Structure(engine.history), shape)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), out)


@pytest.mark.parametrize("name", ["resnet20", "densenet", "mobilenet_v3_small", "shufflenet_v2"])
def test_cutting_silenced_channels_keeps_the_function(name):
    """Before any fine-tuning, the thinner model equals the masked original (to 1e-5)."""
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    engine = ChannelEngine(model, shape)
    drop = _drop_half(engine)
    _silence_outgoing(engine, drop)
    x = torch.randn(4, *shape)
    expected = model(x)
    engine.remove(drop)
    assert (model(x) - expected).abs().max() < 1e-5


def test_residual_blocks_keep_equal_widths():
    model = build_model("resnet20", 10, (3, 32, 32))
    engine = ChannelEngine(model, (3, 32, 32))
    engine.remove(_drop_half(engine))
    for block in model.stages:
        out = block.bn2.num_features
        assert block.conv2.out_channels == out
        if isinstance(block.shortcut, nn.Sequential):
            assert block.shortcut[0].out_channels == out
    assert model.fc.in_features == model.stages[-1].bn2.num_features


def test_densenet_concatenation_follows_its_slices():
    model = _tiny_densenet().eval()
    engine = ChannelEngine(model, (3, 32, 32))
    engine.remove(_drop_half(engine, round_to=1))
    model(torch.randn(1, 3, 32, 32))  # shapes agree across every concatenation
    norm = model.features.denseblock1.denselayer2.norm1
    conv = model.features.denseblock1.denselayer2.conv1
    assert norm.num_features == conv.in_channels


def test_round_to_and_floor():
    model = build_model("vgg-small", 10, (1, 28, 28))
    engine = ChannelEngine(model, (1, 28, 28))
    keep = select(engine.scores(1), 0.7, scope="layer", multiple=8, min_keep=1)
    engine.remove({r: (~m).nonzero().flatten().tolist() for r, m in keep.items()})
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths
    model = build_model("vgg-small", 10, (1, 28, 28))
    engine = ChannelEngine(model, (1, 28, 28))
    keep = select(engine.scores(1), 0.95, scope="layer", multiple=1, min_keep=20)
    engine.remove({r: (~m).nonzero().flatten().tolist() for r, m in keep.items()})
    assert min(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)) == 20


def test_optimizer_state_follows_a_cut():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, (3, 32, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    named = dict(model.named_parameters())
    momentum = {n: optimizer.state[p]["momentum_buffer"].clone() for n, p in named.items()}
    weights = {n: p.detach().clone() for n, p in named.items()}
    engine = ChannelEngine(model, (3, 32, 32))
    kept = engine.remove(_drop_half(engine))
    move_optimizer_state(optimizer, named, model, kept)
    params = list(model.parameters())
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in params]
    for name, p in model.named_parameters():
        buffer = optimizer.state[p]["momentum_buffer"]
        assert buffer.shape == p.shape
        # the kept entries of the old weight and of its momentum are the same positions
        assert torch.equal(p.detach().flatten(), weights[name].flatten()[kept[name]])
        assert torch.equal(buffer.flatten(), momentum[name].flatten()[kept[name]])
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # the optimizer runs on the thinner model


def test_a_structure_for_another_architecture_is_refused():
    model = build_model("resnet20", 10, (3, 32, 32))
    engine = ChannelEngine(model, (3, 32, 32))
    engine.remove(_drop_half(engine))
    with pytest.raises(CompressError, match="different architecture"):
        rebuild(build_model("vgg-small", 10, (3, 32, 32)), Structure(engine.history),
                (3, 32, 32))
    wide = Structure([[name, out, [i + 1000 for i in idxs]] for name, out, idxs
                      in engine.history])
    with pytest.raises(CompressError, match="does not fit"):
        rebuild(build_model("resnet20", 10, (3, 32, 32)), wide, (3, 32, 32))


def test_structure_round_trips_as_plain_numbers():
    model = build_model("resnet20", 10, (3, 32, 32))
    engine = ChannelEngine(model, (3, 32, 32))
    engine.remove(_drop_half(engine))
    structure = Structure(engine.history, {"stem.0": [16, 8]}, {"params": 1, "macs": 2})
    payload = structure.to_dict()
    assert Structure.from_dict(payload) == structure
    with pytest.raises(CompressError, match="unknown engine"):
        Structure.from_dict({**payload, "engine": "other"})
