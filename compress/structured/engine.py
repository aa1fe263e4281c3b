"""The channel engine: remove whole channels physically, with everything coupled to them.

Which channels are coupled (a conv's outputs, its BatchNorm, the next layers' inputs, every
branch of a residual addition, the slices of a concatenation, depthwise convs, attention
projections) is found by torch-pruning's dependency graph, which traces one forward pass.
This module adds what a pipeline needs on top of it:

* `ChannelEngine.groups` lists the prunable channel groups by the name of the layer that
  leads each one, with its width; the classifier's outputs and the model's input channels
  are never in a group (see `compress.structured.rules`).
* `ChannelEngine.remove` cuts the chosen channels and returns, per parameter, which of its
  old entries survive, so that optimizer state, masks or anything else kept per weight can
  follow the cut (`follow_cut`).
* The cut is recorded as plain numbers (`Structure`), which a checkpoint stores and
  `rebuild` replays onto a freshly built model: no pickled modules, so ``weights_only``
  loading still works.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from compress.errors import CompressError
from compress.modes import eval_mode
from compress.structured.rules import EngineRules, after_prune, rules_for

ENGINE = "torch-pruning"
STRUCTURE_VERSION = 1


@dataclass
class ChannelGroup:
    """Channels that can only be removed together, led by the layer ``root``."""

    root: str
    width: int
    members: list[str] = field(default_factory=list)  # every module the cut touches
    blocks: int = 1  # equal blocks the channels form (conv groups, GroupNorm groups, attention
    # heads): every block must lose the same positions, so that the blocks stay equal

    def describe(self) -> str:
        others = [m for m in self.members if m != self.root]
        return f"{self.root} ({self.width} channels, coupled with {len(others)} other layers)"


@dataclass
class Structure:
    """A pruned architecture as plain numbers: the cuts, in order, and the widths."""

    history: list[list] = field(default_factory=list)  # [root, is_output_cut, [indices]]
    widths: dict[str, list[int]] = field(default_factory=dict)  # root -> [original, kept]
    original: dict[str, int] = field(default_factory=dict)  # params, macs of the dense model

    def to_dict(self) -> dict:
        return {"engine": ENGINE, "version": STRUCTURE_VERSION, "history": self.history,
                "widths": self.widths, "original": self.original}

    @classmethod
    def from_dict(cls, payload: dict) -> Structure:
        if payload.get("engine") != ENGINE or int(payload.get("version", 0)) > STRUCTURE_VERSION:
            raise CompressError(f"pruned structure written by an unknown engine "
                                f"{payload.get('engine')!r} version {payload.get('version')}")
        history = [[str(name), bool(out), [int(i) for i in idxs]]
                   for name, out, idxs in payload["history"]]
        return cls(history, {k: [int(a), int(b)] for k, (a, b) in payload["widths"].items()},
                   {k: int(v) for k, v in payload.get("original", {}).items()})

    def merged(self, later: Structure) -> Structure:
        """This structure followed by ``later``'s cuts (widths keep the first original)."""
        widths = dict(self.widths)
        for root, (first, kept) in later.widths.items():
            widths[root] = [widths.get(root, [first])[0], kept]
        return Structure(self.history + later.history, widths, self.original or later.original)


def example_input(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.randn(1, *input_shape, device=device)


class ChannelEngine:
    """Channel groups of ``model`` and the means to cut them (see module docstring)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...],
                 rules: EngineRules | None = None) -> None:
        self.model = model
        self.input_shape = tuple(input_shape)
        self.rules = rules or rules_for(model)
        self.graph = _build_graph(model, self.input_shape, self.rules)
        self.names = {m: n for n, m in model.named_modules()}
        self.history: list[list] = []

    def _root_groups(self) -> Iterator[tuple[nn.Module, tp.Group]]:
        ignored = list(self.rules.ignored_layers)
        for group in self.graph.get_all_groups(ignored_layers=ignored,
                                               root_module_types=self.rules.root_module_types):
            root = group[0].dep.target.module
            yield root, group

    def groups(self) -> list[ChannelGroup]:
        """Every group the engine may cut, leaders in module order."""
        with _graph_step("listing its channel groups"):
            return self._groups()

    def _groups(self) -> list[ChannelGroup]:
        found = []
        for root, group in self._root_groups():
            members = []
            for dep, _ in group:
                name = self.names.get(dep.target.module)
                if name is not None and name not in members:
                    members.append(name)
            width = self.graph.get_pruner_of_module(root).get_out_channels(root)
            found.append(ChannelGroup(self.names[root], int(width), members,
                                      self._blocks(group)))
        return found

    def members(self, root: str) -> list[tuple[str, bool, list[int]]]:
        """Every layer the group led by ``root`` touches, as (name, True where its outputs
        are cut and False where its inputs are, the indices of that layer for root channels
        0..width-1 in order). A layer reading the channels flattened lists ``k`` indices
        per channel, channel after channel."""
        module = dict(self.model.named_modules())[root]
        with _graph_step(f"following the channels of {root}"):
            pruner = self.graph.get_pruner_of_module(module)
            width = pruner.get_out_channels(module)
            group = self.graph.get_pruning_group(module, pruner.prune_out_channels,
                                                 list(range(width)))
        found = []
        for dep, idxs in group:
            name = self.names.get(dep.target.module)
            if name is not None:
                out = self.graph.is_out_channel_pruning_fn(dep.handler)
                found.append((name, bool(out), [int(i) for i in idxs]))
        return found

    def _blocks(self, group: tp.Group) -> int:
        """How many equal blocks the group's channels form, as torch-pruning's own pruner
        counts them: the most that any member declares (a depthwise conv declares none)."""
        counts = [1]
        for dep, _ in group:
            module = dep.target.module
            pruner = self.graph.get_pruner_of_module(module)
            if pruner is None or not isinstance(module, nn.Module):
                continue
            if isinstance(module, nn.modules.conv._ConvNd) and \
                    module.groups == module.out_channels:
                continue
            out = self.graph.is_out_channel_pruning_fn(dep.handler)
            count = pruner.get_out_channel_groups(module) if out else \
                pruner.get_in_channel_groups(module)
            counts.append(int(count or 1))
        return max(counts)

    def scores(self, norm: int = 1) -> dict[str, torch.Tensor]:
        """Per channel, the ``norm`` (1 or 2) magnitude summed over every coupled layer:
        the filter's weights, its norm layer's scale and bias, and the next layers' input
        weights that read it. For ``norm=2`` the squares are summed (same order)."""
        importance = tp.importance.GroupMagnitudeImportance(p=norm, group_reduction="sum",
                                                            normalizer=None)
        found = {}
        with torch.no_grad(), _graph_step("listing its channel groups"):
            for root, group in self._root_groups():
                with _graph_step(f"scoring the channels of {self.names[root]}"):
                    found[self.names[root]] = importance(group).detach().float().cpu()
        return found

    def remove(self, drop: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Cut output channels ``drop[root]`` of each group; return, per parameter name,
        the flat indices of its old entries that remain (see `follow_cut`)."""
        modules = dict(self.model.named_modules())
        unknown = sorted(set(drop) - set(modules))
        if unknown:
            raise CompressError(f"no layer named {unknown[0]!r} in the model")
        with _index_tracking(self.model) as kept:
            for root, idxs in drop.items():
                if not idxs:
                    continue
                module = modules[root]
                with _graph_step(f"cutting {root}"):
                    pruner = self.graph.get_pruner_of_module(module)
                    group = self.graph.get_pruning_group(module, pruner.prune_out_channels,
                                                         sorted(int(i) for i in idxs))
                    group.prune()
            after_prune(self.model)
        self.history = [[str(n), bool(o), [int(i) for i in idxs]]
                        for n, o, idxs in self.graph.pruning_history()]
        return kept


def _build_graph(model: nn.Module, input_shape: tuple[int, ...],
                 rules: EngineRules) -> tp.DependencyGraph:
    """torch-pruning's graph, traced in eval mode (BatchNorm on one sample) with gradients.

    Protected layers stay in the trace (a layer left out of it would not have its inputs
    cut); they are only kept from leading or joining a group (`ChannelEngine.groups`)."""
    try:
        with eval_mode(model), torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input(model, input_shape), verbose=False,
                **rules.graph_kwargs())
    except CompressError:
        raise
    except Exception as exc:  # tracing runs the user's model: it can fail in any way
        raise CompressError(f"the channel engine cannot trace this model"
                            f"{failing_module(model, exc)}: {_reason(exc)}") from None


@contextmanager
def _graph_step(step: str) -> Iterator[None]:
    """torch-pruning's own failures (an index mapping through a reshape, a split or a
    channel shuffle that its graph does not follow) as the engine's one line."""
    try:
        yield
    except CompressError:
        raise
    except Exception as exc:  # inside torch-pruning: any type, never the user's mistake
        raise CompressError(f"the channel engine cannot prune this model: torch-pruning's "
                            f"dependency graph fails while {step} ({_reason(exc)}), a "
                            "coupling of channels it does not follow") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else \
        type(exc).__name__


def failing_module(model: nn.Module, exc: BaseException) -> str:
    """' at module NAME (Type)' for the innermost module of ``model`` whose forward was
    running when ``exc`` was raised; '' when none was."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = owner
        tb = tb.tb_next
    if found is None:
        return ""
    return f" at module {names[id(found)] or '(the model itself)'} ({type(found).__name__})"


def check_runs(model: nn.Module, input_shape: tuple[int, ...], classes: int) -> None:
    """Refuse a cut model that no longer runs or whose outputs changed shape, naming the
    module that fails (a coupling the dependency graph did not see)."""
    try:
        with eval_mode(model), torch.no_grad():
            out = model(example_input(model, input_shape))
    except Exception as exc:
        raise CompressError(f"the channel engine cannot prune this model: after the cut it "
                            f"fails{failing_module(model, exc)}: {_reason(exc)}") from None
    if not torch.is_tensor(out) or out.shape[-1] != classes:
        raise CompressError("the channel engine cannot prune this model: the cut changed its "
                            "outputs")


@contextmanager
def _index_tracking(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While channels are cut, each parameter holds its own flat indices (float64, exact
    below 2**53); afterwards the real values are gathered by the surviving indices, and
    those indices are what the caller gets to move other per-weight state."""
    values = {name: p.data for name, p in model.named_parameters()}
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None  # torch-pruning cuts gradients too; they follow below instead
        p.data = torch.arange(p.numel(), dtype=torch.float64, device=p.device).view_as(p)
    kept: dict[str, torch.Tensor] = {}
    try:
        yield kept
    finally:
        for name, p in model.named_parameters():
            if name not in values:  # a parameter that did not exist before (none expected)
                continue
            index = p.data.long()
            p.data = follow_cut(values[name], index, index.shape)
            if name in grads:
                p.grad = follow_cut(grads[name], index, index.shape)
            kept[name] = index.flatten()


def position_multiple(round_to: int, blocks: int) -> int:
    """The multiple of positions a width is rounded to, so that a group whose channels form
    ``blocks`` equal blocks (a position counts ``blocks`` channels) keeps a multiple of
    ``round_to`` channels."""
    return max(1, round_to // math.gcd(round_to, blocks))


def fold_blocks(scores: torch.Tensor, blocks: int) -> torch.Tensor:
    """Per-position scores of a group whose channels form ``blocks`` equal blocks."""
    return scores.view(blocks, -1).sum(0) if blocks > 1 else scores


def unfold_blocks(positions: list[int], width: int, blocks: int) -> list[int]:
    """The channels to cut when ``positions`` go from every one of ``blocks`` blocks."""
    size = width // blocks
    return sorted(p + b * size for b in range(blocks) for p in positions)


def follow_cut(tensor: torch.Tensor, kept: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The entries of a per-weight ``tensor`` (momentum, mask, ...) that survive a cut."""
    return tensor.flatten()[kept.to(tensor.device)].view(shape)


def move_optimizer_state(optimizer: torch.optim.Optimizer, before: dict[str, nn.Parameter],
                         model: nn.Module, kept: dict[str, torch.Tensor]) -> None:
    """Point ``optimizer`` at the cut model's parameters and cut its state the same way.

    ``before`` maps names to the parameter objects the optimizer held before the cut."""
    after = dict(model.named_parameters())
    swap = {id(before[name]): (name, after[name]) for name in before if name in after}
    for group in optimizer.param_groups:
        new_params = []
        for p in group["params"]:
            name, new = swap.get(id(p), (None, p))
            state = optimizer.state.pop(p, None)
            if state is not None and name is not None:
                state = {k: follow_cut(v, kept[name], new.shape)
                         if torch.is_tensor(v) and v.shape == p.shape else v
                         for k, v in state.items()}
            if state is not None:
                optimizer.state[new] = state
            new_params.append(new)
        group["params"] = new_params


def rebuild(model: nn.Module, structure: Structure, input_shape: tuple[int, ...]) -> nn.Module:
    """Replay ``structure``'s cuts onto a freshly built ``model`` (in place)."""
    if not structure.history:
        return model
    graph = _build_graph(model, input_shape, rules_for(model))
    modules = dict(model.named_modules())
    try:
        for name, is_output, idxs in structure.history:
            if name not in modules:
                raise CompressError(f"the pruned structure names a layer {name!r} that this "
                                    "model does not have (a different architecture?)")
            module = modules[name]
            pruner = graph.get_pruner_of_module(module)
            width = None if pruner is None else pruner.get_out_channels(module) \
                if is_output else pruner.get_in_channels(module)
            if width is None or (idxs and max(idxs) >= width):
                raise CompressError(f"the pruned structure does not fit layer {name!r} of "
                                    "this model (a different architecture?)")
            fn = pruner.prune_out_channels if is_output else pruner.prune_in_channels
            graph.get_pruning_group(module, fn, idxs).prune(record_history=False)
    except CompressError:
        raise
    except Exception as exc:
        raise CompressError(f"cannot rebuild the pruned structure: {type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0][:200]}") from None
    after_prune(model)
    _check_recorded_widths(model, graph, structure)
    return model


def _check_recorded_widths(model: nn.Module, graph, structure: Structure) -> None:
    """Refuse a record whose widths disagree with what its cuts leave: they are what
    reports and an export's metadata show."""
    modules = dict(model.named_modules())
    for root, (_, kept) in structure.widths.items():
        module = modules.get(root)
        pruner = None if module is None else graph.get_pruner_of_module(module)
        width = None if pruner is None else pruner.get_out_channels(module)
        if width != kept:
            raise CompressError(f"the pruned structure records layer {root!r} at {kept} "
                                f"channels, but its cuts leave {width}; the file is damaged")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
