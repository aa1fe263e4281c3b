"""ONNX export of pruned models: cleaning, packing, metadata, onnxruntime checks."""

from export.ort import no_telemetry

no_telemetry()  # before anything loads onnxruntime: see export/ort.py
