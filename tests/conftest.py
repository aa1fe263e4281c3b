"""Shared fixtures: small slices of real Fashion-MNIST and one short real run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.app import app  # sets ORT_DISABLE_TELEMETRY before any test loads onnxruntime
from compress.data import DataConfig, load_splits
from compress.pipeline import train_prune
from compress.recipe import Recipe

SMALL = dict(max_train_samples=1200, max_test_samples=300)
# One thread count for the whole session, fixtures and subprocesses included: figures are
# reproducible, and the suite does not oversubscribe the cores beside another torch job.
THREADS = int(os.environ.get("COMPRESS_TEST_THREADS", "2"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _pinned_threads():
    torch.set_num_threads(THREADS)  # a command's --threads may have changed it


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


HOSTILE_MEMORY_GB = 6  # address space a reader may take on a hostile file (torch maps ~3)


def _cap_memory() -> None:
    import resource

    limit = HOSTILE_MEMORY_GB * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.fixture
def run_capped(tmp_path):
    """Run the real ``compress`` console script in a subprocess under an address-space cap
    and a timeout, with its working directory, HOME and TMPDIR in ``tmp_path`` (so whatever
    it writes stays there); returns the CompletedProcess."""
    import subprocess
    import sys

    script = Path(sys.executable).with_name("compress")

    def run(*args: str, timeout: float = 120, env: dict | None = None):
        scratch = tmp_path / "tmp"
        scratch.mkdir(exist_ok=True)
        environment = {**os.environ, "HOME": str(tmp_path), "TMPDIR": str(scratch),
                       "OPENBLAS_NUM_THREADS": "1", **(env or {})}
        return subprocess.run([str(script), *map(str, args)], cwd=tmp_path, env=environment,
                              capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_cap_memory)

    return run

