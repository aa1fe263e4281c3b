"""timm's architectures as ``--model timm:NAME``: trained, channel-pruned and exported like
torchvision's."""

import json
import sys

import pytest
from helpers import assert_clean_failure

from compress.errors import CompressError
from compress.model_specs import check_spec_from_file
from compress.models import build_model

SMALL = ("--data", "synthetic", "--input-shape", "3,32,32", "--max-train-samples", "64",
         "--max-test-samples", "16", "--threads", "1")


def test_a_timm_model_trains_prunes_channels_exports_and_benches(cli, tmp_path):
    dense, thin = tmp_path / "dense", tmp_path / "thin"
    trained = cli("train-prune", "--model", "timm:resnet18", *SMALL,
                  "--method", "none", "--epochs", "1", "--batch-size", "16", "--out", dense)
    assert trained.exit_code == 0, trained.output
    pruned = cli("prune", dense, "--method", "l1-filter", "--sparsity", "0.5", "--out", thin,
                 "--json")
    assert pruned.exit_code == 0, pruned.output
    exported = cli("export", thin, "--onnx", tmp_path / "thin.onnx")
    assert exported.exit_code == 0, exported.output
    assert "verified" in exported.output
    timed = cli("bench", tmp_path / "thin.onnx", "--runs", "5", "--json")
    assert timed.exit_code == 0, timed.output
    assert json.loads(timed.stdout)["latency_ms"]["p50"] > 0


def test_timm_names_are_looked_up_in_its_registry_only():
    assert check_spec_from_file("timm:resnet18", "f") == "timm:resnet18"
    assert check_spec_from_file("timm:vit_tiny_patch16_224.augreg_in21k", "f")
    for spec in ("timm:hf-hub:someone/model", "timm:../x", "timm:Resnet18 ; rm"):
        with pytest.raises(CompressError, match="a file never chooses code"):
            check_spec_from_file(spec, "f")
    with pytest.raises(CompressError, match="not a hub path"):
        build_model("timm:hf-hub:someone/model", 10, (3, 32, 32))
    with pytest.raises(CompressError, match="closest: timm:resnet18"):
        build_model("timm:resnet19", 10, (3, 32, 32))


def test_without_timm_the_message_names_the_extra(cli, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if it were not installed
    refused = cli("train-prune", "--model", "timm:resnet18", *SMALL, "--epochs", "1",
                  "--out", tmp_path / "run")
    assert_clean_failure(refused, "timm models need timm", "'.[timm]'")


def test_fused_qkv_attention_keeps_its_heads_and_cuts_the_rest(tmp_path):
    """timm's ViT reshapes qkv by num_heads and head_dim, attributes a cut cannot update:
    q/k/v keep their width, the residual and MLP widths are cut, the export matches."""
    import torch

    from compress.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from compress.data import DataConfig
    from compress.pipeline import prune_oneshot
    from export.onnx_export import export_checkpoint

    torch.manual_seed(0)
    spec, shape = "timm:vit_tiny_patch16_224", (3, 32, 32)
    model = build_model(spec, 10, shape)
    data = DataConfig(name="synthetic", input_shape=shape, max_train_samples=16,
                      max_test_samples=8)
    save_checkpoint(Checkpoint(spec, data, model.state_dict()), tmp_path / "dense.pt")
    summary = prune_oneshot(str(tmp_path / "dense.pt"), str(tmp_path / "cut"), 0.5,
                            method="l1-filter", batch_size=8, show_progress=False)
    assert summary["mac_ratio"] < 0.8
    pruned = load_checkpoint(tmp_path / "cut").build_model()
    attention = pruned.blocks[0].attn
    assert attention.qkv.out_features == 3 * 192 and pruned.blocks[0].mlp.fc1.out_features < 768
    result = export_checkpoint(tmp_path / "cut", tmp_path / "cut.onnx", pack="none")
    assert result.verify.max_abs_diff_vs_torch <= result.verify.tolerance
