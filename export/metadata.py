"""Metadata written into exported files, under one reverse-DNS prefix.

Model level: ``metadata_props`` of the ModelProto. Tensor level: ``metadata_props`` of each
pruned weight's initializer (for a packed weight, of its ``<weight>__shape`` initializer),
which ONNX allows since IR version 10. Reading needs only the ``onnx`` package.
"""

from __future__ import annotations

import json

import onnx

PREFIX = "io.compress."


def set_model_metadata(model: onnx.ModelProto, entries: dict[str, object]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in entries.items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        full = PREFIX + key
        if full in existing:
            existing[full].value = text
        else:
            model.metadata_props.add(key=full, value=text)


def set_tensor_metadata(tensor: onnx.TensorProto, entries: dict[str, object]) -> None:
    for key, value in entries.items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        tensor.metadata_props.add(key=PREFIX + key, value=text)


def _decode(value: str) -> object:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def model_metadata(model: onnx.ModelProto) -> dict[str, object]:
    return {p.key.removeprefix(PREFIX): _decode(p.value) for p in model.metadata_props
            if p.key.startswith(PREFIX)}


def tensor_metadata(tensor: onnx.TensorProto) -> dict[str, object]:
    return {p.key.removeprefix(PREFIX): _decode(p.value) for p in tensor.metadata_props
            if p.key.startswith(PREFIX)}
