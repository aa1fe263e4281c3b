"""Channel-pruned models through the whole pipeline: prune, checkpoint, inspect, evaluate,
export (plain, packed, int8), train again, resume; and every bad input, as one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_failure, stop_after_first

from compress.checkpoint import FORMAT_VERSION, load_checkpoint

SYNTHETIC = ("--data", "synthetic", "--input-shape", "3,32,32", "--num-classes", "10",
             "--max-train-samples", "256", "--max-test-samples", "64")
FORMAT1 = Path(__file__).parent / "data" / "format1_mlpnet_dpf.pt"


@pytest.fixture(scope="module")
def l1_run(tmp_path_factory) -> Path:
    """resnet20 on synthetic data, half its channels cut by group L1 norm."""
    from typer.testing import CliRunner

    from cli.app import app

    out = tmp_path_factory.mktemp("structured") / "l1"
    result = CliRunner().invoke(app, ["prune", "--model", "resnet20", *SYNTHETIC, "--method",
                                      "l1-filter", "--sparsity", "0.5", "--out", str(out),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def test_l1_filter_keeps_under_a_third_of_the_macs(cli, l1_run):
    report = cli("inspect", l1_run, "--json")
    assert report.exit_code == 0, report.output
    data = json.loads(report.stdout)
    structure = data["structure"]
    assert data["total"]["macs"] <= 0.3 * structure["original_macs"]
    assert structure["macs_ratio"] == pytest.approx(
        data["total"]["macs"] / structure["original_macs"])
    widths = {row["layer"]: (row["original"], row["kept"]) for row in structure["widths"]}
    assert widths["stem.0"] == (16, 8)
    assert all(kept % 8 == 0 for _, kept in widths.values())
    text = cli("inspect", l1_run)
    assert "channel groups cut" in text.stdout
    assert f"MACs {structure['macs_ratio']:.3f} of the original" in text.stdout


def test_checkpoint_holds_the_structure_as_plain_numbers(l1_run):
    payload = torch.load(l1_run / "checkpoint.pt", weights_only=True)
    assert payload["format_version"] == FORMAT_VERSION == 2
    assert payload["structure"]["history"]
    ckpt = load_checkpoint(l1_run)
    model = ckpt.build_model().eval()
    for key, value in ckpt.state_dict.items():
        assert torch.equal(model.state_dict()[key], value)
    assert model.fc.in_features == 32


def test_export_parity_plain_packed_and_int8(cli, l1_run, tmp_path):
    plain = cli("export", l1_run, "--onnx", tmp_path / "plain.onnx", "--json")
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout)["verify"]["max_abs_diff_vs_torch"] < 1e-4
    meta = json.loads(cli("inspect", tmp_path / "plain.onnx", "--json").stdout)["metadata"]
    assert meta["pattern"] == "structured"
    assert meta["structure"]["widths"]["stem.0"] == {"original": 16, "kept": 8}
    # structured and unstructured compose: cut channels, then zero weights, then pack
    sparse = tmp_path / "sparse"
    again = cli("prune", l1_run, "--method", "magnitude", "--sparsity", "0.8", "--out", sparse,
                "--quiet")
    assert again.exit_code == 0, again.output
    packed = cli("export", sparse, "--onnx", tmp_path / "packed.onnx", "--pack", "bitmask",
                 "--json")
    assert packed.exit_code == 0, packed.output
    assert json.loads(packed.stdout)["packed"]
    report = json.loads(cli("inspect", tmp_path / "packed.onnx", "--json").stdout)
    assert report["metadata"]["pattern"] == "structured+unstructured"
    patterns = {row["name"]: row for row in report["layers"]}
    assert any(row["encoding"].startswith("bitmask") for row in patterns.values())
    int8 = cli("export", sparse, "--onnx", tmp_path / "int8.onnx", "--quantize", "int8",
               "--calibration-samples", "32", "--json")
    assert int8.exit_code == 0, int8.output
    assert cli("evaluate", tmp_path / "int8.onnx").exit_code == 0


def test_finetune_and_train_from_a_pruned_model_then_resume(cli, l1_run, tmp_path):
    tuned = cli("prune", l1_run, "--method", "l1-filter", "--sparsity", "0.25",
                "--round-to", "1", "--finetune-epochs", "1", "--out", tmp_path / "tuned",
                "--json", "--quiet")
    assert tuned.exit_code == 0, tuned.output
    summary = json.loads(tuned.stdout)
    assert summary["original_macs"] > summary["macs"]
    # two cuts in a row: the structure replays both, widths relative to the first original
    widths = load_checkpoint(tmp_path / "tuned").structure["widths"]
    assert widths["stem.0"][0] == 16 and widths["stem.0"][1] < 8
    from compress.pipeline import train_prune
    from compress.recipe import Recipe

    recipe = Recipe(model="resnet20", data="synthetic", input_shape=[3, 32, 32],
                    max_train_samples=256, max_test_samples=64, method="gmp", sparsity=0.5,
                    epochs=2, batch_size=64, weights=str(l1_run)).validate()

    with pytest.raises(KeyboardInterrupt):
        train_prune(recipe, str(tmp_path / "cut"), show_progress=False,
                    on_epoch=stop_after_first)
    train_prune(recipe, str(tmp_path / "whole"), show_progress=False)
    resumed = cli("train-prune", "--out", tmp_path / "cut", "--resume", "--quiet", "--json")
    assert resumed.exit_code == 0, resumed.output
    whole = load_checkpoint(tmp_path / "whole")
    cut = load_checkpoint(tmp_path / "cut")
    assert cut.structure == whole.structure == load_checkpoint(l1_run).structure
    for key, value in whole.state_dict.items():
        assert torch.allclose(value, cut.state_dict[key], atol=1e-6), key
    assert json.loads(resumed.stdout)["sparsity"] == pytest.approx(0.5, abs=1e-4)


def test_target_macs_finds_the_channel_share(cli, tmp_path):
    result = cli("prune", "--model", "vgg-small", *SYNTHETIC, "--method", "l2-filter",
                 "--target-macs", "0.5", "--out", tmp_path / "budget", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert 0.35 <= summary["mac_ratio"] <= 0.5
    assert 0.1 < summary["channel_sparsity"] < 0.5


def test_global_scope_normalises_each_group(cli, tmp_path):
    result = cli("prune", "--model", "resnet20", *SYNTHETIC, "--method", "l1-filter",
                 "--scope", "global", "--sparsity", "0.5", "--round-to", "1",
                 "--out", tmp_path / "global", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["mac_ratio"] < 0.8


def test_a_format_1_checkpoint_still_loads(cli, tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    shutil.copy(FORMAT1, run / "checkpoint.pt")
    assert torch.load(FORMAT1, weights_only=True)["format_version"] == 1
    inspected = cli("inspect", run, "--json")
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.stdout)["structure"] is None
    assert cli("export", run, "--onnx", tmp_path / "old.onnx", "--no-verify").exit_code == 0
    cut = cli("prune", run, "--method", "l1-filter", "--sparsity", "0.5", "--round-to", "4",
              "--out", tmp_path / "cut", "--quiet", "--json")
    assert cut.exit_code == 0, cut.output


def test_shrink_after_dpf_computes_the_same_function(cli, tmp_path):
    from compress.pipeline import train_prune
    from compress.recipe import Recipe

    recipe = Recipe(model="lenet5", method="dpf", sparsity=0.98, epochs=2, batch_size=32,
                    max_train_samples=1200, max_test_samples=300).validate()
    train_prune(recipe, str(tmp_path / "dpf98"), show_progress=False)
    thin = cli("prune", tmp_path / "dpf98", "--method", "shrink", "--out", tmp_path / "thin",
               "--json", "--quiet")
    assert thin.exit_code == 0, thin.output
    summary = json.loads(thin.stdout)
    assert summary["removed_channels"] > 0
    assert summary["params"] < summary["original_params"]
    exported = cli("export", tmp_path / "thin", "--onnx", tmp_path / "thin.onnx", "--json")
    assert exported.exit_code == 0, exported.output  # ORT parity with the thinner model
    before = json.loads(cli("evaluate", tmp_path / "dpf98", "--json").stdout)
    after = json.loads(cli("evaluate", tmp_path / "thin.onnx", "--json").stdout)
    assert after["top1"] == before["top1"]
    again = cli("prune", tmp_path / "thin", "--method", "shrink", "--out", tmp_path / "again",
                "--json", "--quiet")
    assert again.exit_code == 0, again.output  # nothing left to remove is not an error
    assert json.loads(again.stdout)["removed_channels"] == 0


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["--target-macs", "0"], "--target-macs"),
    (["--target-macs", "1.5"], "--target-macs"),
    (["--target-macs", "0.5", "--sparsity", "0.5"], "not --sparsity and --target-macs"),
    (["--round-to", "0"], "--round-to"),
    (["--min-channels", "0"], "--min-channels"),
    (["--sparsity", "0.99", "--round-to", "1"], "with none"),
    (["--method", "dpf"], "method of compress train-prune"),
    (["--method", "magnitude", "--target-macs", "0.5"], "removes weights"),
    (["--method", "shrink"], "no zero weights"),
    (["--scope", "row"], "scope"),
])
def test_bad_structured_prune_input(cli, tmp_path, args, fragment):
    out = tmp_path / "out"
    base = ["prune", "--model", "resnet20", *SYNTHETIC, "--method", "l1-filter"]
    # later flags win in Typer: a test's --method replaces the default one above
    result = cli(*base, *args, "--out", out)
    assert_clean_failure(result, fragment)
    assert not out.exists()


def test_a_structured_checkpoint_refuses_another_architecture(cli, l1_run, tmp_path):
    wrong = cli("train-prune", "--model", "vgg-small", *SYNTHETIC, "--epochs", "1",
                "--weights", l1_run, "--out", tmp_path / "wrong")
    assert_clean_failure(wrong, "different architecture")
    assert not (tmp_path / "wrong").exists()
    # a model on other inputs cannot even be traced: the message names both models
    other = cli("train-prune", "--model", "lenet5", "--data", "synthetic", "--epochs", "1",
                "--max-train-samples", "64", "--weights", l1_run, "--out", tmp_path / "other")
    assert_clean_failure(other, "(weights of 'resnet20') do not fit 'lenet5'")
    assert not (tmp_path / "other").exists()


TINYNETS = """
import torch
from torch import nn


class Picky(nn.Module):
    def forward(self, x):
        if x.requires_grad:  # runs for inference, refuses the engine's traced pass
            raise ValueError("no tracing here")
        return x


def linear_only(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))


def picky(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 16, 3), Picky(), nn.Flatten(),
                         nn.Linear(16 * 30 * 30, num_classes))


def broken(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.Linear(7, num_classes))
"""


@pytest.mark.parametrize("factory, fragments", [
    ("linear_only", ["no channel it may remove", "protected: 1"]),
    ("picky", ["cannot trace this model at module 1 (Picky)", "no tracing here"]),
    ("broken", ["does not run on inputs of shape (3, 32, 32)"]),
])
def test_a_model_the_engine_cannot_prune_is_named(cli, tmp_path, monkeypatch, factory,
                                                 fragments):
    (tmp_path / "tinynets.py").write_text(TINYNETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = cli("prune", "--model", f"tinynets:{factory}", *SYNTHETIC, "--method",
                 "l1-filter", "--out", tmp_path / "out")
    sys.modules.pop("tinynets", None)
    assert_clean_failure(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_nothing_on_disk_is_touched_by_a_failed_prune(cli, l1_run, tmp_path):
    before = {p.name: p.read_bytes() for p in l1_run.iterdir() if p.is_file()}
    result = cli("prune", l1_run, "--method", "l1-filter", "--target-macs", "2",
                 "--out", l1_run)
    assert result.exit_code == 2
    assert {p.name: p.read_bytes() for p in l1_run.iterdir() if p.is_file()} == before
