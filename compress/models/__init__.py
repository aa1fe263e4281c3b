"""Model registry: short names for the networks of the papers, timm's architectures
(``timm:NAME``, `compress.models.timm_models`), or any ``module:callable``.

A factory is called with the keyword arguments it accepts among ``num_classes``,
``in_channels`` and ``input_size`` (taken from the data). When it does not take
``in_channels`` — ``torchvision.models:resnet18`` does not — and its first conv expects a
different number of channels than the data has, that conv is replaced by one with the
data's channel count (same shape otherwise; its fresh weights are the old ones averaged
over input channels).

A spec read from a file must not choose code to run: see `compress.model_specs`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import nn

from compress.errors import CompressError
from compress.model_specs import check_spec_from_file, trust_model_spec
from compress.models.cifar import (
    mobilenetv2_32,
    resnet20,
    resnet32,
    resnet56,
    vgg_small,
    wrn_28_2,
)
from compress.models.small import lenet5, lenet300, mlpnet
from compress.models.timm_models import is_timm, timm_factory

REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlpnet": mlpnet,
    "lenet300": lenet300,
    "lenet5": lenet5,
    "vgg-small": vgg_small,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "wrn-28-2": wrn_28_2,
    "mobilenetv2-32": mobilenetv2_32,
}


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """A registered name or ``package.module:callable`` -> the factory."""
    if spec in REGISTRY:
        return REGISTRY[spec]
    if is_timm(spec):
        return timm_factory(spec)
    if ":" not in spec:
        names = ", ".join(REGISTRY)
        raise CompressError(f"unknown model {spec!r}: use one of {names}, or module:callable")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CompressError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CompressError(f"model {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def _accepted_kwargs(factory: Callable, offered: dict) -> dict:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    kwargs = {k: v for k, v in offered.items() if k in params}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        # torchvision-style ``**kwargs`` forwards to a constructor that knows num_classes
        kwargs.setdefault("num_classes", offered["num_classes"])
    return kwargs


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            return parent, child, module
    return None


def adapt_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the first conv for one that takes ``in_channels`` if it takes another count."""
    found = _first_conv(model)
    if found is None or found[2].in_channels == in_channels:
        return model
    parent, child, old = found
    if old.groups != 1:
        raise CompressError("cannot adapt a grouped first conv to the data's channels")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, 1, old.bias is not None, old.padding_mode)
    mean = old.weight.detach().mean(dim=1, keepdim=True)
    new.weight.data.copy_(mean.expand_as(new.weight))
    if old.bias is not None:
        new.bias.data.copy_(old.bias.detach())
    setattr(parent, child, new)
    return model


def build_model(spec: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """Instantiate ``spec`` for data of shape ``(C, H, W)`` with ``num_classes`` classes."""
    factory = resolve_factory(spec)
    offered = {"num_classes": num_classes, "in_channels": input_shape[0],
               "input_size": tuple(input_shape[1:])}
    kwargs = _accepted_kwargs(factory, offered)
    try:
        model = factory(**kwargs)
    except Exception as exc:  # a user's factory may fail in any way
        raise CompressError(f"model {spec!r} failed to build: {exc}") from None
    if not isinstance(model, nn.Module):
        raise CompressError(f"model {spec!r} returned {type(model).__name__}, not a torch module")
    if "in_channels" not in kwargs:
        adapt_input_channels(model, input_shape[0])
    return model


__all__ = ["REGISTRY", "adapt_input_channels", "build_model", "check_spec_from_file",
           "resolve_factory", "trust_model_spec"]
