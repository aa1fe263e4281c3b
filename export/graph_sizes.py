"""What a graph will compute, bounded before anything runs.

onnxruntime allocates every tensor a graph computes, and computes the constant ones when the
session starts: a file of a few hundred bytes can ask for gigabytes, for example through a
``ConstantOfShape`` whose shape only looks harmless after an ``Identity`` or an ``Abs``. So
before a session opens or the constant part is decoded, the shape of every tensor is found,
node by node in dependency order, by onnx's shape inference given the graph's inputs at a
concrete batch and the values of the small tensors each node reads; shape-like values the
graph computes itself (``Shape``, ``Gather``, ``Concat``, ``Cast``, ``Abs``, ...) are computed
here, as long as they stay small (`MAX_FOLDED_ELEMENTS`), with onnx's reference
implementation.

A file is refused in one line when a tensor would pass ``max_bytes`` per sample, and when
the size of a node's output cannot be known before it runs: it depends on values computed
at run time (``ConstantOfShape``, ``Expand``, ``Tile``, ``Reshape``, ``Range``, ``Resize``,
``Pad``, ``OneHot``, ``NonZero``, ... fed anything but a computable constant), the node
holds a subgraph (``If``, ``Loop``, ``Scan``) or calls a function of the file, onnx has no
schema for it, or it produces something other than a tensor. Sizes are checked at batch 1
and at `PROBE_BATCH`, where a tensor may take the batch times the limit, so a size that
grows faster than the batch is caught as well.
"""

from __future__ import annotations

import contextlib
import heapq
import math
from collections import defaultdict

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper
from onnx.shape_inference import infer_node_outputs

from compress.errors import CompressError, first_line
from export.limits import MAX_FOLDED_ELEMENTS, PROBE_BATCH

# computed here when every input is known and small: shape arithmetic, whose cost is about
# the size of its inputs and output
FOLDABLE = frozenset({
    "Abs", "Add", "And", "ArgMax", "ArgMin", "BitShift", "BitwiseAnd", "BitwiseNot",
    "BitwiseOr", "BitwiseXor", "Cast", "CastLike", "Ceil", "Clip", "Concat", "Constant",
    "ConstantOfShape", "CumSum", "Div", "Equal", "Expand", "Flatten", "Floor", "Gather",
    "GatherElements", "Greater", "GreaterOrEqual", "Identity", "Less", "LessOrEqual", "Max",
    "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "Range", "Reciprocal",
    "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSum", "Relu", "Reshape", "Round", "Shape",
    "Sign", "Size", "Slice", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tile", "Transpose",
    "Unsqueeze", "Where", "Xor",
})
_SUBGRAPHS = (AttributeProto.GRAPH, AttributeProto.GRAPHS)
_NO_SIZE = (TensorProto.UNDEFINED, TensorProto.STRING)


def _quoted(text: str, limit: int = 60) -> str:
    """A name from the file, safe in a one-line message (repr escapes line breaks)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _label(node: onnx.NodeProto, index: int) -> str:
    return f"node {_quoted(node.name or f'#{index}')} ({_quoted(node.op_type, 40)})"


def _bytes_per_element(data_type: int) -> float | None:
    if data_type in (TensorProto.INT4, TensorProto.UINT4):
        return 0.5
    if data_type in _NO_SIZE:
        return None
    try:
        return float(np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def _elements(dims, cap: int | None = None) -> int:
    """The product of ``dims``, stopping early once past ``cap``."""
    count = 1
    for d in dims:
        count *= int(d)
        if cap is not None and count > cap:
            return count
    return count


def _dims_text(dims: list[int]) -> str:
    return str(dims) if len(dims) <= 8 else f"{dims[:8]}... (rank {len(dims)})"


def sparse_tensors(model: onnx.ModelProto):
    """Every sparse tensor the file stores: sparse initializers and sparse attributes."""
    yield from model.graph.sparse_initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.SPARSE_TENSOR:
                yield attribute.sparse_tensor
            elif attribute.type == AttributeProto.SPARSE_TENSORS:
                yield from attribute.sparse_tensors


def check_sparse_tensor(sparse: onnx.SparseTensorProto, where: str, max_bytes: int) -> None:
    """Refuse a sparse tensor whose dense size (what onnx and onnxruntime turn it into) is
    past ``max_bytes``, or whose values and indices do not fit its shape. (The bytes that
    store its values and indices are checked as any stored tensor's.)"""
    name = _quoted(sparse.values.name)
    dims = list(sparse.dims)
    if not dims or any(d < 0 for d in dims):
        raise CompressError(f"{where}: sparse tensor {name} declares shape {_dims_text(dims)}")
    itemsize = _bytes_per_element(sparse.values.data_type)
    if itemsize is None:
        raise CompressError(f"{where}: sparse tensor {name} has element type "
                            f"{sparse.values.data_type}, whose size is unknown")
    count = _elements(dims, cap=max_bytes)
    if count * itemsize > max_bytes:
        raise CompressError(f"{where}: sparse tensor {name} declares {_dims_text(dims)}, past "
                            f"the {max_bytes / 2**20:,.0f} MiB limit (--max-tensor-mb) once "
                            "dense")
    values, indices = list(sparse.values.dims), list(sparse.indices.dims)
    if len(values) != 1 or values[0] > count:
        raise CompressError(f"{where}: sparse tensor {name} stores values of shape "
                            f"{_dims_text(values)} for shape {_dims_text(dims)}")
    if sparse.indices.data_type != TensorProto.INT64 or \
            indices not in ([values[0]], [values[0], len(dims)]):
        raise CompressError(f"{where}: sparse tensor {name} stores indices of shape "
                            f"{_dims_text(indices)} for {values[0]} values of rank {len(dims)}")


def check_graph_sizes(model: onnx.ModelProto, where: str, max_bytes: int) -> None:
    """Refuse (one line) a graph that would compute a tensor past ``max_bytes`` per sample,
    or one whose sizes cannot be known before it runs."""
    free = any(not d.HasField("dim_value") for info in model.graph.input
               for d in info.type.tensor_type.shape.dim)
    for batch in (1, PROBE_BATCH) if free else (1,):
        _Walk(model, where, max_bytes, batch).main(model.graph)


def _schema(node: onnx.NodeProto, label: str, opsets: dict[str, int],
            functions: set[tuple[str, str]], where: str):
    domain = "" if node.domain == "ai.onnx" else node.domain
    if any(attribute.type in _SUBGRAPHS for attribute in node.attribute) and \
            (domain, node.op_type) not in (("", "Loop"), ("", "If")):
        raise CompressError(f"{where}: {label} holds a subgraph, whose sizes cannot be "
                            "bounded before it runs")
    if (node.domain, node.op_type) in functions:
        raise CompressError(f"{where}: {label} calls a function the file defines, whose sizes "
                            "cannot be bounded before it runs")
    if domain not in opsets:
        raise CompressError(f"{where}: {label} is of domain {_quoted(domain)}, which the file "
                            "does not import")
    try:
        return onnx.defs.get_schema(node.op_type, opsets[domain], domain)
    except onnx.defs.SchemaError:
        raise CompressError(f"{where}: {label} is no operator of {domain or 'ai.onnx'} opset "
                            f"{opsets[domain]} that onnx knows, so its sizes cannot be "
                            "bounded") from None


def _in_order(graph: onnx.GraphProto, provided: set[str],
              where: str) -> list[tuple[int, onnx.NodeProto]]:
    """The nodes in dependency order (the file's order where it is one), as onnxruntime
    sorts them, given the names ``provided`` (initializers, inputs, outer scopes); a name
    read before anything provides it, or produced twice, is refused."""
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.output:
            if name and (name in provided or name in producer):
                raise CompressError(f"{where}: {_quoted(name)} is produced twice")
            if name:
                producer[name] = index
    readers: dict[str, list[int]] = defaultdict(list)
    pending = [0] * len(nodes)
    ready: list[int] = []
    for index, node in enumerate(nodes):
        needed = set()
        for name in node.input:
            if not name or name in provided:
                continue
            if name not in producer:
                raise CompressError(f"{where}: {_label(node, index)} reads {_quoted(name)}, "
                                    "which no node, initializer or input provides")
            needed.add(name)
        for name in needed:
            readers[name].append(index)
        pending[index] = len(needed)
        if not needed:
            ready.append(index)
    order = []
    heapq.heapify(ready)
    while ready:
        index = heapq.heappop(ready)
        order.append((index, nodes[index]))
        for name in nodes[index].output:
            for reader in readers.get(name, ()):
                pending[reader] -= 1
                if pending[reader] == 0:
                    heapq.heappush(ready, reader)
    if len(order) < len(nodes):
        raise CompressError(f"{where}: the graph has a cycle")
    return order


class _Walk:
    """One pass over the graph at one batch: the type of every tensor, the value of the
    small ones that can be computed. A subgraph (a ``Loop`` body, an ``If`` branch) is
    walked by a child that sees the names of its outer scopes."""

    def __init__(self, model: onnx.ModelProto, where: str, max_bytes: int,
                 batch: int) -> None:
        self.model, self.where = model, where
        self.max_bytes, self.batch = max_bytes, batch
        self.opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version
                       for o in model.opset_import}
        self.functions = {(f.domain, f.name) for f in model.functions}
        self.types: dict[str, onnx.TypeProto] = {}
        self.dims: dict[str, tuple[int, ...]] = {}
        self.values: dict[str, np.ndarray] = {}
        self.protos: dict[str, TensorProto] = {}  # values as shape inference takes them
        self.unknown: set[str] = set()  # values that cannot be computed here
        self.producer: dict[str, onnx.NodeProto] = {}

    def child(self) -> _Walk:
        walk = _Walk.__new__(_Walk)
        walk.__dict__.update(self.__dict__)
        for name in ("types", "dims", "values", "producer"):
            setattr(walk, name, dict(getattr(self, name)))
        walk.unknown = set(self.unknown)
        return walk

    def main(self, graph: onnx.GraphProto) -> None:
        stored = {t.name for t in graph.initializer}
        for info in graph.input:
            if info.name not in stored:
                self._input(info)
        self.graph(graph)

    def graph(self, graph: onnx.GraphProto) -> list[tuple[int, ...]]:
        """Walk ``graph`` (its inputs known already); the dimensions of its outputs."""
        for tensor in graph.initializer:
            self._known(tensor.name, tensor.data_type, list(tensor.dims))
            if _elements(tensor.dims, MAX_FOLDED_ELEMENTS) <= MAX_FOLDED_ELEMENTS and \
                    tensor.data_location != TensorProto.EXTERNAL:
                with contextlib.suppress(Exception):  # an unreadable value is not known
                    self.values[tensor.name] = numpy_helper.to_array(tensor)
        for sparse in graph.sparse_initializer:
            self._known(sparse.values.name, sparse.values.data_type, list(sparse.dims))
        for index, node in _in_order(graph, set(self.types), self.where):
            label = _label(node, index)
            schema = _schema(node, label, self.opsets, self.functions, self.where)
            if node.op_type == "Loop":
                self._loop(node, label)
            elif node.op_type == "If":
                self._if(node, label)
            else:
                self._node(node, label, schema)
        missing = [o.name for o in graph.output if o.name not in self.dims]
        if missing:
            raise CompressError(f"{self.where}: the graph's output {_quoted(missing[0])} is "
                                "computed by no node")
        return [self.dims[o.name] for o in graph.output]

    def _known(self, name: str, data_type: int, dims: list[int]) -> None:
        self.types[name] = helper.make_tensor_type_proto(data_type, dims)
        self.dims[name] = tuple(dims)

    def _input(self, info: onnx.ValueInfoProto) -> None:
        name = _quoted(info.name)
        if not info.type.HasField("tensor_type"):
            raise CompressError(f"{self.where}: input {name} is not a tensor")
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            raise CompressError(f"{self.where}: input {name} declares no shape, so the sizes "
                                "the graph computes cannot be bounded")
        dims = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                if dim.dim_value < 0:
                    raise CompressError(f"{self.where}: input {name} declares a negative "
                                        "dimension")
                dims.append(dim.dim_value)
            else:  # a free dimension: the batch, or 1 as `bench` feeds it
                dims.append(self.batch if axis == 0 else 1)
        self._known(info.name, tensor_type.elem_type, dims)

    def _node(self, node: onnx.NodeProto, label: str, schema) -> None:
        inputs = [name for name in node.input if name]
        outputs = [name for name in node.output if name]
        inferred = self._infer(node, label, schema, inputs)
        if any(self._static(inferred.get(name)) is None for name in outputs) and \
                self._compute(inputs):
            inferred = self._infer(node, label, schema, inputs)
        for name in outputs:
            self._record(name, inferred.get(name), node, label)

    def _record(self, name: str, value: onnx.TypeProto | None, node: onnx.NodeProto,
                label: str) -> None:
        """Take the type of a node's output, refused when its size is unknown or too large."""
        dims = self._static(value)
        if dims is None:
            raise CompressError(
                f"{self.where}: the size of {_quoted(name)}, computed by {label}, cannot be "
                "known before it runs (it depends on values computed at run time), so the "
                "file is refused")
        itemsize = _bytes_per_element(value.tensor_type.elem_type)
        size = _elements(dims, 2 * self.max_bytes * self.batch) * itemsize
        if size > self.max_bytes * self.batch:
            at = f" at batch {self.batch}" if self.batch > 1 else ""
            raise CompressError(
                f"{self.where}: the graph computes {_quoted(name)} of "
                f"{size / self.batch / 2**20:,.0f} MiB per sample{at}, past the "
                f"{self.max_bytes / 2**20:,.0f} MiB limit (--max-tensor-mb)")
        self.types[name] = value
        self.dims[name] = dims
        self.producer[name] = node

    def _loop(self, node: onnx.NodeProto, label: str) -> None:
        """A Loop is bounded when its loop-carried values keep their shapes and, if it has
        scan outputs (one slice per iteration), its trip count is a known constant."""
        body = next(a.g for a in node.attribute if a.name == "body")
        carried = list(node.input[2:])
        scans = len(node.output) - len(carried)
        if scans < 0 or len(body.input) != 2 + len(carried) or \
                len(body.output) != 1 + len(carried) + scans:
            raise CompressError(f"{self.where}: {label} has a body that does not fit its "
                                "inputs and outputs")
        inner = self.child()
        inner._known(body.input[0].name, TensorProto.INT64, [])
        inner._known(body.input[1].name, TensorProto.BOOL, [])
        for info, name in zip(body.input[2:], carried, strict=True):
            if not name:
                raise CompressError(f"{self.where}: {label} carries an unnamed value")
            inner.types[info.name], inner.dims[info.name] = self.types[name], self.dims[name]
        dims = inner.graph(body)
        for name, after in zip(carried, dims[1:1 + len(carried)], strict=True):
            if after != self.dims[name]:
                raise CompressError(f"{self.where}: {label} changes the shape of a value it "
                                    "carries from one iteration to the next, so its sizes "
                                    "cannot be bounded")
        trips = self._value(node.input[0]) if node.input[0] and scans else None
        if scans and (trips is None or trips.size != 1 or int(trips.reshape(-1)[0]) < 0):
            raise CompressError(f"{self.where}: the size of what {label} collects on each "
                                "iteration depends on how often it loops, which is not a "
                                "known constant, so the file is refused")
        for position, name in enumerate(node.output):
            if not name:
                continue
            if position < len(carried):
                value = self.types[carried[position]]
            else:
                scanned = body.output[1 + position]
                value = helper.make_tensor_type_proto(
                    inner.types[scanned.name].tensor_type.elem_type,
                    [int(trips.reshape(-1)[0]), *inner.dims[scanned.name]])
            self._record(name, value, node, label)

    def _if(self, node: onnx.NodeProto, label: str) -> None:
        """An If is bounded when both branches give outputs of the same shapes."""
        branches = {a.name: a.g for a in node.attribute if a.type == AttributeProto.GRAPH}
        results = []
        for branch in ("then_branch", "else_branch"):
            inner = self.child()
            dims = inner.graph(branches[branch])
            types = [inner.types[o.name].tensor_type.elem_type for o in branches[branch].output]
            results.append((dims, types))
        if results[0] != results[1] or len(results[0][0]) != len(node.output):
            raise CompressError(f"{self.where}: the branches of {label} give outputs of "
                                "different shapes, so its sizes cannot be bounded")
        for name, dims, elem_type in zip(node.output, *results[0], strict=True):
            if name:
                self._record(name, helper.make_tensor_type_proto(elem_type, list(dims)), node,
                             label)

    def _infer(self, node: onnx.NodeProto, label: str, schema, inputs: list[str]) -> dict:
        types = {name: self.types[name] for name in inputs}
        data = {name: self._proto(name) for name in inputs if name in self.values}
        try:
            return infer_node_outputs(schema, node, types, data,
                                      opset_imports=list(self.model.opset_import),
                                      ir_version=self.model.ir_version)
        except Exception as exc:  # noqa: BLE001 - onnx raises several kinds
            raise CompressError(f"{self.where}: onnx cannot infer what {label} "
                                f"computes ({first_line(exc, 120)}), so its sizes cannot be "
                                "bounded") from None

    def _proto(self, name: str) -> TensorProto:
        if name not in self.protos:
            self.protos[name] = numpy_helper.from_array(self.values[name], name)
        return self.protos[name]

    @staticmethod
    def _static(value: onnx.TypeProto | None) -> tuple[int, ...] | None:
        """The dimensions of a tensor type whose shape is fully known, else None."""
        if value is None or not value.HasField("tensor_type"):
            return None
        tensor_type = value.tensor_type
        if not tensor_type.HasField("shape") or \
                _bytes_per_element(tensor_type.elem_type) is None:
            return None
        dims = []
        for dim in tensor_type.shape.dim:
            if not dim.HasField("dim_value") or dim.dim_value < 0:
                return None
            dims.append(dim.dim_value)
        return tuple(dims)

    def _compute(self, inputs: list[str]) -> bool:
        """Compute the values of those ``inputs`` that are small; True if any is new."""
        new = False
        for name in inputs:
            if name not in self.values and name not in self.unknown and \
                    _elements(self.dims[name], MAX_FOLDED_ELEMENTS) <= MAX_FOLDED_ELEMENTS:
                new |= self._value(name) is not None
        return new

    def _value(self, name: str) -> np.ndarray | None:
        """The value of ``name``, computed from the values it depends on (a work list, not
        recursion: a chain of shape nodes may be long)."""
        stack = [name]
        while stack:
            current = stack[-1]
            if current in self.values or current in self.unknown:
                stack.pop()
                continue
            node = self.producer.get(current)
            if node is None or not self._foldable(node):
                self.unknown.add(current)
                stack.pop()
                continue
            needed = [] if node.op_type in ("Shape", "Size") else [n for n in node.input if n]
            missing = [n for n in needed if n not in self.values and n not in self.unknown]
            if missing:
                stack.extend(missing)
                continue
            if any(n in self.unknown for n in needed):
                self.unknown.update(n for n in node.output if n)
            else:
                self._evaluate(node, needed)
            stack.pop()
        return self.values.get(name)

    def _foldable(self, node: onnx.NodeProto) -> bool:
        return node.op_type in FOLDABLE and node.domain in ("", "ai.onnx") and all(
            _elements(self.dims[n], MAX_FOLDED_ELEMENTS) <= MAX_FOLDED_ELEMENTS
            for n in node.output if n)

    def _evaluate(self, node: onnx.NodeProto, needed: list[str]) -> None:
        try:
            if node.op_type == "Shape":
                attributes = {a.name: a.i for a in node.attribute}
                dims = self.dims[node.input[0]]
                results = [np.array(dims[attributes.get("start", 0):attributes.get("end")],
                                    dtype=np.int64)]
            elif node.op_type == "Size":
                results = [np.array(math.prod(self.dims[node.input[0]]), dtype=np.int64)]
            else:
                from onnx.reference import ReferenceEvaluator

                evaluator = ReferenceEvaluator(node, opsets=self.opsets)
                results = evaluator.run(None, {n: self.values[n] for n in needed})
        except Exception:  # noqa: BLE001 - a value that cannot be computed is not known
            results = []
        results = list(results) + [None] * len(node.output)
        for name, value in zip(node.output, results, strict=False):
            if not name:
                continue
            array = np.asarray(value) if value is not None else None
            if array is None or tuple(array.shape) != self.dims[name]:
                self.unknown.add(name)
                continue
            dtype = helper.tensor_dtype_to_np_dtype(self.types[name].tensor_type.elem_type)
            self.values[name] = array.astype(dtype, copy=False)
