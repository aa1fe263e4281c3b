"""``compress bench --profile``: where the time goes, from onnxruntime's own profiler.

The profiler records every kernel of every run; this sums them per operator type and per
node of the optimized graph, divides by the number of runs, and names each node's layer
(the weight it reads) where the original graph says so. Profiling slows the kernels a
little, so it runs in its own session, after the timed runs.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from compress.errors import CompressError
from export.session import open_session

KERNEL_SUFFIX = "_kernel_time"
WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
FUSED_AFTER = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Add", "Sum")


def layer_names(path: Path) -> dict[str, str]:
    """Original node and value names -> the layer they belong to (the weight's name without
    ``.weight``), for the nodes that read a weight and the activation or residual sum right
    after them, which onnxruntime fuses into the same kernel. Empty for ORT-format files
    and where the onnx package is missing: the profile then names nodes only."""
    if path.suffix.lower() == ".ort":
        return {}
    try:
        import onnx

        from export.onnx_inspect import layer_name
        from export.quantize import dequantized_sources

        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return {}
    dequantized = dequantized_sources(model)
    names: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1:
            weight = dequantized.get(node.input[1], node.input[1])
            layer = layer_name(weight)
            names.update({node.name: layer, node.output[0]: layer})
    for _ in range(2):  # Conv -> Add -> Relu is fused into one kernel at most
        for node in model.graph.node:
            source = next((names[i] for i in node.input if i in names), None)
            if node.op_type in FUSED_AFTER and source and node.output[0] not in names:
                names.update({node.name: source, node.output[0]: source})
    return names


def _layer_of(node: str, layers: dict[str, str]) -> str | None:
    """onnxruntime renames the nodes it rewrites: ``X_token_N`` (fusions), ``fused X``,
    ``<output>_nchwc`` (blocked layouts, named after the fused node's output)."""
    plain = re.sub(r"_token_\d+$", "", node).removeprefix("fused ")
    for candidate in (node, plain, plain.removesuffix("_nchwc")):
        if candidate in layers:
            return layers[candidate]
    return None


def summarize(events: list[dict], runs: int, layers: dict[str, str]) -> dict:
    """Per operator type and per node: milliseconds per run and share of kernel time."""
    per_node: dict[str, dict] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith(KERNEL_SUFFIX):
            continue
        name = event["name"][: -len(KERNEL_SUFFIX)]
        entry = per_node.setdefault(name, {"op_type": event.get("args", {}).get("op_name", "?"),
                                           "us": 0.0})
        entry["us"] += float(event.get("dur", 0))
    total_us = sum(e["us"] for e in per_node.values()) or 1.0
    by_type: dict[str, dict] = defaultdict(lambda: {"nodes": 0, "us": 0.0})
    for entry in per_node.values():
        by_type[entry["op_type"]]["nodes"] += 1
        by_type[entry["op_type"]]["us"] += entry["us"]
    op_rows = [{"op_type": op, "nodes": v["nodes"], "ms_per_run": v["us"] / runs / 1e3,
                "share": v["us"] / total_us} for op, v in by_type.items()]
    node_rows = [{"node": name, "op_type": e["op_type"],
                  "layer": _layer_of(name, layers),
                  "ms_per_run": e["us"] / runs / 1e3, "share": e["us"] / total_us}
                 for name, e in per_node.items()]
    model_runs = [float(e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run"]
    return {
        "runs": runs,
        "kernel_ms_per_run": total_us / runs / 1e3,
        "model_run_ms_p50": float(np.median(model_runs)) / 1e3 if model_runs else None,
        "by_op_type": sorted(op_rows, key=lambda r: -r["ms_per_run"]),
        "by_node": sorted(node_rows, key=lambda r: -r["ms_per_run"]),
    }


def profile(model: str | Path, feed: dict, *, threads: int, runs: int, warmup: int) -> dict:
    """Run ``model`` ``warmup + runs`` times under onnxruntime's profiler; summarize the
    last ``runs``."""
    path = Path(model)
    if runs < 1:
        raise CompressError("--runs must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        session = open_session(path, threads=threads, profile_prefix=str(Path(tmp) / "p"))
        for _ in range(warmup + runs):
            session.run(None, feed)
        trace = Path(session.end_profiling())
        try:
            events = json.loads(trace.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CompressError(f"could not read onnxruntime's profile ({exc})") from None
    return summarize(_last_runs(events, runs), runs, layer_names(path))


def _last_runs(events: list[dict], runs: int) -> list[dict]:
    """The events of the last ``runs`` runs (runs are sequential, so: from the start of the
    first of them on); the warm-up runs are profiled too and are dropped here."""
    starts = sorted(float(e.get("ts", 0)) for e in events
                    if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(starts) < runs:
        return events
    cut = starts[-runs]
    return [e for e in events if float(e.get("ts", 0)) >= cut]
