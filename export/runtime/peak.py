"""How close a file runs to what this CPU can do: the MAC rate onnxruntime reaches on a
large convolution and a large matrix product, measured on the spot, in fp32 and in int8.

Published peak figures (cores × vector width × clock) are rarely what a runtime reaches;
a large, regular layer run through the same runtime, threads and precision as the model is
the honest ceiling. The int8 probes are built as our int8 exports are (QuantizeLinear /
DequantizeLinear around the layer, weights stored as int8), so onnxruntime fuses them into
the same integer kernels. Building the probes needs the ``onnx`` package; without it the
peak is reported as unknown.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from export.session import open_session

CONV = {"channels": 256, "side": 28, "kernel": 3}  # 462 M MACs
MATMUL = {"rows": 256, "inner": 1024, "cols": 1024}  # 268 M MACs
MIN_SECONDS = 0.15  # each probe is timed for at least this long after its warm-up
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}


def conv_macs() -> int:
    c, s, k = CONV["channels"], CONV["side"], CONV["kernel"]
    return c * c * k * k * s * s


def matmul_macs() -> int:
    return MATMUL["rows"] * MATMUL["inner"] * MATMUL["cols"]


def single_layer(op_type: str, weight_shape: list[int], input_shape: list[int],
                 attributes: dict, precision: str):
    """An ONNX model of one Conv, Gemm or MatMul with random weights, fed ``input_shape``
    (float32): fp32, or int8 in the QDQ form our int8 exports take."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal(weight_shape).astype(np.float32)
    nodes, inits = [], []
    layer_input = "x"
    if precision == "int8":
        scale = float(np.abs(w).max() / 127) or 1.0
        inits += [numpy_helper.from_array(np.round(w / scale).astype(np.int8), "wq"),
                  numpy_helper.from_array(np.array(scale, np.float32), "ws"),
                  numpy_helper.from_array(np.array(0, np.int8), "wz"),
                  numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
                  numpy_helper.from_array(np.array(128, np.uint8), "xz")]
        nodes += [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]),
                  helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]
        layer_input, layer_output = "xd", "yf"
    else:
        inits.append(numpy_helper.from_array(w, "w"))
        layer_output = "y"
    nodes.append(helper.make_node(op_type, [layer_input, "w"], [layer_output], **attributes))
    if precision == "int8":
        nodes += [helper.make_node("QuantizeLinear", ["yf", "xs", "xz"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "xs", "xz"], ["y"])]
    graph = helper.make_graph(nodes, f"{op_type}-{precision}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime checks the graph as it loads it
    return model


def _probe(kind: str, precision: str):
    """The large layer the peak is measured on, and its input shape."""
    if kind == "conv":
        c, s, k = CONV["channels"], CONV["side"], CONV["kernel"]
        shape = [1, c, s, s]
        return single_layer("Conv", [c, c, k, k], shape, {"pads": [k // 2] * 4},
                            precision), shape
    r, i, o = MATMUL["rows"], MATMUL["inner"], MATMUL["cols"]
    return single_layer("MatMul", [i, o], [r, i], {}, precision), [r, i]


def time_session(session, feed: dict, min_seconds: float = MIN_SECONDS,
                 least_runs: int = 3, warmup: int = 2) -> float:
    """The median seconds of a session's runs, after ``warmup`` runs, timed for at least
    ``min_seconds`` and ``least_runs`` runs."""
    for _ in range(warmup):
        session.run(None, feed)
    times, started = [], time.perf_counter()
    while len(times) < least_runs or time.perf_counter() - started < min_seconds:
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


PROBES = [(kind, precision) for precision in ("fp32", "int8") for kind in ("conv", "matmul")]


def write_probes(folder: str) -> dict | None:
    """The probe models saved in ``folder``: ``{"conv-fp32": [path, input shape], ...}``;
    None without the onnx package. Run in `export.runtime.isolated.in_child`, so that the
    process that times them never imports onnx."""
    try:
        import onnx
    except ModuleNotFoundError:
        return None
    written = {}
    for kind, precision in PROBES:
        model, x_shape = _probe(kind, precision)
        path = Path(folder) / f"{kind}-{precision}.onnx"
        onnx.save(model, str(path))
        written[f"{kind}-{precision}"] = [str(path), x_shape]
    return written


def measured_peak(threads: int, probes: dict | None) -> dict | None:
    """The best GMAC/s of the conv and matmul probes (`write_probes`), per precision, at
    ``threads``: each probe's MACs over the median of its timed runs. None without probes."""
    if probes is None:
        return None
    peak: dict = {"threads": threads}
    for precision in ("fp32", "int8"):
        rates = {}
        for kind in ("conv", "matmul"):
            path, x_shape = probes[f"{kind}-{precision}"]
            session = open_session(path, threads=threads)
            feed = {"x": np.random.default_rng(1).standard_normal(x_shape, dtype=np.float32)}
            macs = conv_macs() if kind == "conv" else matmul_macs()
            rates[kind] = macs / time_session(session, feed) / 1e9
        peak[precision] = max(rates.values())
        peak[f"{precision}_by_layer"] = rates
    return peak


def file_precision(op_types: set[str]) -> str:
    """int8 when the graph quantizes anything, else fp32."""
    return "int8" if op_types & QUANTIZED_OPS else "fp32"


def efficiency(macs: int | None, p50_ms: float, batch: int, precision: str,
               peak: dict | None) -> dict:
    """The file's MACs, the GMAC/s it reached at p50, and that as a share of the peak."""
    if not macs:
        return {"macs": macs, "gmacs_per_s": None, "precision": precision,
                "peak_gmacs_per_s": peak, "share_of_peak": None}
    rate = macs * batch / (p50_ms / 1e3) / 1e9
    top = peak.get(precision) if peak else None
    return {"macs": macs, "gmacs_per_s": rate, "precision": precision,
            "peak_gmacs_per_s": peak, "share_of_peak": rate / top if top else None}


def layer_rates(profile: dict, layer_macs: dict[str, int], batch: int,
                peak: float | None) -> list[dict]:
    """Each layer's kernel time per run and share (its nodes' summed, from the profile), its
    MACs, and the GMAC/s and share of the peak its kernels reached: whether arithmetic or
    per-operator overhead dominates it."""
    times: dict[str, list[float]] = {}
    for row in profile["by_node"]:
        if row["layer"]:
            spent = times.setdefault(row["layer"], [0.0, 0.0])
            spent[0] += row["ms_per_run"]
            spent[1] += row["share"]
    rows = []
    for layer, (ms, share) in times.items():
        macs = layer_macs.get(layer)
        rate = macs * batch / (ms / 1e3) / 1e9 if macs and ms > 0 else None
        rows.append({"layer": layer, "ms_per_run": ms, "share": share, "macs": macs,
                     "gmacs_per_s": rate,
                     "share_of_peak": rate / peak if rate is not None and peak else None})
    return sorted(rows, key=lambda r: -r["ms_per_run"])
