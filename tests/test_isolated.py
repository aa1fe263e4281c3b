"""`evaluate` and `bench` check a file in a forked child: the parent never imports onnx, a
refusal still reads as one line, and a child outlives neither its parent nor a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.errors import CompressError
from export.runtime.isolated import in_child

ROOT = Path(__file__).resolve().parent.parent


def _refuse() -> None:
    raise CompressError("model.onnx: refused for a reason")


def _crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel ends a process out of memory


def _fail() -> None:
    raise ValueError("not a refusal")


def test_the_child_s_result_refusal_crash_and_failure_reach_the_parent():
    calls = []
    assert in_child(lambda a, b: {"sum": a + b}, 2, 3, meanwhile=lambda: calls.append(1)) \
        == {"sum": 5}
    assert calls == [1]  # meanwhile ran here, in the parent
    with pytest.raises(CompressError, match="^model.onnx: refused for a reason$"):
        in_child(_refuse)
    with pytest.raises(CompressError, match="ended its checker process .signal SIGKILL"):
        in_child(_crash)
    with pytest.raises(RuntimeError, match="ValueError: not a refusal"):
        in_child(_fail)


def test_the_child_ends_with_its_parent(tmp_path):
    """The time limit ends a reader with os._exit, which waits for no child: the kernel
    ends the child with it."""
    pid_file = tmp_path / "child.pid"
    script = f"""
import os, threading, time
from export.runtime.isolated import in_child

def work():
    open({str(pid_file)!r}, "w").write(str(os.getpid()))
    time.sleep(60)

threading.Timer(1.0, os._exit, args=(2,)).start()
in_child(work)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=30, check=False)
    assert done.returncode == 2
    child = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("command", [["evaluate", "--max-test-samples", "20"],
                                     ["bench", "--runs", "2", "--warmup", "0"]])
def test_readers_that_open_a_session_never_import_onnx(dpf_run, tmp_path, cli, command):
    exported = tmp_path / "dpf.onnx"
    assert cli("export", dpf_run, "--onnx", exported, "--no-verify").exit_code == 0
    argv = [command[0], str(exported), *command[1:], "--json"]
    script = f"""
import atexit, sys
atexit.register(lambda: print("onnx imported:", "onnx" in sys.modules, file=sys.stderr))
sys.argv[1:] = {argv!r}
from cli.app import main
main()
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "onnx imported: False" in done.stderr
    result = json.loads(done.stdout)
    assert result["integrity"]["status"] == "verified"
