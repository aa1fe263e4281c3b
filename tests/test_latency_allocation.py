"""Channel widths chosen by a layer table (`--budget-ms` with `--allocation latency`): the
prediction, the greedy allocation, and the search that measures real onnxruntime sessions."""

from __future__ import annotations

import json

import pytest
import torch

from compress.structured.latency_allocation import (
    GroupLayers,
    LatencyModel,
    allocate,
    fixed_cost,
)


def entry(name: str, cin: int, cout: int, ms_per_mac: float, fixed: float = 0.0) -> dict:
    widths_in = sorted({max(1, cin * k // 4) for k in range(1, 5)})
    widths_out = sorted({max(1, cout * k // 4) for k in range(1, 5)})
    return {"layer": name, "input_channels": cin, "output_channels": cout,
            "depthwise": False,
            "times_ms": [[i, o, fixed + ms_per_mac * i * o] for i in widths_in
                         for o in widths_out]}


def test_the_fixed_cost_of_a_layer_alone_is_the_intercept_of_its_grid():
    rows = [(i, o, 0.02 + 0.001 * i + 0.0005 * o + 1e-5 * i * o)
            for i in (8, 16, 32, 64) for o in (8, 16, 32)]
    assert fixed_cost(rows, depthwise=False) == pytest.approx(0.02, abs=1e-9)
    assert fixed_cost([(8, 8, 0.5)], depthwise=False) == 0.0


def chain() -> LatencyModel:
    """a: 16 -> 32 (group A), b: 32 -> 32 (reads A, group B), c: 32 -> 10 (reads B); b is
    ten times as slow per MAC as the others."""
    table = {"layers": [entry("a", 16, 32, 1e-4), entry("b", 32, 32, 1e-3),
                        entry("c", 32, 10, 1e-4)]}
    full = {"a": (16, 32), "b": (32, 32), "c": (32, 10)}
    groups = {"A": (32, GroupLayers(outputs=["a"], inputs=["b"])),
              "B": (32, GroupLayers(outputs=["b"], inputs=["c"]))}
    return LatencyModel(table, full, groups)


def test_the_prediction_is_the_sum_of_the_layers_at_the_widths_the_groups_give():
    model = chain()
    full = model.predict({"A": 32, "B": 32})
    assert full == pytest.approx(1e-4 * 16 * 32 + 1e-3 * 32 * 32 + 1e-4 * 32 * 10)
    half_a = model.predict({"A": 16, "B": 32})
    assert half_a == pytest.approx(1e-4 * 16 * 16 + 1e-3 * 16 * 32 + 1e-4 * 32 * 10)
    assert model.saving("A", {"A": 32, "B": 32}, 16) == pytest.approx(full - half_a)


def test_allocation_meets_the_target_and_cuts_where_a_millisecond_costs_least():
    """Equal importance per channel: the group whose channels buy the most time goes
    first; a floor is never crossed; the target is met when the floors allow it."""
    model = chain()
    scores = {"A": torch.ones(32), "B": torch.ones(32)}
    step, floor, blocks = {"A": 8, "B": 8}, {"A": 8, "B": 8}, {"A": 1, "B": 1}
    full = model.predict({"A": 32, "B": 32})
    found = allocate(model, scores, 0.7 * full, step, floor, blocks)
    assert found.predicted_ms <= 0.7 * full
    assert model.predict(found.kept) == pytest.approx(found.predicted_ms)
    # A's channels feed the slow layer b's inputs and B's feed only c: cutting A saves more
    assert found.kept["A"] < 32 and found.kept["A"] <= found.kept["B"]
    first = allocate(model, scores, model.predict({"A": 24, "B": 32}), step, floor, blocks)
    assert first.kept == {"A": 24, "B": 32}  # one step: A's
    least = allocate(model, scores, 0.0, step, floor, blocks)
    assert least.kept == {"A": 8, "B": 8}  # down to the floors, and no further


def test_a_cut_is_spread_rather_than_one_group_taken_to_its_floor():
    """Two groups whose channels buy the same time and matter alike: the greedy must not
    empty one while the other stays whole (the thinner a group, the more its next channel
    costs), the pattern that cut every other vgg-small layer to 8 channels."""
    model = LatencyModel({"layers": [entry("a", 4, 64, 1e-4), entry("b", 4, 64, 1e-4)]},
                         {"a": (4, 64), "b": (4, 64)},
                         {"A": (64, GroupLayers(outputs=["a"])),
                          "B": (64, GroupLayers(outputs=["b"]))})
    scores = {"A": torch.ones(64), "B": torch.ones(64)}
    found = allocate(model, scores, 0.5 * model.predict({"A": 64, "B": 64}),
                     {"A": 8, "B": 8}, {"A": 8, "B": 8}, {"A": 1, "B": 1})
    assert found.kept == {"A": 32, "B": 32}


def test_importance_outweighs_time_when_a_group_is_precious():
    model = chain()
    scores = {"A": torch.ones(32), "B": torch.ones(32)}
    scores["A"][:24] = 1e3  # A: 24 of its channels matter a thousand times more
    scores["B"][:] = 0.5
    found = allocate(model, scores, 0.9 * model.predict({"A": 32, "B": 32}),
                     {"A": 8, "B": 8}, {"A": 8, "B": 8}, {"A": 1, "B": 1})
    assert found.kept["A"] >= 24  # only A's unimportant channels could go


@pytest.fixture(scope="module")
def vgg():
    from compress.models import build_model

    torch.manual_seed(0)
    return build_model("vgg-small", 10, (1, 28, 28))


def test_the_search_meets_the_budget_it_measures(vgg):
    """Each trial is exported and timed in onnxruntime; the cut kept is the first trial whose
    measured p50 met the budget, with the table's prediction beside every measurement."""
    import copy

    from compress.methods.filter_norm import FilterNorm
    from compress.methods.registry import OneShotRequest
    from export.budget import latency_meter, layer_table_maker, onnx_p50_ms

    model = copy.deepcopy(vgg)
    budget = 0.6 * onnx_p50_ms(model, (1, 28, 28), runs=30)
    pruner = FilterNorm(OneShotRequest(budget_ms=budget, input_shape=(1, 28, 28),
                                       latency=latency_meter(runs=30),
                                       table_maker=layer_table_maker(1)), norm=1)
    result = pruner.prune(model)
    trials = result.details["latency_trials"]
    assert trials[0]["trial"] == 0 and len(trials) >= 2
    assert all(t["predicted_ms"] > 0 and t["measured_ms"] > 0 for t in trials)
    assert trials[-1]["measured_ms"] <= budget
    assert all(t["measured_ms"] > budget for t in trials[:-1])
    assert any("latency table (made here)" in note for note in result.notes)
    assert 0 < result.details["channel_sparsity"] < 1


def test_an_int8_budget_is_met_in_int8(vgg):
    """--budget-precision int8: the table and every trial are int8 files (their quantize and
    dequantize steps, which no layer's width changes, included in what is measured)."""
    import copy

    from compress.methods.filter_norm import FilterNorm
    from compress.methods.registry import OneShotRequest
    from export.budget import latency_meter, layer_table_maker, onnx_p50_ms

    model = copy.deepcopy(vgg)
    budget = 0.6 * onnx_p50_ms(model, (1, 28, 28), runs=30, precision="int8")
    table = layer_table_maker(1, "int8")(model, (1, 28, 28))
    assert table["precision"] == "int8"
    pruner = FilterNorm(OneShotRequest(budget_ms=budget, input_shape=(1, 28, 28),
                                       latency=latency_meter(runs=30, precision="int8"),
                                       latency_table=table), norm=1)
    trials = pruner.prune(model).details["latency_trials"]
    assert trials[-1]["measured_ms"] <= budget < trials[0]["measured_ms"]


def test_a_table_for_another_model_or_an_unreachable_budget_is_one_line(vgg, tmp_path, cli):
    from export.budget import layer_table_maker

    run = tmp_path / "dense"
    assert cli("train-prune", "--model", "lenet5", "--method", "none", "--epochs", "1",
               "--max-train-samples", "256", "--max-test-samples", "64", "--quiet",
               "--out", run).exit_code == 0
    other = tmp_path / "vgg.json"
    other.write_text(json.dumps(layer_table_maker(1)(vgg, (1, 28, 28))))
    base = ["prune", run, "--method", "l1-filter", "--out", tmp_path / "p"]
    wrong = cli(*base, "--budget-ms", "0.01", "--latency-table", other)
    assert wrong.exit_code == 2 and "made for another model" in wrong.output
    assert len(wrong.output.strip().splitlines()) == 1
    unreachable = cli(*base, "--budget-ms", "0.000001")
    assert unreachable.exit_code == 2 and "cannot be met" in unreachable.output
    uniform = cli(*base, "--budget-ms", "1", "--allocation", "uniform",
                  "--latency-table", other)
    assert uniform.exit_code == 2 and "--allocation latency only" in uniform.output
    precision = cli(*base, "--budget-ms", "1", "--budget-precision", "int8",
                    "--latency-table", other)
    assert precision.exit_code == 2 and "timed in fp32" in precision.output
    unused = cli(*base, "--sparsity", "0.5", "--latency-table", other)
    assert unused.exit_code == 2 and "read with --budget-ms" in unused.output
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


@pytest.mark.parametrize(("method", "share"), [("dpf-filter", 0.55), ("density", 0.2)])
def test_a_training_budget_met_by_the_table_is_met_when_the_file_is_timed_again(method, share,
                                                                                tmp_path):
    """train-prune's latency allocation: the search's own measurements say the budget is met;
    the exported file, timed again interleaved with the dense file (a ratio, so a loaded
    machine slows both alike), runs at the budget's share of the dense p50 within 25 %."""
    from compress.pipeline import train_prune
    from compress.recipe import Recipe
    from export.budget import latency_meter, layer_table_maker
    from export.onnx_export import export_checkpoint
    from export.runtime.latency import measure

    common = {"model": "vgg-small", "epochs": 1, "max_train_samples": 256,
              "max_test_samples": 64, "batch_size": 64, "seed": 0}
    dense = tmp_path / "dense"
    train_prune(Recipe(method="none", **common).validate(), str(dense), show_progress=False)
    dense_file = tmp_path / "dense.onnx"
    export_checkpoint(dense, dense_file, quantize="none", verify=False)
    (dense_ms,), _ = measure([dense_file], runs=60)  # density alone cuts this to ~0.3
    extra = {"prune_end": 0.5} if method == "dpf-filter" else \
        {"density_start": 0.2, "density_stop": 0.9, "density_every": 0.2, "probe_samples": 64}
    summary = train_prune(
        Recipe(method=method, weights=str(dense / "checkpoint.pt"),
               budget_ms=share * dense_ms.latency()["p50"], **extra, **common).validate(),
        str(tmp_path / "cut"), show_progress=False, latency=latency_meter(runs=30),
        table_maker=layer_table_maker(1))
    assert "latency_trials" in summary, summary.get("notes")
    trials = summary["latency_trials"]
    assert trials[0]["trial"] == 0 and len(trials) >= 2
    assert all(t["predicted_ms"] > 0 and t["measured_ms"] > 0 for t in trials)
    assert any("latency table (made here)" in n and " met" in n for n in summary["notes"])
    cut_file = tmp_path / "cut.onnx"
    export_checkpoint(tmp_path / "cut", cut_file, quantize="none", verify=False)
    measured, _ = measure([dense_file, cut_file], runs=100)
    ratio = measured[1].latency()["p50"] / measured[0].latency()["p50"]
    assert ratio <= share * 1.25, (ratio, trials)


def test_timing_a_model_in_training_leaves_it_in_training(vgg):
    """A budget search times the model a run is still training (density's last cut): the
    export must not leave it in eval mode, or the rest of the epoch trains on frozen
    BatchNorm statistics."""
    import copy

    from export.budget import onnx_p50_ms

    model = copy.deepcopy(vgg).train()
    onnx_p50_ms(model, (1, 28, 28), runs=3)
    assert model.training and all(m.training for m in model.modules())
