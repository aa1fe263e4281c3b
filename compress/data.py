"""Data sets as train / validation / test splits.

Validation is carved from the training set with a fixed split seed, so every decision the
tool makes (early choices, best-iteration picks) uses it; the test split is touched only
for final figures.

Small image sets (MNIST, Fashion-MNIST, CIFAR, synthetic) are held in memory as uint8 and
batched by slicing, which is several times faster than a per-item ``DataLoader`` on two
cores. ImageFolder trees go through torchvision's ``ImageFolder`` and a ``DataLoader``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.dataconfig import DATASETS, DataConfig
from compress.datafiles import FASHION_MNIST_SYSTEM_DIR, read_split
from compress.errors import CompressError
from compress.image_folders import (
    LAYOUT,
    BadImages,
    FolderLoader,
    default_workers,
    folder_sets,
)

Batch = tuple[torch.Tensor, torch.Tensor]
Shard = tuple[int, int]  # (rank, world) of a torchrun process


def shard_order(order: torch.Tensor, shard: Shard | None, pad: bool) -> torch.Tensor:
    """This process's interleaved slice of ``order``. With ``pad`` the order is first
    extended by its own start so every process gets as many items (and takes as many
    steps); evaluation does not pad, so no image is counted twice."""
    if shard is None or shard[1] == 1:
        return order
    rank, world = shard
    if pad:
        order = torch.cat([order, order[: (-len(order)) % world]])
    return order[rank::world]


def sharded_batches(length: int, batch_size: int, world: int = 1) -> int:
    """Steps per epoch for each of ``world`` processes (training pads, see shard_order)."""
    return math.ceil(math.ceil(length / world) / batch_size)


class TensorSplit:
    """Images kept as uint8 ``(N, C, H, W)``, normalised per batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: list[float],
                 std: list[float], augment: bool = False) -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor, augment: bool | None = None) -> TensorSplit:
        split = TensorSplit(self.images[index], self.labels[index], [], [],
                            self.augment if augment is None else augment)
        split.mean, split.std = self.mean, self.std
        return split

    def _prepare(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = images.float().div_(255.0)
        if self.augment and generator is not None:
            x = _random_crop_flip(x, generator)
        return (x - self.mean) / self.std

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None,
                shard: Shard | None = None) -> Iterator[Batch]:
        order = (torch.randperm(len(self), generator=generator) if shuffle
                 else torch.arange(len(self)))
        order = shard_order(order, shard, pad=shuffle)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield self._prepare(self.images[idx], generator if shuffle else None), self.labels[idx]

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        return sharded_batches(len(self), batch_size, world)


def _random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation: pad-4 random crop and horizontal flip."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


class FolderSplit:
    """Images of an image-folder tree (`compress.image_folders`), batched by a
    ``DataLoader``; augmented only in a shuffled (training) pass of an augmenting split."""

    def __init__(self, plain: FolderLoader, augmented: FolderLoader | None, bad: BadImages,
                 indices: list[int] | None = None) -> None:
        self.plain, self.augmented, self.bad = plain, augmented, bad
        self.indices = list(range(len(plain.dataset))) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, index: torch.Tensor, augment: bool | None = None) -> FolderSplit:
        augmented = None if augment is False else self.augmented
        return FolderSplit(self.plain, augmented, self.bad,
                           [self.indices[i] for i in index.tolist()])

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None,
                shard: Shard | None = None) -> Iterator[Batch]:
        order = (torch.randperm(len(self), generator=generator) if shuffle
                 else torch.arange(len(self)))
        order = shard_order(order, shard, pad=shuffle)
        loader = self.augmented if shuffle and self.augmented is not None else self.plain
        yield from loader.batches([self.indices[i] for i in order.tolist()], batch_size,
                                  self.bad)

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        return sharded_batches(len(self), batch_size, world)


def first_batches(split, samples: int, batch_size: int = 256) -> list[Batch]:
    """The first ``samples`` images of ``split`` (fixed order, unaugmented) in batches."""
    batches, seen = [], 0
    if samples < 1:
        return batches
    for x, y in split.batches(batch_size):
        batches.append((x[:samples - seen], y[:samples - seen]))
        seen += len(batches[-1][1])
        if seen >= samples:
            break
    return batches


@dataclass
class Splits:
    train: TensorSplit | FolderSplit
    val: TensorSplit | FolderSplit
    test: TensorSplit | FolderSplit
    config: DataConfig

    def skipped_images(self) -> int:
        """Images left out as unreadable so far (``--skip-bad-images``)."""
        folders = [s for s in (self.train, self.val, self.test) if isinstance(s, FolderSplit)]
        return len(set().union(*(s.bad.paths for s in folders)))


# -- readers --------------------------------------------------------------------------------
def _tensor_sets(config: DataConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train and test images and labels of an in-memory data set, as torch tensors."""
    samples = {"train": config.max_train_samples, "test": config.max_test_samples}
    out = {}
    for split in ("train", "test"):
        images, labels = read_split(config.name, config.data_dir, split,
                                    tuple(config.input_shape), config.num_classes,
                                    samples[split])
        out[split] = torch.from_numpy(images.copy()), torch.from_numpy(labels)
    return out


def _image_folder(config: DataConfig) -> Splits:
    if not config.data_dir:
        raise CompressError(f"imagefolder needs --data-dir holding {LAYOUT}")
    if config.input_shape[0] not in (1, 3):
        raise CompressError(f"imagefolder: images have 1 or 3 channels, not "
                            f"{config.input_shape[0]} (--input-shape)")
    workers = default_workers() if config.workers is None else config.workers
    bad = BadImages(skip=config.skip_bad_images)
    augment = config.augment is not False
    sets = folder_sets(Path(config.data_dir), tuple(config.input_shape), augment, workers, bad,
                       config.mean, config.std)
    config.num_classes = len(sets.classes)
    config.mean, config.std = sets.mean, sets.std
    train = FolderSplit(FolderLoader(sets.train_plain, workers),
                        FolderLoader(sets.train, workers) if augment else None, bad)
    test = FolderSplit(FolderLoader(sets.test, workers), None, bad)
    if sets.val is None:
        return _split(train, test, config)
    val = FolderSplit(FolderLoader(sets.val, workers), None, bad)
    return _split(train, test, config, val)


def _split(train, test, config: DataConfig, val=None) -> Splits:
    """Validation carved from train (``val_fraction``), unless a validation split is given."""
    g = torch.Generator().manual_seed(config.split_seed)
    order = torch.randperm(len(train), generator=g)
    if config.max_train_samples:
        order = order[:config.max_train_samples]
    if val is not None:
        return Splits(train.subset(order), val, _test_slice(test, config), config)
    n_val = max(1, int(round(config.val_fraction * len(order))))
    if len(order) - n_val < 1:
        raise CompressError(f"{config.name}: {len(order)} training images leave none for "
                            "training after the validation split; use more samples")
    val, train_part = train.subset(order[:n_val], augment=False), train.subset(order[n_val:])
    return Splits(train_part, val, _test_slice(test, config), config)


def _test_slice(test, config: DataConfig):
    if config.max_test_samples and config.max_test_samples < len(test):
        return test.subset(torch.arange(config.max_test_samples))
    return test


def _channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images[:10000].float() / 255.0
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()


def missing_data_dir(name: str, data_dir: str) -> str:
    """What to do when a data directory (given, or recorded in a run) is gone."""
    default = FASHION_MNIST_SYSTEM_DIR if name == "fashion-mnist" else None
    where = f" (its usual place, {default}, holds it: --data-dir {default})" \
        if default is not None and default.is_dir() else ""
    return (f"data directory {data_dir} does not exist; pass --data-dir with the folder that "
            f"now holds {name}{where}")


def load_splits(config: DataConfig) -> Splits:
    """Read ``config.name`` and split it; raises `CompressError` with a fix on failure."""
    if config.name not in DATASETS:
        raise CompressError(f"unknown data set {config.name!r}: use one of {', '.join(DATASETS)}")
    if config.data_dir and not Path(config.data_dir).is_dir():
        raise CompressError(missing_data_dir(config.name, config.data_dir))
    if not 0.0 < config.val_fraction < 1.0:
        raise CompressError(f"validation fraction must be in (0, 1), got {config.val_fraction}")
    if config.name == "imagefolder":
        return _image_folder(config)
    if config.name != "synthetic":
        config.num_classes = 100 if config.name == "cifar100" else 10
    raw = _tensor_sets(config)
    train_x, train_y = raw["train"]
    config.input_shape = tuple(int(d) for d in train_x.shape[1:])
    augment = config.augment if config.augment is not None else config.name.startswith("cifar")
    mean, std = _channel_stats(train_x)
    config.mean, config.std = mean, std
    train = TensorSplit(train_x, train_y, mean, std, augment)
    test = TensorSplit(*raw["test"], mean, std, augment=False)
    return _split(train, test, config)
