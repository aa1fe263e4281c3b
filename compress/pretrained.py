"""Weights named by their pretrained name, and fitting weights to a data set's classes.

``--weights torchvision:ResNet18_Weights.IMAGENET1K_V1`` (or ``...DEFAULT``) names
torchvision's published weights. They are read from torch's own cache
(``$TORCH_HOME/hub/checkpoints/<file>``, the file name torchvision downloads to), and
downloaded there when missing and the network allows; else one line says which file to
fetch and where to put it. They are read like any file handed to compress: bounded, with
``weights_only``. timm's published weights (``--weights timm:NAME``) are
`compress.pretrained_timm`'s; this module tells both kinds of name from a file.

Weights trained on another number of classes (ImageNet's 1000) fit a model built for the
data's: the final classifier, the only layer whose shapes differ, keeps its fresh
initialisation, and the run says so. Normalisation follows the weights: an image folder
read for torchvision weights is normalised with the statistics they were trained with.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError
from compress.hub_cache import cached_url
from compress.models.timm_models import PREFIX as TIMM
from compress.pretrained_timm import is_timm_weights
from compress.pretrained_timm import normalisation as timm_normalisation

TORCHVISION = "torchvision:"


def is_named(weights: str | None) -> bool:
    """Whether ``--weights`` names published weights (torchvision's or timm's,
    `compress.pretrained_timm`) rather than a file."""
    return bool(weights) and weights.startswith((TORCHVISION, TIMM))


def _all_weight_names() -> list[str]:
    from torchvision import models

    names = []
    for model in models.list_models():
        enum = models.get_model_weights(model)
        names += [f"{enum.__name__}.{member.name}" for member in enum] + \
            [f"{enum.__name__}.DEFAULT"]
    return sorted(set(names))


def torchvision_weights(name: str):
    """torchvision's ``WeightsEnum`` member for ``torchvision:Enum.MEMBER``."""
    from torchvision import models

    wanted = name.removeprefix(TORCHVISION)
    try:
        return models.get_weight(wanted)
    except (ValueError, KeyError, AttributeError):
        close = difflib.get_close_matches(wanted, _all_weight_names(), n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(TORCHVISION + c for c in close)}" if close else \
            " (a torchvision weights name, such as torchvision:ResNet18_Weights.DEFAULT)"
        raise CompressError(f"unknown pretrained weights {name!r}{hint}") from None


def named_file(name: str) -> Path:
    """The file of named weights, in torch's cache (see the module)."""
    weights = torchvision_weights(name)
    return cached_url(weights.url, str(weights))


def normalisation(name: str) -> tuple[list[float], list[float]] | None:
    """The mean and std the named weights were trained with, where they say."""
    if is_timm_weights(name):
        return timm_normalisation(name)
    transforms = torchvision_weights(name).transforms()
    mean, std = getattr(transforms, "mean", None), getattr(transforms, "std", None)
    return (list(mean), list(std)) if mean and std else None


def fit_classifier(model: nn.Module, state: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], str | None]:
    """``state`` without the classifier's tensors when only they differ in shape from
    ``model``'s (weights trained on another number of classes), and a note saying so."""
    own = model.state_dict()
    differ = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    if not differ:
        return state, None
    modules = {key.rpartition(".")[0] for key in differ}
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if len(modules) != 1 or not last or modules != {last[-1]}:
        return state, None  # not a classifier swap: loading reports the misfit
    classifier = modules.pop()
    was, now = state[differ[0]].shape[0], own[differ[0]].shape[0]
    kept = {**state, **{k: own[k] for k in differ}}  # the fresh classifier stays
    return kept, (f"the classifier ({classifier}) was trained on {was} classes; it is "
                  f"replaced by a fresh one for the data's {now}")
