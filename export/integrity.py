"""Digests that let an exported file prove it still computes what was exported.

A file records three SHA-256 digests in its metadata (``io.compress.integrity``, version 2):

- ``weights``: the bytes of every initializer as stored (its name, type and shape, then its
  data), hashed a tensor at a time. Packed weights are hashed as their stream and decoder
  constants, not decoded: a flipped bit in the stream, a changed decoder constant or a NaN
  in a dense initializer all change it, and checking it needs neither onnxruntime nor
  memory beyond the file.
- ``graph``: the nodes (Constant values included), inputs, outputs, opsets and the name,
  type and shape of every initializer. With the weights digest it pins everything the file
  computes, the decoder included, so no decoding is needed to check a file.
- ``metadata``: every metadata entry of the model and its tensors but this one.

The graph and metadata are checked, then the weights; nothing is decoded to check them.
Version-1 records (earlier exports) hashed the weights *after decoding*, by running the
file's decoder subgraph in onnxruntime; they are still read, and that decoding runs only
when the graph and metadata digests have matched.

Digests catch damage (bad copies, truncated downloads, bit rot), not forgery: someone who
edits a file on purpose can recompute them. Before anything is decoded, the declared size
of every stored tensor is checked against the bytes that hold it, and the tensors the graph
computes are checked against ``max_tensor_bytes``, so a file cannot make a reader allocate
what it asks for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.errors import CompressError, first_line
from compress.jsontext import read_json
from export.graph_sizes import check_graph_sizes, check_sparse_tensor, sparse_tensors
from export.limits import MAX_TENSOR_MB
from export.metadata import PREFIX

INTEGRITY_KEY = PREFIX + "integrity"
INTEGRITY_VERSION = 2  # 1: the weights digest hashed the decoded weights (still read)
READ_VERSIONS = (1, 2)
PARTS = ("graph", "weights", "metadata")
_INT32_HELD = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
               TensorProto.INT32, TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.BFLOAT16,
               TensorProto.INT4, TensorProto.UINT4}


def _itemsize(data_type: int) -> float:
    if data_type in (TensorProto.INT4, TensorProto.UINT4):
        return 0.5
    try:
        return float(np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 0.0


def _stored_values(tensor: TensorProto) -> int | None:
    """How many values a tensor's typed fields hold (None when raw bytes hold them)."""
    if tensor.HasField("raw_data"):
        return None
    if tensor.data_type == TensorProto.FLOAT:
        return len(tensor.float_data)
    if tensor.data_type in (TensorProto.INT64,):
        return len(tensor.int64_data)
    if tensor.data_type in (TensorProto.DOUBLE,):
        return len(tensor.double_data)
    if tensor.data_type in (TensorProto.UINT32, TensorProto.UINT64):
        return len(tensor.uint64_data)
    if tensor.data_type in (TensorProto.COMPLEX64,):
        return len(tensor.float_data) // 2
    if tensor.data_type == TensorProto.STRING:
        return len(tensor.string_data)
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return 2 * len(tensor.int32_data)
    return len(tensor.int32_data) if tensor.data_type in _INT32_HELD else None


def check_stored_tensor(tensor: TensorProto, where: str, max_bytes: int) -> None:
    """Refuse a tensor whose declared shape does not match the bytes that store it."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return  # onnx.load has read it, or refused it, already
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise CompressError(f"{where}: tensor {tensor.name!r} declares a negative dimension "
                            f"{dims}")
    count = 1
    for d in dims:
        count *= d
    itemsize = _itemsize(tensor.data_type)
    if itemsize == 0.0:
        raise CompressError(f"{where}: tensor {tensor.name!r} has an unknown element type "
                            f"{tensor.data_type}")
    if count * itemsize > max_bytes:
        raise CompressError(f"{where}: tensor {tensor.name!r} declares {count:,} elements "
                            f"({count * itemsize / 2**20:,.0f} MiB), past the "
                            f"{max_bytes / 2**20:,.0f} MiB limit (--max-tensor-mb)")
    stored = _stored_values(tensor)
    if stored is None:
        expected = int(np.ceil(count * itemsize)) if tensor.data_type != TensorProto.STRING \
            else None
        if expected is not None and len(tensor.raw_data) != expected:
            raise CompressError(f"{where}: tensor {tensor.name!r} declares shape {dims} "
                                f"({expected:,} bytes) but stores {len(tensor.raw_data):,} "
                                "bytes")
    elif stored != count and not (tensor.data_type in (TensorProto.INT4, TensorProto.UINT4)
                                  and stored == count + 1):
        raise CompressError(f"{where}: tensor {tensor.name!r} declares shape {dims} but "
                            f"stores {stored:,} values")


def stored_tensors(model: onnx.ModelProto):
    """Every tensor the file stores: initializers and the values of Constant nodes."""
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == onnx.AttributeProto.TENSORS:
                yield from attribute.tensors


def check_stored_sizes(model: onnx.ModelProto, where: str,
                       max_bytes: int = MAX_TENSOR_MB * 2**20) -> None:
    for tensor in stored_tensors(model):
        check_stored_tensor(tensor, where, max_bytes)
    for sparse in sparse_tensors(model):  # onnx and onnxruntime make them dense
        check_sparse_tensor(sparse, where, max_bytes)
        check_stored_tensor(sparse.values, where, max_bytes)
        check_stored_tensor(sparse.indices, where, max_bytes)


def check_computed_sizes(model: onnx.ModelProto, where: str,
                         max_bytes: int = MAX_TENSOR_MB * 2**20) -> None:
    """Refuse a graph that would compute a tensor past ``max_bytes`` per sample, or whose
    sizes cannot be known before it runs (see `export.graph_sizes`)."""
    check_graph_sizes(model, where, max_bytes)


@dataclass
class ConstantPart:
    """The nodes that depend on stored tensors only (decoders, dequantization), and the
    constant tensors the rest of the graph reads: the weights it computes with."""

    nodes: list[onnx.NodeProto]
    weights: list[str]


def constant_part(model: onnx.ModelProto) -> ConstantPart:
    graph = model.graph
    constant = {t.name for t in graph.initializer}
    nodes, computing_reads = [], set()
    for node in graph.node:
        if all(name == "" or name in constant for name in node.input) and \
                node.op_type not in ("RandomNormal", "RandomUniform"):
            nodes.append(node)
            constant.update(node.output)
        else:
            computing_reads.update(node.input)
    computing_reads.update(output.name for output in graph.output)
    return ConstantPart(nodes, sorted(computing_reads & constant))


def computed_weights(model: onnx.ModelProto, where: str,
                     extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The constant tensors the computing nodes read, decoded by onnxruntime running the
    file's own constant subgraph (so they are what the model runs with); ``extra`` names
    further constant tensors to return (an int8 weight before its DequantizeLinear)."""
    part = constant_part(model)
    produced_anywhere = {o for node in part.nodes for o in node.output}
    part.weights = sorted(set(part.weights) |
                          {n for n in extra if n in produced_anywhere})
    stored = {t.name: t for t in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    try:
        for name in part.weights:
            if name in stored:
                out[name] = numpy_helper.to_array(stored[name])
    except Exception as exc:
        raise CompressError(f"{where}: a stored tensor cannot be read "
                            f"({first_line(exc)})") from None
    produced = [name for name in part.weights if name not in stored]
    if produced:
        out.update(_run_constant_nodes(model, part.nodes, produced, stored, where))
    return out


def _run_constant_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
                        outputs: list[str], stored: dict[str, TensorProto],
                        where: str) -> dict[str, np.ndarray]:
    from export.ort import load_onnxruntime
    from export.session import quiet

    ort = load_onnxruntime()

    needed = {name for node in nodes for name in node.input}
    graph = helper.make_graph(nodes, "constants", [],
                              [onnx.ValueInfoProto(name=name) for name in outputs],
                              initializer=[stored[n] for n in sorted(needed) if n in stored])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import),
                            ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(sub.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"], enable_fallback=0)
        quiet(session)
        values = session.run(None, {})
    except Exception as exc:
        raise CompressError(f"{where}: onnxruntime cannot decode its weights, the file is "
                            f"damaged ({first_line(exc, 160)})") from None
    return dict(zip(outputs, values, strict=True))


def _decoded_weights_digest(weights: dict[str, np.ndarray]) -> str:
    """Version 1's weights digest: over the weights after decoding (`computed_weights`)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name])
        header = json.dumps([name, array.dtype.str, list(array.shape)])
        digest.update(header.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


_TYPED_FIELDS = (("float_data", np.float32), ("int32_data", np.int32),
                 ("int64_data", np.int64), ("double_data", np.float64),
                 ("uint64_data", np.uint64))


def _stored_weights_digest(model: onnx.ModelProto) -> str:
    """Version 2's weights digest: every initializer as stored, one at a time (its name,
    type, shape, where it lies, then its bytes and any typed values); nothing decoded."""
    digest = hashlib.sha256()
    for tensor in model.graph.initializer:
        typed = [len(getattr(tensor, name)) for name, _ in _TYPED_FIELDS]
        header = [tensor.name, tensor.data_type, list(tensor.dims), tensor.data_location,
                  [(e.key, e.value) for e in tensor.external_data], typed,
                  len(tensor.string_data)]
        digest.update(json.dumps(header).encode())
        digest.update(tensor.raw_data)
        for (name, dtype), count in zip(_TYPED_FIELDS, typed, strict=True):
            if count:
                digest.update(np.asarray(getattr(tensor, name), dtype=dtype).tobytes())
        for text in tensor.string_data:
            digest.update(len(text).to_bytes(8, "little") + text)
    return digest.hexdigest()


def _graph_digest(model: onnx.ModelProto) -> str:
    digest = hashlib.sha256()
    graph = model.graph
    digest.update(str(model.ir_version).encode())
    for message in [*model.opset_import, *model.functions, *graph.node, *graph.input,
                    *graph.output, *graph.value_info, *graph.sparse_initializer]:
        digest.update(message.SerializeToString(deterministic=True))
    for tensor in graph.initializer:
        digest.update(json.dumps([tensor.name, tensor.data_type, list(tensor.dims)]).encode())
    return digest.hexdigest()


def _metadata_digest(model: onnx.ModelProto) -> str:
    digest = hashlib.sha256()
    entries = sorted((p.key, p.value) for p in model.metadata_props if p.key != INTEGRITY_KEY)
    tensors = [(t.name, sorted((p.key, p.value) for p in t.metadata_props))
               for t in model.graph.initializer if len(t.metadata_props)]
    digest.update(json.dumps([entries, tensors, model.producer_name, model.producer_version,
                              model.domain, model.model_version, model.doc_string]).encode())
    return digest.hexdigest()


def digests(model: onnx.ModelProto) -> dict[str, str]:
    """The file's version-2 digests (nothing decoded)."""
    return {"graph": _graph_digest(model), "weights": _stored_weights_digest(model),
            "metadata": _metadata_digest(model)}


def record_integrity(model: onnx.ModelProto) -> dict[str, str]:
    """Write the digests into the model's metadata (last, after every other entry)."""
    values = digests(model)
    text = json.dumps({"version": INTEGRITY_VERSION, **values}, separators=(",", ":"))
    for prop in model.metadata_props:
        if prop.key == INTEGRITY_KEY:
            prop.value = text
            break
    else:
        model.metadata_props.add(key=INTEGRITY_KEY, value=text)
    return values


@dataclass
class IntegrityReport:
    """What a file's digests say: ``status`` is verified, damaged, not-recorded or skipped."""

    status: str
    differs: list[str]

    def to_dict(self) -> dict:
        return {"status": self.status, "differs": self.differs}


def recorded_digests(model: onnx.ModelProto) -> dict | None:
    for prop in model.metadata_props:
        if prop.key == INTEGRITY_KEY:
            try:
                value = read_json(prop.value, "the integrity record")
            except CompressError:  # too deep, too long, not JSON: unreadable
                return {}
            return value if isinstance(value, dict) else {}
    return None


def check_integrity(model: onnx.ModelProto, where: str, *, ignore: bool = False,
                    max_bytes: int = MAX_TENSOR_MB * 2**20) -> IntegrityReport:
    """Refuse (one line naming what differs) a file whose digests do not match it.

    A file from compress must carry its digests; a foreign ONNX file (no ``io.compress.``
    entry) has none and passes as ``not-recorded``. ``ignore`` reports instead of refusing.
    """
    check_stored_sizes(model, where, max_bytes)
    check_computed_sizes(model, where, max_bytes)
    recorded = recorded_digests(model)
    ours = any(p.key.startswith(PREFIX) for p in model.metadata_props)
    hint = "; pass --ignore-digest to use it anyway"
    if recorded is None:
        if ours and not ignore:
            raise CompressError(f"{where} carries no integrity record (exported by an older "
                                f"compress, or the record was damaged); re-export it{hint}")
        return IntegrityReport("not-recorded", [])
    if type(recorded.get("version")) is not int or recorded["version"] not in READ_VERSIONS or \
            not all(isinstance(recorded.get(p), str) for p in PARTS):
        if ignore:
            return IntegrityReport("damaged", ["integrity record"])
        raise CompressError(f"{where}: its integrity record is unreadable{hint}")
    differs = [p for p in ("graph", "metadata") if recorded[p] != digests_part(model, p)]
    if recorded["version"] != 1:
        if recorded["weights"] != _stored_weights_digest(model):
            differs.append("weights")
    elif not differs:  # version 1 decodes the weights: only once the graph is the exported one
        try:
            if recorded["weights"] != _decoded_weights_digest(computed_weights(model, where)):
                differs.append("weights")
        except CompressError:
            if not ignore:
                raise
            differs.append("weights")
    if differs and not ignore:
        raise CompressError(f"{where} failed its integrity check: its "
                            f"{' and '.join(differs)} differ from what was exported (the "
                            f"file is damaged){hint}")
    return IntegrityReport("damaged" if differs else "verified", differs)


def digests_part(model: onnx.ModelProto, part: str) -> str:
    return _graph_digest(model) if part == "graph" else _metadata_digest(model)
