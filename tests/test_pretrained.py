"""Weights named by their pretrained name, read offline from torch's cache, fitted to the
data's classes; the normalisation they were trained with."""

import json
from pathlib import Path

import onnx
import pytest
import torch
import torchvision
from helpers import assert_clean_failure, write_tree

from compress.checkpoint import load_weights_into
from compress.errors import CompressError
from compress.models import build_model
from export.metadata import model_metadata

NAME = "torchvision:MobileNet_V3_Small_Weights.IMAGENET1K_V1"
MODEL = "torchvision.models:mobilenet_v3_small"


@pytest.fixture
def torch_cache(tmp_path, monkeypatch) -> Path:
    """A private torch cache holding ImageNet-shaped weights (random, seeded) under the file
    name torchvision downloads MobileNetV3-small's to; downloads go through a proxy that
    refuses, so nothing leaves the machine."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    torch.manual_seed(0)
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    path = home / "hub" / "checkpoints" / Path(weights.url).name
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    return path


def test_named_weights_load_from_the_cache_and_the_classifier_is_replaced(torch_cache):
    saved = torch.load(torch_cache, weights_only=True)
    model = build_model(MODEL, 3, (3, 32, 32))
    fresh_head = model.classifier[3].weight.detach().clone()
    structure, notes = load_weights_into(model, NAME, MODEL)
    assert structure is None
    assert torch.equal(model.features[0][0].weight, saved["features.0.0.weight"])
    assert torch.equal(model.classifier[3].weight, fresh_head)  # 1000 classes -> 3, fresh
    assert notes == ["the classifier (classifier.3) was trained on 1000 classes; it is "
                     "replaced by a fresh one for the data's 3"]


def test_missing_weights_say_what_to_fetch_and_where(torch_cache):
    torch_cache.unlink()
    with pytest.raises(CompressError) as refused:
        load_weights_into(build_model(MODEL, 3, (3, 32, 32)), NAME, MODEL)
    message = str(refused.value)
    assert "could not be downloaded" in message and "\n" not in message
    assert "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth" in message
    assert str(torch_cache) in message


def test_an_unknown_name_gives_the_closest(torch_cache):
    with pytest.raises(CompressError, match="closest: torchvision:ResNet18_Weights"):
        load_weights_into(build_model(MODEL, 3, (3, 32, 32)),
                          "torchvision:ResNet18_Weigths.IMAGENET1K_V1", MODEL)


def test_a_run_from_named_weights_uses_their_normalisation(cli, torch_cache, tmp_path):
    images = write_tree(tmp_path / "images", per_class=4)
    run = tmp_path / "run"
    result = cli("train-prune", "--model", MODEL, "--weights", NAME, "--data", "imagefolder",
                 "--data-dir", images, "--input-shape", "3,32,32", "--workers", "0",
                 "--method", "none", "--epochs", "1", "--batch-size", "8", "--threads", "1",
                 "--json", "--out", run)
    assert result.exit_code == 0, result.output
    assert any("replaced by a fresh one" in note for note in json.loads(result.stdout)["notes"])
    data = torch.load(run / "checkpoint.pt", weights_only=True)["data"]
    assert data["mean"] == pytest.approx([0.485, 0.456, 0.406])
    wrong = cli("train-prune", "--model", MODEL, "--weights", "torchvision:NoSuch.V1",
                "--data", "imagefolder", "--data-dir", images, "--input-shape", "3,32,32",
                "--workers", "0", "--epochs", "1", "--out", tmp_path / "wrong")
    assert_clean_failure(wrong, "unknown pretrained weights 'torchvision:NoSuch.V1'")


def test_a_torchvision_model_from_named_weights_thins_exports_and_evaluates(cli, torch_cache,
                                                                             tmp_path):
    """The practitioner's path: an image folder, pretrained weights by name (their own
    normalisation), ADP while fine-tuning with augmentation, int8 export calibrated on the
    folder's training images, evaluate the file."""
    images = write_tree(tmp_path / "images", per_class=6)
    run, onnx_file = tmp_path / "run", tmp_path / "thin.onnx"
    trained = cli("train-prune", "--model", MODEL, "--weights", NAME, "--data", "imagefolder",
                  "--data-dir", images, "--input-shape", "3,32,32", "--workers", "0",
                  "--augment", "--method", "density", "--probe-samples", "8",
                  "--density-start", "0", "--density-tolerance", "1", "--epochs", "2",
                  "--batch-size", "6", "--threads", "1", "--json", "--out", run)
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout)
    assert summary["mac_ratio"] < 1.0  # ADP cut channels
    data = torch.load(run / "checkpoint.pt", weights_only=True)["data"]
    assert data["mean"] == pytest.approx([0.485, 0.456, 0.406]) and data["augment"] is True
    exported = cli("export", run, "--onnx", onnx_file, "--quantize", "int8", "--json")
    assert exported.exit_code == 0, exported.output
    # calibrated on the training images, all of them where there are fewer than 512
    meta = model_metadata(onnx.load(str(onnx_file)))
    assert meta["quantization"]["calibration_samples"] == 16
    scored = cli("evaluate", onnx_file, "--data-dir", images, "--json")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["samples"] == 18
