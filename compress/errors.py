"""One exception type for every mistake a user can make.

The command line turns a `CompressError` into one line on stderr and a non-zero exit;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

# onnxruntime puts its C++ source location and function signature before the reason:
# "...failed:/onnxruntime_src/core/graph/model.cc:256 onnxruntime::Model::Model(...) Reason"
_ORT_SOURCE = re.compile(r"/onnxruntime_src/\S+:\d+ [\w:~<>]+\([^)]*\)\s*")
_ORT_STATUS = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


class CompressError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type), for one-line errors;
    onnxruntime's source locations are dropped so that its reason fits."""
    text = _ORT_STATUS.sub("", _ORT_SOURCE.sub("", str(exc).strip()))
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def causes(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or during, outermost first."""
    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) and nxt not in chain:
        chain.append(nxt)
    return chain


def raise_if_interrupted(exc: BaseException) -> None:
    """Libraries that wrap every error (torch's exporter does) also wrap Ctrl-C; undo that."""
    if any(isinstance(e, KeyboardInterrupt) for e in causes(exc)):
        raise KeyboardInterrupt from None
