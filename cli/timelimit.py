"""``--time-limit``: a command reading a hostile file stops instead of running forever.

A file can make onnxruntime spin inside native code: a ``Loop`` with a trip count of
10**12 runs when ``inspect`` decodes the constant part of the graph, when a session folds
constants at start and on every ``bench`` or ``evaluate`` run. Python gets no control back
there, so neither an exception nor a ``SIGALRM`` handler would run, and a session's
creation cannot be cancelled. A watchdog thread does not need the main thread: when the
time is up it writes one line to stderr and ends the process with ``os._exit(2)``.

That skips every ``finally`` and buffered output, so it is only for commands that write no
file the user keeps (``inspect``, ``evaluate``, ``bench``): nothing half-written is left.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Annotated

import typer

from cli.output import EXIT_USER_ERROR


def time_limit_option(default: float) -> object:
    """The ``--time-limit`` option, with this command's default."""
    return Annotated[float, typer.Option(
        "--time-limit", help=f"Stop with exit 2 after this many seconds (default: {default:g}; "
                             "0: no limit): a hostile file cannot keep the command running.",
        show_default=False)]


@contextmanager
def time_limit(seconds: float, command: str) -> Iterator[None]:
    """End the process (exit 2, one line on stderr) if the body runs past ``seconds``."""
    from compress.errors import CompressError

    if not seconds >= 0:  # also NaN
        raise CompressError(f"--time-limit must be 0 (no limit) or a positive number of "
                            f"seconds, got {seconds}")
    if seconds == 0:
        yield
        return
    timer = threading.Timer(seconds, _stop, args=(seconds, command))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _stop(seconds: float, command: str) -> None:
    # os.write, not rich or sys.stderr: the main thread may hold their locks
    clear = "\r\x1b[2K\x1b[?25h" if sys.stderr.isatty() else ""  # a progress bar's line
    line = (f"{clear}error: compress {command}: stopped after {seconds:g} s (--time-limit "
            f"{seconds:g}; raise it, or 0 for no limit)\n")
    try:
        os.write(2, line.encode())
    finally:
        os._exit(EXIT_USER_ERROR)


def time_limited(command: Callable) -> Callable:
    """Run a command that takes ``time_limit`` under `time_limit`."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        name = command.__name__.replace("_", "-")
        with time_limit(kwargs["time_limit"], name):
            return command(*args, **kwargs)

    return wrapper
