"""Channel widths chosen by measured latency, not by one share for every layer.

A layer table (``compress bench MODEL.onnx --layer-table``; `export.runtime.layer_table`)
says how long each prunable layer takes alone at a grid of input and output widths, on the
CPU, threads and precision the model will run with. From it, the latency of any choice of
widths is predicted as the sum of its layers' times, each interpolated (bilinearly) in its
own table at the widths the choice gives it: a group's kept channels are the outputs of the
layers it leads and the inputs of the layers that read it.

`allocate` then removes channels greedily, a rounding step at a time, from the group whose
next step loses the least importance (the method's own channel scores, each group's divided
by their mean so that groups compare, and weighted up as the group thins: `thinning_costs`)
per millisecond of predicted time saved, until the prediction meets the target. Widths
where a kernel is slow show as slow in the table and are avoided by it; a step that saves
nothing is never taken.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from compress.errors import CompressError

LOOKAHEAD = 8  # rounding steps tried at once per group: past a knee, without trying them all


@dataclass
class LayerTimes:
    """One layer's table: times at a grid of (input width, output width)."""

    inputs: list[int]
    outputs: list[int]
    ms: dict[tuple[int, int], float]
    depthwise: bool = False

    @classmethod
    def from_entry(cls, entry: dict) -> LayerTimes:
        """The entry's times less its `fixed_cost` (what running the layer alone costs
        whatever its widths)."""
        rows = [(int(i), int(o), float(t)) for i, o, t in entry["times_ms"]]
        fixed = fixed_cost(rows, bool(entry.get("depthwise")))
        ms = {(i, o): max(0.0, t - fixed) for i, o, t in rows}
        return cls(sorted({i for i, _ in ms}), sorted({o for _, o in ms}), ms,
                   bool(entry.get("depthwise")))

    def at(self, cin: float, cout: float) -> float:
        """Interpolated time at widths ``cin`` x ``cout`` (clamped to the grid's range)."""
        if self.depthwise:
            return _interpolate(self.inputs, lambda i: self.ms[(i, i)], cout)
        return _interpolate(self.inputs, lambda i: _interpolate(
            self.outputs, lambda o: self.ms[(i, o)], cout), cin)


def fixed_cost(rows: list[tuple[int, int, float]], depthwise: bool) -> float:
    """The part of a layer's time alone that does not grow with its widths: the intercept
    of a least-squares fit ``a + b·in + c·out + d·in·out`` over its grid (``a + b·w + d·w²``
    for a depthwise layer), kept between 0 and the smallest time. A layer timed alone pays
    it once per run (a session run, layout conversions at its edges); inside the model the
    layers share those, so the table's differences carry over and its intercepts do not."""
    if len(rows) < 2:
        return 0.0
    i = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    o = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    t = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    columns = [torch.ones_like(i), i, i * o] if depthwise or len(set(i.tolist())) < 2 \
        or len(set(o.tolist())) < 2 else [torch.ones_like(i), i, o, i * o]
    design = torch.stack(columns, dim=1)
    coef = torch.linalg.lstsq(design, t.unsqueeze(1), driver="gelsd").solution.flatten()
    return float(min(max(coef[0].item(), 0.0), t.min().item()))


def _interpolate(grid: list[int], value, x: float) -> float:
    if x <= grid[0]:
        return value(grid[0])
    if x >= grid[-1]:
        return value(grid[-1])
    k = bisect.bisect_right(grid, x)
    lo, hi = grid[k - 1], grid[k]
    t = (x - lo) / (hi - lo)
    return (1 - t) * value(lo) + t * value(hi)


@dataclass
class GroupLayers:
    """What a channel group's width changes: the layers whose outputs it is, and those
    whose inputs it is."""

    outputs: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)


class LatencyModel:
    """Predicted latency (ms, the table's sum over its layers) of any widths of the groups."""

    def __init__(self, table: dict, full: dict[str, tuple[int, int]],
                 groups: dict[str, tuple[int, GroupLayers]]) -> None:
        """``full``: each table layer's (input, output) channels in the model; ``groups``:
        root -> (full width, the layers it feeds)."""
        self.times = {e["layer"]: LayerTimes.from_entry(e) for e in table["layers"]}
        self.full, self.groups = full, groups
        self.touched: dict[str, set[str]] = {
            root: {n for n in [*layers.outputs, *layers.inputs] if n in self.times}
            for root, (_, layers) in groups.items()}
        self._out_group = {n: root for root, (_, g) in groups.items() for n in g.outputs}
        self._in_group = {n: root for root, (_, g) in groups.items() for n in g.inputs}

    def layer_ms(self, name: str, kept: dict[str, int]) -> float:
        cin, cout = self.full[name]
        scale_in = self._share(self._in_group.get(name), kept)
        scale_out = self._share(self._out_group.get(name), kept)
        return self.times[name].at(cin * scale_in, cout * scale_out)

    def _share(self, root: str | None, kept: dict[str, int]) -> float:
        if root is None:
            return 1.0
        return kept[root] / self.groups[root][0]

    def predict(self, kept: dict[str, int]) -> float:
        return sum(self.layer_ms(name, kept) for name in self.times)

    def saving(self, root: str, kept: dict[str, int], narrower: int) -> float:
        """Predicted ms saved by narrowing group ``root`` to ``narrower`` channels."""
        after = {**kept, root: narrower}
        return sum(self.layer_ms(n, kept) - self.layer_ms(n, after) for n in self.touched[root])


@dataclass
class Allocation:
    kept: dict[str, int]  # root -> channels kept
    predicted_ms: float
    steps: int


def allocate(model: LatencyModel, scores: dict[str, torch.Tensor], target_ms: float,
             step: dict[str, int], floor: dict[str, int],
             blocks: dict[str, int], start: dict[str, int] | None = None) -> Allocation:
    """Widths whose predicted latency meets ``target_ms`` (or the least the floors allow),
    removing ``step[root]`` of the lowest-scored positions at a time from the group that
    loses least importance per ms saved (see the module). ``scores`` are per position; a
    position is ``blocks[root]`` channels (grouped convs, attention heads); ``start``: the
    positions each group keeps before the first step (default: all). Returns kept
    positions."""
    order = {root: thinning_costs(s) for root, s in scores.items()}
    kept = {root: len(s) for root, s in order.items()}
    if start is not None:
        kept = {root: min(n, max(floor[root], start.get(root, n))) for root, n in kept.items()}

    def channels(positions: dict[str, int]) -> dict[str, int]:
        return {root: n * blocks[root] for root, n in positions.items()}

    predicted, steps = model.predict(channels(kept)), 0
    while predicted > target_ms:
        best, best_rate = None, None
        for root, values in order.items():
            removed = len(values) - kept[root]
            # narrower widths up to LOOKAHEAD steps away: a table is not monotone (a
            # kernel's knee), so the next step alone may save nothing where two would
            least = max(floor[root] - 1, kept[root] - LOOKAHEAD * step[root] - 1)
            for narrower in range(kept[root] - step[root], least, -step[root]):
                saved = model.saving(root, channels(kept), narrower * blocks[root])
                if saved <= 0:
                    continue
                rate = sum(values[removed:len(values) - narrower]) / saved
                if best_rate is None or rate < best_rate:
                    best, best_rate = (root, narrower), rate
        if best is None:
            break
        kept[best[0]] = best[1]
        predicted, steps = model.predict(channels(kept)), steps + 1
    return Allocation(kept, predicted, steps)


def thinning_costs(scores: torch.Tensor) -> list[float]:
    """What removing each position costs, lowest first: its score over the group's mean,
    times ``n / k`` for a group of ``n`` positions that still has ``k`` when it goes. Plain
    scores rate the tenth channel taken from a layer of sixteen like the tenth from a layer
    of 256, and the greedy then cuts every other layer to its floor, where a conv with
    either side narrow costs nearly nothing (vgg-small: 84.5 % against 88.0 % for one share
    everywhere, at the same measured p50). Weighted, a group thinned to a share ``f`` of
    its width costs about ``n·ln(1/f)`` for even scores: deep cuts of one group cost more
    than even cuts of two (87.7 % there)."""
    values = torch.sort(scores / scores.mean().clamp_min(1e-12)).values.tolist()
    n = len(values)
    return [v * n / (n - j) for j, v in enumerate(values)]


def check_table(table: dict, layers: dict[str, tuple[int, int]],
                thinned: bool = False) -> None:
    """Refuse (one line) a table whose layers are not this model's (``layers``: every conv
    and linear layer's input and output channels; with ``thinned``, channels at most the
    table's: the model was cut since the table was made)."""
    if not isinstance(table, dict) or not isinstance(table.get("layers"), list) or \
            not table["layers"] or \
            not all(isinstance(e, dict) and isinstance(e.get("times_ms"), list)
                    and e["times_ms"] for e in table["layers"]):
        raise CompressError("the latency table is not one that `compress bench "
                            "--layer-table` writes")
    for entry in table["layers"]:
        name = entry.get("layer")
        if name not in layers:
            raise CompressError(f"the latency table's layer {name} is not in this model: it "
                                f"was made for another model ({table.get('model', '?')})")
        channels = (entry.get("input_channels"), entry.get("output_channels"))
        fits = channels == layers[name] or thinned and all(
            isinstance(t, int) and m <= t for m, t in zip(layers[name], channels, strict=True))
        if not fits:
            raise CompressError(f"the latency table's layer {name} has {channels[0]}x"
                                f"{channels[1]} channels and this model's "
                                f"{layers[name][0]}x{layers[name][1]}: it was made for "
                                "another model")
