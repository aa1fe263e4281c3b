"""--time-limit on inspect, evaluate and bench: a file that makes onnxruntime loop 10**12
times inside native code stops with exit 2 and one line, instead of running forever."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from export.integrity import INTEGRITY_KEY, digests_part

COMPRESS = [sys.executable, "-c", "from cli.app import main; main()"]


def spinning_model(path: Path, trips: int = 10**12, *, integrity_record: bool = False) -> Path:
    """A 28x28 classifier whose logits add a constant a ``Loop`` counts up to ``trips``.

    The loop reads stored tensors only, so ``inspect`` runs it when it decodes the constant
    part of the graph: to check a version-1 integrity record whose graph and metadata
    digests match (anyone can compute those). A session runs it on every inference."""
    body = oh.make_graph(
        [oh.make_node("Identity", ["cond_in"], ["cond_out"]),
         oh.make_node("Add", ["acc_in", "one"], ["acc_out"])], "count",
        [oh.make_tensor_value_info("i", TensorProto.INT64, []),
         oh.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         oh.make_tensor_value_info("acc_in", TensorProto.FLOAT, [])],
        [oh.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         oh.make_tensor_value_info("acc_out", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    graph = oh.make_graph(
        [oh.make_node("Loop", ["trips", "cond", "zero"], ["total"], body=body),
         oh.make_node("Flatten", ["x"], ["flat"]),
         oh.make_node("MatMul", ["flat", "w"], ["logits"]),
         oh.make_node("Add", ["logits", "total"], ["y"])], "spin",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 28, 28])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        initializer=[numpy_helper.from_array(np.array(trips, np.int64), "trips"),
                     numpy_helper.from_array(np.array(True), "cond"),
                     numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                     numpy_helper.from_array(np.zeros((784, 10), np.float32), "w")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    if integrity_record:  # the weights digest is wrong, found only after the decoding
        record = {"version": 1, "graph": digests_part(model, "graph"),
                  "metadata": digests_part(model, "metadata"), "weights": "0"}
        model.metadata_props.add(key=INTEGRITY_KEY, value=json.dumps(record))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("command, extra, record", [
    ("inspect", [], True),
    ("bench", ["--runs", "2"], False),
    ("evaluate", ["--data", "synthetic", "--max-test-samples", "8"], False),
])
def test_a_looping_file_stops_at_the_limit(tmp_path, command, extra, record):
    model = spinning_model(tmp_path / "spin.onnx", integrity_record=record)
    start = time.monotonic()
    proc = subprocess.run(COMPRESS + [command, str(model), *extra, "--time-limit", "3"],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: compress {command}: stopped after 3 s (--time-limit 3; raise it, or 0 "
        "for no limit)"]
    assert proc.stdout == ""
    assert 3 <= elapsed < 60


def test_the_limit_ends_with_the_command(tmp_path):
    """A command that finishes in time leaves no watchdog behind to end the process."""
    model = spinning_model(tmp_path / "short.onnx", trips=3, integrity_record=True)
    code = ("import sys, time\nfrom cli.app import main\n"
            f"sys.argv = ['compress', 'inspect', {str(model)!r}, '--ignore-digest', "
            "'--json', '--time-limit', '2']\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "time.sleep(3)\nprint('still running', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "still running" in proc.stderr and "--time-limit" not in proc.stderr
    assert json.loads(proc.stdout)["integrity"]["status"] == "damaged"


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_negative_limit_is_refused(cli, tmp_path, value):
    model = spinning_model(tmp_path / "spin.onnx")
    result = cli("bench", model, "--time-limit", value)
    assert result.exit_code == 2
    assert "--time-limit must be 0" in result.output
