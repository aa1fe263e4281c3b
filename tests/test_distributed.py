"""Data-parallel training under torchrun: two real processes on CPU (Gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import sleep_into_second_epoch

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


def test_a_batchnorm_model_ends_with_the_same_statistics_in_every_process(tmp_path):
    """BatchNorm's running statistics are updated by each process on its own shard; the run
    ends with the first process's, everywhere, as DDP would hand them to the next step (the
    final check compares every float of the model)."""
    result = torchrun("train-prune", "--model", "resnet20", "--method", "dpf", "--sparsity",
                      "0.5", "--epochs", "1", "--max-train-samples", "320",
                      "--max-test-samples", "64", "--batch-size", "32", "--quiet",
                      "--out", str(tmp_path / "bn"), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["processes"] == 2


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


def test_one_shot_prune_refuses_torchrun_for_a_method_without_gradients(dpf_run, tmp_path,
                                                                         cli, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = cli("prune", dpf_run, "--out", tmp_path / "p")
    assert result.exit_code == 2 and "without torchrun" in result.output
    assert "cbs, cbs-s and woodfisher" in result.output


def test_two_processes_prune_with_cbs_what_one_process_prunes(tmp_path, cli):
    """Each process takes half of the gradient batches and the Fisher blocks are summed: the
    masks are the one-process masks and the weights agree within float64 rounding. (CBS
    uses the Fisher for its selection and its update; WoodFisher reads the same blocks.)"""
    dense = tmp_path / "dense"
    trained = cli("train-prune", "--model", "mlpnet", "--method", "none", "--epochs", "1",
                  "--max-train-samples", "600", "--max-test-samples", "100", "--quiet",
                  "--out", dense)
    assert trained.exit_code == 0, trained.output
    args = ["prune", str(dense), "--method", "cbs", "--sparsity", "0.8", "--fisher-samples",
            "96", "--rmp-trials", "3", "--max-block", "512", "--quiet"]
    two = torchrun(*args, "--out", str(tmp_path / "two"), "--json")
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads(two.stdout)  # printed once, by the first process
    assert summary["processes"] == 2
    one = cli(*args, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    for name, tensor in a.state_dict.items():
        assert torch.allclose(tensor, b.state_dict[name], rtol=1e-5, atol=1e-7), name


CHANNELS = {"density": ["--density-start", "0", "--density-tolerance", "1",
                        "--probe-samples", "64"],
            "dpf-filter": ["--sparsity", "0.5", "--refresh-every", "4"]}


@pytest.mark.parametrize("method", list(CHANNELS))
def test_a_method_that_cuts_channels_trains_under_torchrun(tmp_path, cli, method):
    """Each cut is decided once and applied in both processes (the run checks that their
    final weights agree), and two processes end where one process with twice the batch
    ends: the same widths, the same weights within float tolerance."""
    args = ["train-prune", "--model", "lenet5", "--method", method, "--epochs", "2",
            "--max-train-samples", "1280", "--max-test-samples", "200", "--quiet",
            *CHANNELS[method]]
    two = torchrun(*args, "--batch-size", "32", "--out", str(tmp_path / "two"), "--json")
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads(two.stdout)
    assert summary["processes"] == 2 and summary["mac_ratio"] < 1.0
    one = cli(*args, "--batch-size", "64", "--out", tmp_path / "one", "--json")
    assert one.exit_code == 0, one.output
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert a.structure["widths"] == b.structure["widths"]
    for name, tensor in a.state_dict.items():
        assert torch.allclose(tensor, b.state_dict[name], atol=1e-4), name


def test_a_killed_torchrun_density_run_resumes_to_the_same_weights(tmp_path):
    args = ["train-prune", "--model", "lenet5", "--method", "density", "--epochs", "3",
            "--max-train-samples", "2560", "--max-test-samples", "200", "--quiet",
            "--batch-size", "32", "--density-start", "0.5", "--probe-samples", "64"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert torchrun(*args, "--out", str(whole)).returncode == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "--no-python", COMPRESS, *args, "--out", str(cut)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sleep_into_second_epoch(cut, process)
    _kill_every_process_naming(str(cut))  # torchrun and both workers, at once
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    again = torchrun(*args, "--out", str(cut), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = load_checkpoint(whole), load_checkpoint(cut)
    assert a.structure["widths"] == b.structure["widths"]
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def _kill_every_process_naming(text: str) -> None:
    """SIGKILL every process whose command line holds ``text`` (torchrun starts its workers
    in process groups of their own, so killing its group would leave them running)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_text():
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            pass  # gone already, or not ours to read
