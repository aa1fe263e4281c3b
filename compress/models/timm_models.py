"""``--model timm:NAME``: any architecture of timm's registry, built without pretrained
weights (``timm`` is the optional extra ``compress[timm]``).

A name is looked up in timm's registry and nothing else: ``hf-hub:`` and other sources
that fetch configuration from the network are refused, so a file naming a timm model
chooses no code and makes no request.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable

from torch import nn

from compress.errors import CompressError, first_line

PREFIX = "timm:"
NAME = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)?")  # an architecture, with an optional tag


def is_timm(spec: str) -> bool:
    return spec.startswith(PREFIX)


def import_timm():
    try:
        import timm
    except ImportError:
        raise CompressError("timm models need timm: install the extra, .venv/bin/pip install "
                            "'.[timm]' (or pip install timm)") from None
    return timm


def timm_factory(spec: str) -> Callable[..., nn.Module]:
    """A factory taking ``num_classes``, ``in_channels`` and ``input_size``, as the model
    registry offers them."""
    name = spec.removeprefix(PREFIX)
    if not NAME.fullmatch(name):
        raise CompressError(f"model {spec!r}: a timm model is named by its architecture "
                            "(such as timm:resnet18), not a hub path")
    timm = import_timm()
    architecture = name.partition(".")[0]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(PREFIX + c for c in close)}" if close else ""
        raise CompressError(f"unknown timm model {name!r}{hint}")

    def build(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
        return create(name, num_classes, in_channels, input_size)

    return build


def create(name: str, num_classes: int, in_channels: int, input_size: tuple[int, int],
           **options) -> nn.Module:
    """``timm.create_model`` for data of ``in_channels`` x ``input_size`` with ``num_classes``
    classes; ``options`` go to timm as they are (pretrained weights, for one)."""
    timm = import_timm()
    options = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels,
               **options}
    try:
        try:  # transformers take the image size; convolutional networks refuse the keyword
            return timm.create_model(name, img_size=tuple(input_size), **options)
        except TypeError:
            return timm.create_model(name, **options)
    except Exception as exc:  # timm's builders fail in many ways on odd shapes
        raise CompressError(f"timm model {name!r} failed to build: "
                            f"{first_line(exc)[:160]}") from None
