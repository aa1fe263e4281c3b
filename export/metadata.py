"""Metadata written into exported files, under one reverse-DNS prefix.

Model level: ``metadata_props`` of the ModelProto. Tensor level: ``metadata_props`` of each
pruned weight's initializer (for a packed weight, of its ``<weight>__shape`` initializer),
which ONNX allows since IR version 10. Reading needs only the ``onnx`` package.
"""

from __future__ import annotations

import json

import onnx

from compress.jsontext import NotJson, read_json

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


def _decode(key: str, value: str) -> object:
    """An entry's JSON value, or its text where it is not JSON; JSON past the limits of
    `read_json` (too long, too deep, a huge integer) is refused in one line."""
    try:
        return read_json(value, f"metadata entry {key[:80]!r}")
    except NotJson:
        return value


def model_metadata(model: onnx.ModelProto) -> dict[str, object]:
    return {p.key.removeprefix(PREFIX): _decode(p.key, p.value) for p in model.metadata_props
            if p.key.startswith(PREFIX)}


def tensor_metadata(tensor: onnx.TensorProto) -> dict[str, object]:
    return {p.key.removeprefix(PREFIX): _decode(p.key, p.value) for p in tensor.metadata_props
            if p.key.startswith(PREFIX)}
