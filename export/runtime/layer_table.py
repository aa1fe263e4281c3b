"""``compress bench FILE --layer-table OUT.json``: how long each prunable layer of an
exported model takes alone, at a grid of its input and output widths, measured where the
model will run.

Every Conv, Gemm and MatMul that reads a stored weight is rebuilt alone as onnxruntime
would run it inside the model: the same kernel, strides, padding, dilation and groups, the
real spatial size of its input, the file's precision (int8 in the QDQ form our int8
exports take) and the given threads, at widths from a grid over its input and output
channels (depthwise layers: one width, since they keep ``groups == channels``). Each entry
is the median of timed runs after a warm-up. A layer run alone pays what a session run and its
layout conversions cost, which the layers inside the model do not pay each; the reader of
the table takes that off (`compress.structured.latency_allocation`). The table records the
CPU, threads, batch,
onnxruntime version and the model's digest, so that a table made for another model, CPU
or thread count can be told apart. Needs onnx and onnxruntime, not torch.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from compress.errors import CompressError
from export.runtime.latency import cpu_name
from export.runtime.peak import file_precision, single_layer, time_session
from export.session import open_session

TABLE_FORMAT = 1
LAYER_SECONDS = 0.02  # each width pair is timed for at least this long


def width_grid(channels: int, points: int, step: int) -> list[int]:
    """At most ``points`` widths from ``step`` to ``channels``: multiples of ``step`` spread
    evenly, the full width always included."""
    if channels <= step:
        return [channels]
    candidates = list(range(step, channels, step)) + [channels]
    if len(candidates) <= points:
        return candidates
    picks = np.linspace(0, len(candidates) - 1, points).round().astype(int)
    return sorted({candidates[i] for i in picks})


def _layer_shapes(layer: dict, cin: int, cout: int, batch: int) -> tuple[list, list, dict]:
    """Weight shape, input shape and attributes of ``layer`` at widths ``cin`` x ``cout``."""
    attributes = dict(layer["attributes"])
    if layer["op_type"] == "Conv":
        _, per_group, *kernel = layer["weight_shape"]
        depthwise = int(attributes.get("group", 1)) > 1 and per_group == 1
        if depthwise:  # (other grouped convolutions are left out of the table)
            attributes["group"] = cin
        spatial = layer["input_shape"][2:]
        weight = [cout, 1 if depthwise else cin, *kernel]
        return weight, [batch, cin, *spatial], attributes
    rows = layer["input_shape"][:-1]
    transposed = layer["op_type"] == "Gemm" and int(attributes.get("transB", 0))
    weight = [cout, cin] if transposed else [cin, cout]
    return weight, [batch, *rows[1:], cin] if rows else [batch, cin], attributes


def _full_widths(layer: dict) -> tuple[int, int, bool]:
    """(input channels, output channels, depthwise) of ``layer`` as the file has it."""
    shape = layer["weight_shape"]
    if layer["op_type"] == "Conv":
        groups = int(layer["attributes"].get("group", 1))
        return shape[1] * groups, shape[0], groups > 1 and shape[1] == 1
    transposed = layer["op_type"] == "Gemm" and int(layer["attributes"].get("transB", 0))
    return (shape[1], shape[0], False) if transposed else (shape[0], shape[1], False)


def _time_layer(layer: dict, cin: int, cout: int, precision: str, threads: int, batch: int,
                workdir: Path) -> float:
    import onnx

    weight, input_shape, attributes = _layer_shapes(layer, cin, cout, batch)
    model = single_layer(layer["op_type"], weight, input_shape, attributes, precision)
    path = workdir / "layer.onnx"
    onnx.save(model, str(path))
    session = open_session(path, threads=threads)
    feed = {"x": np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)}
    return time_session(session, feed, min_seconds=LAYER_SECONDS) * 1e3


def layer_table(path: str | Path, *, threads: int = 1, batch: int = 1, points: int = 6,
                step: int = 8, on_progress=None) -> dict:
    """The table of ``path`` (see the module): one entry per layer with its full widths and
    ``times_ms`` as ``[input width, output width, ms]`` rows."""
    from export.onnx_inspect import load_checked, model_work, weight_layers
    from export.ort import load_onnxruntime

    if points < 1 or step < 1:
        raise CompressError("--table-widths and --table-step must be at least 1")
    path = Path(path)
    if path.suffix.lower() == ".ort":
        raise CompressError("a layer table needs the ONNX file (an .ort file has no original "
                            "graph to read the layers from)")
    model, _ = load_checked(path)
    precision = file_precision(set(model_work(model)["op_types"]))
    layers = weight_layers(model)
    if not layers:
        raise CompressError(f"{path} has no Conv, Gemm or MatMul layer with a stored weight")
    plans = []
    for layer in layers:
        cin, cout, depthwise = _full_widths(layer)
        if int(layer["attributes"].get("group", 1)) > 1 and not depthwise:
            continue  # grouped (not depthwise) convolutions are left out
        pairs = [(c, c) for c in width_grid(cin, points, step)] if depthwise else \
            [(i, o) for i in width_grid(cin, points, step)
             for o in width_grid(cout, points, step)]
        plans.append((layer, cin, cout, depthwise, pairs))
    total, done, entries = sum(len(p[-1]) for p in plans), 0, []
    with tempfile.TemporaryDirectory(prefix="compress-table-") as work:
        for layer, cin, cout, depthwise, pairs in plans:
            rows = []
            for i, o in pairs:
                rows.append([i, o, _time_layer(layer, i, o, precision, threads, batch,
                                               Path(work))])
                done += 1
                if on_progress:
                    on_progress(done, total)
            entries.append({"layer": layer["layer"], "op_type": layer["op_type"],
                            "input_channels": cin, "output_channels": cout,
                            "depthwise": depthwise, "input_shape": layer["input_shape"],
                            "attributes": layer["attributes"], "times_ms": rows})
    return {"format": TABLE_FORMAT, "model": path.name, "model_sha256": _digest(path),
            "precision": precision, "threads": threads, "batch": batch,

            "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "onnxruntime": load_onnxruntime().__version__,
            "grid": {"points": points, "step": step}, "layers": entries}


def full_width_ms(table: dict) -> float:
    """The table's prediction for the file as it is: each layer's time at its full widths."""
    total = 0.0
    for entry in table["layers"]:
        full = [ms for i, o, ms in entry["times_ms"]
                if i == entry["input_channels"] and o == entry["output_channels"]]
        total += full[0] if full else 0.0
    return total


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()
