"""Sparse weights stored as their non-zero values plus a packed, hierarchical bitmask.

All packed weights of a file share one stream and one decoder: their non-zeros are
concatenated (C order, weight after weight) and so are their masks. The mask is a 4-ary
occupancy tree with ``levels`` levels, the depth chosen per file to make it smallest:

- ``levels = 0``: one bit per weight (a plain bitmask).
- ``levels = L``: one bit per block of 4**L weights (does it hold a non-zero?), then, level
  by level down to the weights, one nibble per non-empty block saying which of its four
  sub-blocks are non-empty (two nibbles per byte). At 90 % sparsity one level takes about
  0.59 bits per weight instead of 1 (the entropy is 0.47); at 98 %, two levels take about
  0.21 bits instead of 1 (entropy 0.14).

The decoder uses standard ops only; every input is a constant, so onnxruntime's constant
folding turns the whole chain back into dense initializers when the session starts and
the optimized graph is the dense graph::

    top bits -> unpack(1 bit) = occupancy
    per level:  occupancy -> Cast -> CumSum -> Mul = rank (0 where empty)
                nibbles -> unpack(4 bits) -> Gather(rank) -> unpack(1 bit x 4) = occupancy
    then:       mask -> Cast -> CumSum -> Mul = index;  [0, values...] -> Gather(index)
                -> Split per weight -> [Mul scale (int8)] -> Reshape

fp32 values are stored losslessly in fewer than 32 bits when their exponents are few, as
they are after magnitude pruning (the kept weights of a layer span a few octaves): the 23
mantissa bits and the sign as uint16 + uint8, and per value a ``width``-bit index (1, 2 or
4 bits) into a table of the powers of two that occur. The graph rebuilds each value as
``table[index, sign] * (1 + mantissa * 2**-23)``, which is exact in float32 for normal
numbers, so the decoded weights are bit for bit the originals. A 90 %-sparse LeNet-5 has
four exponents: 26 bits per value instead of 32.

"unpack" is Unsqueeze -> BitShift -> BitwiseAnd -> Reshape. ``NonZero``, ``ScatterND`` and
``DequantizeLinear`` are avoided on purpose: onnxruntime does not fold them and would
decode on every inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.errors import CompressError
from export.limits import MAX_TENSOR_MB

VALUE_TYPES = ("fp32", "fp16", "int8")
MAX_LEVELS = 3
DECODER_OPS = {"BitShift", "BitwiseAnd", "BitwiseOr", "CumSum"}
FANOUT = 4  # sub-blocks per block: one nibble each
PREFIX = "packed:"  # names of the stream's initializers (no torch parameter has a colon)
NODE_BYTES = 450  # about what the nodes and constants of one more level cost
_VALUE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
EXPONENT_WIDTHS = (1, 2, 4)  # bits per exponent index; they divide a byte
MANTISSA_BITS = 23
EXPONENT_NODE_BYTES = 1000  # about what the exponent decoder's nodes and constants cost


@dataclass
class PackedTensor:
    """Where one weight lives in the stream."""

    name: str
    shape: tuple[int, ...]
    offset: int  # first element in the concatenated dense order
    scale: float | None = None  # int8 only: value = q * scale

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class PackedStream:
    """The packed form of every packed weight of a file."""

    tensors: list[PackedTensor]
    values: np.ndarray  # non-zeros of all tensors in order: float32, float16 or int8
    top: np.ndarray  # uint8, little-endian: one bit per top-level block
    nibbles: list[np.ndarray] = field(default_factory=list)  # per level, top first
    raw_int8: bool = False  # weights already int8 (QDQ-quantized): decoded as int8
    exponent_width: int = 0  # fp32 values stored exponent-coded with this index width

    @property
    def value_coding(self) -> str:
        return f"exponent{self.exponent_width}" if self.exponent_width else "plain"

    @property
    def levels(self) -> int:
        return len(self.nibbles)

    @property
    def total(self) -> int:
        return sum(t.size for t in self.tensors)

    @property
    def mask_bytes(self) -> int:
        return self.top.nbytes + sum(n.nbytes for n in self.nibbles)


def _quantize(nonzero: np.ndarray, values: str) -> tuple[np.ndarray, float | None]:
    """Values at storage precision. A non-zero never becomes zero, so the sparsity pattern
    is exact at every precision (int8 keeps at least one quantum of a symmetric scale)."""
    if values == "fp16":
        stored = nonzero.astype(np.float16)
        lost = stored == 0
        stored[lost] = (np.sign(nonzero[lost]) * 6e-8).astype(np.float16)
        return stored, None
    if values == "int8":
        peak = float(np.abs(nonzero).max()) if nonzero.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        q = np.clip(np.rint(nonzero / scale), -127, 127)
        return np.where(q == 0, np.sign(nonzero), q).astype(np.int8), scale
    return nonzero.astype(np.float32), None


def _pack_nibbles(nibbles: np.ndarray) -> np.ndarray:
    """A leading 0 nibble (what an empty block gathers), then two nibbles per byte."""
    padded = np.concatenate([[0], nibbles, [0] * (nibbles.size % 2 == 0)]).astype(np.uint8)
    return (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)


def occupancy_tree(mask: np.ndarray, levels: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(top-level bits, nibbles per level from the top) for a flat boolean mask."""
    block = FANOUT ** levels
    occupied = np.zeros(-(-mask.size // block) * block, dtype=bool)
    occupied[: mask.size] = mask
    weights = 1 << np.arange(FANOUT, dtype=np.uint8)
    nibbles = []
    for _ in range(levels):
        children = occupied.reshape(-1, FANOUT)
        occupied = children.any(axis=1)
        nibbles.append(_pack_nibbles(children[occupied].astype(np.uint8) @ weights))
    return np.packbits(occupied, bitorder="little"), nibbles[::-1]


def _tree_cost(tree: tuple[np.ndarray, list[np.ndarray]]) -> int:
    """Bytes of a tree plus what its decoder levels cost in nodes."""
    top, nibbles = tree
    return top.nbytes + sum(n.nbytes for n in nibbles) + NODE_BYTES * len(nibbles)


def encode(weights: list[tuple[str, np.ndarray]], values: str = "fp32",
           levels: int | None = None, code_exponents: bool = True) -> PackedStream:
    """Pack ``weights`` (name, array) into one stream; ``levels=None`` picks the smallest.

    int8 weights (from QDQ quantization) are stored and rebuilt as int8, unscaled. fp32
    values are exponent-coded where that is lossless and smaller (``code_exponents``)."""
    raw_int8 = bool(weights) and all(w.dtype == np.int8 for _, w in weights)
    if raw_int8:
        values = "int8"
    elif any(w.dtype == np.int8 for _, w in weights):
        raise ValueError("int8 and float weights cannot share one stream")
    if values not in VALUE_TYPES:
        raise ValueError(f"values must be one of {VALUE_TYPES}, got {values!r}")
    if levels is not None and not 0 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be between 0 and {MAX_LEVELS}, got {levels}")
    tensors, stored, masks, offset = [], [], [], 0
    for name, weight in weights:
        flat = weight.ravel() if raw_int8 else weight.astype(np.float32).ravel()
        mask = flat != 0
        q, scale = (flat[mask], None) if raw_int8 else _quantize(flat[mask], values)
        tensors.append(PackedTensor(name, tuple(weight.shape), offset, scale))
        stored.append(q)
        masks.append(mask)
        offset += flat.size
    mask = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    depths = range(MAX_LEVELS + 1) if levels is None else [levels]
    top, nibbles = min((occupancy_tree(mask, n) for n in depths), key=_tree_cost)
    dtype = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[values]
    all_values = np.concatenate(stored).astype(dtype) if stored else np.zeros(0, dtype)
    width = exponent_width(all_values) if code_exponents and values == "fp32" else 0
    if all_values.size * (8 - width) / 8 <= EXPONENT_NODE_BYTES:  # bytes saved
        width = 0
    return PackedStream(tensors, all_values, top, nibbles, raw_int8, width)


def _biased_exponents(values: np.ndarray) -> np.ndarray:
    return ((values.view(np.uint32) >> MANTISSA_BITS) & 0xFF).astype(np.int64)


def exponent_width(values: np.ndarray) -> int:
    """Bits of the smallest exponent index that codes ``values`` exactly; 0 where none
    does (a zero, subnormal, infinite or NaN value, or more than 16 exponents)."""
    if values.dtype != np.float32 or values.size == 0:
        return 0
    exponents = _biased_exponents(values)
    if exponents.min() == 0 or exponents.max() == 0xFF:
        return 0
    distinct = np.unique(exponents).size
    return next((w for w in EXPONENT_WIDTHS if distinct <= 1 << w), 0)


@dataclass
class ExponentCode:
    """fp32 values as mantissa, sign and exponent index (see the module docstring)."""

    low: np.ndarray  # uint16: mantissa bits 0-15
    high: np.ndarray  # uint8: sign << 7 | mantissa bits 16-22
    indices: np.ndarray  # uint8: ``width``-bit exponent indices, least significant first
    table: np.ndarray  # float32, 2 * 2**width: the powers of two, then their negatives
    width: int


def exponent_code(values: np.ndarray, width: int) -> ExponentCode:
    """Code ``values`` (float32, all normal, at most 2**width exponents); the arrays are
    padded with zeros to whole bytes of indices."""
    per_byte = 8 // width
    count = -(-values.size // per_byte) * per_byte
    bits = np.zeros(count, dtype=np.uint32)
    bits[: values.size] = values.view(np.uint32)
    biased = _biased_exponents(bits.view(np.float32))
    distinct = np.unique(biased[: values.size])
    index = np.searchsorted(distinct, biased).clip(0, distinct.size - 1).astype(np.uint8)
    index[values.size:] = 0
    powers = np.ones(1 << width, dtype=np.float32)
    powers[: distinct.size] = np.ldexp(np.float32(1), distinct - 127).astype(np.float32)
    fields = index.reshape(-1, per_byte).astype(np.uint16) << (np.arange(per_byte) * width)
    return ExponentCode(
        low=(bits & 0xFFFF).astype(np.uint16),
        high=(((bits >> 31) << 7) | ((bits >> 16) & 0x7F)).astype(np.uint8),
        indices=fields.sum(axis=1).astype(np.uint8),
        table=np.concatenate([powers, -powers]),
        width=width)


def exponent_decode(code: ExponentCode, count: int) -> np.ndarray:
    """numpy twin of the graph's value decoder: the first ``count`` values."""
    sign = ((code.high >> (7 - code.width)) & (1 << code.width)).astype(np.int64)
    index = _unpack(code.indices, code.width).astype(np.int64) | sign
    mantissa = (code.high & 0x7F).astype(np.float32) * np.float32(65536) + \
        code.low.astype(np.float32)
    fraction = mantissa * np.float32(2.0 ** -MANTISSA_BITS) + np.float32(1)
    return (fraction * code.table[index])[:count].astype(np.float32)


def _unpack(data: np.ndarray, width: int, fields: int | None = None) -> np.ndarray:
    """numpy twin of the graph's unpack: ``fields`` fields of ``width`` bits per element
    (all that fit a byte by default), least significant first."""
    shifts = np.arange(0, width * (fields or 8 // width), width, dtype=np.uint8)
    return ((data[:, None] >> shifts) & ((1 << width) - 1)).reshape(-1)


def decode_mask(top: np.ndarray, nibbles: list[np.ndarray], total: int) -> np.ndarray:
    """The flat boolean mask of ``total`` weights that an occupancy tree stores."""
    occupied = _unpack(top, 1)
    for level in nibbles:
        rank = np.cumsum(occupied, dtype=np.int64) * occupied
        occupied = _unpack(_unpack(level, 4)[rank], 1, FANOUT)
    return occupied[:total].astype(bool)


def decode(stream: PackedStream) -> dict[str, np.ndarray]:
    """What the graph rebuilds, computed with numpy (for checks and for `inspect`)."""
    mask = decode_mask(stream.top, stream.nibbles, stream.total)
    dtype = np.int8 if stream.raw_int8 else np.float32
    flat = np.zeros(stream.total, dtype=dtype)
    flat[mask] = stream.values.astype(dtype)
    out = {}
    for t in stream.tensors:
        part = flat[t.offset: t.offset + t.size]
        if t.scale is not None:
            part = part * np.float32(t.scale)
        out[t.name] = part.reshape(t.shape)
    return out


class _Builder:
    """Collects decoder nodes; intermediate names are short because each is stored twice."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, TensorProto] = {}
        self._count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        if PREFIX + name not in self.inits:
            self.inits[PREFIX + name] = numpy_helper.from_array(array, PREFIX + name)
        return PREFIX + name

    def scalar(self, value: float, dtype: type) -> str:
        return self.const(f"{np.dtype(dtype).kind}{value:g}", np.array(value, dtype=dtype))

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        if output is None:
            output = f"cp{self._count}"
            self._count += 1
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output

    def unpack(self, data: str, width: int, fields: int | None = None) -> str:
        fields = fields or 8 // width
        shifts = self.const(f"shift{width}x{fields}",
                            np.arange(0, width * fields, width, dtype=np.uint8)[None, :])
        mask = self.const(f"field{width}", np.array((1 << width) - 1, dtype=np.uint8))
        wide = self.op("Unsqueeze", [data, self.const("axis1", np.array([1], dtype=np.int64))])
        shifted = self.op("BitShift", [wide, shifts], direction="RIGHT")
        flat = self.const("flat", np.array([-1], dtype=np.int64))
        return self.op("Reshape", [self.op("BitwiseAnd", [shifted, mask]), flat])

    def rank(self, bits: str) -> str:
        """Per position: 0 where the bit is 0, else the 1-based count of set bits so far."""
        wide = self.op("Cast", [bits], to=TensorProto.INT64)
        axis = self.const("axis0", np.array(0, dtype=np.int64))
        return self.op("Mul", [self.op("CumSum", [wide, axis]), wide])


def decoder(stream: PackedStream) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes and initializers whose outputs are the dense weights, named as before packing.

    The stored values start with one extra 0: the Gather index is 0 (that zero) where a
    weight is pruned and the 1-based rank of the non-zero otherwise. The returned
    initializers start with the stream's top-level mask bits (``packed:top``, which
    carries the stream's metadata), then one ``<weight>__shape`` per weight in stream
    order (they carry the weights' metadata).
    """
    b = _Builder()
    top = b.const("top", stream.top)
    if stream.exponent_width:
        values = _exponent_decoder(b, exponent_code(stream.values, stream.exponent_width))
    else:
        padded = np.concatenate([np.zeros(1, dtype=stream.values.dtype), stream.values])
        values = b.const("values", padded)
    shapes = [numpy_helper.from_array(np.array(t.shape, dtype=np.int64), f"{t.name}__shape")
              for t in stream.tensors]
    occupied = b.unpack(top, 1)
    for level, nibbles in enumerate(stream.nibbles):
        table = b.unpack(b.const(f"level{level}", nibbles), 4)
        occupied = b.unpack(b.op("Gather", [table, b.rank(occupied)]), 1, FANOUT)
    if stream.values.dtype != np.float32 and not stream.raw_int8:
        values = b.op("Cast", [values], to=TensorProto.FLOAT)
    dense = b.op("Gather", [values, b.rank(occupied)])
    decoded_length = stream.top.size * 8 * FANOUT ** stream.levels
    sizes = [t.size for t in stream.tensors]
    spare = decoded_length - stream.total
    parts = [f"cp_w{i}" for i in range(len(sizes))] + (["cp_spare"] if spare else [])
    split = b.const("split", np.array(sizes + ([spare] if spare else []), dtype=np.int64))
    b.nodes.append(helper.make_node("Split", [dense, split], parts, axis=0))
    for i, t in enumerate(stream.tensors):
        part = parts[i]
        if t.scale is not None:
            part = b.op("Mul", [part, b.const(f"scale{i}", np.array(t.scale, np.float32))])
        b.op("Reshape", [part, shapes[i].name], output=t.name)
    inits = list(b.inits.values())
    return b.nodes, [inits[0], *shapes, *inits[1:]]


def _exponent_decoder(b: _Builder, code: ExponentCode) -> str:
    """Nodes rebuilding ``[0, values...]`` as float32 from an exponent code."""
    low, high, width = b.const("low", code.low), b.const("high", code.high), code.width
    shifted = b.op("BitShift", [high, b.scalar(7 - width, np.uint8)], direction="RIGHT")
    sign = b.op("BitwiseAnd", [shifted, b.scalar(1 << width, np.uint8)])  # sign << width
    index = b.op("BitwiseOr", [b.unpack(b.const("indices", code.indices), width), sign])
    power = b.op("Gather", [b.const("powers", code.table),
                            b.op("Cast", [index], to=TensorProto.INT64)])
    high_bits = b.op("BitwiseAnd", [high, b.scalar(0x7F, np.uint8)])
    mantissa = b.op("Add", [
        b.op("Mul", [b.op("Cast", [high_bits], to=TensorProto.FLOAT),
                     b.scalar(65536, np.float32)]),
        b.op("Cast", [low], to=TensorProto.FLOAT)])
    fraction = b.op("Add", [b.op("Mul", [mantissa, b.scalar(2.0 ** -MANTISSA_BITS, np.float32)]),
                            b.scalar(1, np.float32)])
    zero = b.const("zero", np.zeros(1, np.float32))
    return b.op("Concat", [zero, b.op("Mul", [fraction, power])], axis=0)


def _value_layout(inits: dict[str, TensorProto], count: int) -> tuple[np.dtype, int]:
    """(the type the stored non-zeros decode to, exponent index width or 0) of a file's
    stream, checked from the stored shapes alone to hold exactly ``count`` values (as many as
    its mask has non-zeros); nothing is decoded."""
    if PREFIX + "high" not in inits:
        stored = inits[PREFIX + "values"]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(stored.data_type))
        if dtype not in (np.float32, np.float16, np.int8):
            raise ValueError(f"{PREFIX}values holds {dtype}, not float32, float16 or int8")
        if len(stored.dims) != 1 or stored.dims[0] - 1 != count:  # less the padding 0
            held = int(np.prod(stored.dims)) - 1
            raise ValueError(f"the mask has {count} non-zeros but {held} values are stored")
        return dtype, 0
    size = {k: int(np.prod(inits[PREFIX + k].dims))
            for k in ("low", "high", "indices", "powers")}
    width = int(size["powers"] // 2).bit_length() - 1
    if width not in EXPONENT_WIDTHS or size["powers"] != 2 << width:
        raise ValueError(f"{PREFIX}powers has {size['powers']} entries, not 4, 8 or 32")
    stored = size["indices"] * (8 // width)
    if not size["low"] == size["high"] == stored or not count <= stored < count + 8 // width:
        raise ValueError(f"the mask has {count} non-zeros but the exponent code stores "
                         f"{size['low']}, {size['high']} and {stored} fields")
    return np.dtype(np.float32), width


def _read_values(inits: dict[str, TensorProto], count: int) -> tuple[np.ndarray, int]:
    """(the stored non-zeros, exponent index width or 0) of a file's stream, which must
    hold exactly as many values as its mask has non-zeros."""
    _, width = _value_layout(inits, count)
    if not width:
        return numpy_helper.to_array(inits[PREFIX + "values"])[1:], 0  # drop the padding 0
    array = {k: numpy_helper.to_array(inits[PREFIX + k])
             for k in ("low", "high", "indices", "powers")}
    code = ExponentCode(array["low"], array["high"], array["indices"], array["powers"], width)
    return exponent_decode(code, count), width


@dataclass
class StreamLayout:
    """A file's stream as stored, nothing decoded but its mask: where each weight lies, how
    many of its positions the mask marks non-zero, and what values are stored."""

    tensors: list[PackedTensor]
    nonzeros: list[int]  # per tensor, from the mask
    top: np.ndarray
    nibbles: list[np.ndarray]
    value_dtype: np.dtype  # what the stored values decode to
    value_count: int
    raw_int8: bool
    exponent_width: int

    value_coding = PackedStream.value_coding
    levels = PackedStream.levels
    mask_bytes = PackedStream.mask_bytes


def read_layout(model: onnx.ModelProto,
                max_bytes: int = MAX_TENSOR_MB * 2**20) -> StreamLayout:
    """The stream of a file laid out as its decoder reads it: which weight each Split output
    becomes, its offset, shape and int8 scale all come from the graph itself. The mask is
    read a piece at a time (`mask_pieces`) and the values are not decoded, so this costs
    about the file's mask, not its weights; the values stored must be as many as the mask's
    non-zeros."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, node)
    split = next(n for n in model.graph.node if n.op_type == "Split" and
                 list(n.input[1:2]) == [PREFIX + "split"])
    sizes = numpy_helper.to_array(inits[PREFIX + "split"])
    tensors, offset = [], 0
    for part, size in zip(split.output, sizes, strict=True):
        node, scale = consumers.get(part), None
        if node is not None and node.op_type == "Mul":
            scale = float(numpy_helper.to_array(inits[node.input[1]]))
            node = consumers.get(node.output[0])
        if node is not None and node.op_type == "Reshape":
            shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[1]]))
            tensors.append(PackedTensor(node.output[0], shape, offset, scale))
            if math.prod(shape) != int(size):
                raise ValueError(f"weight {node.output[0]!r} of shape {shape[:8]} does not "
                                 f"hold its share of the stream ({int(size)})")
        offset += int(size)
    if PREFIX + f"level{MAX_LEVELS}" in inits:  # each level multiplies what is decoded by 4
        raise ValueError(f"its mask has more than {MAX_LEVELS} levels")
    levels = []
    while PREFIX + f"level{len(levels)}" in inits:
        levels.append(numpy_helper.to_array(inits[PREFIX + f"level{len(levels)}"]))
    top = numpy_helper.to_array(inits[PREFIX + "top"])
    _check_decoded_length(top.size * 8 * FANOUT ** len(levels), sizes, max_bytes)
    total = sum(t.size for t in tensors)
    nonzeros, count = _count_mask(top, levels, tensors, total)
    dtype, width = _value_layout(inits, count)
    raw_int8 = dtype == np.int8 and all(t.scale is None for t in tensors)
    return StreamLayout(tensors, nonzeros, top, levels, dtype, count, raw_int8, width)


def _check_decoded_length(length: int, sizes: np.ndarray, max_bytes: int) -> None:
    """Before anything is decoded: the stream decodes to ``length`` weights, which its
    decoder ranks as int64 (8 bytes each, within ``max_bytes``) and which the Split sizes
    share out exactly."""
    if length * 8 > max_bytes:
        raise CompressError(f"its packed stream decodes to {length:,} weights, past the "
                            f"{max_bytes / 2**20:,.0f} MiB limit (--max-tensor-mb)")
    shares = [int(size) for size in sizes.reshape(-1)]
    if any(share < 0 for share in shares) or sum(shares) != length:
        raise ValueError(f"{PREFIX}split shares out {sum(shares)} weights, the mask holds "
                         f"{length}")


def _count_mask(top: np.ndarray, nibbles: list[np.ndarray], tensors: list[PackedTensor],
                total: int) -> tuple[list[int], int]:
    """(non-zeros the mask marks in each tensor, in the first ``total`` positions)."""
    counts, count, start = [0] * len(tensors), 0, 0
    for piece in mask_pieces(top, nibbles, total):
        end = start + piece.size
        count += int(np.count_nonzero(piece))
        for i, t in enumerate(tensors):
            lo, hi = max(t.offset, start), min(t.offset + t.size, end)
            if lo < hi:
                counts[i] += int(np.count_nonzero(piece[lo - start: hi - start]))
        start = end
    if start < max((t.offset + t.size for t in tensors), default=0):
        raise ValueError(f"the mask covers {start} weights, fewer than its tensors hold")
    return counts, count


def mask_pieces(top: np.ndarray, nibbles: list[np.ndarray], total: int,
                piece: int = 1 << 20):
    """The first ``total`` positions of the mask `decode_mask` gives, in consecutive
    boolean pieces of about ``piece`` weights: the tree is walked a run of top-level blocks
    at a time, each level's rank counted on from where the last run stopped, so no array
    is larger than a piece whatever the file's size."""
    step = max(1, piece // FANOUT ** len(nibbles) // 8)  # bytes of top-level bits per run
    used = [0] * len(nibbles)  # nibbles of each level read by earlier runs
    emitted = 0
    for first in range(0, top.size, step):
        if emitted >= total:
            return
        occupied = _unpack(top[first: first + step], 1)
        for depth, level in enumerate(nibbles):
            rank = np.cumsum(occupied, dtype=np.int64)
            found = int(rank[-1]) if rank.size else 0
            rank = (rank + used[depth]) * occupied  # 0 (the leading empty nibble) where empty
            used[depth] += found
            nibble = (level[rank >> 1] >> ((rank & 1) << 2).astype(np.uint8)) & 0xF
            occupied = _unpack(nibble.astype(np.uint8), 1, FANOUT)
        out = occupied[: total - emitted].astype(bool)
        emitted += out.size
        yield out


def read_stream(model: onnx.ModelProto) -> PackedStream:
    """The stream back from a file with its values decoded (`read_layout`, then the
    values): for the export's own checks; the readers of a file need only its layout."""
    layout = read_layout(model)
    inits = {t.name: t for t in model.graph.initializer}
    values, width = _read_values(inits, layout.value_count)
    return PackedStream(layout.tensors, values, layout.top, layout.nibbles, layout.raw_int8,
                        width)


def worth_packing(weight: np.ndarray, values: str) -> bool:
    """True when the weight's values and a plain mask are smaller than it is dense (an
    all-zero weight, a layer pruned away, is always worth it: it costs only its mask)."""
    nonzero = int(np.count_nonzero(weight))
    if weight.ndim < 2:
        return False
    width = 1 if weight.dtype == np.int8 else _VALUE_BYTES[values]
    packed = nonzero * width + -(-weight.size // 8) + 64  # + its shape node
    return packed < weight.size * weight.itemsize
