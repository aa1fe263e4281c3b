"""``compress export --quantize auto``: int8 only where it pays, decided by measurement.

int8 is not always faster (onnxruntime's integer kernels lose to fp32 on some thin layers,
and the QDQ boundaries cost time of their own) and not always as accurate. Both files are
exported beside the target, timed interleaved in one process (`export.runtime.latency`) with
the threads the device will use, and their validation top-1 measured in onnxruntime; int8
is kept when it is faster and loses at most ``max_drop`` of validation top-1, fp32 otherwise,
and the reason is returned with the figures. Only the kept file is renamed into place.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from compress.errors import CompressError
from export.onnx_export import ExportResult, export_checkpoint
from export.runtime.latency import measure


def decide(p50_ms: dict[str, float], top1: dict[str, float | None],
           max_drop: float) -> tuple[str, str]:
    """("int8" or "fp32", why): int8 when it is faster and its validation top-1 is at most
    ``max_drop`` below fp32's."""
    speed = p50_ms["fp32"] / p50_ms["int8"]
    if top1["int8"] is None or top1["fp32"] is None:
        return "fp32", "the validation top-1 could not be measured, so int8 was not trusted"
    drop = top1["fp32"] - top1["int8"]
    if speed <= 1.0:
        return "fp32", f"int8 ran {speed:.2f}x as fast as fp32 here, no faster"
    if drop > max_drop:
        return "fp32", (f"int8 was {speed:.2f}x faster but lost {100 * drop:.2f} points of "
                        f"validation top-1 (at most {100 * max_drop:.2f} allowed)")
    return "int8", (f"int8 ran {speed:.2f}x faster than fp32 here at {-100 * drop:+.2f} points "
                    "of validation top-1")


def export_measured_precision(source: str | Path, out: str | Path, *, threads: int = 1,
                              runs: int = 200, max_drop: float = 0.005,
                              overwrite: bool = False,
                              on_stage: Callable[[str], None] | None = None,
                              **options) -> tuple[ExportResult, dict]:
    """Export ``source`` in fp32 and in int8, keep the one `decide` picks at ``out``; the
    result and the choice (figures and reason). ``options`` go to `export_checkpoint`."""
    if not 0 <= max_drop < 1:
        raise CompressError(f"--max-accuracy-drop must be in [0, 100) points, got "
                            f"{100 * max_drop:g}")
    if options.get("file_format", "onnx") != "onnx":
        raise CompressError("--quantize auto writes an ONNX file; convert the chosen file with "
                            "--format ort in a second export")
    out = Path(out)
    if out.exists() and not overwrite:
        raise CompressError(f"--onnx {out} already exists; pass --overwrite to replace it")
    stage = on_stage or (lambda what: None)
    folder = Path(tempfile.mkdtemp(prefix=".compress-precision-", dir=out.parent or "."))
    try:
        results = {}
        for precision, quantize in (("fp32", "none"), ("int8", "int8")):
            stage(f"exporting the {precision} candidate")
            given = {**options, "calibration_samples": options.get("calibration_samples")
                     if quantize == "int8" else None}
            results[precision] = export_checkpoint(
                source, folder / f"{precision}.onnx", quantize=quantize, measure_accuracy=True,
                on_stage=on_stage, **given)
        stage("timing fp32 against int8")
        measured, _ = measure([folder / "fp32.onnx", folder / "int8.onnx"], threads=threads,
                              runs=runs)
        p50 = {p: m.latency()["p50"] for p, m in zip(("fp32", "int8"), measured, strict=True)}
        top1 = {p: (r.accuracy or {}).get("onnx_val_top1") for p, r in results.items()}
        chosen, reason = decide(p50, top1, max_drop)
        kept = folder / f"{chosen}.onnx"
        os.replace(kept, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = dataclasses.replace(results[chosen], path=str(out),
                                 file_bytes=out.stat().st_size)
    return result, {"chosen": chosen, "reason": reason, "p50_ms": p50, "val_top1": top1,
                    "threads": threads, "runs": runs, "max_accuracy_drop": max_drop,
                    "file_bytes": {p: r.file_bytes for p, r in results.items()}}
