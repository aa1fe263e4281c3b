"""The one reader of JSON that comes from a file a user hands us (ONNX metadata, integrity
records, a run's metrics log): bounded, and every way it can fail is one line.

Python's ``json`` recurses once per level of nesting (``RecursionError`` past about a
thousand), refuses integers of more than 4300 digits with a ``ValueError``, and reads
``NaN``, ``Infinity`` and ``1e999`` as floats nobody expects. Here the text is refused,
as a `CompressError`, when it is longer than `MAX_JSON_BYTES`, nested deeper than
`MAX_JSON_DEPTH` (checked before parsing, without recursion), holds an integer of more than
`MAX_JSON_INT_DIGITS` digits, a number that is not finite, or a string that is not text (a
lone surrogate). Text that is not JSON at all raises `NotJson`, a `CompressError` too, so
a reader that takes plain strings as well can fall back to the text. Syntax is checked
before the bounds: a hex digest such as ``1678e438c4...`` starts like a huge number, and
is plain text, not JSON past a limit.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from compress.errors import CompressError
from compress.fileio import regular_file_size

MAX_JSON_BYTES = 2**20  # longest JSON text read from a file (metadata, records, logs)
MAX_JSON_DEPTH = 64  # deepest nesting of lists and objects in it
MAX_JSON_INT_DIGITS = 64  # longest integer in it

_SPECIAL = re.compile(r'["\\\[\]{}]')


class NotJson(CompressError):
    """The text is not JSON (as opposed to JSON past a limit)."""


def read_json(text: str | bytes, what: str) -> object:
    """``text`` parsed, or a one-line `CompressError` naming ``what`` (see the module)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise CompressError(f"{what} is not UTF-8 text") from None
    if len(text) > MAX_JSON_BYTES:
        raise CompressError(f"{what} is {len(text):,} characters long, more than the "
                            f"{MAX_JSON_BYTES:,} a JSON entry may take")
    if _depth(text) > MAX_JSON_DEPTH:
        raise CompressError(f"{what} nests lists or objects more than {MAX_JSON_DEPTH} deep")
    try:  # syntax first: numbers kept as text, so a bound cannot fire on text that is not JSON
        json.loads(text, parse_int=str, parse_float=str, parse_constant=str)
    except json.JSONDecodeError as exc:
        raise NotJson(f"{what} is not JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError as exc:
        raise CompressError(f"{what} holds {exc}") from None
    try:
        value = json.loads(text, parse_int=_integer, parse_float=_float,
                           parse_constant=_constant)
    except (ValueError, RecursionError) as exc:
        raise CompressError(f"{what} holds {exc}") from None
    if not _all_text(value):
        raise CompressError(f"{what} holds a string that is not text (a lone surrogate)")
    return value


def read_json_file(path: str | Path, what: str) -> object:
    """A JSON file a user hands us, read as `read_json` reads text: a regular file only (a
    FIFO or device is never opened), of at most `MAX_JSON_BYTES`."""
    name = f"{what} {path}"
    regular_file_size(path, MAX_JSON_BYTES / 2**20, "read as JSON", name)
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise CompressError(f"cannot read {name}: {exc.strerror}") from None
    return read_json(data, name)


def _depth(text: str) -> int:
    """How deep lists and objects nest (brackets inside strings do not count); stops
    counting once past the limit."""
    depth = deepest = 0
    in_string, skip = False, -1
    for match in _SPECIAL.finditer(text):
        at, char = match.start(), match.group()
        if at == skip:  # the character after a backslash
            continue
        if in_string:
            if char == "\\":
                skip = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                break
        elif char in "]}":
            depth -= 1
    return deepest


def _integer(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_JSON_INT_DIGITS:
        raise ValueError(f"an integer of {digits:,} digits, more than {MAX_JSON_INT_DIGITS}")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"a number too large for a float ({text[:20]}...)")
    return value


def _constant(name: str) -> float:
    raise ValueError(f"{name}, which is not a JSON number")


def _all_text(value: object) -> bool:
    """No string (key or value) holds a lone surrogate. Nesting is bounded already, so a
    work list keeps this simple rather than necessary."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True
