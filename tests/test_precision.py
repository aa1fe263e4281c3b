"""Mixed precision: bf16 autocast trains on the CPU with masks and cuts exact; fp16 is
refused where there is no fp16 training path."""

import json

import torch
from helpers import assert_clean_failure

SMALL = ("--model", "lenet5", "--max-train-samples", "2048", "--max-test-samples", "256",
         "--epochs", "2", "--batch-size", "64", "--threads", "1", "--json")


def test_bf16_trains_dpf_on_the_cpu_with_exact_masks(cli, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        result = cli("train-prune", *SMALL, "--method", "dpf", "--sparsity", "0.8",
                     "--precision", precision, "--out", tmp_path / precision)
        assert result.exit_code == 0, result.output
        runs[precision] = json.loads(result.stdout)
    assert runs["bf16"]["sparsity"] == runs["fp32"]["sparsity"] == 0.8
    assert runs["bf16"]["test_top1"] > 0.4  # it learns (fp32: 0.59, bf16: 0.56 measured)
    weights = {p: torch.load(tmp_path / p / "checkpoint.pt", weights_only=True)["state_dict"]
               for p in runs}
    assert all(v.dtype == torch.float32 for v in weights["bf16"].values()
               if v.is_floating_point())
    first = "features.0.weight"
    assert not torch.equal(weights["bf16"][first], weights["fp32"][first])  # autocast ran


def test_bf16_cuts_channels_with_density(cli, tmp_path):
    result = cli("train-prune", *SMALL, "--method", "density", "--precision", "bf16",
                 "--probe-samples", "64", "--density-start", "0", "--density-tolerance", "1",
                 "--out", tmp_path / "adp")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["mac_ratio"] < 1.0


def test_fp16_without_cuda_is_one_line(cli, tmp_path):
    result = cli("train-prune", *SMALL, "--precision", "fp16", "--out", tmp_path / "x")
    assert_clean_failure(result, "--precision fp16 trains on CUDA only")
    assert not (tmp_path / "x").exists()
