"""The command line end to end on real data slices, and every bad input it must refuse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_failure, stop_after_first

SLICE = ["--max-train-samples", "1200", "--max-test-samples", "300"]
QUICK = ["--model", "lenet5", "--epochs", "1", "--batch-size", "64", "--quiet", *SLICE]


def test_inspect_reports_exact_sparsity(cli, dpf_run):
    result = cli("inspect", dpf_run, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    total = report["total"]
    assert set(total) >= {"params", "nonzero", "sparsity", "prunable_params",
                          "prunable_sparsity", "macs"}
    zeros = total["prunable_params"] - total["prunable_nonzero"]
    assert zeros == round(0.8 * total["prunable_params"])
    assert {"name", "shape", "params", "nonzero", "sparsity"} <= set(report["layers"][0])
    assert report["metadata"]["method"] == "dpf"
    assert total["nonzero_macs"] < total["macs"]
    table = cli("inspect", dpf_run)
    assert table.exit_code == 0 and "prunable" in table.stdout


def test_evaluate_matches_training_summary(cli, dpf_run):
    result = cli("evaluate", dpf_run, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["split"] == "test" and payload["samples"] == 300
    metrics = [json.loads(line) for line in (dpf_run / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in metrics if m["event"] == "final"][-1]
    assert payload["top1"] == pytest.approx(final["test_top1"])


def test_run_directory_contents(dpf_run):
    names = {p.name for p in dpf_run.iterdir()}
    assert {"checkpoint.pt", "metrics.jsonl", "recipe.yaml", "report.md", "plots"} <= names
    assert (dpf_run / "plots" / "training.png").stat().st_size > 1000
    assert (dpf_run / "plots" / "layers.png").stat().st_size > 1000
    report = (dpf_run / "report.md").read_text()
    assert "prunable sparsity: 0.8000" in report
    events = [json.loads(line)["event"] for line in (dpf_run / "metrics.jsonl").open()]
    assert events.count("epoch") == 2 and "refresh" in events and events[-1] == "final"


def test_recipe_from_run_reproduces_run(cli, dpf_run, tmp_path):
    out = tmp_path / "again"
    result = cli("train-prune", "--recipe", dpf_run / "recipe.yaml", "--out", out, "--quiet",
                 "--json")
    assert result.exit_code == 0, result.output
    first = torch.load(dpf_run / "checkpoint.pt", weights_only=True)["state_dict"]
    second = torch.load(out / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_prune_magnitude_with_finetune(cli, dpf_run, tmp_path):
    out = tmp_path / "pruned"
    result = cli("prune", dpf_run, "--method", "magnitude", "--sparsity", "0.9",
                 "--finetune-epochs", "1", "--out", out, "--quiet", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-4)
    report = json.loads(cli("inspect", out, "--json").stdout)
    assert report["total"]["prunable_sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_resume_continues_an_interrupted_run(cli, tmp_path):
    from compress.pipeline import train_prune
    from compress.recipe import Recipe

    recipe = Recipe(model="lenet5", method="dpf", sparsity=0.7, epochs=2, batch_size=64,
                    refresh_every=4, max_train_samples=1200, max_test_samples=300).validate()
    train_prune(recipe, str(tmp_path / "whole"), show_progress=False)

    with pytest.raises(KeyboardInterrupt):
        train_prune(recipe, str(tmp_path / "cut"), show_progress=False,
                    on_epoch=stop_after_first)
    warned = cli("inspect", tmp_path / "cut")
    assert "warning: this run stopped after epoch 1 of 2" in warned.stderr
    onnx_file = tmp_path / "cut.onnx"
    assert cli("export", tmp_path / "cut", "--onnx", onnx_file, "--no-verify").exit_code == 0
    for command in ("inspect", "evaluate"):
        warned = cli(command, onnx_file)
        assert warned.exit_code == 0, warned.output
        assert "exported from a run that stopped before its last epoch" in warned.stderr
    metrics = tmp_path / "cut" / "metrics.jsonl"
    with open(metrics, "a") as f:  # as if it had died in epoch 2 after a refresh
        f.write(json.dumps({"event": "refresh", "step": 999, "flips": 0.5}) + "\n")
    resumed = cli("train-prune", "--out", tmp_path / "cut", "--resume", "--quiet")
    assert resumed.exit_code == 0, resumed.output

    def events(run):
        return [(e["event"], e.get("step"), e.get("epoch")) for e in
                map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]

    assert events("cut") == events("whole")  # the stale refresh is gone, nothing doubled
    assert "warning" not in cli("inspect", tmp_path / "cut").stderr
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for key, value in whole["state_dict"].items():
        assert torch.allclose(value, cut["state_dict"][key], atol=1e-6), key
    assert whole["metrics"]["test_top1"] == cut["metrics"]["test_top1"]
    again = cli("train-prune", "--out", tmp_path / "cut", "--resume")
    assert_clean_failure(again, "already finished")
    mixed = cli("train-prune", "--out", tmp_path / "cut", "--resume", "--epochs", "3")
    assert_clean_failure(mixed, "--epochs")


def test_synthetic_data_with_torchvision_model(cli, tmp_path):
    result = cli("train-prune", "--model", "torchvision.models:resnet18", "--data", "synthetic",
                 "--input-shape", "3,32,32", "--num-classes", "4", "--max-train-samples", "64",
                 "--max-test-samples", "32", "--batch-size", "32", "--epochs", "1",
                 "--method", "dpf", "--sparsity", "0.5", "--quiet", "--json",
                 "--out", tmp_path / "tv")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sparsity"] == pytest.approx(0.5, abs=1e-6)


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["--model", "resnet999"], "unknown model"),
    (["--data", "imagenet"], "unknown data set"),
    (["--method", "snip"], "unknown method"),
    (["--sparsity", "1.0"], "[0, 1)"),
    (["--sparsity", "-0.2"], "[0, 1)"),
    (["--data", "mnist", "--data-dir", "/nonexistent"], "does not exist"),
    (["--input-shape", "1,28"], "--input-shape"),
    (["--device", "tpu"], "--device"),
])
def test_bad_train_prune_input(cli, tmp_path, args, fragment):
    out = tmp_path / "out"
    assert_clean_failure(cli("train-prune", *QUICK, *args, "--out", out), fragment)


def test_clashing_out_is_refused_and_kept(cli, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_clean_failure(cli("train-prune", *QUICK, "--out", out), "already holds files")
    assert (out / "precious.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_clean_failure(cli("train-prune", *QUICK, "--out", a_file), "not a directory")
    assert_clean_failure(cli("train-prune", *QUICK, "--out", a_file / "sub"), "cannot create")
    assert a_file.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out(cli, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_clean_failure(cli("train-prune", *QUICK, "--out", locked / "run"), "--out")


def test_unwritable_out_on_a_read_only_filesystem(cli):
    assert_clean_failure(cli("train-prune", *QUICK, "--out", "/proc/compress-run"), "--out")


def test_diverging_run_stops_cleanly(cli, tmp_path):
    out = tmp_path / "nan"
    result = cli("train-prune", *QUICK, "--lr", "1e12", "--out", out)
    assert_clean_failure(result, "diverged")
    assert (out / "recipe.yaml").exists()


def test_bad_recipe_key(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sparsity: 0.9\nlearning_rate: 0.1\n")
    assert_clean_failure(cli("train-prune", "--recipe", recipe, "--out", tmp_path / "o"),
                         "learning_rate")


@pytest.mark.parametrize("command", ["inspect", "evaluate", "prune"])
def test_bad_checkpoints(cli, tmp_path, dpf_run, command):
    truncated = tmp_path / "truncated.pt"
    data = (dpf_run / "checkpoint.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2000))
    extra = ["--out", tmp_path / "o"] if command == "prune" else []
    for path, fragment in ((truncated, "truncated"), (foreign, "not a compress checkpoint"),
                           (garbage, "not a loadable"), (tmp_path / "missing", "no checkpoint")):
        assert_clean_failure(cli(command, path, *extra), fragment)
    assert (dpf_run / "checkpoint.pt").read_bytes() == data


def test_prune_refuses_unknown_method(cli, dpf_run, tmp_path):
    assert_clean_failure(cli("prune", dpf_run, "--method", "snip", "--out", tmp_path / "o"),
                         "unknown method")


def test_console_script_one_line_error_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("compress")
    proc = subprocess.run([str(exe), "train-prune", "--model", "nope", "--out",
                           str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown model" in errors[0]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in proc.stderr
    debug = subprocess.run([str(exe), "--debug", "inspect", str(tmp_path / "missing")],
                           capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_acceptance_lenet5_dpf_two_epochs_full_data(cli, tmp_path):
    """The issue's acceptance run: full Fashion-MNIST, 2 epochs, DPF at 0.9."""
    out = tmp_path / "R"
    result = cli("train-prune", "--model", "lenet5", "--data", "fashion-mnist", "--method",
                 "dpf", "--sparsity", "0.9", "--epochs", "2", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    total = json.loads(cli("inspect", out, "--json").stdout)["total"]
    assert total["prunable_params"] - total["prunable_nonzero"] == \
        round(0.9 * total["prunable_params"])
    assert f"{total['prunable_sparsity']:.2f}" == "0.90"
    top1 = json.loads(cli("evaluate", out, "--json").stdout)["top1"]
    assert top1 >= 0.84


def test_weights_start_a_run_and_bad_weights_are_refused(cli, dpf_run, tmp_path):
    ok = cli("train-prune", *QUICK, "--method", "none", "--weights", dpf_run / "checkpoint.pt",
             "--out", tmp_path / "from-weights", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["test_top1"] > 0.5  # started from trained weights
    wrong = cli("train-prune", *QUICK, "--model", "lenet300", "--weights", dpf_run,
                "--out", tmp_path / "wrong")
    assert_clean_failure(wrong, "do not fit")


def test_failed_start_leaves_no_files_behind(cli, tmp_path):
    out = tmp_path / "fresh"
    assert_clean_failure(cli("train-prune", *QUICK, "--model", "nope", "--out", out),
                         "unknown model")
    assert not out.exists()
    ok = cli("train-prune", *QUICK, "--out", out)  # the same --out now works
    assert ok.exit_code == 0, ok.output


def test_prune_refuses_a_target_below_existing_sparsity(cli, dpf_run, tmp_path):
    out = tmp_path / "less"
    assert_clean_failure(cli("prune", dpf_run, "--sparsity", "0.5", "--out", out),
                         "already 0.8000 sparse")
    assert not out.exists()


def test_user_text_is_not_read_as_markup(cli, tmp_path):
    result = cli("train-prune", *QUICK, "--model", "foo[/x]", "--out", tmp_path / "o")
    assert_clean_failure(result, "foo[/x]")
    result = cli("inspect", tmp_path / "[bold]x[/bold]")
    assert_clean_failure(result, "[bold]x[/bold]")


@pytest.mark.parametrize("args, fragment", [
    (["--max-train-samples", "0"], "--max-train-samples"),
    (["--max-test-samples", "-1"], "--max-test-samples"),
    (["--num-classes", "0", "--data", "synthetic"], "--num-classes"),
    (["--lr", "nan"], "--lr"),
    (["--momentum", "5"], "--momentum"),
    (["--layer-floor", "0.5"], "--layer-floor"),
    (["--layer-floor", "-0.1"], "--layer-floor"),
])
def test_bad_numbers(cli, tmp_path, args, fragment):
    assert_clean_failure(cli("train-prune", *QUICK, *args, "--out", tmp_path / "o"), fragment)


def test_emptied_layers_are_reported(cli, tmp_path):
    """The papers' exact rule (--layer-floor 0) can empty a layer: the summary says which and
    names the flag that prevents it (the default floor does)."""
    result = cli("train-prune", "--model", "mlpnet", "--sparsity", "0.999", "--epochs", "1",
                 "--layer-floor", "0", "--quiet", *SLICE, "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert "no weight left" in result.stdout and "1.weight" in result.stdout
    assert "--layer-floor" in result.stdout


def test_layer_floor_keeps_every_layer_alive(cli, tmp_path):
    result = cli("train-prune", "--model", "mlpnet", "--sparsity", "0.999", "--epochs", "1",
                 "--layer-floor", "0.0005", "--quiet", *SLICE, "--out", tmp_path / "f",
                 "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["empty_layers"] == [] and summary["sparsity"] == pytest.approx(0.999, abs=1e-4)
    layers = json.loads(cli("inspect", tmp_path / "f", "--json").stdout)["layers"]
    assert all(layer["nonzero"] >= 1 for layer in layers if layer["name"].endswith("weight"))


def test_resume_refuses_another_process_count(cli, tmp_path, dpf_run):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(dpf_run, run)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["training_state"]["processes"] = 2
    ckpt["training_state"]["epoch"] = 0
    ckpt["metrics"].pop("test_top1", None)
    torch.save(ckpt, run / "checkpoint.pt")
    assert_clean_failure(cli("train-prune", "--out", run, "--resume"),
                         "torchrun --nproc_per_node=2")


def test_flags_the_method_does_not_read_and_a_tiny_validation_split_are_warned_about(
        cli, tmp_path):
    result = cli("train-prune", "--model", "lenet5", "--epochs", "1", "--batch-size", "64",
                 "--quiet", "--max-train-samples", "200", "--max-test-samples", "50",
                 "--method", "none", "--sparsity", "0.9", "--refresh-every", "3",
                 "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert ("warning: --method none does not read --refresh-every, --sparsity; they change "
            "nothing in this run") in result.output
    assert "warning: validation on 20 image(s)" in result.output
