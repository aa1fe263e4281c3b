"""Sparse weights stored as their non-zero values plus a packed bitmask.

The dense weight is rebuilt inside the graph with standard ops only::

    bits (uint8) -> Unsqueeze -> BitShift(0..7) -> BitwiseAnd 1 -> Reshape -> Slice
      -> Cast(int64) = mask -> CumSum -> Mul mask = index
    [0, values...] -> [Cast to float, Mul scale] -> Gather(index) -> Reshape

Every input is a constant, so onnxruntime's constant folding turns the whole chain back
into one dense initializer when the session starts: the optimized graph is the dense graph
and runs at dense speed. ``NonZero``, ``ScatterND`` and ``DequantizeLinear`` are avoided on
purpose: ORT does not fold them and would decode on every inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VALUE_TYPES = ("fp32", "fp16", "int8")
DECODER_OPS = {"BitShift", "BitwiseAnd", "CumSum"}


@dataclass
class PackedWeight:
    """The pieces that replace one dense initializer."""

    name: str
    shape: tuple[int, ...]
    values: np.ndarray  # non-zeros in C order: float32, float16 or int8
    bits: np.ndarray  # uint8, little-endian bit order, ceil(n / 8) bytes
    scale: float | None  # int8 only: value = q * scale

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.bits.nbytes + (4 if self.scale is not None else 0)


def encode(name: str, weight: np.ndarray, values: str = "fp32") -> PackedWeight:
    """Split ``weight`` into a bitmask of non-zeros and their values at ``values`` precision.

    int8 uses one symmetric per-tensor scale; a non-zero weight never rounds to zero
    (it keeps at least one quantum) so the sparsity pattern is exact at every precision.
    """
    if values not in VALUE_TYPES:
        raise ValueError(f"values must be one of {VALUE_TYPES}, got {values!r}")
    flat = weight.astype(np.float32).ravel()
    mask = flat != 0
    nonzero = flat[mask]
    scale = None
    if values == "fp16":
        stored = nonzero.astype(np.float16)
        stored[stored == 0] = np.float16(np.sign(nonzero[stored == 0]) * 6e-8)
    elif values == "int8":
        peak = float(np.abs(nonzero).max()) if nonzero.size else 1.0
        scale = peak / 127.0 if peak > 0 else 1.0
        q = np.clip(np.rint(nonzero / scale), -127, 127)
        q = np.where(q == 0, np.sign(nonzero), q)
        stored = q.astype(np.int8)
    else:
        stored = nonzero
    bits = np.packbits(mask, bitorder="little")
    return PackedWeight(name, tuple(weight.shape), stored, bits, scale)


def decode(packed: PackedWeight) -> np.ndarray:
    """What the graph rebuilds, computed with numpy (for checks and for `inspect`).

    ``packed.values`` holds the non-zeros only (as `encode` returns them)."""
    n = int(np.prod(packed.shape))
    mask = np.unpackbits(packed.bits, bitorder="little")[:n].astype(bool)
    values = packed.values.astype(np.float32)
    if packed.scale is not None:
        values = values * np.float32(packed.scale)
    out = np.zeros(n, dtype=np.float32)
    out[mask] = values
    return out.reshape(packed.shape)


def _const(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


SHARED = "compress_decoder__"


def shared_constants() -> list[TensorProto]:
    """Constants every decoder uses, stored once per file."""
    s = SHARED
    return [
        _const(s + "shifts", np.arange(8, dtype=np.uint8).reshape(1, 8)),
        _const(s + "one_u8", np.array(1, dtype=np.uint8)),
        _const(s + "axis1", np.array([1], dtype=np.int64)),
        _const(s + "flat", np.array([-1], dtype=np.int64)),
        _const(s + "start", np.array([0], dtype=np.int64)),
        _const(s + "zero_axis", np.array(0, dtype=np.int64)),
    ]


def decoder(packed: PackedWeight, tag: str) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes and initializers whose output is the dense weight, named ``packed.name``.

    The stored values start with one extra 0: the index of each entry is
    ``cumsum(mask) * mask``, which is 0 (that padding zero) where the weight is pruned and
    the 1-based rank of the non-zero otherwise, so one Gather rebuilds the flat weight.
    ``tag`` (unique per weight) names the intermediate results briefly: names are stored
    twice per node and would otherwise cost more than a small layer's weights. The values
    initializer comes first in the returned list (it carries the metadata); the graph also
    needs `shared_constants` once.
    """
    p, s, t = f"{packed.name}__", SHARED, f"{tag}_"
    n = int(np.prod(packed.shape))
    padded = np.concatenate([np.zeros(1, dtype=packed.values.dtype), packed.values])
    inits = [
        _const(p + "values", padded),
        _const(p + "bits", packed.bits),
        _const(p + "count", np.array([n], dtype=np.int64)),
        _const(p + "shape", np.array(packed.shape, dtype=np.int64)),
    ]
    node = helper.make_node
    nodes = [
        node("Unsqueeze", [p + "bits", s + "axis1"], [t + "u"]),
        node("BitShift", [t + "u", s + "shifts"], [t + "s"], direction="RIGHT"),
        node("BitwiseAnd", [t + "s", s + "one_u8"], [t + "a"]),
        node("Reshape", [t + "a", s + "flat"], [t + "r"]),
        node("Slice", [t + "r", s + "start", p + "count"], [t + "b"]),
        node("Cast", [t + "b"], [t + "m"], to=TensorProto.INT64),
        node("CumSum", [t + "m", s + "zero_axis"], [t + "c"]),
        node("Mul", [t + "c", t + "m"], [t + "i"]),
    ]
    values = p + "values"
    if packed.values.dtype != np.float32:
        nodes.append(node("Cast", [values], [t + "f"], to=TensorProto.FLOAT))
        values = t + "f"
    if packed.scale is not None:
        inits.append(_const(p + "scale", np.array(packed.scale, dtype=np.float32)))
        nodes.append(node("Mul", [values, p + "scale"], [t + "q"]))
        values = t + "q"
    nodes += [
        node("Gather", [values, t + "i"], [t + "g"]),
        node("Reshape", [t + "g", p + "shape"], [packed.name]),
    ]
    return nodes, inits


def worth_packing(weight: np.ndarray, values: str) -> bool:
    """True when values + bitmask + decoder constants are smaller than the dense tensor."""
    nonzero = int(np.count_nonzero(weight))
    if nonzero == 0 or weight.ndim < 2:
        return False
    width = {"fp32": 4, "fp16": 2, "int8": 1}[values]
    packed = nonzero * width + (weight.size + 7) // 8 + 400  # ~400 B of decoder nodes
    return packed < weight.size * 4
