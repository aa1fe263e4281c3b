"""What a newcomer walking through README met: each message says what to do next, long work
shows progress also when output is not a terminal, an interrupted prune can be run again
into the same --out."""

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_failure
from rich.console import Console

from compress.checkpoint import Checkpoint, unfinished_note
from compress.data import DataConfig, load_splits
from compress.errors import CompressError
from compress.jobs import runner
from compress.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
TINY = ("--data", "synthetic", "--max-train-samples", "48", "--max-test-samples", "16",
        "--threads", "1")


def test_a_moved_data_directory_names_the_flag_and_the_usual_place(tmp_path):
    with pytest.raises(CompressError) as refused:
        load_splits(DataConfig(name="fashion-mnist", data_dir=str(tmp_path / "moved")))
    message = str(refused.value)
    assert "pass --data-dir" in message
    assert "/usr/share/datasets/fashion-mnist" in message  # installed by scripts/setup.sh


def test_bench_given_a_checkpoint_says_to_export_it(cli, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    assert_clean_failure(cli("bench", path), "is a PyTorch checkpoint, not an ONNX model",
                         "compress export")


def test_a_run_stopped_before_its_first_epoch_points_at_resume(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("model: lenet5\n")
    (run / "metrics.jsonl").write_text('{"event": "start"}\n')
    for command in (("export", run, "--onnx", tmp_path / "m.onnx"), ("evaluate", run)):
        assert_clean_failure(cli(*command), "no checkpoint", "--resume")


def test_an_unfinished_prune_run_starts_over_in_the_same_out(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("recipe.yaml", "checkpoint.pt"):
        (run / name).write_text("x")
    (run / "metrics.jsonl").write_text('{"event": "oneshot"}\n{"event": "epoch"}\n')
    with pytest.raises(CompressError, match="already holds files"):
        RunDir(run).create(resumable=False)  # a training run is never clobbered
    created = RunDir(run).create(resumable=False, restartable=True)
    assert created.path.is_dir() and not any(run.iterdir())
    created.unlock()
    # a finished run, or a directory holding anything else, is refused
    (run / "metrics.jsonl").write_text('{"event": "final"}\n')
    with pytest.raises(CompressError, match="already holds files"):
        RunDir(run).create(resumable=False, restartable=True)
    (run / "metrics.jsonl").write_text('{"event": "epoch"}\n')
    (run / "notes.txt").write_text("mine")
    with pytest.raises(CompressError, match="already holds files"):
        RunDir(run).create(resumable=False, restartable=True)
    assert (run / "notes.txt").read_text() == "mine"


def test_inspect_advice_for_an_unfinished_prune_run_is_to_run_prune_again():
    ckpt = Checkpoint(state_dict={}, model_spec="lenet5", method="magnitude",
                      data=DataConfig(name="synthetic"), recipe={"epochs": 3},
                      training_state={"epoch": 1})
    assert "run the same `compress prune` command again" in unfinished_note(ckpt)
    ckpt.method = "dpf"
    assert "train-prune --out RUN --resume" in unfinished_note(ckpt)


def test_progress_without_a_terminal_is_a_line_now_and_then(monkeypatch, tmp_path):
    log = tmp_path / "log.txt"
    with log.open("w") as handle:
        console = Console(file=handle, force_terminal=False)
        with runner.progress_bars(console, True) as progress:
            assert isinstance(progress, runner.ProgressLines)
            short = progress.add_task("short", total=3, info="")
            progress.update(short, completed=3)  # quick: no line
            monkeypatch.setattr(runner, "PROGRESS_LINE_SECONDS", 0.0)
            long = progress.add_task("long", total=4, info="loss 1.0")
            for step in range(1, 5):
                progress.update(long, completed=step)
    lines = log.read_text().splitlines()
    assert [line.split(" (")[0] for line in lines] == \
        ["long: 1/4 loss 1.0", "long: 2/4 loss 1.0", "long: 3/4 loss 1.0", "long: 4/4 loss 1.0"]


def test_export_says_each_slow_step_and_prune_warns_of_a_tiny_validation_split(
        cli, tmp_path, monkeypatch):
    from cli import commands

    pruned = cli("prune", "--model", "lenet5", *TINY, "--out", tmp_path / "run")
    assert pruned.exit_code == 0, pruned.output
    assert "warning: validation on 5 image(s)" in pruned.output
    quick = cli("export", tmp_path / "run", "--onnx", tmp_path / "m.onnx")
    assert quick.exit_code == 0 and "export:" not in quick.output  # quick steps: no lines
    monkeypatch.setattr(commands, "SLOW_STAGE_SECONDS", 0.0)  # every step counts as slow
    slow = cli("export", tmp_path / "run", "--onnx", tmp_path / "m2.onnx")
    assert slow.exit_code == 0, slow.output
    for step in ("reading the checkpoint", "packing the sparse weights",
                 "checking the file against PyTorch in onnxruntime"):
        assert f"export: {step}: " in slow.output


def test_run_sh_passes_threads_and_the_sample_gates_on_the_percentile_it_prints():
    assert '--threads "${COMPRESS_THREADS:-$(nproc)}"' in (REPO / "run.sh").read_text()
    sample = (REPO / "samples" / "fashion_mnist_pipeline.py").read_text()
    assert '"--percentile", "p50"' in sample and "p50 <=" in sample


def test_busy_cores_advice_respects_an_explicit_thread_count(monkeypatch):
    from compress import threads

    monkeypatch.setattr(threads, "busy_cores", lambda: 2.0)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    try:
        _, default = threads.use_threads(None)
        _, explicit = threads.use_threads(2)
    finally:
        torch.set_num_threads(before)
    assert "pass --threads 1" in default
    assert "pass --threads" not in explicit and "--threads 1 may be faster" in explicit


def test_metrics_final_event_is_what_restart_looks_for(tmp_path):
    """`RunDir.holds_only_an_unfinished_run` reads the log's text: the event is written
    exactly so."""
    run = RunDir(tmp_path / "r").create()
    run.log("final", top1=0.5)
    assert json.loads(run.metrics.read_text())["event"] == "final"
    assert not run.holds_only_an_unfinished_run()


def test_prune_checks_the_layer_floor_against_the_sparsity_given_even_zero(cli, tmp_path):
    refused = cli("prune", tmp_path / "absent", "--sparsity", "0", "--layer-floor", "0.5")
    assert_clean_failure(refused, "no checkpoint")  # the floor fits sparsity 0: not refused
    refused = cli("prune", tmp_path / "absent", "--sparsity", "0.8", "--layer-floor", "0.5")
    assert_clean_failure(refused, "--layer-floor must be between 0 and 1 - sparsity")


def test_a_refused_first_run_leaves_no_empty_runs_folder(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    refused = cli("train-prune", "--data", "imagefolder", "--data-dir", "images")
    assert_clean_failure(refused, "has no train/ folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_a_dead_unpruned_model_is_not_blamed_on_pruning(cli, tmp_path):
    from compress.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "dense"
    trained = cli("train-prune", "--method", "none", *TINY, "--epochs", "1", "--out", run)
    assert trained.exit_code == 0, trained.output
    ckpt = load_checkpoint(run)
    for name in ("classifier.5.weight", "classifier.5.bias"):  # zero, as ViTs start
        ckpt.state_dict[name].zero_()
    save_checkpoint(ckpt, run / "checkpoint.pt")
    refused = cli("export", run, "--onnx", tmp_path / "m.onnx")
    assert_clean_failure(refused, "and it is not pruned", "--allow-constant-output")
    assert not (tmp_path / "m.onnx").exists()
