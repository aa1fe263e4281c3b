"""Every registered method, built through the registry on a tiny model and driven only
through the declared interfaces: training methods are attached, stepped, finalised and
resumed; one-shot methods check and prune."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compress.data import first_batches
from compress.masks import mask_sparsity
from compress.methods import REGISTRY, TrainingPruner, method
from compress.methods.registry import OneShotPruner, OneShotRequest, OneShotResult
from compress.models import build_model
from compress.recipe import Recipe
from compress.structured.engine import count_params

ROOT = Path(__file__).resolve().parent.parent
TRAINING = sorted(n for n, s in REGISTRY.items() if s.info.when == "training")
ONE_SHOT = sorted(n for n, s in REGISTRY.items() if s.info.when == "one-shot")
STEPS = 16
SECOND_ORDER = {"fisher_samples": 64, "max_block": 64, "heldout_samples": 64, "rmp_trials": 2}


@pytest.mark.parametrize("name", TRAINING)
def test_every_training_method_runs_through_the_declared_interface(name, fmnist_small):
    torch.manual_seed(0)
    model = build_model("lenet5", 10, (1, 28, 28))
    recipe = Recipe(model="lenet5", method=name, refresh_every=2, round_to=1,
                    probe_samples=64, density_start=0.1, density_every=0.3,
                    density_tolerance=1.0, density_cuts=1).validate()
    pruner = method(name, "training").build(model, recipe, STEPS)
    if REGISTRY[name].info.granularity == "none":
        assert pruner is None
        return
    assert isinstance(pruner, TrainingPruner)
    assert pruner.granularity == REGISTRY[name].info.granularity
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe = [x for x, _ in first_batches(fmnist_small.train, 64)] if pruner.needs_probe else []
    pruner.attach(optimizer, probe)
    batches = list(fmnist_small.train.batches(64))[:STEPS]
    for x, y in batches:
        optimizer.zero_grad()
        with pruner.pruned():
            F.cross_entropy(model(x), y).backward()
        optimizer.step()
        pruner.step()
    pruner.finalize()
    assert 0.0 < pruner.sparsity < 1.0
    if pruner.granularity == "channels":
        assert pruner.cutter is not None and pruner.cutter.structure is not None
    assert set(pruner.pruned_state_dict()) == set(model.state_dict())
    pruner.load_state_dict(pruner.state_dict())
    assert isinstance(pruner.summary(), dict)
    with torch.no_grad(), pruner.pruned():
        assert model(batches[0][0]).shape == (64, 10)


@pytest.mark.parametrize("name", ONE_SHOT)
def test_every_one_shot_method_prunes_through_the_registry(name, fmnist_small):
    torch.manual_seed(0)
    model = build_model("lenet5", 10, (1, 28, 28))
    spec = method(name, "one-shot")
    sparsity = None if name == "shrink" else 0.5  # shrink cuts what is already empty
    pruner = spec.build(OneShotRequest(sparsity=sparsity, round_to=1, input_shape=(1, 28, 28),
                                       second_order=SECOND_ORDER))
    assert isinstance(pruner, OneShotPruner)
    stages: list[str] = []
    pruner.progress = lambda stage, done, total: stages.append(stage)
    if name == "shrink":  # what unstructured pruning leaves: two empty filters
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        with torch.no_grad():
            conv.weight[:2] = 0
    params = count_params(model)
    pruner.check(model)
    result = pruner.prune(model, fmnist_small if spec.info.needs_data else None)
    assert isinstance(result, OneShotResult)
    if spec.info.granularity == "weights":
        assert mask_sparsity(result.masks) == pytest.approx(0.5, abs=0.01)
    else:
        assert count_params(model) < params
    if name in ("cbs", "cbs-s", "woodfisher"):
        assert "gradients" in stages  # a long method reports its stages
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_nothing_outside_the_methods_probes_a_pruner():
    """The pipeline calls only what TrainingPruner and OneShotPruner declare."""
    probes = []
    for path in [*(ROOT / "compress").rglob("*.py"), *(ROOT / "cli").rglob("*.py"),
                 *(ROOT / "export").rglob("*.py")]:
        if "methods" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("hasattr", "getattr") and node.args and \
                    "prun" in ast.unparse(node.args[0]):
                probes.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert probes == []


def test_a_method_defined_here_runs_from_the_command_line(cli, tmp_path):
    """Adding a method is its builder and its declaration: this one, defined in this test,
    trains through `compress train-prune` like the shipped ones."""
    from compress.catalog import CATALOG, MethodInfo
    from compress.methods.gmp import GMP
    from compress.methods.registry import register
    from compress.schedules import constant_schedule

    class HalfAtOnce(GMP):
        name = "toy-half"

    def build(model, recipe, total_steps):
        return HalfAtOnce(model, constant_schedule(0.5), refresh_every=1, freeze_step=0)

    register(MethodInfo("toy-half", "weights", "training", "half of the weights, at once",
                        __name__), build)
    try:
        result = cli("train-prune", "--method", "toy-half", "--epochs", "1", "--batch-size",
                     "64", "--max-train-samples", "300", "--max-test-samples", "100",
                     "--out", tmp_path / "run", "--json", "--quiet")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["sparsity"] == pytest.approx(0.5, abs=0.01)
    finally:
        CATALOG.pop("toy-half")
        REGISTRY.pop("toy-half")
