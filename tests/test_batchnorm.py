"""BatchNorm statistics re-estimated on training images (`compress.batchnorm`): exact on
one batch, nothing else touched, and ``--bn-recalibrate`` in a training run."""

import json

import torch
from torch import nn

from compress import batchnorm


def test_reestimate_gives_the_statistics_of_the_images_and_touches_nothing_else():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.01), nn.ReLU(),
                          nn.Dropout(0.5), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    images = torch.randn(32, 3, 8, 8) * 3 + 1
    weights = {k: v.clone() for k, v in model.state_dict().items()
               if "running" not in k and "num_batches" not in k}
    model.train()
    assert batchnorm.reestimate(model, [images[:16], images[16:]]) == 32
    with torch.no_grad():
        features = model[0](images)
    halves = features[:16], features[16:]
    mean = sum(h.mean((0, 2, 3)) for h in halves) / 2
    var = sum(h.transpose(0, 1).flatten(1).var(1) for h in halves) / 2  # unbiased, per batch
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, var, atol=1e-4)
    assert model[1].momentum == 0.01 and model.training  # put back as it was
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert batchnorm.slow_statistics(model) and not batchnorm.slow_statistics(model[:1])
    assert batchnorm.reestimate(nn.Linear(2, 2), [torch.randn(4, 2)]) == 0


def test_a_training_run_re_estimates_or_says_it_could(cli, tmp_path):
    """torchvision's MobileNetV3 keeps its statistics with momentum 0.01."""
    common = ("--model", "torchvision.models:mobilenet_v3_small", "--data", "synthetic",
              "--input-shape", "3,32,32", "--max-train-samples", "64",
              "--max-test-samples", "16", "--method", "none", "--epochs", "1",
              "--batch-size", "16", "--threads", "1", "--json")
    plain = cli("train-prune", *common, "--out", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    summary = json.loads(plain.stdout)
    assert "bn_recalibrated_images" not in summary
    assert any("--bn-recalibrate" in note for note in summary["notes"])
    fixed = cli("train-prune", *common, "--bn-recalibrate", "40", "--out", tmp_path / "fixed")
    assert fixed.exit_code == 0, fixed.output
    summary = json.loads(fixed.stdout)
    assert summary["bn_recalibrated_images"] == 40 and "notes" not in summary
    saved = torch.load(tmp_path / "fixed" / "checkpoint.pt", weights_only=True)["state_dict"]
    plain_state = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)
    key = "features.0.1.running_mean"
    assert not torch.allclose(saved[key], plain_state["state_dict"][key])


def test_one_shot_magnitude_recovers_with_re_estimated_statistics(cli, tmp_path):
    """Half the weights of a trained ResNet-20 cut by magnitude (global): with the default
    re-estimation the cut model is within 2 points of dense, without it far below."""
    data = ("--data", "fashion-mnist", "--max-train-samples", "2000",
            "--max-test-samples", "1000", "--threads", "2", "--json")
    dense = cli("train-prune", "--model", "resnet20", "--method", "none", "--epochs", "2",
                "--batch-size", "64", "--lr", "0.1", *data, "--out", tmp_path / "dense")
    assert dense.exit_code == 0, dense.output
    dense_top1 = json.loads(dense.stdout)["test_top1"]
    cut = {}
    for images in ("2048", "0"):
        result = cli("prune", tmp_path / "dense", "--method", "magnitude", "--sparsity", "0.5",
                     "--bn-recalibrate", images, "--json", "--out", tmp_path / images)
        assert result.exit_code == 0, result.output
        cut[images] = json.loads(result.stdout)
    assert cut["2048"]["bn_recalibrated_images"] == 1800  # the whole training split
    assert cut["2048"]["test_top1"] >= dense_top1 - 0.02
    assert cut["0"]["bn_recalibrated_images"] == 0
    assert cut["0"]["test_top1"] < cut["2048"]["test_top1"]
