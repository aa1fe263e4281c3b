"""One registry of pruning methods: a method is one file that registers its builder here.

What a method is (which weights it removes, when it runs, what it needs) is declared in
`compress.catalog`, which needs no torch; the recipe, the command line and the report read
that. This registry holds the builders, imported from each method's module when the method
is built.

Two kinds of method:

* **during training** (``when="training"``): ``build(model, recipe, total_steps)`` returns a
  `compress.methods.base.TrainingPruner` (or None for dense training) that the training
  loop steps;
* **one shot** (``when="one-shot"``): ``build(request)`` returns a `OneShotPruner`, which is
  given the model and data once and may zero weights, move the weights it keeps, or cut
  channels physically (`OneShotResult`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.catalog import (
    CATALOG,
    GRANULARITIES,
    WHEN,
    MethodInfo,
    declare,
    method_info,
    names,
)
from compress.distributed import SINGLE, Shard
from compress.masks import Coverage

__all__ = ["GRANULARITIES", "REGISTRY", "WHEN", "MethodSpec", "OneShotPruner",
           "OneShotRequest", "OneShotResult", "method", "names", "register"]


@dataclass(frozen=True)
class MethodSpec:
    """A declared method (`compress.catalog.MethodInfo`) with its builder."""

    info: MethodInfo
    build: Callable


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str | MethodInfo, build: Callable) -> MethodSpec:
    """Register the builder of a method the catalog declares (a `MethodInfo` declares one
    on the way: a method defined outside this package, or in a test)."""
    info = declare(name) if isinstance(name, MethodInfo) else CATALOG.get(name)
    if info is None:
        raise ValueError(f"method {name!r} is not declared in compress.catalog")
    if info.name in REGISTRY:
        raise ValueError(f"method {info.name!r} is registered twice")
    REGISTRY[info.name] = MethodSpec(info, build)
    return REGISTRY[info.name]


def method(name: str, when: str) -> MethodSpec:
    """The spec of ``name`` among the methods that run ``when``, its module imported (which
    registers it); one clear line for a method that is not one."""
    info = method_info(name, when)
    if name not in REGISTRY:
        importlib.import_module(info.module)
    return REGISTRY[name]


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
    allocation: str = "latency"  # budget_ms: widths by a latency table, or one share alike
    latency_table: dict | None = None  # `compress bench --layer-table`'s table (None: make one)
    table_maker: Callable | None = None  # (model, input_shape) -> a layer table made here
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

    # True for a method whose work is shared out among torchrun's processes: each is given
    # its `shard` before `prune`, and every process must reach the same weights
    runs_across_processes: bool = False

    def __init__(self, request: OneShotRequest) -> None:
        self.request = request
        self.shard: Shard = SINGLE
        # where a long method reports its stages: progress(stage, done, total); the pipeline
        # points it at progress bars, and a method that reports nothing never calls it
        self.progress: Callable[[str, int, int], None] | None = None

    def check(self, model: nn.Module) -> None:  # noqa: B027 - most methods check nothing
        """Refuse a model this method cannot prune, before any work is done."""

    @abstractmethod
    def prune(self, model: nn.Module, data=None) -> OneShotResult:
        """Prune ``model`` in place; ``data`` is a `compress.data.Splits` or None."""
