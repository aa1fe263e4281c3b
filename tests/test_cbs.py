"""CBS and WoodFisher through `compress prune`: exact sparsity, exact zeros, the held-out
split, sweeps, and bad input as one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_clean_failure

from compress.checkpoint import load_checkpoint

QUICK = ("--fisher-samples", "64", "--rmp-trials", "3", "--max-block", "512")


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    """MLPNet (the CBS paper's 784-40-20-10) trained briefly on a Fashion-MNIST slice."""
    from compress.pipeline import train_prune
    from compress.recipe import Recipe

    out = tmp_path_factory.mktemp("cbs") / "dense"
    recipe = Recipe(model="mlpnet", method="none", epochs=1, batch_size=64,
                    max_train_samples=1200, max_test_samples=300).validate()
    train_prune(recipe, str(out), show_progress=False)
    return out


def _prunable(ckpt):
    return {k: v for k, v in ckpt.state_dict.items() if k.endswith(".weight")}


@pytest.mark.parametrize("args", [
    ("--method", "cbs"), ("--method", "cbs-s"), ("--method", "woodfisher"),
    ("--method", "magnitude", "--update", "cbs"),
    ("--method", "magnitude", "--update", "woodfisher"),
])
def test_exact_sparsity_and_exact_zeros(cli, mlp_run, tmp_path, args):
    out = tmp_path / "pruned"
    result = cli("prune", mlp_run, *args, "--sparsity", "0.8", *QUICK, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out / "checkpoint.pt")
    weights = _prunable(ckpt)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == round(0.8 * total)
    for name, w in weights.items():  # the mask and the zeros agree exactly
        assert torch.equal(w != 0, ckpt.masks[name])


def test_the_update_moves_the_weights_that_stay(cli, mlp_run, tmp_path):
    plain, updated = tmp_path / "plain", tmp_path / "updated"
    for out, extra in ((plain, ()), (updated, ("--update", "cbs"))):
        result = cli("prune", mlp_run, "--method", "magnitude", "--sparsity", "0.8", *extra,
                     *QUICK, "--out", out)
        assert result.exit_code == 0, result.output
    a = _prunable(load_checkpoint(plain / "checkpoint.pt"))
    b = _prunable(load_checkpoint(updated / "checkpoint.pt"))
    for name in a:
        assert torch.equal(a[name] == 0, b[name] == 0)  # same selection
    assert any(not torch.equal(a[n], b[n]) for n in a)  # kept weights moved


def test_the_held_out_split_is_the_validation_split_not_the_test_split(fmnist_small):
    from compress.methods.cbs import _heldout

    batches = _heldout(fmnist_small, 100)
    images = torch.cat([x for x, _ in batches])
    first_val = next(iter(fmnist_small.val.batches(100)))[0]
    first_test = next(iter(fmnist_small.test.batches(100)))[0]
    assert torch.equal(images, first_val)
    assert not torch.equal(images, first_test)


def test_a_sweep_gives_the_same_masks_as_separate_runs(cli, mlp_run, tmp_path):
    sweep = tmp_path / "sweep"
    result = cli("prune", mlp_run, "--method", "cbs", "--sparsity", "0.5,0.8", *QUICK,
                 "--out", sweep, "--evaluate")
    assert result.exit_code == 0, result.output
    assert "| 0.8000 |" in (sweep / "sweep.md").read_text()
    for level in ("0.5", "0.8"):
        single = tmp_path / f"single-{level}"
        assert cli("prune", mlp_run, "--method", "cbs", "--sparsity", level, *QUICK,
                   "--out", single).exit_code == 0
        a = load_checkpoint(sweep / f"sparsity-{level}" / "checkpoint.pt")
        b = load_checkpoint(single / "checkpoint.pt")
        for name in a.masks:
            assert torch.equal(a.masks[name], b.masks[name])
            assert torch.allclose(a.state_dict[name], b.state_dict[name])


@pytest.mark.parametrize(("args", "fragment"), [
    (("--sparsity", "0.5,1.2"), "[0, 1)"),
    (("--sparsity", "0.5,x"), "a list such as"),
    (("--sparsity", "0.5", "--fisher-samples", "4"), "too few"),
    (("--sparsity", "0.5", "--fisher-samples", "100000"), "more than the"),
    (("--sparsity", "0.5", "--max-memory-gb", "0.01"), "below what one Fisher block needs"),
    (("--sparsity", "0.5", "--update", "obs"), "--update must be"),
])
def test_bad_second_order_input_is_one_line(cli, mlp_run, tmp_path, args, fragment):
    out = tmp_path / "bad"
    result = cli("prune", mlp_run, "--method", "cbs", *args, "--rmp-trials", "2", "--out", out)
    assert_clean_failure(result, fragment)
    assert not out.exists() or not any(out.iterdir())


def test_a_model_without_trained_weights_is_pruned_with_a_warning(cli, tmp_path):
    result = cli("prune", "--model", "mlpnet", "--method", "woodfisher", "--sparsity", "0.5",
                 *QUICK, "--max-train-samples", "300", "--max-test-samples", "100",
                 "--out", tmp_path / "fresh")
    assert result.exit_code == 0, result.output
    assert "no trained weights" in result.output


def test_a_cbs_pruned_mlpnet_exports_packed_and_evaluates_the_same(cli, mlp_run, tmp_path):
    import json

    out = tmp_path / "cbs90"
    assert cli("prune", mlp_run, "--method", "cbs", "--sparsity", "0.9", *QUICK,
               "--out", out).exit_code == 0
    onnx_file = tmp_path / "cbs90.onnx"
    exported = cli("export", out, "--onnx", onnx_file, "--pack", "bitmask")
    assert exported.exit_code == 0, exported.output
    torch_top1 = json.loads(cli("evaluate", out, "--json").stdout)["top1"]
    onnx_top1 = json.loads(cli("evaluate", onnx_file, "--json").stdout)["top1"]
    assert onnx_top1 == pytest.approx(torch_top1, abs=1e-9)
    report = json.loads(cli("inspect", onnx_file, "--json").stdout)
    assert report["total"]["prunable_sparsity"] == pytest.approx(0.9, abs=1e-4)


@pytest.mark.parametrize("method", ["cbs", "woodfisher"])
def test_fisher_blocks_in_groups_give_what_all_blocks_at_once_give(mlp_run, tmp_path, method):
    """Under a memory cap the blocks come in groups, their gradients recomputed for each:
    the masks and the weights are those of the all-at-once path."""
    from compress.data import load_splits
    from compress.methods import method as registered
    from compress.methods.registry import OneShotRequest

    ckpt = load_checkpoint(mlp_run / "checkpoint.pt")
    splits = load_splits(ckpt.data)
    results = {}
    for name, cap in (("whole", None), ("grouped", 0.05)):
        model = ckpt.build_model()
        request = OneShotRequest(sparsity=0.8, second_order={
            "fisher_samples": 64, "rmp_trials": 3, "max_block": 512, "max_memory_gb": cap})
        pruner = registered(method, "one-shot").build(request)
        pruner.check(model)
        details = pruner.prune(model, splits).details
        results[name] = details, dict(model.state_dict())
    (whole, a), (grouped, b) = results["whole"], results["grouped"]
    assert whole["fisher_groups"] == 1 and grouped["fisher_groups"] > 2
    assert grouped["gradient_passes"] == 2 * grouped["fisher_groups"]  # selection, update
    for name in a:
        assert torch.equal(a[name], b[name]), name
