"""Image folders as practitioners lay them out: real Fashion-MNIST images written as PNG
files in class folders, read through the loader a training run uses."""

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import CLASSES, assert_clean_failure, write_tree

from compress.data import load_splits
from compress.dataconfig import DataConfig
from compress.errors import CompressError


def config(root: Path, **changes) -> DataConfig:
    return DataConfig(**{"name": "imagefolder", "data_dir": str(root),
                         "input_shape": (1, 24, 24), "workers": 0, **changes})


def test_a_val_folder_is_the_validation_split_and_images_are_normalised(tmp_path):
    root = write_tree(tmp_path, ("train", "val", "test"))
    splits = load_splits(config(root))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 24, 24)
    assert splits.config.num_classes == 3
    x = torch.cat([x for x, _ in splits.train.batches(64)])
    assert x.shape == (24, 1, 24, 24)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # measured stats


def test_without_a_val_folder_validation_is_a_share_of_train(tmp_path):
    splits = load_splits(config(write_tree(tmp_path), val_fraction=0.25))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 24)


def test_training_passes_are_augmented_evaluation_is_not(tmp_path):
    splits = load_splits(config(write_tree(tmp_path)))
    plain = [x for x, _ in splits.val.batches(8)]
    assert all(torch.equal(a, b) for a, b in zip(plain, [x for x, _ in splits.val.batches(8)],
                                                  strict=True))
    generator = torch.Generator().manual_seed(0)
    shuffled = torch.cat([x for x, _ in splits.train.batches(64, True, generator)])
    ordered = torch.cat([x for x, _ in splits.train.batches(64)])
    assert not torch.allclose(shuffled.sort(0).values, ordered.sort(0).values)
    off = load_splits(config(tmp_path, augment=False))
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(off.train), generator=generator)
    again = torch.cat([x for x, _ in off.train.batches(64, True,
                                                      torch.Generator().manual_seed(0))])
    assert torch.equal(again, torch.cat([x for x, _ in off.train.batches(64)])[order])


def test_workers_give_the_same_batches(tmp_path):
    root = write_tree(tmp_path)
    alone = [x for x, _ in load_splits(config(root)).test.batches(10)]
    helped = [x for x, _ in load_splits(config(root, workers=2)).test.batches(10)]
    assert all(torch.equal(a, b) for a, b in zip(alone, helped, strict=True))


def test_an_unreadable_image_is_named_or_skipped_and_counted(tmp_path):
    root = write_tree(tmp_path)
    bad = root / "train" / "trouser" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(CompressError) as refused:
        list(load_splits(config(root)).train.batches(64))
    assert str(bad) in str(refused.value) and "--skip-bad-images" in str(refused.value)
    splits = load_splits(config(root, skip_bad_images=True))
    seen = sum(len(y) for _, y in splits.train.batches(64))
    assert seen == len(splits.train) - 1 and splits.skipped_images() == 1


@pytest.mark.parametrize("build, fragment", [
    (lambda root: (root / "train").mkdir(), "has no test/ (or val/) folder"),
    (lambda root: write_tree(root, ("test",)), "has no train/ folder"),
    (lambda root: [write_tree(root, ("train",)), write_tree(root, ("test",), classes=CLASSES[:2])],
     "the classes of"),
    (lambda root: [write_tree(root, ("train",)), (root / "test").mkdir()],
     "Couldn't find any class folder"),
])
def test_a_wrong_tree_is_one_line(tmp_path, build, fragment):
    build(tmp_path)
    with pytest.raises(CompressError, match=re.escape(fragment)) as refused:
        load_splits(config(tmp_path))
    assert "\n" not in str(refused.value)


def test_train_prune_evaluate_and_prune_read_an_image_folder(cli, tmp_path):
    root = write_tree(tmp_path / "images")
    (root / "train" / "pullover" / "broken.png").write_bytes(b"\x89PNG broken")
    run = tmp_path / "run"
    trained = cli("train-prune", "--data", "imagefolder", "--data-dir", root, "--model",
                  "lenet5", "--image-size", "28", "--workers", "0", "--skip-bad-images",
                  "--epochs", "1", "--batch-size", "8", "--threads", "1", "--json",
                  "--out", run)
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout)
    assert summary["skipped_images"] == 1 and summary["test_samples"] == 24
    recorded = torch.load(run / "checkpoint.pt", weights_only=True)["data"]
    assert recorded["input_shape"] == [1, 28, 28] and len(recorded["mean"]) == 1
    pruned = cli("prune", run, "--sparsity", "0.95", "--out", tmp_path / "pruned", "--json")
    assert pruned.exit_code == 0, pruned.output
    refused = cli("train-prune", "--data", "imagefolder", "--data-dir", root, "--model",
                  "lenet5", "--workers", "0", "--epochs", "1", "--out", tmp_path / "strict")
    assert_clean_failure(refused, "cannot read image", "broken.png", "--skip-bad-images")
