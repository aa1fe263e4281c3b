"""One-shot "unstructured to structured": remove the channels that unstructured pruning emptied.

At high sparsity (a DPF run at 0.98, say) unstructured pruning empties whole channels. This
method removes them physically, so that the model computes the same function (in eval mode),
only thinner. Each channel group of the channel engine (a filter, its BatchNorm, the next
layers' inputs, every branch of a residual sum, ...) is read one channel at a time: the
Conv/Linear layers of the group that *write* the channel are its producers (a depthwise conv,
which passes a channel through, is one) and those that *read* it are its consumers.

* **Nothing goes out**: every consumer's weights for the channel are zero. Whatever the
  channel holds is multiplied by zero wherever it is read, so removing it is exact.
* **Nothing comes in**: every producer's weights for the channel are zero, so the channel
  holds a constant (biases carried through BatchNorm, activations and additions). The
  constant each consumer reads is measured on a few random inputs; it must not vary across
  samples or positions, or the channel stays. A zero constant contributes nothing: removal is
  exact. A non-zero constant ``k`` adds ``sum(W[:, channel]) * k`` to every output of a Linear
  or an unpadded, ungrouped Conv, the same at every position, so it is folded into that
  consumer's bias; a bias-free consumer read by a BatchNorm alone gets it subtracted from the
  BatchNorm's running mean instead (the same in eval mode, and what training re-estimates).
  A padded conv reads zeros instead of ``k`` at its borders, so there the channel stays; so
  it does for a consumer with neither bias nor BatchNorm (a bias created here would not exist
  in the model a checkpoint rebuilds, so its weights would no longer load).
* Groups that pass through a layer that mixes channels in a way these rules cannot prove
  exact (LayerNorm, GroupNorm, grouped non-depthwise or transposed grouped convs, LSTM,
  embeddings, attention, torch-pruning custom layers or unwrapped parameters, or the model's
  output itself) are left alone; the notes say how many.

Every group keeps at least one channel (``min_channels`` when given): where all of its channels
are empty, the lowest-index ones stay, untouched, so the cut is exact all the same. Widths are
not rounded to multiples of 8 (``round_to`` is ignored): rounding would keep empty channels or
cut live ones, and the point here is exactness.

The cut is first made on a copy, whose outputs on random inputs must match the original's:
an operation the dependency graph cannot see (a reduction across channels, say) would show
there, and the model is then left unchanged with an error.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch_pruning.ops import OPTYPE

from compress.errors import CompressError
from compress.methods.registry import (
    OneShotPruner,
    OneShotRequest,
    OneShotResult,
    register,
)
from compress.modes import eval_mode
from compress.stats import count_macs
from compress.structured.engine import ChannelEngine, Structure, count_params

MAX_ROUNDS = 8  # cut-and-look-again rounds; each finds only what the last one freed
SAMPLES = 4  # random inputs to measure constants on, and as many to check the cut on
TOLERANCE = 1e-4  # of the outputs' magnitude: a fold changes float rounding, nothing else
WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
# layers that mix a channel with others, or hold weights these rules do not read
UNPROVABLE = {OPTYPE.LN, OPTYPE.GN, OPTYPE.MHA, OPTYPE.LSTM, OPTYPE.EMBED, OPTYPE.PARAMETER,
              OPTYPE.CUSTOMIZED, OPTYPE.OUTPUT}
# traced as element-wise ops, but they mix or move channels: attention, and the opaque nodes
# (custom autograd functions) that stand for a whole module or a channel shuffle
# (a plain "mm" is not one: a Linear's own addmm shows up as such a node too)
MIXING_OPS = ("bmm", "softmax", "attention", "opaque")


@dataclass
class Member:
    """A Conv/Linear layer's share of one channel: it writes it (producer) or reads it."""

    name: str
    module: nn.Module
    producer: bool
    idxs: list[int]


@dataclass
class Verdict:
    """What one channel allows: removal (with constants to fold), or why it stays."""

    removable: bool
    folds: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    unfoldable: bool = False  # a constant channel whose constant has nowhere exact to go


@dataclass
class Plan:
    """The channels to cut per group leader and the constants to fold before the cut."""

    drop: dict[str, list[int]] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)
    folds: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    folded: int = 0
    skipped: int = 0
    unfoldable: int = 0
    floored: int = 0
    floor: int = 1  # channels every group keeps

    later_removed: int = 0  # channels later rounds removed (see `Shrink.prune`)

    @property
    def removed(self) -> int:
        return sum(len(idxs) for idxs in self.drop.values()) + self.later_removed

    def absorb(self, later: Plan) -> None:
        """Count a later round's cuts in this (first) round's figures."""
        self.later_removed += later.removed
        self.folded += later.folded


class Shrink(OneShotPruner):
    """Remove every channel that carries no information (see module docstring)."""

    def check(self, model: nn.Module) -> None:
        """A dense model has no emptied channel: refuse it before any work."""
        if not any(bool((m.weight == 0).any()) for m in model.modules()
                   if isinstance(m, WEIGHTED) and m.weight is not None):
            raise CompressError("--method shrink removes channels emptied by unstructured "
                                "pruning; this model has no zero weights (prune it first, "
                                "e.g. compress train-prune --method dpf)")

    def prune(self, model: nn.Module, data=None) -> OneShotResult:
        """Cut, then look again: a cut can leave channels whose only readers it removed, so
        rounds repeat until one finds nothing (at most `MAX_ROUNDS`)."""
        self.check(model)
        shape = self.request.input_shape
        original = {"params": count_params(model), "macs": count_macs(model, shape)[0]}
        probe, verify = _random_inputs(model, shape, seed=0), _random_inputs(model, shape, seed=1)
        reference = _forward(model, verify)
        total, structure, difference = Plan(), None, None
        for _ in range(MAX_ROUNDS):
            engine = ChannelEngine(model, shape)
            plan = _plan(engine, _measure(model, probe), self.request.min_channels or 1)
            if structure is None:  # what the first look kept and why is what users need
                total = plan
            if not plan.drop:
                break
            trial = copy.deepcopy(model)
            _cut(trial, ChannelEngine(trial, shape), plan)
            difference = _difference(reference, _forward(trial, verify))
            del trial
            _cut(model, engine, plan)
            cut = Structure(engine.history, {root: [plan.widths[root],
                                                    plan.widths[root] - len(idxs)]
                                             for root, idxs in plan.drop.items()}, original)
            structure = cut if structure is None else structure.merged(cut)
            if total is not plan:
                total.absorb(plan)
        if structure is None:
            return _unchanged(total, original)
        details = _details(total, original, count_params(model), count_macs(model, shape)[0])
        return OneShotResult(structure=structure, notes=_notes(total, difference),
                             details=details)


# --- which channels are empty --------------------------------------------------------------

def _plan(engine: ChannelEngine, stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
          floor: int) -> Plan:
    """Read every group channel by channel; collect what can go and what must be folded."""
    plan = Plan(floor=floor)
    modules = dict(engine.model.named_modules())
    for group in engine.groups():
        channels = _channel_members(engine, modules[group.root], group.width)
        if group.blocks > 1 or channels is None:
            plan.skipped += 1
            continue
        verdicts = [_verdict(engine, members, stats) for members in channels]
        plan.unfoldable += sum(v.unfoldable for v in verdicts)
        removable = [c for c, v in enumerate(verdicts) if v.removable]
        excess = len(removable) - (group.width - floor)
        if excess > 0:  # every channel empty: the lowest-index ones stay, untouched
            removable = removable[excess:]
            plan.floored += 1
        if not removable:
            continue
        plan.drop[group.root] = removable
        plan.widths[group.root] = group.width
        for c in removable:
            plan.folded += bool(verdicts[c].folds)
            for target, amount in verdicts[c].folds.items():
                plan.folds[target] = plan.folds.get(target, 0) + amount
    return plan


def _channel_members(engine: ChannelEngine, root: nn.Module,
                     width: int) -> list[list[Member]] | None:
    """Per channel of ``root``'s group, its Conv/Linear members; None when the group holds a
    layer these rules cannot prove exact."""
    graph = engine.graph
    pruner = graph.get_pruner_of_module(root)
    channels = []
    for c in range(width):
        group = graph.get_pruning_group(root, pruner.prune_out_channels, [c])
        members = []
        for dep, idxs in group:
            if _unprovable(graph, dep.target):
                return None
            module = dep.target.module
            if isinstance(module, WEIGHTED):
                producer = _is_depthwise(module) or graph.is_out_channel_pruning_fn(dep.handler)
                members.append(Member(engine.names[module], module, producer, list(idxs)))
        channels.append(members)
    return channels


def _unprovable(graph, node) -> bool:
    """Does this node mix the channel with others in a way the rules cannot follow?"""
    module = node.module
    if node.type in UNPROVABLE or type(module) in graph.CUSTOMIZED_PRUNERS or \
            any(module is key for key in graph.CUSTOMIZED_PRUNERS):
        return True
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        return module.transposed or not _is_depthwise(module)
    if node.type == OPTYPE.ELEMENTWISE and hasattr(node.grad_fn, "name"):
        return isinstance(node.grad_fn, torch.autograd.function.BackwardCFunction) or \
            any(op in node.grad_fn.name().lower() for op in MIXING_OPS)
    return False


def _is_depthwise(module: nn.Module) -> bool:
    """torch-pruning's test: one filter per channel, so the channel passes through."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels \
        and module.out_channels > 1


def _verdict(engine: ChannelEngine, members: list[Member],
             stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Verdict:
    """"Nothing goes out" first (it needs no fold), then "nothing comes in"."""
    consumers = [m for m in members if not m.producer]
    if not consumers:  # read by nothing these rules see: keep it, to be safe
        return Verdict(False)
    if all(_empty(m) for m in consumers):
        return Verdict(True)
    if not all(_empty(m) for m in members if m.producer):
        return Verdict(False)
    folds: dict[tuple[str, str], torch.Tensor] = {}
    for m in consumers:
        if _empty(m):
            continue  # reads the constant through zero weights: nothing to fold
        constant = _constant(m, stats)
        if constant is None:
            return Verdict(False)
        if not constant.any():
            continue
        target = _fold_target(engine, m)
        if target is None:
            return Verdict(False, unfoldable=True)
        folds[target] = folds.get(target, 0) + _contribution(m, constant)
    return Verdict(True, folds)


def _channel_dim(module: nn.Module, producer: bool) -> int:
    """The weight dimension that holds a layer's output (producer) or input channels."""
    transposed = getattr(module, "transposed", False)
    return int(producer == transposed)


def _empty(member: Member) -> bool:
    """Are all of this layer's weights for the channel zero?"""
    weight = member.module.weight.detach()
    index = torch.tensor(member.idxs, device=weight.device)
    return not bool(weight.index_select(_channel_dim(member.module, member.producer), index).any())


def _constant(member: Member, stats: dict) -> torch.Tensor | None:
    """The value this consumer reads at each of the channel's inputs, when that value is the
    same for every sample and position; None when it varies (or was never seen)."""
    if member.name not in stats:
        return None
    low, high = stats[member.name]
    index = torch.tensor(member.idxs, device=low.device)
    low, high = low[index], high[index]
    if not torch.equal(low, high) or not bool(torch.isfinite(low).all()):
        return None
    return low


# --- folding a constant ----------------------------------------------------------------------

def _fold_target(engine: ChannelEngine, member: Member) -> tuple[str, str] | None:
    """Where a constant input of this consumer can go exactly: its bias, or the running mean
    of the BatchNorm that alone reads it; None for padded, grouped or transposed convs."""
    module = member.module
    if isinstance(module, nn.modules.conv._ConvNd) and (
            module.transposed or module.groups != 1 or not _unpadded(module)):
        return None
    if module.bias is not None:
        return member.name, "bias"
    node = engine.graph.module2node.get(module)
    readers = {out.module for out in node.outputs} if node is not None else set()
    if len(readers) == 1:
        reader = next(iter(readers))
        if isinstance(reader, nn.modules.batchnorm._BatchNorm):
            # without running statistics BatchNorm subtracts the batch mean: nothing to do
            kind = "running_mean" if reader.running_mean is not None else "batch_mean"
            return engine.names[reader], kind
    return None


def _unpadded(conv: nn.modules.conv._ConvNd) -> bool:
    return conv.padding == "valid" or (not isinstance(conv.padding, str)
                                       and all(p == 0 for p in conv.padding))


def _contribution(member: Member, constant: torch.Tensor) -> torch.Tensor:
    """What the constant adds to each output of the consumer (float64, to fold exactly)."""
    weight = member.module.weight.detach().double()
    index = torch.tensor(member.idxs, device=weight.device)
    weight = weight.index_select(1, index)
    if weight.dim() > 2:
        weight = weight.flatten(2).sum(2)  # an unpadded kernel sees the constant everywhere
    return weight @ constant.to(weight)


def _cut(model: nn.Module, engine: ChannelEngine, plan: Plan) -> None:
    """Fold the constants, then remove the channels (the engine's graph is ``model``'s)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for (name, kind), amount in plan.folds.items():
            module = modules[name]
            if kind == "bias":
                module.bias.add_(amount.to(module.bias))
            elif kind == "running_mean":
                module.running_mean.sub_(amount.to(module.running_mean))
    engine.remove(plan.drop)


# --- measuring and checking on random inputs --------------------------------------------------

@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    with eval_mode(model), torch.no_grad():
        yield


def _random_inputs(model: nn.Module, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SAMPLES, *shape, generator=generator).to(param.device, dtype)


def _measure(model: nn.Module, inputs: torch.Tensor) -> dict[str, tuple[torch.Tensor,
                                                                       torch.Tensor]]:
    """Per Conv/Linear layer, the smallest and largest value each input channel (feature)
    takes over samples, positions and calls, in eval mode."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str, module: nn.Module, args: tuple) -> None:
        x = args[0] if args and torch.is_tensor(args[0]) else None
        if x is None:
            return
        dim = -1 if isinstance(module, nn.Linear) else 1
        flat = x.detach().movedim(dim, 0).flatten(1)
        low, high = flat.amin(1), flat.amax(1)
        if name in stats:
            low, high = torch.minimum(low, stats[name][0]), torch.maximum(high, stats[name][1])
        stats[name] = (low, high)

    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: hook(n, mod, args))
               for name, m in model.named_modules() if isinstance(m, WEIGHTED)]
    try:
        with _evaluating(model):
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _forward(model: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    with _evaluating(model):
        return list(_tensors(model(inputs)))


def _tensors(output) -> Iterator[torch.Tensor]:
    """The tensors of a model's output (a tensor, or tuples, lists and dicts of them)."""
    if torch.is_tensor(output):
        yield output.detach().float()
    elif isinstance(output, (list, tuple)):
        for item in output:
            yield from _tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _tensors(item)


def _difference(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """The largest output difference of the cut copy; an error when it is more than float
    rounding (the model has not been touched yet)."""
    if len(reference) != len(outputs) or any(a.shape != b.shape
                                             for a, b in zip(reference, outputs, strict=True)):
        raise CompressError("--method shrink stopped: the thinned model's outputs changed "
                            "shape; the model is unchanged")
    worst, scale = 0.0, 1.0
    for a, b in zip(reference, outputs, strict=True):
        worst = max(worst, float((a - b).abs().max()) if a.numel() else 0.0)
        scale = max(scale, float(a.abs().max()) if a.numel() else 0.0)
    if not worst <= TOLERANCE * scale:  # also catches NaN
        raise CompressError(f"--method shrink stopped: removing the empty channels changed the "
                            f"outputs (by up to {worst:.3g}), so the model uses an operation "
                            "the channel engine cannot follow (a reduction across channels?); "
                            "the model is unchanged")
    return worst


# --- the result ----------------------------------------------------------------------------

def _details(plan: Plan, original: dict[str, int], params: int, macs: int) -> dict:
    return {"removed_channels": plan.removed, "folded_channels": plan.folded,
            "params": params, "macs": macs, "original_params": original["params"],
            "original_macs": original["macs"],
            "mac_ratio": macs / original["macs"] if original["macs"] else None}


def _notes(plan: Plan, difference: float | None) -> list[str]:
    """What was cut and, as plainly, what was kept and why."""
    if difference is not None:
        folded = f" ({plan.folded} of them held a constant, now folded into the next layer's " \
            "bias or BatchNorm)" if plan.folded else ""
        notes = [f"removed {plan.removed} empty channels in {len(plan.drop)} groups{folded}; "
                 f"outputs unchanged (largest difference {difference:.1e} on {SAMPLES} random "
                 "inputs)"]
    elif plan.unfoldable or plan.skipped:
        notes = ["no channel could be removed (see below): the model is unchanged"]
    else:
        notes = ["no channel is empty (the zero weights are scattered inside channels): the "
                 "model is unchanged"]
    if plan.floored:
        keeps = "its lowest-index one" if plan.floor == 1 else \
            f"its lowest-index ones, to keep {plan.floor}"
        notes.append(f"{plan.floored} groups had every channel empty; each keeps {keeps} "
                     "(exact all the same)")
    if plan.unfoldable:
        notes.append(f"{plan.unfoldable} constant channels were kept: a padded or grouped conv "
                     "(or a layer with neither bias nor BatchNorm) reads them, so their "
                     "constant cannot be folded exactly")
    if plan.skipped:
        notes.append(f"{plan.skipped} channel groups were left alone: they pass through a "
                     "layer that mixes channels in a way this method cannot prove exact "
                     "(LayerNorm, GroupNorm, grouped conv, attention, custom layer or "
                     "parameter)")
    return notes


def _unchanged(plan: Plan, original: dict[str, int]) -> OneShotResult:
    details = _details(plan, original, original["params"], original["macs"])
    return OneShotResult(notes=_notes(plan, None), details=details)


def _build(request: OneShotRequest) -> Shrink:
    if request.sparsity is not None or request.target_macs is not None:
        raise CompressError("--method shrink removes exactly the channels unstructured pruning "
                            "emptied; it takes no --sparsity or --target-macs")
    if request.min_channels is not None and request.min_channels < 1:
        raise CompressError(f"--min-channels must be at least 1, got {request.min_channels}")
    return Shrink(request)


register("shrink", _build)
