"""Runs that die (SIGKILL, Ctrl-C, a full disk) and the rough edges a newcomer hit: each
leaves a directory that resumes or can be reused, and says what to do in one line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import sleep_into_second_epoch

from compress.recipe import Recipe, dump_recipe

SMALL = ["--model", "lenet5", "--max-train-samples", "1200", "--max-test-samples", "300",
         "--batch-size", "64", "--quiet"]
COMPRESS = [sys.executable, "-c", "from cli.app import main; main()"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["state_dict"]


def _one_line_exit_2(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("method, sent", [
    # gmp keeps its state as dpf does (a mask schedule and the optimizer): dpf stands for it
    ("dpf", signal.SIGKILL), ("density", signal.SIGKILL), ("dpf-filter", signal.SIGKILL),
    ("dpf", signal.SIGINT)])
def test_killed_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, method, sent):
    """A process killed with SIGKILL (or stopped with Ctrl-C's SIGINT) in its second epoch,
    resumed with the same command and --resume appended, ends with exactly the weights of
    a run that was never stopped."""
    flags = [*SMALL, "--method", method, "--epochs", "3", "--threads", "1",
             "--max-train-samples", "4000"]
    if method == "density":
        flags += ["--density-start", "0.5", "--probe-samples", "128"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*COMPRESS, "train-prune", *flags, "--out", str(whole)], check=True, env=env)
    # SIGINT as a terminal sends it, even where this suite runs with it ignored (a background
    # job of a shell without job control), which the child would inherit
    process = subprocess.Popen([*COMPRESS, "train-prune", *flags, "--out", str(cut)], env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    sleep_into_second_epoch(cut, process)
    process.send_signal(sent)
    process.wait()
    expected = -signal.SIGKILL if sent == signal.SIGKILL else 130  # 130: Ctrl-C, handled
    assert process.returncode == expected, "the run ended before it could be stopped"
    again = subprocess.run([*COMPRESS, "train-prune", *flags, "--out", str(cut), "--resume"],
                           env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    first, second = _weights(whole), _weights(cut)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_accepts_the_same_flags_and_names_those_that_differ(cli, tmp_path):
    out = tmp_path / "run"
    flags = [*SMALL, "--method", "gmp", "--sparsity", "0.7", "--epochs", "2"]
    from compress.pipeline import train_prune as run

    recipe = Recipe(model="lenet5", method="gmp", sparsity=0.7, epochs=2, batch_size=64,
                    max_train_samples=1200, max_test_samples=300).validate()

    def stop(result):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(recipe, str(out), show_progress=False, on_epoch=stop)
    line = _one_line_exit_2(cli("train-prune", *flags[:-2], "--epochs", "5", "--sparsity",
                                "0.8", "--out", out, "--resume"))
    assert "--epochs 5 (saved: 2)" in line and "--sparsity 0.8 (saved: 0.7)" in line
    assert "--model" not in line
    resumed = cli("train-prune", *flags, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(dump_recipe(recipe))
    finished = cli("train-prune", "--recipe", recipe_file, "--out", out, "--resume")
    assert "nothing to resume" in _one_line_exit_2(finished)


def test_ctrl_c_before_the_first_epoch_leaves_a_run_that_resumes(cli, tmp_path, monkeypatch):
    out = tmp_path / "run"
    import compress.jobs.train as train

    real = train.run_epochs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_epochs", interrupted)
    flags = [*SMALL, "--method", "gmp", "--epochs", "1"]
    result = cli("train-prune", *flags, "--out", out)
    assert result.exit_code == 130 and "--resume" in result.output
    again = cli("train-prune", *flags, "--out", out)
    assert "--resume to start that run again" in _one_line_exit_2(again)
    monkeypatch.setattr(train, "run_epochs", real)
    resumed = cli("train-prune", *flags, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (out / "checkpoint.pt").exists()


def test_interrupted_prune_leaves_out_reusable(cli, dpf_run, tmp_path, monkeypatch):
    import compress.jobs.prune as prune

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prune, "run_epochs", interrupted)
    out = tmp_path / "pruned"
    result = cli("prune", dpf_run, "--finetune-epochs", "1", "--out", out, "--quiet")
    assert result.exit_code == 130 and "train-prune --resume" not in result.output
    assert "not resumed" in result.output
    assert not out.exists()
    monkeypatch.undo()
    assert cli("prune", dpf_run, "--out", out, "--quiet").exit_code == 0


def test_a_full_disk_keeps_the_last_good_checkpoint(cli, tmp_path, monkeypatch):
    import compress.checkpoint as checkpoint

    real, saves = checkpoint.torch.save, []

    def full_disk_on_second(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_on_second)
    out = tmp_path / "run"
    result = cli("train-prune", *SMALL, "--method", "gmp", "--epochs", "2", "--out", out)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]  # after the run's banner
    assert "No space left on device" in line and "last good checkpoint is kept" in line
    monkeypatch.undo()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["training_state"]["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert cli("train-prune", "--out", out, "--resume", "--quiet").exit_code == 0


def test_default_out_gives_each_run_a_new_directory(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--data", "synthetic", "--model", "lenet300", "--method", "none", "--epochs", "1",
             "--max-train-samples", "128", "--max-test-samples", "64", "--quiet"]
    for _ in range(2):
        assert cli("train-prune", *flags).exit_code == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("lenet300-none-") for r in runs)
    assert cli("prune", runs[0], "--quiet").exit_code == 0
    assert any(r.name.startswith("pruned-magnitude-") for r in (tmp_path / "runs").iterdir())
    assert "--out RUN" in _one_line_exit_2(cli("train-prune", "--resume"))


def test_messages_a_newcomer_needed(cli, dpf_run, tmp_path):
    line = _one_line_exit_2(cli("train-prune", "--model", "lenet300", "--weights", dpf_run,
                                "--epochs", "1", "--out", tmp_path / "x", "--quiet"))
    assert "'lenet5'" in line and "'lenet300'" in line
    line = _one_line_exit_2(cli("bench", dpf_run))
    assert f"compress export {dpf_run} --onnx" in line
    assert "--threads" in _one_line_exit_2(cli("evaluate", dpf_run, "--threads", "0"))
    result = cli("evaluate", dpf_run, "--threads", "1", "--max-test-samples", "50")
    assert result.exit_code == 0 and "on 50 samples" in result.output
    assert torch.get_num_threads() == 1


def test_debug_works_after_the_command_name(tmp_path):
    done = subprocess.run([*COMPRESS, "inspect", str(tmp_path / "missing"), "--debug"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" in done.stderr
    assert "no such option" not in done.stderr.lower()


def test_no_layer_is_emptied_by_default_and_a_dead_network_is_not_exported(cli, dpf_run,
                                                                          tmp_path):
    """At 0.995 a global threshold empties LeNet-5's layers; the default floor keeps 1 % of
    each (or half of what is left), the papers' rule (--layer-floor 0) warns and its export
    fails the parity check instead of reporting a perfect match on a constant output."""
    kept = cli("prune", dpf_run, "--sparsity", "0.995", "--out", tmp_path / "kept", "--json")
    assert kept.exit_code == 0 and json.loads(kept.stdout)["empty_layers"] == []
    exact = cli("prune", dpf_run, "--sparsity", "0.995", "--layer-floor", "0", "--out",
                tmp_path / "exact")
    assert exact.exit_code == 0 and "--layer-floor" in exact.output
    assert "no weight left" in exact.output
    line = _one_line_exit_2(cli("export", tmp_path / "exact", "--onnx", tmp_path / "x.onnx"))
    assert "does not depend on its input" in line and not (tmp_path / "x.onnx").exists()
    assert "typically because pruning emptied a layer" in line
    assert cli("export", tmp_path / "kept", "--onnx", tmp_path / "k.onnx").exit_code == 0
    anyway = cli("export", tmp_path / "exact", "--onnx", tmp_path / "x.onnx",
                 "--allow-constant-output")
    assert anyway.exit_code == 0 and "warning: the model's output does not depend" in \
        anyway.output and (tmp_path / "x.onnx").exists()


def test_default_threads_split_the_cores_among_torchrun_processes(monkeypatch):
    from compress import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.default_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert threads.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 3


def test_busy_cores_give_a_warning_that_names_the_flag(monkeypatch):
    from compress import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.9)
    chosen, warning = threads.use_threads(2)
    assert chosen == 2 and "--threads 1" in warning
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.1)
    assert threads.use_threads(2)[1] is None
    assert threads.use_threads(1)[1] is None


@pytest.mark.parametrize("command", ["export", "bench"])
def test_interrupted_export_and_bench_speak_of_themselves(cli, dpf_run, tmp_path, monkeypatch,
                                                          command):
    import export.onnx_export
    import export.runtime.latency

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    path = tmp_path / "m.onnx"
    if command == "bench":
        export.onnx_export.export_checkpoint(dpf_run, path, verify=False)
        monkeypatch.setattr(export.runtime.latency, "measure", interrupted)
        result = cli("bench", path)
    else:
        monkeypatch.setattr(export.onnx_export, "_clean_model", interrupted)
        result = cli("export", dpf_run, "--onnx", path)
        assert not path.exists()
    assert result.exit_code == 130
    assert "epoch" not in result.output and "--resume" not in result.output


def test_a_run_directory_in_use_is_refused_to_a_second_run(tmp_path):
    """Two runs writing into one --out would mix their checkpoints: the second is refused
    while the first holds the directory, and gets it once the first is done."""
    from compress.errors import CompressError
    from compress.rundir import RunDir

    first = RunDir(tmp_path / "run").create()
    with pytest.raises(CompressError, match="is in use by another compress run"):
        RunDir(tmp_path / "run").lock()
    first.unlock()
    second = RunDir(tmp_path / "run")
    second.lock()
    second.unlock()
