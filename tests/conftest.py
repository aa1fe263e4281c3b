"""Shared fixtures: small slices of real Fashion-MNIST and one short real run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from compress.data import DataConfig, load_splits
from compress.pipeline import train_prune
from compress.recipe import Recipe

SMALL = dict(max_train_samples=1200, max_test_samples=300)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fmnist_small():
    return load_splits(DataConfig(**SMALL))


@pytest.fixture(scope="session")
def dpf_run(tmp_path_factory) -> Path:
    """A short real DPF run of LeNet-5 on a Fashion-MNIST slice."""
    out = tmp_path_factory.mktemp("runs") / "dpf"
    recipe = Recipe(model="lenet5", method="dpf", sparsity=0.8, epochs=2, batch_size=64,
                    refresh_every=4, **SMALL).validate()
    train_prune(recipe, str(out), show_progress=False)
    return out


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke
