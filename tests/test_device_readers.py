"""On a device only onnxruntime, onnx and numpy are installed: every reader of an exported
file runs there, and scores it exactly as the torch side does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from compress.data import DataConfig, load_splits
from compress.datafiles import channel_stats, held_out_batches, normalised_batches, read_split
from export.runtime.evaluation import scoring_batch_size

sys.path.insert(0, str(Path(__file__).parent))
from isolation import CLI_WITHOUT_TORCH, run_without  # noqa: E402


def test_evaluate_scores_an_export_without_torch(dpf_run, tmp_path, cli):
    exported = tmp_path / "dpf.onnx"
    assert cli("export", dpf_run, "--onnx", exported, "--no-verify").exit_code == 0
    in_torch = json.loads(cli("evaluate", dpf_run, "--json").output)
    for command in (["evaluate", str(exported), "--json"], ["inspect", str(exported), "--json"]):
        body = f"sys.argv[1:] = {command!r}\n" + CLI_WITHOUT_TORCH
        proc = run_without(("torch", "torchvision"), body)
        assert proc.returncode == 0, proc.stderr[-2000:]
    on_device = json.loads(run_without(("torch", "torchvision"), (
        f"sys.argv[1:] = {['evaluate', str(exported), '--json']!r}\n" + CLI_WITHOUT_TORCH)
    ).stdout)
    assert on_device["samples"] == in_torch["samples"] == 300
    assert on_device["top1"] == in_torch["top1"]


def test_numpy_arrays_are_the_training_splits_images():
    """The arrays evaluation reads are the ones training batches come from, normalised alike."""
    config = DataConfig(name="synthetic", input_shape=(3, 8, 8), num_classes=5,
                        max_train_samples=200, max_test_samples=70)
    splits = load_splits(config)
    images, labels = read_split("synthetic", None, "test", (3, 8, 8), 5, 70)
    assert np.array_equal(images, splits.test.images.numpy())
    assert np.array_equal(labels, splits.test.labels.numpy())
    train = read_split("synthetic", None, "train", (3, 8, 8), 5, 200)[0]
    mean, std = channel_stats(train)
    assert np.allclose(mean, config.mean, atol=1e-6) and np.allclose(std, config.std, atol=1e-6)


def test_synthetic_classes_are_drawn_in_blocks_alike():
    """Any split can be drawn alone, and more classes than one block still label evenly."""
    first = read_split("synthetic", None, "test", (1, 4, 4), 200, 100)
    again = read_split("synthetic", None, "test", (1, 4, 4), 200, 100)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert first[1].max() >= 64 and len(np.unique(first[1])) > 40


def test_synthetic_test_split_is_scored_a_batch_at_a_time_as_drawn_whole():
    """Scoring draws a synthetic test split block by block; the batches it yields are the
    whole split's, normalised alike, whatever the batch size against the block."""
    shape, mean, std = (3, 5, 5), [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    images, labels = read_split("synthetic", None, "test", shape, 7, 150)
    for batch_size in (1, 7, 64, 100, 512):
        count, batches = held_out_batches("synthetic", None, shape, 7, 150, mean, std, batch_size)
        got = list(batches)
        assert count == 150 and all(len(y) <= batch_size for _, y in got)
        assert np.array_equal(np.concatenate([y for _, y in got]), labels)
        whole = np.concatenate(list(x for x, _ in normalised_batches(images, labels, mean, std,
                                                                       150)))
        assert np.array_equal(np.concatenate([x for x, _ in got]), whole)


def test_default_scoring_batch_holds_about_a_mebibyte_of_input():
    assert scoring_batch_size((1, 28, 28)) == 334
    assert scoring_batch_size((3, 32, 32)) == 85
    assert scoring_batch_size((3, 224, 224)) == 1
    assert scoring_batch_size((1, 2, 2)) == 512
