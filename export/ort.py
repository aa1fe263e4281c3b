"""onnxruntime, loaded with its telemetry off. Every session compress opens loads it here.

The official onnxruntime 1.31 wheels for Linux start Microsoft's 1DS telemetry as the
library loads (``import onnxruntime``, before any session): they create a device id and
an events database under ``$XDG_CACHE_HOME`` (else ``~/.cache``)
``/Microsoft/DeveloperTools/.onnxruntime/``, and some seconds later look up the events
host (``mobile.events.data.microsoft.com``) in DNS. ``onnxruntime.disable_telemetry_events()``
comes too late for either: the files exist by the time it can be called.

``ORT_DISABLE_TELEMETRY=1`` in the environment when the library loads is the switch its
Privacy.md documents; measured here under strace, the library then touches no file of its
cache directory and opens no socket, and it stays off even if events are enabled again.
It is set when `export` (or the `cli`) is imported, so it precedes any import of
onnxruntime made through compress; a process that loaded onnxruntime itself beforehand
keeps the telemetry it started with, and gets only ``disable_telemetry_events()``.
"""

from __future__ import annotations

import os

TELEMETRY_SWITCH = "ORT_DISABLE_TELEMETRY"


def no_telemetry() -> None:
    """Turn onnxruntime's telemetry off for this process and the processes it starts.

    Has its effect only before onnxruntime loads; set unconditionally (a ``0`` inherited
    from the environment does not turn it back on)."""
    os.environ[TELEMETRY_SWITCH] = "1"


def load_onnxruntime():
    """``import onnxruntime``, its telemetry switched off first."""
    no_telemetry()
    import onnxruntime

    onnxruntime.disable_telemetry_events()  # all that is left if it was loaded earlier
    return onnxruntime
