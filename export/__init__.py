"""ONNX export of pruned models: cleaning, packing, metadata, onnxruntime checks."""

from export.runtime import no_telemetry

no_telemetry()  # before anything loads onnxruntime: see export/runtime.py
