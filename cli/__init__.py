"""The ``compress`` console script (Typer)."""

from export.runtime import no_telemetry

no_telemetry()  # before any command loads onnxruntime: see export/runtime.py
