"""Activation-density pruning (ADP) and DPF's filter variant: the measurement, the width
rule, cuts in the middle of training (residual groups, optimizer state, resume) and the
physical removal of masked channels."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import stop_after_first
from torch import nn

from compress.methods.density import ActivationDensity, DensityOptions, options_from
from compress.methods.dpf_filter import DPFFilter
from compress.models import build_model
from compress.recipe import Recipe
from compress.schedules import CubicSchedule
from compress.structured.activation_density import density_width, measure
from compress.structured.engine import ChannelEngine

THRESHOLDS = torch.tensor([0.0, 0.495, 0.895, 2.0])  # channel c is non-zero where x > t_c
EXPECTED = torch.tensor([0.99, 0.5, 0.1, 0.0])  # on the values 0.00, 0.01, ..., 0.99


def known_pattern_model() -> nn.Module:
    """conv1 copies the input into 4 channels shifted by -t_c; a max-pool stands between
    its ReLU and the next conv, and the last conv is read through pooling and flattening."""
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.copy_(-THRESHOLDS)
        model[3].weight.fill_(0.0)
        model[3].bias.copy_(torch.tensor([1.0, -1.0] * 4))  # channels alternately on, off
    return model


def test_density_of_a_layer_with_a_known_activation_pattern():
    model = known_pattern_model()
    x = (torch.arange(100, dtype=torch.float32) / 100).view(1, 1, 10, 10)
    engine = ChannelEngine(model, (1, 10, 10))
    reading = measure(engine, [x, x])
    # measured at the ReLU, not after the max-pool that follows it
    assert torch.allclose(reading.channels["0"], EXPECTED, atol=1e-6)
    assert reading.layers["0"] == pytest.approx(float(EXPECTED.mean()))
    # read through average pooling and flattening: back at the ReLU's output
    assert reading.channels["3"].tolist() == [1.0, 0.0] * 4


@pytest.mark.parametrize(("density", "width", "round_to", "floor", "blocks", "expected"), [
    (0.5, 64, 8, 1, 1, 32),
    (0.51, 64, 8, 1, 1, 40),  # ceil(32.64) = 33, rounded up to a multiple of 8
    (0.51, 64, 1, 1, 1, 33),
    (0.0, 64, 8, 1, 1, 8),  # never below one multiple
    (0.05, 64, 1, 16, 1, 16),  # the floor
    (0.99, 20, 8, 1, 1, 20),  # rounding up never widens a layer
    (0.3, 12, 8, 1, 4, 8),  # 4 blocks of 3 positions: 2 positions of each (8 channels)
    (0.5, 32, 8, 1, 4, 16),  # 4 blocks of 8: 4 positions of each
])
def test_width_rule_floor_and_rounding(density, width, round_to, floor, blocks, expected):
    assert density_width(density, width, round_to=round_to, floor=floor,
                         blocks=blocks) == expected


def _options(**changes) -> DensityOptions:
    """The recipe's default ADP settings, with ``changes``."""
    return dataclasses.replace(options_from(Recipe()), **changes)


def _probe(shape=(1, 28, 28), n=64, seed=0):
    return [torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))]


def _cut_now(model, optimizer=None, **options):
    """An ADP pruner made to cut at its next measurement."""
    pruner = ActivationDensity(model, (1, 28, 28), 100,
                               _options(start=0.0, tolerance=float("inf"), **options))
    pruner.attach(optimizer, _probe())
    return pruner


def test_channels_joined_by_a_residual_addition_get_one_width():
    model = build_model("resnet20", 10, (1, 28, 28))
    pruner = _cut_now(model, round_to=1)
    event = pruner.measure_and_cut()
    assert event.widths, "nothing was cut"
    stage = [model.stages[i] for i in range(3, 6)]  # the 32-channel stage
    widths = {b.bn2.num_features for b in stage} | {stage[0].shortcut[0].out_channels}
    assert len(widths) == 1 and widths.pop() < 32
    assert all(b.conv1.in_channels == stage[0].bn2.num_features for b in stage[1:])
    model(torch.randn(2, 1, 28, 28))


def test_optimizer_state_follows_a_cut():
    model = build_model("vgg-small", 10, (1, 28, 28))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = model(torch.randn(8, 1, 28, 28)).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    before = {n: optimizer.state[p]["momentum_buffer"].clone()
              for n, p in model.named_parameters()}
    old_bn = model.features[1].weight.detach().clone()
    pruner = _cut_now(model, optimizer, round_to=1)
    pruner.measure_and_cut()
    conv, bn = model.features[0], model.features[1]
    assert conv.out_channels < 64
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert params == {id(p) for p in model.parameters()}
    # the kept channels are those whose BN scale survived, in order: their momentum too
    kept = [int((old_bn == w).nonzero()[0]) for w in bn.weight.detach()]
    assert torch.equal(optimizer.state[bn.weight]["momentum_buffer"],
                       before["features.1.weight"][kept])
    assert torch.equal(optimizer.state[conv.weight]["momentum_buffer"],
                       before["features.0.weight"][kept])
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()  # shapes agree


def test_the_densest_channels_are_kept():
    model = known_pattern_model()
    pruner = ActivationDensity(model, (1, 10, 10), 100,
                               _options(start=0.0, tolerance=float("inf"), round_to=1))
    pruner.attach(None, [(torch.arange(100, dtype=torch.float32) / 100).view(1, 1, 10, 10)])
    pruner.measure_and_cut()
    # density 0.3975 of 4 channels -> 2 kept: the two densest, thresholds 0.0 and 0.495
    assert model[0].out_channels == 2
    assert torch.equal(model[0].bias.detach(), -THRESHOLDS[:2])


def _density_recipe(**extra):
    from compress.recipe import Recipe

    return Recipe(model="lenet5", method="density", epochs=3, batch_size=64,
                  max_train_samples=900, max_test_samples=200, probe_samples=128,
                  density_start=0.3, density_every=0.2, density_tolerance=1.0,
                  density_cuts=3, round_to=4, **extra).validate()


def test_a_cut_and_resume_mid_run_give_the_same_widths(tmp_path):
    from compress.checkpoint import load_checkpoint
    from compress.pipeline import train_prune

    recipe = _density_recipe()
    whole = train_prune(recipe, str(tmp_path / "whole"), show_progress=False)
    assert whole["cuts"] >= 2 and whole["param_ratio"] < 0.7
    with pytest.raises(KeyboardInterrupt):
        train_prune(recipe, str(tmp_path / "cut"), show_progress=False,
                    on_epoch=stop_after_first)
    first = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert first.structure, "the first cut (epoch 1) is in the checkpoint"
    resumed = train_prune(recipe, str(tmp_path / "cut"), resume=True, show_progress=False)
    assert resumed["widths"] == whole["widths"]
    assert resumed["cuts"] == whole["cuts"]
    assert resumed["training_macs"] == pytest.approx(whole["training_macs"])
    assert resumed["test_top1"] == pytest.approx(whole["test_top1"], abs=1e-6)
    events = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").open()]
    assert any(e["event"] == "density" and e["widths"] for e in events)


def test_density_run_exports_and_passes_parity(cli, tmp_path):
    from compress.pipeline import train_prune

    summary = train_prune(_density_recipe(), str(tmp_path / "run"), show_progress=False)
    assert summary["training_mac_ratio"] < 1.0
    assert summary["mac_ratio"] < 1.0
    result = cli("export", tmp_path / "run", "--onnx", tmp_path / "run.onnx")
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Widths over training" in report


def test_dpf_filter_feeds_back_to_masked_channels_and_cuts_them_at_the_end():
    torch.manual_seed(0)
    model = build_model("vgg-small", 10, (1, 28, 28))
    schedule = CubicSchedule(0.5, 0, 4)
    pruner = DPFFilter(model, schedule, (1, 28, 28), refresh_every=2, round_to=1,
                       freeze_step=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner.cutter.optimizer = optimizer
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    seen = []
    for _ in range(6):
        with pruner.pruned():
            nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
        gone = (~pruner.keep["features.0"]).nonzero().flatten()
        seen.append((gone, model.features[1].weight.detach()[gone].clone()))
    gone, values = seen[-1]
    assert len(gone) > 0
    assert not torch.equal(seen[-2][1], values), "masked channels' dense values are frozen"
    assert (values != 0).all(), "masked channels' dense values were zeroed"
    model.eval()
    with pruner.pruned(), torch.no_grad():
        masked = model(x)
    event = pruner.step()  # past the freeze: the cut
    assert event is not None and event.kind == "cut"
    assert model.features[0].out_channels == 64 - len(gone)
    with torch.no_grad():
        assert torch.allclose(model(x), masked, atol=1e-5)  # the cut changed nothing
    assert pruner.step() is None and not pruner.masks


def test_uniform_budget_search_meets_the_budget_it_was_given(tmp_path):
    """The search measures real onnxruntime sessions; the model it keeps is the trial whose
    measured p50 met the budget, and every narrower cut it tried missed it."""
    from compress.methods.filter_norm import FilterNorm
    from compress.methods.registry import OneShotRequest
    from compress.stats import count_macs
    from export.budget import latency_meter, onnx_p50_ms

    torch.manual_seed(0)
    model = build_model("vgg-small", 10, (1, 28, 28))
    dense = onnx_p50_ms(model, (1, 28, 28), runs=30)
    budget = 0.6 * dense
    pruner = FilterNorm(OneShotRequest(budget_ms=budget, input_shape=(1, 28, 28),
                                       latency=latency_meter(runs=30), allocation="uniform"),
                        norm=1)
    result = pruner.prune(model)
    curve = result.details["latency_curve"]
    chosen = result.details["channel_sparsity"]
    point = next(c for c in curve if abs(c["share"] - round(chosen, 4)) < 1e-9)
    assert point["p50_ms"] <= budget
    assert point["macs"] == count_macs(model, (1, 28, 28))[0]
    assert all(c["p50_ms"] > budget for c in curve if c["share"] < point["share"])
    assert any("--budget-ms" in note for note in result.notes)


def test_dpf_filter_budget_raises_the_final_share_until_the_budget_is_met():
    from compress.methods.latency_budget import LatencyBudget
    from export.budget import latency_meter, onnx_p50_ms

    torch.manual_seed(0)
    model = build_model("vgg-small", 10, (1, 28, 28))
    budget = 0.3 * onnx_p50_ms(model, (1, 28, 28), runs=30)  # a 0.1 cut cannot meet it
    pruner = DPFFilter(model, CubicSchedule(0.1, 0, 10), (1, 28, 28), round_to=8)
    pruner.set_budget(LatencyBudget(budget, latency_meter(runs=30), "uniform"))
    final = pruner.schedule.final_sparsity
    curve = {c["share"]: c["p50_ms"] for c in pruner.budget_curve}
    assert curve[0.1] > budget and final > 0.1  # raised, because 0.1 missed the budget
    assert curve[round(final, 4)] <= budget
    assert pruner.state_dict()["final_sparsity"] == final  # a resumed run keeps it


def test_dpf_filter_keeps_training_the_layers_it_cut_before_the_last_epoch(tmp_path):
    """A cut replaces the cut layers' parameters: the optimizer must follow them, or the
    epochs after the cut leave those layers as they were."""
    from compress.pipeline import train_prune
    from compress.recipe import Recipe

    first_weights, job = [], {}

    def on_epoch(result) -> None:
        weight = next(p for n, p in job["job"].model.named_parameters() if n.endswith("weight"))
        first_weights.append(weight.detach().clone())

    recipe = Recipe(model="lenet5", method="dpf-filter", sparsity=0.5, round_to=1, epochs=3,
                    prune_end=0.3, batch_size=64, max_train_samples=600,
                    max_test_samples=100).validate()
    train_prune(recipe, str(tmp_path / "run"), show_progress=False, on_epoch=on_epoch,
                on_start=lambda started: job.update(job=started))
    cut, after = first_weights[-2], first_weights[-1]  # the cut happened in the first epoch
    assert cut.shape == after.shape and cut.shape[0] < 6
    assert not torch.equal(cut, after), "the cut layer stopped training after the cut"


def test_a_latency_budget_from_python_needs_the_meter_handed_in(tmp_path):
    """compress never imports export: the caller hands in what measures latency."""
    from compress.errors import CompressError
    from compress.pipeline import train_prune

    with pytest.raises(CompressError, match="latency=export.budget.latency_meter"):
        train_prune(_density_recipe(budget_ms=1.0), str(tmp_path / "run"),
                    show_progress=False)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--method", "density", "--density-start", "1.5"], "--density-start"),
    (["--method", "density", "--density-start", "0.9", "--density-stop", "0.5"],
     "--density-start <= --density-stop"),
    (["--method", "density", "--density-cuts", "0"], "--density-cuts"),
    (["--method", "density", "--budget-ms", "-1"], "--budget-ms"),
    (["--method", "gmp", "--budget-ms", "1"], "method gmp has no cut"),
    (["--method", "dpf-filter", "--sparsity", "1.2"], "[0, 1)"),
    (["--method", "density", "--model", "mlpnet", "--round-to", "0"], "--round-to"),
])
def test_bad_structured_training_input_is_one_line(cli, tmp_path, args, fragment):
    from helpers import assert_clean_failure

    out = tmp_path / "run"
    result = cli("train-prune", *args, "--epochs", "1", "--max-train-samples", "200",
                 "--out", out)
    assert_clean_failure(result, fragment)
    assert not out.exists()
