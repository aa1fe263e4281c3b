"""Peak memory and time of every reader of an exported file, against a bare onnxruntime
session on the same file.

For each torchvision model (untrained, pruned by magnitude to 0.9 on synthetic data of
3x224x224 and 1000 classes, 256 training images, exported packed and unpacked; ViT-B/16's
classifier head, which torchvision initialises to zero, drawn at random first: a model
whose logits ignore its input is refused by the export), each of these runs in a process
of its own, and its peak resident memory (``ru_maxrss`` from ``wait4``: the largest of the
process and the children it waited for) and wall time are recorded:

- ``bare``: ``python -c "import onnxruntime; InferenceSession(FILE)"``, the reference;
- ``bare-run``: the same session run 40 times at batch 1 (what ``bench`` does, without
  compress): the memory running the model adds;
- ``check``: the digest and size checks alone (``load_checked``, what every reader runs
  first) and the packed stream's layout (``packed_layout``), in one process; ``evaluate``
  and ``bench`` run the same in a forked child that ends before their session opens;
- ``inspect``: ``compress inspect FILE --json``;
- ``bench``: ``compress bench FILE --runs 20 --json`` (its wall time includes 40 runs, so
  its session start is compared instead);
- ``bench-start``: ``compress bench FILE --runs 1 --warmup 0 --json``: its process time less
  its one run is the time ``bench`` takes to be ready (checks and session), compared with
  the bare process's (``START_BUDGET``); ``evaluate`` reads the file the same way first;
- ``evaluate``: ``compress evaluate FILE --json``, on the synthetic data the file records
  (512 test images of 3x224x224), at its default batch (as many images as fit 1 MiB of input:
  1 here), and ``evaluate-b8`` at ``--batch-size 8`` (their time is the data set's and the
  inference's, not compared).

The prune runs and exports are kept under ``--work`` (default ``runs/device_memory``), so a
second run only measures. Results go to ``benchmarks/results/device_memory.json``; a run
with fewer models or readers updates its rows there and keeps the rest.

    .venv/bin/python benchmarks/device_memory.py
    .venv/bin/python benchmarks/device_memory.py --models resnet18 --readers bare,check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMPRESS = str(BIN / "compress")
RESULTS = ROOT / "benchmarks" / "results" / "device_memory.json"
MODELS = {"resnet18": "torchvision.models:resnet18",
          "mobilenet_v2": "torchvision.models:mobilenet_v2",
          "efficientnet_b0": "torchvision.models:efficientnet_b0",
          "vit_b_16": "torchvision.models:vit_b_16"}
BUDGET = 1.5  # a reader's peak RSS may be at most this many times the bare session's
START_BUDGET = 2.0  # and its time to be ready at most this many times the bare process's

BARE = """
import json, sys, time
started = time.perf_counter()
import onnxruntime as ort
imported = time.perf_counter()
ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
print(json.dumps({"session_start_ms": (time.perf_counter() - imported) * 1e3,
                  "import_ms": (imported - started) * 1e3}))
"""
BARE_RUNS = """
import json, sys, time
import numpy as np
import onnxruntime as ort
started = time.perf_counter()
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
spec = session.get_inputs()[0]
x = np.random.default_rng(0).standard_normal(
    [1] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]).astype(np.float32)
for _ in range(40):
    session.run(None, {spec.name: x})
print(json.dumps({"wall_ms": (time.perf_counter() - started) * 1e3}))
"""
CHECK = """
import json, sys, time
started = time.perf_counter()
from export.onnx_inspect import load_checked, packed_layout
imported = time.perf_counter()
model, report = load_checked(sys.argv[1])
packed_layout(model)
print(json.dumps({"check_ms": (time.perf_counter() - imported) * 1e3,
                  "import_ms": (imported - started) * 1e3, "integrity": report.to_dict()}))
"""
READERS = {
    "bare": lambda f: [sys.executable, "-c", BARE, str(f)],
    "bare-run": lambda f: [sys.executable, "-c", BARE_RUNS, str(f)],
    "check": lambda f: [sys.executable, "-c", CHECK, str(f)],
    "inspect": lambda f: [COMPRESS, "inspect", str(f), "--json"],
    "bench": lambda f: [COMPRESS, "bench", str(f), "--runs", "20", "--json"],
    "bench-start": lambda f: [COMPRESS, "bench", str(f), "--runs", "1", "--warmup", "0",
                              "--json"],
    "evaluate": lambda f: [COMPRESS, "evaluate", str(f), "--json"],
    "evaluate-b8": lambda f: [COMPRESS, "evaluate", str(f), "--batch-size", "8", "--json"],
}


def measured(command: list[str]) -> dict:
    """Run ``command`` alone; its exit code, peak RSS (MiB), wall time and JSON output.

    A child's ``ru_maxrss`` is never below what its parent held when it was started (Linux
    carries the high-water mark of the memory it forked from, or borrowed with vfork,
    across exec), so this process imports neither torch nor onnx, and ``main`` records its
    own peak beside the results."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    row = {"exit": child.returncode, "peak_mb": usage.ru_maxrss / 1024, "wall_s": wall}
    try:
        row["output"] = json.loads(stdout)
    except ValueError:
        row["error"] = (stderr or stdout).strip()[-400:]
    return row


def run(*args: object) -> None:
    done = subprocess.run([COMPRESS, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"compress {' '.join(map(str, args))} failed: {done.stderr[-800:]}")


RANDOM_HEAD = """
import sys, torch, torchvision
torch.manual_seed(0)
model = torchvision.models.vit_b_16(num_classes=1000)
torch.nn.init.normal_(model.heads.head.weight, std=0.02)
torch.save(model.state_dict(), sys.argv[1])
"""


def _weights(name: str, folder: Path) -> list[str]:
    """``--weights`` for ViT-B/16: torchvision's initial weights with the zero classifier head
    drawn from N(0, 0.02), so that its logits depend on the input. Drawn in a child process:
    this one must stay small (see `measured`)."""
    if name != "vit_b_16":
        return []
    path = folder / "initial.pt"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", RANDOM_HEAD, str(path)], check=True)
    return ["--weights", str(path)]


def exports(name: str, work: Path) -> dict[str, Path]:
    """The model's packed and unpacked exports, made once (prune, then export)."""
    folder = work / name
    run_dir = folder / "run"
    if not (run_dir / "checkpoint.pt").is_file():
        print(f"{name}: pruning", flush=True)
        run("prune", "--model", MODELS[name], *_weights(name, folder), "--data", "synthetic",
            "--input-shape", "3,224,224", "--num-classes", "1000", "--max-train-samples", "256",
            "--method", "magnitude", "--sparsity", "0.9", "--out", run_dir)
    files = {"packed": folder / "packed.onnx", "unpacked": folder / "unpacked.onnx"}
    for kind, path in files.items():
        if not path.is_file():
            print(f"{name}: exporting {kind}", flush=True)
            run("export", run_dir, "--onnx", path, "--pack", "auto" if kind == "packed"
                else "none")
    return files


def measure(name: str, kind: str, path: Path, readers: list[str]) -> dict:
    row = {"model": name, "file": kind, "file_bytes": path.stat().st_size,
           "load_before": os.getloadavg()[0], "readers": {}}
    for reader in readers:
        load = os.getloadavg()[0]  # other work on the machine slows the times, not memory
        row["readers"][reader] = {**measured(READERS[reader](path)), "load": load}
        got = row["readers"][reader]
        print(f"  {name} {kind} {reader}: {got['peak_mb']:.0f} MiB, {got['wall_s']:.2f} s"
              + (f" (exit {got['exit']}: {got.get('error', '')})" if got["exit"] else ""),
              flush=True)
    row["load_after"] = os.getloadavg()[0]
    return row


def _start_s(reader: str, got: dict) -> float | None:
    """Seconds to be ready: the bare session's start, the check's, bench's session start."""
    output = got.get("output") or {}
    key = {"bare": "session_start_ms", "check": "check_ms", "bench": "session_start_ms"}
    return output[key[reader]] / 1e3 if reader in key and key[reader] in output else None


def ready_s(reader: str, got: dict | None) -> float | None:
    """A reader's process time until it is ready: the whole process for ``bare``, ``check``
    and ``inspect``; for ``bench-start``, its process less its one timed run."""
    if got is None or got["exit"]:
        return None
    if reader == "bench-start":
        return got["wall_s"] - got["output"]["latency_ms"]["mean"] / 1e3
    return got["wall_s"] if reader in ("bare", "check", "inspect") else None


def table(rows: list[dict]) -> str:
    readers = [r for r in READERS if r != "bare" and any(r in row["readers"] for row in rows)]
    lines = ["| model | file | MB | bare session: peak MiB, start s | "
             + " | ".join(f"{r}: peak MiB (× bare)" for r in readers) + " |",
             "|---|---|---|---|" + "---|" * len(readers)]
    for row in rows:
        bare = row["readers"].get("bare", {})
        cells = [row["model"], row["file"], f"{row['file_bytes'] / 1e6:.1f}",
                 f"{bare.get('peak_mb', 0):.0f}, {_start_s('bare', bare) or 0:.2f}"]
        for reader in readers:
            got = row["readers"].get(reader)
            if got is None:
                cells.append("-")
            elif got["exit"]:
                cells.append(f"exit {got['exit']}")
            else:
                ratio = got["peak_mb"] / bare["peak_mb"] if bare else float("nan")
                mark = "" if ratio <= BUDGET else " **over**"
                cells.append(f"{got['peak_mb']:.0f} ({ratio:.2f}){mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_table(rows: list[dict]) -> str:
    """Process seconds until ready, and the ratio to the bare session's process."""
    readers = ("check", "inspect", "bench-start")
    lines = ["| model | file | bare: process s (session start s) | "
             + " | ".join(f"{r}: s (× bare)" for r in readers) + " |",
             "|---|---|---|" + "---|" * len(readers)]
    for row in rows:
        got = row["readers"]
        bare = ready_s("bare", got.get("bare"))
        cells = [row["model"], row["file"],
                 "-" if bare is None else f"{bare:.2f} ({_start_s('bare', got['bare']):.2f})"]
        for reader in readers:
            ready = ready_s(reader, got.get(reader))
            if ready is None or bare is None:
                cells.append("-")
                continue
            mark = "" if ready <= START_BUDGET * bare else " **over**"
            cells.append(f"{ready:.2f} ({ready / bare:.2f}){mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save(out: Path, rows: dict) -> list[dict]:
    """Write the results so far (a long run loses nothing when stopped); the rows, ordered."""
    ordered = [rows[key] for key in sorted(rows, key=lambda k: (list(MODELS).index(k[0]), k[1]))]
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "budget": BUDGET, "start_budget": START_BUDGET,
              "parent_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "rows": ordered}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return ordered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--readers", default=",".join(READERS))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "device_memory")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    readers = args.readers.split(",")
    if "bare" not in readers:
        readers.insert(0, "bare")
    old = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    rows = {(row["model"], row["file"]): row for row in old}
    for name in args.models.split(","):
        for kind, path in exports(name, args.work).items():
            row = measure(name, kind, path, readers)
            kept = rows.get((name, kind), {}).get("readers", {})
            rows[(name, kind)] = {**row, "readers": {**kept, **row["readers"]}}
            _save(args.out, rows)
    rows = _save(args.out, rows)
    print(table(rows))
    print()
    print(time_table(rows))


if __name__ == "__main__":
    main()
