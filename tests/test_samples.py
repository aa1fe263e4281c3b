import subprocess
import sys
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def test_custom_loop_sample_runs():
    proc = subprocess.run([sys.executable, str(SAMPLES / "custom_loop.py"), "--epochs", "1",
                           "--max-train-samples", "1500", "--sparsity", "0.8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("final:") and "(0.8000)" in last


def test_fashion_mnist_pipeline_sample_runs_end_to_end(tmp_path):
    """The whole-pipeline sample on a small slice: dense -> ADP -> DPF -> exports -> bench."""
    out = tmp_path / "pipeline"
    proc = subprocess.run([sys.executable, str(SAMPLES / "fashion_mnist_pipeline.py"),
                           "--out", str(out), "--epochs", "2", "--max-train-samples", "1200",
                           "--max-test-samples", "300", "--runs", "20"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "$ compress train-prune --recipe" in proc.stdout
    assert "| thin+sparse int8" in proc.stdout
    import json

    result = json.loads((out / "pipeline.json").read_text())
    rows = result["rows"]
    assert rows["thin"]["bytes"] < rows["dense"]["bytes"]
    assert rows["thin+sparse fp32"]["bytes"] < rows["thin"]["bytes"]
    assert result["shipped"] in rows
