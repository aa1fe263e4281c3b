"""Static int8 quantization in QDQ form, through onnxruntime's own quantization tools.

Weights are int8, symmetric and per output channel, so a pruned (zero) weight stays exactly
zero and the sparsity pattern survives; activations are uint8 (asymmetric) with ranges
calibrated (min/max) on images from the run's training split, normalised as the model
expects and never augmented. uint8 activations with int8 weights (U8S8) are onnxruntime's
fast path on x86: measured on ResNet-20 here, 2.2x faster than fp32 at one thread, where
int8 activations (S8S8) were 1.4x slower than fp32. The result is a QDQ graph
(``DequantizeLinear`` after each int8 weight) that onnxruntime fuses into integer kernels
(``QLinearConv``, ``QGemm``...) at session start.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from compress.errors import CompressError, first_line

QUANT_MODES = ("none", "int8")
DEFAULT_CALIBRATION_SAMPLES = 512
CALIBRATION_SEED = 0


def calibration_batches(ckpt, samples: int | None, batch_size: int = 64) -> list[np.ndarray]:
    """``samples`` training images drawn with a fixed seed, in batches of float32 arrays;
    ``None``: ``DEFAULT_CALIBRATION_SAMPLES``, or the whole split when it is smaller."""
    import torch

    from compress.data import load_splits

    if samples is not None and samples < 1:
        raise CompressError(f"--calibration-samples must be at least 1, got {samples}")
    train = load_splits(ckpt.data).train
    if samples is None:
        samples = min(DEFAULT_CALIBRATION_SAMPLES, len(train))
    if samples > len(train):
        raise CompressError(f"--calibration-samples {samples} is more than the {len(train):,} "
                            "images of the training split")
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    chosen = torch.randperm(len(train), generator=generator)[:samples]
    subset = train.subset(chosen, augment=False)
    return [x.numpy().astype(np.float32) for x, _ in subset.batches(batch_size)]


def settings(samples: int) -> dict:
    """What is recorded in the file's metadata about the quantization."""
    return {"format": "QDQ", "weights": "int8, symmetric, per output channel",
            "activations": "uint8, asymmetric, min/max calibration", "calibration_samples": samples,
            "calibration_split": "train", "calibration_seed": CALIBRATION_SEED}


def quantize_int8(model: onnx.ModelProto, batches: list[np.ndarray]) -> onnx.ModelProto:
    """The model quantized to int8 QDQ, calibrated on ``batches``."""
    from export.ort import load_onnxruntime

    load_onnxruntime()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    input_name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(batches)

        def get_next(self) -> dict | None:
            x = next(self._batches, None)
            return None if x is None else {input_name: x}

    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it suggests pre-processing on every call
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
            onnx.save(model, str(source))
            quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"WeightSymmetric": True})
            quantized = onnx.load(str(target))
    except CompressError:
        raise
    except Exception as exc:
        raise CompressError(f"onnxruntime could not quantize the model: {first_line(exc)}") \
            from None
    finally:
        quiet.setLevel(level)
    quantized.metadata_props.extend(model.metadata_props)
    return quantized


def quantized_weights(model: onnx.ModelProto) -> set[str]:
    """Names of int8 initializers of rank >= 2 that a DequantizeLinear reads: the weights."""
    inits = {t.name: t for t in model.graph.initializer}
    return {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
            and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8
            and len(inits[n.input[0]].dims) >= 2}


def dequantized_sources(model: onnx.ModelProto) -> dict[str, str]:
    """Output -> input of every DequantizeLinear: in a QDQ graph a Conv reads DQ(weight)."""
    return {n.output[0]: n.input[0] for n in model.graph.node
            if n.op_type == "DequantizeLinear"}


def quantization_parameters(model: onnx.ModelProto) -> set[str]:
    """Names of scale and zero-point inputs of QuantizeLinear/DequantizeLinear."""
    return {name for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") for name in n.input[1:]}
