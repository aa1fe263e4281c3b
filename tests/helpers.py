"""Helpers several test modules share (the fixtures are in conftest.py)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from compress.datafiles import read_split


def assert_clean_failure(result, *fragments: str) -> None:
    """A command line refusal: exit 2, one ``error:`` line, no traceback, each fragment said."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "error:" in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def stop_after_first(result) -> None:
    """An on_epoch callback that interrupts a run after its first epoch, as Ctrl-C would."""
    if result.epoch == 1:
        raise KeyboardInterrupt


CLASSES = ("t-shirt", "trouser", "pullover")


def write_tree(root: Path, splits=("train", "test"), per_class: int = 8,
               classes=CLASSES) -> Path:
    """``per_class`` Fashion-MNIST images of each class in ``classes``, as 28x28 PNG files."""
    images, labels = read_split("fashion-mnist", None, "train")
    for s, split in enumerate(splits):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            chosen = np.flatnonzero(labels == CLASSES.index(name))[s * per_class:]
            for i, index in enumerate(chosen[:per_class]):
                Image.fromarray(images[index, 0]).save(folder / f"{i}.png")
    return root


def sleep_into_second_epoch(run: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``process`` has finished its first epoch in ``run``, then a little into
    the second (not so far that a first epoch slowed by other work on the machine lets the
    epochs that remain finish first)."""
    deadline, epochs = time.monotonic() + timeout, []
    while not epochs and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        if (run / "checkpoint.pt").exists():
            epochs = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().split(
                "\n")[:-1]) if e["event"] == "epoch"]
    time.sleep(min(0.4 * epochs[0]["seconds"], 1.0) if epochs else 0.0)
