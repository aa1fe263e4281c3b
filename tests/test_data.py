"""Data readers on real Fashion-MNIST and on small files laid out as the real sets are."""

import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from compress.data import DataConfig, load_splits
from compress.errors import CompressError


def test_fashion_mnist_from_debian_package():
    splits = load_splits(DataConfig())
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    assert splits.config.input_shape == (1, 28, 28) and splits.config.num_classes == 10
    x, y = next(splits.train.batches(256, shuffle=True, generator=torch.Generator()))
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.2 and 0.7 < float(x.std()) < 1.3
    assert set(y.tolist()) <= set(range(10))


def test_validation_split_is_fixed_and_disjoint(fmnist_small):
    again = load_splits(DataConfig(max_train_samples=1200, max_test_samples=300))
    assert torch.equal(again.val.images, fmnist_small.val.images)
    train_rows = {bytes(img.numpy()) for img in fmnist_small.train.images}
    assert not any(bytes(img.numpy()) in train_rows for img in fmnist_small.val.images[:50])


def write_idx(path, array: np.ndarray, compress: bool):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_from_torchvision_layout(tmp_path, compress):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 100), ("t10k", 40)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)), compress)
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), compress)
    splits = load_splits(DataConfig(name="mnist", data_dir=str(tmp_path)))
    assert len(splits.train) + len(splits.val) == 100 and len(splits.test) == 40


def test_truncated_idx_file(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((10, 28, 28)), False)
    data = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data[:500])
    with pytest.raises(CompressError, match="truncated"):
        load_splits(DataConfig(name="mnist", data_dir=str(tmp_path)))


def test_cifar10_from_torchvision_layout(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (20, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, 20).tolist()}, f)
    splits = load_splits(DataConfig(name="cifar10", data_dir=str(tmp_path)))
    assert splits.config.input_shape == (3, 32, 32) and len(splits.test) == 20
    assert splits.train.augment and not splits.val.augment
    x, _ = next(splits.train.batches(8, shuffle=True, generator=torch.Generator()))
    assert x.shape == (8, 3, 32, 32)


def test_cifar100_from_torchvision_layout(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        with open(root / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (30, 3072), dtype=np.uint8),
                         "fine_labels": rng.integers(0, 100, 30).tolist()}, f)
    splits = load_splits(DataConfig(name="cifar100", data_dir=str(tmp_path)))
    assert splits.config.num_classes == 100


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(6):
                pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    splits = load_splits(DataConfig(name="imagefolder", data_dir=str(tmp_path),
                                    input_shape=(3, 16, 16), val_fraction=0.25))
    assert splits.config.num_classes == 2 and len(splits.test) == 12
    x, y = next(splits.train.batches(4))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64


def test_synthetic_shape_and_classes():
    splits = load_splits(DataConfig(name="synthetic", input_shape=(3, 8, 8), num_classes=5))
    x, y = next(splits.train.batches(64))
    assert x.shape == (64, 3, 8, 8) and int(y.max()) < 5
    assert len(set(y.tolist())) > 1


@pytest.mark.parametrize("config, message", [
    (DataConfig(name="imagenet"), "unknown data set"),
    (DataConfig(name="mnist", data_dir="/nonexistent/dir"), "does not exist"),
    (DataConfig(name="cifar10"), "needs --data-dir"),
    (DataConfig(name="mnist"), "needs --data-dir"),
    (DataConfig(name="fashion-mnist", data_dir="/tmp"), "not found"),
    (DataConfig(max_train_samples=1), "none for training"),
])
def test_bad_data_choices(config, message):
    with pytest.raises(CompressError, match=message):
        load_splits(config)
