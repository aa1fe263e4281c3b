"""How much a file may make a reader allocate, unless the user raises the limit."""

MAX_TENSOR_MB = 4096  # largest tensor a file may declare or make onnxruntime compute
MAX_INPUT_MB = 256  # largest random input `bench` allocates
PROBE_BATCH = 512  # computed sizes are checked at batch 1 and at this batch (evaluate's)
MAX_FOLDED_ELEMENTS = 4096  # largest constant the size check computes (shapes, axes, sizes)
