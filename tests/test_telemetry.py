"""No calls home: compress loads onnxruntime with its telemetry off (export/ort.py).

Without the switch, ``import onnxruntime`` alone creates
``~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db}`` and, some
seconds later, looks up ``mobile.events.data.microsoft.com``. Each command here runs in a
process of its own whose home and XDG directories are fresh, and which inherits
``ORT_DISABLE_TELEMETRY=0``: compress must switch it off itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.ort import TELEMETRY_SWITCH

COMPRESS = [sys.executable, "-c", "from cli.app import main; main()"]


def _home_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env[TELEMETRY_SWITCH] = "0"  # as if the user's environment said so: compress overrides it
    env["HOME"] = str(home)
    for name in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        env[name] = str(home / name.lower())
    return env


def _run(args: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(COMPRESS + args, capture_output=True, text=True, cwd=cwd,
                          env=_home_env(home))
    assert proc.returncode == 0, proc.stderr
    return proc


def _files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A pruned LeNet-5 exported (and verified in onnxruntime) by the CLI; its home."""
    root = tmp_path_factory.mktemp("telemetry")
    home = root / "home-export"
    home.mkdir()
    _run(["prune", "--model", "lenet5", "--data", "synthetic", "--method", "magnitude",
          "--sparsity", "0.5", "--threads", "1", "--out", "run"], home, root)
    _run(["export", "run", "--onnx", "m.onnx", "--threads", "1"], home, root)
    return root / "m.onnx", home


def test_export_leaves_nothing_of_onnxruntime_in_home(exported):
    _, home = exported  # prune's plots leave matplotlib's font cache there, nothing else
    assert not [f for f in _files(home) if re.search(r"microsoft|onnxruntime", f, re.I)], \
        _files(home)


def test_inspect_bench_evaluate_write_nothing_in_home(exported, tmp_path):
    model, _ = exported
    home = tmp_path / "home"
    home.mkdir()
    _run(["inspect", str(model), "--json"], home, tmp_path)
    bench = json.loads(_run(["bench", str(model), "--runs", "20", "--json"],
                            home, tmp_path).stdout)
    assert bench["latency_ms"]["p50"] > 0
    _run(["evaluate", str(model), "--json"], home, tmp_path)
    assert _files(home) == []


def test_a_home_that_cannot_be_written_is_no_problem(exported, tmp_path):
    model, _ = exported
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    env = _home_env(blocker / "home")  # nothing can be created below a plain file
    proc = subprocess.run(COMPRESS + ["bench", str(model), "--runs", "5", "--json"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "telemetry" not in proc.stderr.lower()  # ORT warns when it cannot persist its id


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/setup.sh)")
def test_no_socket_opened_and_no_address_looked_up(exported, tmp_path):
    """A bench in a process kept alive 15 s: without the switch, onnxruntime looks up its
    events host about 9 s after loading (measured under strace)."""
    model, _ = exported
    home = tmp_path / "home"
    home.mkdir()
    code = ("import sys, time\nfrom cli.app import main\n"
            f"sys.argv = ['compress', 'bench', {str(model)!r}, '--runs', '20']\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "time.sleep(15)\n")
    trace = tmp_path / "trace.txt"
    proc = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e",
                           "trace=%network,%file", sys.executable, "-c", code],
                          capture_output=True, text=True, cwd=tmp_path, env=_home_env(home))
    assert proc.returncode == 0, proc.stderr
    calls = trace.read_text()
    assert "DeveloperTools" not in calls and str(home) not in calls
    inet = [line for line in calls.splitlines() if re.search(r"AF_INET6?\b", line)]
    assert inet == [], inet[:5]  # no socket to anywhere, so no DNS look-up either
    assert _files(home) == []
