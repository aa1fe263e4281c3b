"""Per-layer counts and MACs read from an exported ONNX file, with numpy and onnx only.

The non-zeros reported are the ones in the file, not the ones the metadata claims. A file
whose digests verified is read lean: a packed weight's non-zeros are counted from its mask
(every value the export stores is non-zero), a piece of the mask at a time, and a dense
one's a tensor at a time, so reading costs about the file, not its decoded weights. A file
that did not verify (looked at with ``--ignore-digest``) or has no record is counted from
the weights onnxruntime decodes with the file's own decoder, as it would run them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from compress.errors import CompressError, first_line
from export.integrity import IntegrityReport, check_integrity, computed_weights
from export.limits import MAX_TENSOR_MB
from export.metadata import model_metadata, tensor_metadata
from export.packing import PREFIX, PackedStream, StreamLayout, decode, read_layout, read_stream
from export.quantize import dequantized_sources, quantization_parameters, quantized_weights

# float weights and biases, and the int32 biases of a QDQ-quantized model
PARAMETER_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT32)


def _is_torch_file(path: Path) -> bool:
    """``torch.save`` writes a zip archive whose first entry is ``<name>/data.pkl`` (or, in
    the legacy format, a pickle): told apart from ONNX by its first bytes."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") and b"data.pkl" in head or \
        head.startswith(b"\x80\x02\x8a\x0a")


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
        if _is_torch_file(path):
            raise CompressError(f"{path} is a PyTorch checkpoint, not an ONNX model; export it "
                                f"first: compress export {path} --onnx {path.stem}.onnx") \
                from None
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


_DAMAGE = (KeyError, ValueError, IndexError, StopIteration, ZeroDivisionError, TypeError)


def packed_layout(model: onnx.ModelProto) -> StreamLayout | None:
    """The file's packed stream as stored, checked to fit together (as many values as the
    mask has non-zeros), nothing decoded; None where nothing is packed."""
    if not any(t.name == PREFIX + "top" for t in model.graph.initializer):
        return None
    try:
        return read_layout(model)
    except _DAMAGE as exc:
        raise CompressError(f"its packed weights are damaged: {_damage(exc)}") from None


def read_packed(model: onnx.ModelProto) -> Packed | None:
    """The file's packed stream and the weights it decodes to in numpy, checked to fit
    together; None where nothing is packed (for the export's checks: it holds every packed
    weight dense)."""
    if not any(t.name == PREFIX + "top" for t in model.graph.initializer):
        return None
    try:
        stream = read_stream(model)
        return stream, decode(stream)
    except _DAMAGE as exc:
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
    for name, tensor in _parameter_initializers(model, inits, out):
        out[name] = (numpy_helper.to_array(tensor), tensor_metadata(tensor))
    return out


def _parameter_initializers(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto],
                            done: dict):
    """(name, tensor) of every stored weight or bias not in ``done`` and not packed: float
    tensors of rank >= 1, int8 weights and int32 biases, but not scales and zero points."""
    skip = quantization_parameters(model)
    int8_weights = quantized_weights(model)
    for name, tensor in inits.items():
        if name.startswith(PREFIX) or name in done or name in skip or not tensor.dims:
            continue
        if tensor.data_type in PARAMETER_TYPES or name in int8_weights:
            yield name, tensor


Counted = tuple[tuple[int, ...], int, dict]  # shape, non-zeros, tensor metadata


def weight_counts(model: onnx.ModelProto, layout: StreamLayout | None,
                  decoded: dict[str, np.ndarray] | None = None) -> dict[str, Counted]:
    """Shape and non-zeros of every float initializer of rank >= 1 and every packed weight:
    a packed one's from ``decoded`` where given (the weights onnxruntime decodes), else from
    its mask; the others read one at a time."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, Counted] = {}
    for t, nonzero in zip(layout.tensors if layout else [], layout.nonzeros if layout else [],
                          strict=True):
        shape_init = inits.get(f"{t.name}__shape")
        meta = tensor_metadata(shape_init) if shape_init is not None else {}
        array = decoded.get(t.name) if decoded is not None else None
        if array is not None:
            out[t.name] = (tuple(array.shape), int(np.count_nonzero(array)), meta)
        else:
            out[t.name] = (t.shape, nonzero, meta)
    for name, tensor in _parameter_initializers(model, inits, out):
        array = numpy_helper.to_array(tensor)
        out[name] = (array.shape, int(np.count_nonzero(array)), tensor_metadata(tensor))
    return out


def _damage(exc: Exception) -> str:
    """What is wrong with a packed stream, in words."""
    if isinstance(exc, KeyError):
        return f"tensor {exc.args[0]} is missing"
    if isinstance(exc, StopIteration):
        return f"the graph has no Split of {PREFIX}split"
    return first_line(exc) if isinstance(exc, ValueError) else \
        f"its arrays do not fit together ({first_line(exc)})"


SHAPE_VALUES = 4096  # largest int tensor whose values shape inference is given


def _shapes_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model for shape inference: every stored tensor but small int ones (shapes, split
    sizes, axes) becomes a graph input of its type and shape, so inference sees every shape
    and onnx holds no second copy of the weights (it serialises the model it is given)."""
    graph = model.graph
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    out = light.graph
    out.input.extend(graph.input)
    out.output.extend(graph.output)
    out.value_info.extend(graph.value_info)
    declared = {info.name for info in graph.input}
    for tensor in graph.initializer:
        if tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and \
                int(np.prod(tensor.dims)) <= SHAPE_VALUES:
            out.initializer.append(tensor)
        elif tensor.name not in declared:
            declared.add(tensor.name)
            out.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    out.node.extend(graph.node)
    return light


def _macs(model: onnx.ModelProto, weights: dict[str, Counted]) -> tuple[int, int]:
    """(dense MACs, MACs with non-zero weights) for one sample, from inferred shapes."""
    layers = _layer_macs(model, weights)
    return sum(d for d, _ in layers.values()), sum(n for _, n in layers.values())


def inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int]] | None:
    """Every value's shape by onnx's shape inference (unknown dimensions as 1); None where
    inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_shapes_model(model))
    except Exception:
        return None
    shapes = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1
                           for d in vi.type.tensor_type.shape.dim]
    return shapes


def weight_layers(model: onnx.ModelProto) -> list[dict]:
    """Each Conv, Gemm and MatMul that reads a stored weight, as one layer alone would be
    rebuilt: its name (`layer_name`), operator, weight shape, input shape and attributes."""
    try:
        layout = packed_layout(model)
    except CompressError:
        layout = None
    weights = weight_counts(model, layout)
    shapes = inferred_shapes(model) or {}
    dequantized = dequantized_sources(model)
    layers = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight = dequantized.get(node.input[1], node.input[1])
        if weight not in weights or node.input[0] not in shapes:
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        layers.append({"layer": layer_name(weight), "op_type": node.op_type,
                       "weight_shape": [int(d) for d in weights[weight][0]],
                       "input_shape": shapes[node.input[0]],
                       "attributes": {k: v if isinstance(v, int | float) else list(v)
                                      for k, v in attributes.items()
                                      if isinstance(v, int | float | list)}})
    return layers


def layer_name(weight: str) -> str:
    """A layer's name from its weight's (``stages.0.conv2.weight_quantized`` ->
    ``stages.0.conv2``): how inspect, bench and its profile name a layer."""
    return re.sub(r"(\.weight)?(_quantized)?$", "", weight)


def _layer_macs(model: onnx.ModelProto,
                weights: dict[str, Counted]) -> dict[str, tuple[int, int]]:
    """Per layer (`layer_name`): (dense MACs, MACs with non-zero weights) for one sample."""
    shapes = inferred_shapes(model)
    if shapes is None:
        return {}
    dequantized = dequantized_sources(model)
    layers: dict[str, tuple[int, int]] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = dequantized.get(node.input[1], node.input[1])
        weight = name if name in weights else None
        out_shape = shapes.get(node.output[0])
        if weight is None or not out_shape:
            continue
        shape, nonzeros, _ = weights[weight]
        if node.op_type == "Conv":
            positions = int(np.prod(out_shape[2:])) if len(out_shape) > 2 else 1
        else:
            positions = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
        dense, nonzero = layers.get(layer_name(weight), (0, 0))
        layers[layer_name(weight)] = (dense + positions * int(np.prod(shape)),
                                      nonzero + positions * nonzeros)
    return layers


def model_work(model: onnx.ModelProto) -> dict:
    """What `compress bench` rates a file by: its dense MACs per sample, in all and per
    layer, and its operator types (whether it runs quantized)."""
    try:
        layout = packed_layout(model)
    except CompressError:
        layout = None
    layers = _layer_macs(model, weight_counts(model, layout))
    return {"macs": sum(dense for dense, _ in layers.values()),
            "layer_macs": {name: dense for name, (dense, _) in layers.items()},
            "op_types": sorted({node.op_type for node in model.graph.node})}


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


def packing_summary(stream: StreamLayout | None) -> dict | None:
    """How the file stores its packed weights."""
    if stream is None:
        return None
    bits = 24 + stream.exponent_width if stream.exponent_width else \
        8 * stream.value_dtype.itemsize
    return {"weights": len(stream.tensors), "mask_levels": stream.levels,
            "mask_bytes": stream.mask_bytes,
            "values": "qdq-int8" if stream.raw_int8 else _VALUE_NAMES[stream.value_dtype.name],
            "value_coding": stream.value_coding, "value_bits": bits,
            "values_stored": stream.value_count}


def _stale_metadata(weights: dict[str, Counted]) -> list[str]:
    """Tensors whose recorded sparsity is not what the file holds."""
    notes = []
    for name, (shape, nonzero, meta) in weights.items():
        recorded, size = meta.get("sparsity"), int(np.prod(shape))
        if isinstance(recorded, int | float) and size:
            actual = 1.0 - nonzero / size
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
    """What the file holds. A verified file is counted lean (its packed weights from their
    mask); any other from the weights onnxruntime decodes by running the file's own decoder,
    so a changed decoder constant shows here as it would at run time."""
    model, integrity = load_checked(path, ignore_digest=ignore_digest,
                                    max_tensor_mb=max_tensor_mb)
    try:
        layout = packed_layout(model)
    except CompressError as exc:
        raise CompressError(f"{path}: {exc}") from None
    decoded = None
    if layout is not None and integrity.status != "verified":
        names = tuple(t.name for t in layout.tensors)
        decoded = computed_weights(model, str(path), names)
    weights = weight_counts(model, layout, decoded)
    del decoded
    layers = []
    for name in _model_order(model, weights):
        shape, nz, meta = weights[name]
        n = int(np.prod(shape))
        layers.append({"name": name, "shape": list(shape), "params": n, "nonzero": nz,
                       "sparsity": 1.0 - nz / n if n else 0.0,
                       "prunable": bool(meta.get("prunable", len(shape) >= 2)),
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
        "packing": packing_summary(layout),
        "warnings": _stale_metadata(weights) + _integrity_warnings(integrity),
        "integrity": integrity.to_dict(),
        "metadata": {**model_metadata(model), "ir_version": model.ir_version,
                     "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import}},
    }
