"""Per-layer counts and MACs read from an exported ONNX file, with numpy and onnx only.

Packed weights are decoded from the packed stream, so the non-zeros reported are
the ones in the file, not the ones the metadata claims.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from compress.errors import CompressError, first_line
from export.integrity import IntegrityReport, check_integrity, computed_weights
from export.limits import MAX_TENSOR_MB
from export.metadata import model_metadata, tensor_metadata
from export.packing import PREFIX, PackedStream, decode, read_stream
from export.quantize import dequantized_sources, quantization_parameters, quantized_weights

# float weights and biases, and the int32 biases of a QDQ-quantized model
PARAMETER_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT32)


def load_onnx(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if path.is_dir() and (path / "checkpoint.pt").is_file():
        raise CompressError(f"{path} is a run directory, not a model file; export it first: "
                            f"compress export {path} --onnx {path.name}.onnx")
    if path.is_dir():
        raise CompressError(f"{path} is a directory, not an ONNX file")
    if not path.is_file():
        raise CompressError(f"no ONNX file at {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several kinds on foreign bytes
        raise CompressError(f"{path} is not a readable ONNX model ({type(exc).__name__})") \
            from None
    if not model.graph.node:
        raise CompressError(f"{path} is not an ONNX model (it has no graph)")
    _check_text(model, path)
    return model


def _texts(model: onnx.ModelProto):
    """Every name and metadata string the readers use (protobuf hands proto2 strings that
    are not UTF-8 back as bytes)."""
    graph = model.graph
    for prop in model.metadata_props:
        yield prop.key
        yield prop.value
    for tensor in graph.initializer:
        yield tensor.name
        for prop in tensor.metadata_props:
            yield prop.key
            yield prop.value
    for node in graph.node:
        yield from (node.op_type, node.domain, node.name, *node.input, *node.output)
    for info in [*graph.input, *graph.output, *graph.value_info]:
        yield info.name
    for opset in model.opset_import:
        yield opset.domain


def _check_text(model: onnx.ModelProto, path: str | Path) -> None:
    if any(not isinstance(text, str) for text in _texts(model)):
        raise CompressError(f"{path} is damaged: a name or metadata entry is not valid UTF-8")


def load_checked(path: str | Path, *, ignore_digest: bool = False,
                 max_tensor_mb: float = MAX_TENSOR_MB) -> tuple[onnx.ModelProto, IntegrityReport]:
    """The file, its stored and computed sizes within ``max_tensor_mb``, its digests
    checked (refused when they differ, unless ``ignore_digest``)."""
    if max_tensor_mb <= 0:
        raise CompressError(f"--max-tensor-mb must be positive, got {max_tensor_mb}")
    model = load_onnx(path)
    report = check_integrity(model, str(path), ignore=ignore_digest,
                             max_bytes=int(max_tensor_mb * 2**20))
    return model, report


Packed = tuple[PackedStream, dict[str, np.ndarray]]  # a stream and the weights it decodes to


def read_packed(model: onnx.ModelProto) -> Packed | None:
    """The file's packed stream and the weights it decodes to, checked to fit together;
    None where nothing is packed."""
    if not any(t.name == PREFIX + "top" for t in model.graph.initializer):
        return None
    try:
        stream = read_stream(model)
        return stream, decode(stream)
    except (KeyError, ValueError, IndexError, StopIteration, ZeroDivisionError) as exc:
        raise CompressError(f"its packed weights are damaged: {_damage(exc)}") from None


def dense_weights(model: onnx.ModelProto,
                  packed: Packed | None = None) -> dict[str, tuple[np.ndarray, dict]]:
    """Every float initializer of rank >= 1 as a dense array, packed ones decoded
    (``packed``: what `read_packed` gave, where the caller has read it already)."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, tuple[np.ndarray, dict]] = {}
    packed = packed or read_packed(model)
    if packed is not None:
        stream, decoded = packed
        for t in stream.tensors:
            shape_init = inits.get(f"{t.name}__shape")
            meta = tensor_metadata(shape_init) if shape_init is not None else {}
            out[t.name] = (decoded[t.name], meta)
    skip = quantization_parameters(model)  # scales and zero points are not parameters
    int8_weights = quantized_weights(model)
    for name, tensor in inits.items():
        if name.startswith(PREFIX) or name in out or name in skip or not tensor.dims:
            continue
        if tensor.data_type in PARAMETER_TYPES or name in int8_weights:
            out[name] = (numpy_helper.to_array(tensor), tensor_metadata(tensor))
    return out


def _damage(exc: Exception) -> str:
    """What is wrong with a packed stream, in words."""
    if isinstance(exc, KeyError):
        return f"tensor {exc.args[0]} is missing"
    if isinstance(exc, StopIteration):
        return f"the graph has no Split of {PREFIX}split"
    return first_line(exc) if isinstance(exc, ValueError) else \
        f"its arrays do not fit together ({first_line(exc)})"


def _macs(model: onnx.ModelProto, weights: dict[str, tuple[np.ndarray, dict]]) -> tuple[int, int]:
    """(dense MACs, MACs with non-zero weights) for one sample, from inferred shapes."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return 0, 0
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in
                vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    dequantized = dequantized_sources(model)
    dense = nonzero = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = dequantized.get(node.input[1], node.input[1])
        weight = name if name in weights else None
        out_shape = shapes.get(node.output[0])
        if weight is None or not out_shape:
            continue
        w = weights[weight][0]
        if node.op_type == "Conv":
            positions = int(np.prod(out_shape[2:])) if len(out_shape) > 2 else 1
        else:
            positions = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
        dense += positions * w.size
        nonzero += positions * int(np.count_nonzero(w))
    return dense, nonzero


def _model_order(model: onnx.ModelProto, names) -> list[str]:
    """``names`` in the order the graph's layers read them (packed weights are produced by
    the decoder, which comes first; int8 ones are read through a DequantizeLinear, which the
    quantizer places anywhere)."""
    dequantized = dequantized_sources(model)
    first: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type == "DequantizeLinear":
            continue
        for name in node.input:
            first.setdefault(dequantized.get(name, name), index)
    return sorted(names, key=lambda name: first.get(name, len(model.graph.node)))


_VALUE_NAMES = {"float32": "fp32", "float16": "fp16", "int8": "int8"}


def packing_summary(stream: PackedStream | None) -> dict | None:
    """How the file stores its packed weights."""
    if stream is None:
        return None
    bits = 24 + stream.exponent_width if stream.exponent_width else \
        8 * stream.values.itemsize
    return {"weights": len(stream.tensors), "mask_levels": stream.levels,
            "mask_bytes": stream.mask_bytes,
            "values": "qdq-int8" if stream.raw_int8 else _VALUE_NAMES[stream.values.dtype.name],
            "value_coding": stream.value_coding, "value_bits": bits,
            "values_stored": int(stream.values.size)}


def _stale_metadata(weights: dict[str, tuple[np.ndarray, dict]]) -> list[str]:
    """Tensors whose recorded sparsity is not what the file holds."""
    notes = []
    for name, (array, meta) in weights.items():
        recorded = meta.get("sparsity")
        if isinstance(recorded, int | float) and array.size:
            actual = 1.0 - np.count_nonzero(array) / array.size
            if abs(actual - recorded) > 5e-6:
                notes.append(f"{name}: its metadata records sparsity {recorded}, the file "
                             f"holds {actual:.6f}")
    return notes


def _integrity_warnings(report: IntegrityReport) -> list[str]:
    if report.status == "damaged":
        return [f"the file is damaged: its {' and '.join(report.differs)} differ from what "
                "was exported (shown anyway, --ignore-digest)"]
    return []


def inspect_onnx(path: str | Path, *, ignore_digest: bool = False,
                 max_tensor_mb: float = MAX_TENSOR_MB) -> dict:
    """What the file holds. Packed weights are the ones onnxruntime decodes by running the
    file's own decoder, so a changed decoder constant shows here as it would at run time."""
    model, integrity = load_checked(path, ignore_digest=ignore_digest,
                                    max_tensor_mb=max_tensor_mb)
    try:
        packed = read_packed(model)
    except CompressError as exc:
        raise CompressError(f"{path}: {exc}") from None
    if packed is not None:  # decoded once: by the digest check where it ran
        missing = [n for n in packed[1] if n not in (integrity.weights or {})]
        run = {**(integrity.weights or {}),
               **(computed_weights(model, str(path), tuple(missing)) if missing else {})}
        packed = packed[0], {name: run.get(name, array) for name, array in packed[1].items()}
    weights = dense_weights(model, packed)
    layers = []
    for name in _model_order(model, weights):
        array, meta = weights[name]
        n = int(array.size)
        nz = int(np.count_nonzero(array))
        layers.append({"name": name, "shape": list(array.shape), "params": n, "nonzero": nz,
                       "sparsity": 1.0 - nz / n if n else 0.0,
                       "prunable": bool(meta.get("prunable", array.ndim >= 2)),
                       "encoding": meta.get("encoding", "dense")})
    params = sum(r["params"] for r in layers)
    nonzero = sum(r["nonzero"] for r in layers)
    prunable = [r for r in layers if r["prunable"]]
    p_params = sum(r["params"] for r in prunable)
    p_nonzero = sum(r["nonzero"] for r in prunable)
    macs = _macs(model, weights)
    return {
        "total": {"params": params, "nonzero": nonzero,
                  "sparsity": 1.0 - nonzero / params if params else 0.0,
                  "prunable_params": p_params, "prunable_nonzero": p_nonzero,
                  "prunable_sparsity": 1.0 - p_nonzero / p_params if p_params else 0.0,
                  "macs": macs[0], "nonzero_macs": macs[1],
                  "file_bytes": Path(path).stat().st_size},
        "layers": layers,
        "packing": packing_summary(packed[0] if packed else None),
        "warnings": _stale_metadata(weights) + _integrity_warnings(integrity),
        "integrity": integrity.to_dict(),
        "metadata": {**model_metadata(model), "ir_version": model.ir_version,
                     "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import}},
    }
