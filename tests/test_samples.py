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
