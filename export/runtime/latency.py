"""``compress bench``: latency of ONNX models in onnxruntime, as a device would see it.

Needs only onnxruntime and numpy. Percentiles come from single timed runs after warm-up;
with a second model the two are run in alternating blocks in one process so machine noise
hits both alike, and the ratio of their p50s is reported.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compress.errors import CompressError
from export.limits import MAX_INPUT_MB, MAX_TENSOR_MB
from export.ort import load_onnxruntime
from export.runtime.isolated import in_child
from export.runtime.peak import (
    efficiency,
    file_precision,
    layer_rates,
    measured_peak,
    write_probes,
)
from export.session import open_session, single_input

PERCENTILES = ("p50", "p90", "p99")


@dataclass
class Measurement:
    model: str
    file_bytes: int
    session_start_ms: float
    input_shape: list[int]
    times_ms: list[float] = field(default_factory=list)

    def latency(self) -> dict[str, float]:
        t = np.asarray(self.times_ms)
        return {"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90)),
                "p99": float(np.percentile(t, 99)), "mean": float(t.mean())}


def _timed_session(path: Path, threads: int):
    started = time.perf_counter()
    session = open_session(path, threads=threads)
    return session, (time.perf_counter() - started) * 1e3


def _feed(session, batch: int, max_input_mb: float = MAX_INPUT_MB,
          where: str | Path = "the model") -> tuple[dict, list[int]]:
    spec = single_input(session, where)
    dims = [batch] + [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:]]
    if spec.type != "tensor(float)":
        raise CompressError(f"bench feeds float32 inputs; the model's input is {spec.type}")
    size_mb = np.dtype(np.float32).itemsize * math.prod(dims) / 2**20  # as drawn below
    if size_mb > max_input_mb:  # checked before allocating what the file declares
        raise CompressError(f"the model declares an input of shape {tuple(dims)} "
                            f"({size_mb:,.0f} MiB at batch {batch}), past the {max_input_mb:g} "
                            "MiB limit; pass --max-input-mb to raise it")
    x = np.random.default_rng(0).standard_normal(dims, dtype=np.float32)
    return {spec.name: x}, dims


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(paths: list[Path], *, threads: int = 1, batch: int = 1, runs: int = 200,
            warmup: int = 20, blocks: int = 5, on_progress=None,
            max_input_mb: float = MAX_INPUT_MB):
    """Time several models in alternating blocks in one process, so machine noise hits all
    alike. Returns the measurements and the (session, feed) pairs, in the order given."""
    for flag, value, least in (("--threads", threads, 1), ("--batch", batch, 1),
                               ("--runs", runs, 1), ("--warmup", warmup, 0)):
        if value < least:
            raise CompressError(f"{flag} must be at least {least}, got {value}")
    sessions, measurements = [], []
    for path in paths:
        session, start_ms = _timed_session(path, threads)
        feed, dims = _feed(session, batch, max_input_mb, path)
        sessions.append((session, feed))
        measurements.append(Measurement(str(path), path.stat().st_size, start_ms, dims))
    for session, feed in sessions:
        for _ in range(warmup):
            session.run(None, feed)
    blocks = max(1, min(blocks, runs))
    per_block = [runs // blocks + (1 if i < runs % blocks else 0) for i in range(blocks)]
    done = 0
    for count in per_block:
        for (session, feed), m in zip(sessions, measurements, strict=True):
            for _ in range(count):
                t = time.perf_counter()
                session.run(None, feed)
                m.times_ms.append((time.perf_counter() - t) * 1e3)
                done += 1
                if on_progress:
                    on_progress(done, runs * len(sessions))
    return measurements, sessions


def bench(model: str | Path, against: str | Path | None = None, *, threads: int = 1,
          batch: int = 1, runs: int = 200, warmup: int = 20, blocks: int = 5,
          on_progress=None, profile_runs: int = 0, ignore_digest: bool = False,
          max_tensor_mb: float | None = None, max_input_mb: float = MAX_INPUT_MB,
          rate: bool = True) -> dict:
    """Measure ``model`` (and ``against``, interleaved) and return the ``bench --json`` dict.

    With ``rate``, the file's MACs, the GMAC/s it reaches at p50 and their share of this
    CPU's measured peak for its precision are added (`export.runtime.peak`).

    With ``profile_runs``, ``model`` is then run that often under onnxruntime's profiler (in
    a session of its own, so profiling does not slow the timed runs) and the summary is
    added under ``profile``."""
    if max_input_mb <= 0:
        raise CompressError(f"--max-input-mb must be positive, got {max_input_mb}")
    paths = [Path(model)] + ([Path(against)] if against else [])
    checked = [in_child(checked_integrity, str(path), ignore_digest,
                        max_tensor_mb or MAX_TENSOR_MB, meanwhile=load_onnxruntime)
               for path in paths]
    integrity = [c["integrity"] for c in checked]
    ort = load_onnxruntime()  # imported already, while the first check ran
    measurements, sessions = measure(paths, threads=threads, batch=batch, runs=runs,
                                     warmup=warmup, blocks=blocks, on_progress=on_progress,
                                     max_input_mb=max_input_mb)
    first = measurements[0]
    result = {
        "model": first.model,
        "file_bytes": first.file_bytes,
        "threads": threads,
        "batch": batch,
        "runs": runs,
        "warmup": warmup,
        "input_shape": first.input_shape,
        "session_start_ms": first.session_start_ms,
        "latency_ms": first.latency(),
        "throughput_per_s": batch * 1e3 / first.latency()["mean"],
        "peak_rss_mb": peak_rss_mb(),
        "onnxruntime": ort.__version__,
        "providers": sessions[0][0].get_providers(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "against": None,
        "ratio_p50": None,
        "integrity": integrity[0],
    }
    if against:
        other = measurements[1]
        result["against"] = {"model": other.model, "file_bytes": other.file_bytes,
                             "session_start_ms": other.session_start_ms,
                             "latency_ms": other.latency(), "integrity": integrity[1]}
        result["ratio_p50"] = first.latency()["p50"] / other.latency()["p50"]
    work = checked[0]["work"] or {}
    if rate:
        with tempfile.TemporaryDirectory(prefix="compress-peak-") as folder:
            peak = measured_peak(threads, in_child(write_probes, folder))
        result.update(efficiency(work.get("macs"), first.latency()["p50"], batch,
                                 file_precision(set(work.get("op_types", []))), peak))
    result["warnings"] = _warnings(measurements, threads)
    result["profile"] = None
    if profile_runs:
        from export.runtime.profile import profile

        result["profile"] = profile(paths[0], sessions[0][1], threads=threads,
                                    runs=profile_runs, warmup=min(warmup, 10))
        if rate:
            peak = (result["peak_gmacs_per_s"] or {}).get(result["precision"])
            result["profile"]["by_layer"] = layer_rates(
                result["profile"], work.get("layer_macs") or {}, batch, peak)
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory, or its checker child's (`in_child`) if that was
    higher: the child's count includes the pages it shared with this process."""
    return max(resource.getrusage(who).ru_maxrss
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024


def checked_integrity(path: str, ignore_digest: bool, max_tensor_mb: float) -> dict:
    """A file's integrity, checked before a session is opened (ORT format has none), and
    its work (`export.onnx_inspect.model_work`; None where onnx cannot read it). Run in
    `in_child`, so that onnx is imported there."""
    if path.lower().endswith(".ort"):
        if not Path(path).is_file():
            raise CompressError(f"no model file at {path}")
        return {"integrity": {"status": "skipped", "differs": []}, "work": None}
    try:
        from export.onnx_inspect import load_checked, model_work
    except ModuleNotFoundError as exc:  # bench itself needs only onnxruntime and numpy
        if exc.name != "onnx":
            raise
        return {"integrity": {"status": "unchecked", "differs": [], "reason": "the onnx "
                              "package is not installed, so the digests were not read"},
                "work": None}
    model, report = load_checked(path, ignore_digest=ignore_digest,
                                 max_tensor_mb=max_tensor_mb)
    return {"integrity": report.to_dict(), "work": model_work(model)}


def _warnings(measurements: list[Measurement], threads: int) -> list[str]:
    """What makes the figures mean less than they seem to (they are still measured)."""
    notes = []
    cores = os.cpu_count() or 1
    if threads > cores:
        notes.append(f"--threads {threads} is more than the {cores} CPU cores here; the "
                     "threads contend for cores, so the figures measure that contention")
    if len(measurements) == 2 and measurements[0].input_shape != measurements[1].input_shape:
        shapes = " and ".join(str(tuple(m.input_shape)) for m in measurements)
        notes.append(f"the two models take different inputs ({shapes}), so their ratio "
                     "compares different work")
    return notes


def budget_verdict(result: dict, budget_ms: float | None, percentile: str) -> dict:
    if percentile not in PERCENTILES:
        raise CompressError(f"--percentile must be one of {', '.join(PERCENTILES)}, "
                            f"got {percentile!r}")
    if budget_ms is not None and not 0 < budget_ms < math.inf:
        raise CompressError(f"--budget-ms must be a positive number of milliseconds, got "
                            f"{budget_ms}")
    within = None if budget_ms is None else result["latency_ms"][percentile] <= budget_ms
    return {**result, "budget_ms": budget_ms, "budget_percentile": percentile,
            "within_budget": within}


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2)
