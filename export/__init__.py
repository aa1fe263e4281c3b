"""ONNX export of pruned models: cleaning, packing, metadata, onnxruntime checks."""
