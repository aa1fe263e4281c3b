"""One registry of pruning methods: a method is one file that registers itself here.

The recipe, the pipeline, the command line and the report ask this registry what a method
is (which weights it removes, when it runs, what it needs) instead of listing names.

Two kinds of method:

* **during training** (``when="training"``): ``build(model, schedule, recipe)`` returns a
  `MaskPruner` (or None for dense training) that the training loop steps;
* **one shot** (``when="one-shot"``): ``build(request)`` returns a `OneShotPruner`, which is
  given the model and data once and may zero weights, move the weights it keeps, or cut
  channels physically (`OneShotResult`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.errors import CompressError
from compress.masks import Coverage

GRANULARITIES = ("weights", "channels", "none")
WHEN = ("training", "one-shot")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    granularity: str  # "weights" (unstructured), "channels" (structured) or "none"
    when: str  # "training" or "one-shot"
    summary: str  # one line for --help and errors
    build: Callable
    needs_data: bool = False  # one-shot: the pruner reads training images


REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.granularity not in GRANULARITIES or spec.when not in WHEN:
        raise ValueError(f"bad method spec {spec}")
    if spec.name in REGISTRY:
        raise ValueError(f"method {spec.name!r} is registered twice")
    REGISTRY[spec.name] = spec
    return spec


def names(when: str) -> list[str]:
    """Methods that run ``when``: those that remove weights first, then channels."""
    specs = [spec for spec in REGISTRY.values() if spec.when == when]
    return [s.name for s in sorted(specs, key=lambda s: GRANULARITIES.index(s.granularity))]


def method(name: str, when: str) -> MethodSpec:
    """The spec of ``name`` among the methods that run ``when``; one clear line otherwise."""
    spec = REGISTRY.get(name)
    if spec is None or spec.when != when:
        flag = "train-prune" if when == "training" else "prune"
        hint = ""
        if spec is not None:
            other = "compress prune" if spec.when == "one-shot" else "compress train-prune"
            hint = f" ({name!r} is a method of {other})"
        raise CompressError(f"unknown method {name!r} for {flag}{hint}: use one of "
                            f"{', '.join(names(when))}")
    return spec


@dataclass
class OneShotRequest:
    """What a user asked of a one-shot method; each method reads the fields it needs."""

    sparsity: float | None = None  # weights (unstructured) or channels (structured)
    scope: str | None = None  # None: the method's own default
    coverage: Coverage = field(default_factory=Coverage)
    layer_floor: float = 0.0
    round_to: int = 8
    min_channels: int | None = None
    target_macs: float | None = None  # fraction of the dense MACs to keep instead
    budget_ms: float | None = None  # or: the p50 latency (ms) the exported model must meet
    latency: Callable | None = None  # (model, input_shape) -> p50 ms, for budget_ms
    second_order: dict | None = None  # cbs / woodfisher options (`SecondOrderOptions` fields)
    input_shape: tuple[int, ...] = (1, 28, 28)


@dataclass
class OneShotResult:
    """What a one-shot method did. The model it was given is changed in place."""

    masks: dict[str, torch.Tensor] | None = None  # unstructured keep-masks, weights zeroed
    structure: object | None = None  # a `compress.structured.engine.Structure` of the cut
    notes: list[str] = field(default_factory=list)  # what a user should know, in words
    details: dict = field(default_factory=dict)  # figures for the run summary


class OneShotPruner(ABC):
    """Given a trained model (and training data where it needs it), prune it once."""

    def __init__(self, request: OneShotRequest) -> None:
        self.request = request
        # where a long method reports its stages: progress(stage, done, total); the pipeline
        # points it at progress bars, and a method that reports nothing never calls it
        self.progress: Callable[[str, int, int], None] | None = None

    def check(self, model: nn.Module) -> None:  # noqa: B027 - most methods check nothing
        """Refuse a model this method cannot prune, before any work is done."""

    @abstractmethod
    def prune(self, model: nn.Module, data=None) -> OneShotResult:
        """Prune ``model`` in place; ``data`` is a `compress.data.Splits` or None."""
