"""Data-parallel training under torchrun: two real processes on CPU (Gloo)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from compress.checkpoint import load_checkpoint

COMPRESS = str(Path(sys.executable).parent / "compress")
ARGS = ["train-prune", "--model", "lenet5", "--method", "dpf", "--sparsity", "0.9",
        "--epochs", "1", "--max-train-samples", "1280", "--max-test-samples", "200",
        "--refresh-every", "4", "--quiet"]


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "--no-python", COMPRESS, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_two_processes_train_what_one_process_trains_with_twice_the_batch(tmp_path, cli):
    """1,152 training images: 18 steps of 2 x 32 images equal 18 steps of 64 images."""
    two = torchrun(*ARGS, "--batch-size", "32", "--out", str(tmp_path / "two"), "--json")
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads(two.stdout)  # printed once, by rank 0
    assert summary["processes"] == 2 and summary["sparsity"] == 0.9
    one = cli(*ARGS, "--batch-size", "64", "--out", tmp_path / "one", "--json")
    assert one.exit_code == 0, one.output
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    for name, tensor in a.state_dict.items():
        assert torch.allclose(tensor, b.state_dict[name], atol=1e-5), name
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    events = [json.loads(line)["event"]
              for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert events.count("epoch") == 1 and events.count("final") == 1  # rank 0 writes alone
    assert (tmp_path / "two" / "report.md").exists()


def test_a_failed_start_stops_every_process(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    started = time.monotonic()
    result = torchrun(*ARGS, "--out", str(taken))
    assert result.returncode != 0 and time.monotonic() - started < 120
    # each process says one line; torchrun itself then reports the failed children
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 2 and any("already holds files" in line for line in ours)
    assert any("another process of this torchrun job failed" in line for line in ours)
    assert (taken / "keep.txt").read_text() == "mine"


def test_one_shot_prune_refuses_torchrun(dpf_run, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = cli("prune", dpf_run, "--out", tmp_path / "p")
    assert result.exit_code == 2 and "without torchrun" in result.output
