"""timm's architectures as ``--model timm:NAME``: trained, channel-pruned and exported like
torchvision's."""

import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers import assert_clean_failure, write_tree
from safetensors.torch import load_file, save_file

from compress.checkpoint import load_weights_into
from compress.errors import CompressError
from compress.model_specs import check_spec_from_file
from compress.models import build_model
from compress.pretrained import normalisation

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


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A private Hugging Face cache holding timm:resnet18.a1_in1k's weights (random, seeded,
    ImageNet's 1000 classes) where ``hf_hub_download`` puts them; offline, and downloads go
    through a proxy that refuses, so nothing leaves the machine."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once, at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    repo = cache / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    path = repo / "snapshots" / "0123abcd" / "model.safetensors"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18").state_dict(), path)
    return path


def test_timm_weights_by_name_load_offline_and_fit_the_data(hub_cache):
    saved = load_file(hub_cache)
    model = build_model("timm:resnet18", 3, (1, 32, 32))
    fresh_head = model.fc.weight.detach().clone()
    structure, notes = load_weights_into(model, "timm:resnet18.a1_in1k", "timm:resnet18",
                                         (3, (1, 32, 32)))
    assert structure is None
    assert torch.equal(model.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])
    assert torch.allclose(model.conv1.weight, saved["conv1.weight"].sum(1, keepdim=True))
    assert model.fc.weight.shape == (3, 512) and not torch.equal(model.fc.weight, fresh_head)
    assert notes == ["the classifier (fc) was trained on 1000 classes; it is replaced by a "
                     "fresh one for the data's 3", "the first convolution (conv1) was "
                     "trained on 3 input channels; timm adapted it to 1"]
    assert normalisation("timm:resnet18") == (pytest.approx([0.485, 0.456, 0.406]),
                                              pytest.approx([0.229, 0.224, 0.225]))


def test_timm_weights_that_cannot_be_had_are_one_line(hub_cache):
    model = build_model("timm:resnet18", 3, (3, 32, 32))
    with pytest.raises(CompressError) as missing:
        load_weights_into(model, "timm:resnet18.tv_in1k", "timm:resnet18", (3, (3, 32, 32)))
    message = str(missing.value)
    assert "\n" not in message and "could not be downloaded (offline" in message
    assert "https://huggingface.co/timm/resnet18.tv_in1k/resolve/main/model.safetensors" \
        in message and "models--timm--resnet18.tv_in1k" in message
    with pytest.raises(CompressError, match="closest: timm:resnet18.tv_in1k"):
        load_weights_into(model, "timm:resnet18.tv_in1kk", "timm:resnet18", (3, (3, 32, 32)))
    with pytest.raises(CompressError, match="use --model timm:resnet34"):
        load_weights_into(model, "timm:resnet34", "timm:resnet18", (3, (3, 32, 32)))
    hub_cache.write_bytes(b"not safetensors")
    with pytest.raises(CompressError, match="did not load as timm:resnet18"):
        load_weights_into(model, "timm:resnet18", "timm:resnet18", (3, (3, 32, 32)))


def test_a_run_from_timm_weights_uses_their_normalisation(cli, hub_cache, tmp_path):
    images = write_tree(tmp_path / "images", per_class=4)
    result = cli("train-prune", "--model", "timm:resnet18", "--weights", "timm:resnet18",
                 "--data", "imagefolder", "--data-dir", images, "--input-shape", "3,32,32",
                 "--workers", "0", "--method", "none", "--epochs", "1", "--batch-size", "8",
                 "--threads", "1", "--json", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["notes"] == [
        "the classifier (fc) was trained on 1000 classes; it is replaced by a fresh one for "
        "the data's 3"]
    data = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["data"]
    assert data["mean"] == pytest.approx([0.485, 0.456, 0.406])
    wrong = cli("train-prune", "--model", "timm:resnet18", "--weights", "timm:resnet81",
                "--data", "imagefolder", "--data-dir", images, "--input-shape", "3,32,32",
                "--workers", "0", "--epochs", "1", "--out", tmp_path / "wrong")
    assert_clean_failure(wrong, "unknown pretrained weights 'timm:resnet81'")


def test_a_coupling_torch_pruning_does_not_follow_is_one_line(cli, tmp_path):
    """DPN's dual paths fail inside torch-pruning's index mapping (an IndexError while
    scoring; ResNeSt's split attention, a ZeroDivisionError while cutting): the engine
    names the step and the layer."""
    result = cli("prune", "--model", "timm:dpn48b", *SMALL, "--method", "l1-filter",
                 "--out", tmp_path / "out")
    assert_clean_failure(result, "torch-pruning's dependency graph fails while scoring the "
                         "channels of features.conv5_3.c1x1_c2 (IndexError")
    assert not (tmp_path / "out").exists()


def test_timm_weights_without_a_connection_are_one_line_at_once(hub_cache, monkeypatch):
    """No proxy and no answer from the hub: refused before the hub's client would retry for
    half a minute."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    started = time.monotonic()
    with pytest.raises(CompressError, match=r"\(no connection to the hub\): fetch https://"):
        load_weights_into(build_model("timm:resnet18", 3, (3, 32, 32)),
                          "timm:resnet18.tv_in1k", "timm:resnet18", (3, (3, 32, 32)))
    assert time.monotonic() - started < 10
