"""A file's checks, run in a child process that has ended before a session opens.

`evaluate` and `bench` read a file twice: once with onnx, to check its digests, sizes and
packed stream, and once with onnxruntime, to run it. Importing onnx and parsing a model
costs a reader about 20 MB (onnx's operator schemas) plus the parsed model, which a process
keeps beside the session it opens next: on a small model (MobileNetV2, a 14 MB file whose
bare session peaks at 100 MiB) that alone is a fifth of the session. Forked after the
imports both sides share, a child does the checks and sends back a small JSON result;
the parent never imports onnx, and the child's memory is gone before the session's is
taken, so the pair never holds both.

Where ``os.fork`` is missing (Windows) the work runs in the process itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import traceback
from collections.abc import Callable

from compress.errors import CompressError

PR_SET_PDEATHSIG = 1  # prctl(2): a signal the child gets when its parent ends


def in_child(work: Callable[..., object], *args: object,
             meanwhile: Callable[[], object] | None = None) -> object:
    """``work(*args)``, run in a forked child; its JSON-able result, or its `CompressError`
    raised here with the same line. A child killed by a signal (a crash in native code, the
    memory limit) is refused in one line; any other exception is an internal error.

    ``meanwhile`` runs here while the child works (importing onnxruntime: on a small model
    the checks and that import take as long as the session's start)."""
    if not hasattr(os, "fork"):
        result = work(*args)
        if meanwhile is not None:
            meanwhile()
        return result
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - measured by the parent's tests, not in this process
        os.close(read_end)
        _child(work, args, write_end, parent)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        try:
            if meanwhile is not None:
                meanwhile()
            message = pipe.read()
            _, status = os.waitpid(pid, 0)
        except BaseException:  # meanwhile's error, an interrupt: the child goes too
            _kill(pid)
            raise
    return _outcome(message, status)


def _child(work: Callable[..., object], args: tuple, write_end: int, parent: int) -> None:
    """Run ``work`` and write its outcome; never returns (``os._exit`` leaves the parent's
    buffered output and cleanup alone)."""
    code = 0
    try:
        _die_with_parent()
        if os.getppid() != parent:  # it ended before the request above
            code = 1
            return
        try:
            outcome = {"result": work(*args)}
        except CompressError as exc:
            outcome = {"refused": str(exc)}
        except KeyboardInterrupt:
            code, outcome = 130, {"refused": "interrupted"}
        except BaseException:  # noqa: BLE001 - reported by the parent as an internal error
            outcome = {"failed": traceback.format_exc()}
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(json.dumps(outcome).encode())
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    """Ask Linux to end this child if the parent ends first (the time limit ends a reader
    with ``os._exit``, which waits for no child)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: nothing to ask
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _outcome(message: bytes, status: int) -> object:
    if os.WIFSIGNALED(status) or not message:
        cause = (f"signal {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
                 else f"exit {os.waitstatus_to_exitcode(status)}")
        raise CompressError(f"checking the file ended its checker process ({cause}): the file "
                            "is damaged or hostile, or the memory limit was reached")
    outcome = json.loads(message)
    if "refused" in outcome:
        raise CompressError(outcome["refused"])
    if "failed" in outcome:
        raise RuntimeError(f"the checker process failed:\n{outcome['failed']}")
    return outcome["result"]
