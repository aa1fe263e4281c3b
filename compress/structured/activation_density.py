"""Activation density: the share of a channel's activations that are non-zero.

Activation-density pruning (ADP) sets each layer's width from how many of its post-ReLU
activations are non-zero. A channel group (`ChannelEngine.groups`) is measured where the
next layers read it: a forward pre-hook on every layer that takes the group's channels as
input (a conv, or a linear after flattening) captures that input and walks back through
pooling, dropout, flattening and identity layers to the activation module (ReLU, ReLU6,
Hardswish, Threshold) that produced it, so a max-pool between ReLU and the next conv does
not inflate the count. Where no such activation is found the input itself is measured.
A group read by several layers (a residual stream) gets the mean over its readers.

Measurement runs in eval mode (BatchNorm uses its running statistics) without gradients on
a fixed probe set, so two readings differ only because the weights did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.modes import eval_mode
from compress.structured.engine import ChannelEngine, position_multiple

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Threshold)
PASS_THROUGH = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d,
                nn.Flatten, nn.Identity)
READERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class DensityReading:
    """One measurement: per group, the density of each channel and of the whole layer."""

    channels: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def layers(self) -> dict[str, float]:
        return {root: float(d.mean()) for root, d in self.channels.items()}

    def change_from(self, earlier: DensityReading | None) -> float:
        """Largest change of a layer density since ``earlier`` (inf when not comparable)."""
        if earlier is None:
            return math.inf
        common = set(self.channels) & set(earlier.channels)
        if not common or any(self.channels[r].numel() != earlier.channels[r].numel()
                             for r in common):
            return math.inf
        now, before = self.layers, earlier.layers
        return max(abs(now[r] - before[r]) for r in common)


def has_activations(model: nn.Module) -> bool:
    return any(isinstance(m, ACTIVATIONS) for m in model.modules())


class _Tape:
    """What the leaf modules of one forward pass produced, to walk a reader's input back."""

    def __init__(self) -> None:
        self.produced: dict[int, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}

    def record(self, module: nn.Module, inputs: tuple, output) -> None:
        if torch.is_tensor(output) and inputs and torch.is_tensor(inputs[0]):
            # keep the tensors alive so that their ids stay unique during the pass
            self.produced[id(output)] = (module, inputs[0], output)

    def source(self, x: torch.Tensor) -> torch.Tensor:
        """The activation output behind ``x``, or ``x`` when there is none."""
        seen = 0
        while seen < 16:
            seen += 1
            entry = self.produced.get(id(x))
            if entry is None and x._base is not None:  # a view, such as x.flatten(1)
                entry = self.produced.get(id(x._base))
            if entry is None:
                return x
            module, before, out = entry
            if isinstance(module, ACTIVATIONS):
                return out
            if not isinstance(module, PASS_THROUGH):
                return x
            x = before
        return x


def _channel_density(source: torch.Tensor, reader: nn.Module, idxs: list[int],
                     width: int) -> torch.Tensor:
    """Density of each of the group's ``width`` channels in ``source`` (what ``reader``
    reads), from the reader's input indices of those channels."""
    nonzero = (source != 0).float()
    per_channel = nonzero.transpose(0, 1).flatten(1).mean(1) if nonzero.dim() > 1 \
        else nonzero
    read = reader.in_features if isinstance(reader, nn.Linear) else reader.in_channels
    per_index = max(1, len(idxs) // width)  # a flattened reader lists k entries a channel
    features = torch.as_tensor(idxs, device=per_channel.device)
    if per_channel.numel() != read and read % per_channel.numel() == 0:
        features = features // (read // per_channel.numel())  # read through a flatten
    values = per_channel[features.clamp_max(per_channel.numel() - 1)]
    return values.view(width, per_index).mean(1)


@dataclass
class ReadLayout:
    """Which layers read each group's channels, at which input indices (valid until the
    next cut)."""

    widths: dict[str, int]
    readers: dict[str, list[tuple[str, list[int]]]]


def read_layout(engine: ChannelEngine) -> ReadLayout:
    modules = dict(engine.model.named_modules())
    widths = {g.root: g.width for g in engine.groups()}
    readers: dict[str, list[tuple[str, list[int]]]] = {}
    for root in widths:
        for name, is_out, idxs in engine.members(root):
            if not is_out and isinstance(modules[name], READERS):
                readers.setdefault(name, []).append((root, idxs))
    return ReadLayout(widths, readers)


@torch.no_grad()
def measure(engine: ChannelEngine, probe: list[torch.Tensor],
            layout: ReadLayout | None = None) -> DensityReading:
    """Per-channel activation density of every group of ``engine`` on the ``probe`` batches
    (``layout``: `read_layout` of the engine as it is now, to save finding it again)."""
    model = engine.model
    modules = dict(model.named_modules())
    layout = layout or read_layout(engine)
    widths, readers = layout.widths, layout.readers
    sums = {root: torch.zeros(w) for root, w in widths.items()}
    counts = dict.fromkeys(widths, 0)
    tape = _Tape()
    handles = [m.register_forward_hook(tape.record) for m in model.modules()
               if not list(m.children())]

    def read(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            source = tape.source(inputs[0])
            for root, idxs in readers[name]:
                sums[root] += _channel_density(source, module, idxs, widths[root]).cpu()
                counts[root] += 1
        return hook

    handles += [modules[name].register_forward_pre_hook(read(name)) for name in readers]
    try:
        with eval_mode(model):
            for x in probe:
                tape.produced.clear()
                model(x)
    finally:
        tape.produced.clear()
        for h in handles:
            h.remove()
    return DensityReading({root: sums[root] / counts[root] for root in widths
                           if counts[root]})


def density_width(density: float, width: int, *, round_to: int = 8, floor: int = 1,
                  blocks: int = 1) -> int:
    """The width ADP gives a layer: ``ceil(density × width)`` rounded up to a multiple of
    ``round_to`` channels, at least ``floor``, never wider than it is. A group whose channels
    form ``blocks`` equal blocks keeps whole positions of every block."""
    positions = width // blocks
    keep = max(1, math.ceil(min(1.0, max(0.0, density)) * positions - 1e-9))
    multiple = position_multiple(round_to, blocks)
    keep = math.ceil(keep / multiple) * multiple
    keep = max(keep, -(-floor // blocks), 1)
    return min(positions, keep) * blocks
