"""The ``compress`` console script (Typer)."""

from export.ort import no_telemetry

no_telemetry()  # before any command loads onnxruntime: see export/ort.py
