"""Latency of a PyTorch model as onnxruntime runs it here: what ``--budget-ms`` searches on.

MAC counts predict CPU latency badly for thin layers (README, "Structured pruning": at half
the MACs a thin ResNet-20 runs only 1.2x faster), so a latency budget is met by measuring:
the model is exported the way ``compress export`` exports it (same exporter, same tidying),
loaded into an onnxruntime session with the asked number of threads, and timed at batch 1.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from export.onnx_export import module_to_onnx, tidy
from export.quantize import quantize_int8
from export.runtime.latency import measure

DEFAULT_RUNS = 100


PRECISIONS = ("fp32", "int8")


@contextmanager
def exported(model: nn.Module, input_shape: tuple[int, ...],
             precision: str = "fp32") -> Iterator[Path]:
    """``model`` exported as ``compress export`` exports it (``--quantize int8`` for int8),
    to a temporary ONNX file. int8 is calibrated on random images: the scales it finds
    change no kernel and no shape, so the file runs as fast as one calibrated on data."""
    proto = tidy(module_to_onnx(model, tuple(input_shape), type(model).__name__))
    if precision == "int8":
        proto = quantize_int8(proto, timing_batches(input_shape))
    with tempfile.TemporaryDirectory(prefix="compress-budget-") as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(proto, str(path))
        yield path


def timing_batches(input_shape: tuple[int, ...]) -> list[np.ndarray]:
    """Two small batches of seeded random images: calibration for a file that is only timed."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal((4, *input_shape)).astype(np.float32) for _ in range(2)]


def onnx_p50_ms(model: nn.Module, input_shape: tuple[int, ...], *, threads: int = 1,
                runs: int = DEFAULT_RUNS, precision: str = "fp32") -> float:
    """Median latency in ms of one batch-1 inference of ``model`` in onnxruntime."""
    with exported(model, input_shape, precision) as path:
        measurements, _ = measure([path], threads=threads, runs=runs, warmup=10)
    return measurements[0].latency()["p50"]


def layer_table_maker(threads: int = 1, precision: str = "fp32"
                      ) -> Callable[[nn.Module, tuple[int, ...]], dict]:
    """A function making a model's layer table here (`export.runtime.layer_table`), as
    ``compress bench --layer-table`` would on its exported file, for a latency allocation."""
    from export.runtime.layer_table import layer_table

    def make(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
        with exported(model, input_shape, precision) as path:
            return layer_table(path, threads=threads)
    return make


def table_warnings(table: dict, threads: int, precision: str = "fp32") -> list[str]:
    """What makes a given layer table fit this budget search less: other threads, another
    CPU (the measured correction runs here); a table of another precision is refused."""
    from compress.errors import CompressError
    from export.runtime.latency import cpu_name

    if table.get("precision", precision) != precision:
        raise CompressError(f"the latency table was timed in {table.get('precision')} and the "
                            f"budget is measured in {precision} (--budget-precision)")
    warnings = []
    if table.get("threads") != threads:
        warnings.append(f"the latency table was timed with {table.get('threads')} thread(s) "
                        f"and the budget is measured with {threads}")
    if table.get("cpu") and table.get("cpu") != cpu_name():
        warnings.append(f"the latency table was made on {table['cpu']} and the budget is "
                        f"measured here, on {cpu_name()}")
    return warnings


def latency_meter(threads: int = 1, runs: int = DEFAULT_RUNS, precision: str = "fp32"
                  ) -> Callable[[nn.Module, tuple[int, ...]], float]:
    """A function measuring a model's p50 (ms) with these settings, for a pruner's search."""
    def meter(model: nn.Module, input_shape: tuple[int, ...]) -> float:
        return onnx_p50_ms(model, input_shape, threads=threads, runs=runs, precision=precision)
    return meter
