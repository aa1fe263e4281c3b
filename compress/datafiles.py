"""Data set files read into numpy arrays, without torch.

`compress.data` builds its training splits from these arrays; `compress evaluate` on an
exported model uses them directly, so that scoring a file on a device needs onnxruntime and
numpy only (importing torch alone takes about 0.9 GB of memory here). Images are uint8
``(N, C, H, W)``, labels int64. Every reader bounds what it reads before reading it.
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from compress.errors import CompressError, first_line
from compress.fileio import regular_file_size
from compress.safe_pickle import load_cifar_batch

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ARRAY_DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic")
MAX_SYNTHETIC_MB = 4096  # what drawing one synthetic split may take
MAX_IDX_MB = 2048  # Fashion-MNIST's training images take 45 MiB
SYNTHETIC_SEED = 1234
SYNTHETIC_BLOCK = 64  # samples or classes drawn at a time: memory stays small for any shape
SYNTHETIC_FEATURES = 4096  # inputs the labelling projection weighs apart (`_pooled`)
DEFAULT_SAMPLES = {"train": 2048, "test": 512}  # synthetic split sizes when not sliced
Arrays = tuple[np.ndarray, np.ndarray]  # images (N, C, H, W) uint8, labels (N,) int64


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes; reads no more than its header declares (a gzip bomb
    stops there), and refuses a declared size past ``MAX_IDX_MB``."""
    regular_file_size(path, MAX_IDX_MB, "an IDX file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 8:
                raise CompressError(f"{path} is not an IDX file of unsigned bytes")
            dims = [int.from_bytes(f.read(4), "big") for _ in range(head[3])]
            count = math.prod(dims)
            if count > MAX_IDX_MB * 2**20:
                raise CompressError(f"{path} declares {count:,} bytes of data, more than an "
                                    f"IDX data set may hold here ({MAX_IDX_MB:,} MiB)")
            raw = f.read(count)
    except (OSError, EOFError, zlib.error) as exc:
        raise CompressError(f"cannot read {path}: {first_line(exc)}") from None
    if len(raw) != count:
        raise CompressError(f"{path} is truncated ({len(raw)} of {count} bytes)")
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims)


def find_idx_dir(name: str, data_dir: str | None) -> Path:
    folder = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[name]
    candidates: list[Path] = []
    if data_dir:
        root = Path(data_dir)
        candidates += [root, root / folder / "raw", root / name]
    elif name == "fashion-mnist":
        candidates.append(FASHION_MNIST_SYSTEM_DIR)
    for c in candidates:
        stem = IDX_FILES["train"][0]
        if (c / stem).exists() or (c / f"{stem}.gz").exists():
            return c
    if not candidates:
        raise CompressError(f"{name} needs --data-dir (IDX files, or torchvision's layout)")
    where = ", ".join(str(c) for c in candidates)
    hint = (" (install Debian's dataset-fashion-mnist or pass --data-dir)"
            if name == "fashion-mnist" else "")
    raise CompressError(f"{name} IDX files not found in {where}{hint}")


def idx_split(name: str, data_dir: str | None, split: str) -> Arrays:
    root = find_idx_dir(name, data_dir)

    def load(stem: str) -> np.ndarray:
        return read_idx(root / stem if (root / stem).exists() else root / f"{stem}.gz")

    images, labels = (load(stem) for stem in IDX_FILES[split])
    if len(images) != len(labels):
        raise CompressError(f"{name} {split}: {len(images)} images but {len(labels)} labels")
    return images[:, None], labels.astype(np.int64)


def cifar_split(name: str, data_dir: str | None, split: str) -> Arrays:
    if not data_dir:
        raise CompressError(f"{name} needs --data-dir (torchvision's on-disk layout)")
    ten = name == "cifar10"
    root = Path(data_dir) / ("cifar-10-batches-py" if ten else "cifar-100-python")
    if not root.is_dir():
        raise CompressError(f"{name}: {root} not found (torchvision's on-disk layout expected)")
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"],
             "test": ["test_batch"] if ten else ["test"]}[split]
    data, labels = [], []
    for file_name in names:
        images, batch_labels = _cifar_batch(root / file_name, "labels" if ten else
                                            "fine_labels", name)
        data.append(images)
        labels += batch_labels
    return np.concatenate(data), np.asarray(labels, dtype=np.int64)


def _cifar_batch(path: Path, label_key: str, name: str) -> tuple[np.ndarray, list[int]]:
    entry = load_cifar_batch(path)
    try:
        images = entry["data"]
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.size % 3072:
            raise ValueError("its data are not uint8 images of 3x32x32")
        labels = entry[label_key]
        if not isinstance(labels, list) or len(labels) * 3072 != images.size or \
                not all(type(v) is int for v in labels):
            raise ValueError("its labels are not one integer per image")
    except KeyError as exc:
        raise CompressError(f"{name}: {path} is not a CIFAR batch: it has no "
                            f"{exc.args[0]!r}") from None
    except ValueError as exc:
        raise CompressError(f"{name}: {path} is not a CIFAR batch: {first_line(exc)}") from None
    return images.reshape(-1, 3, 32, 32), labels


def synthetic_split(input_shape: tuple[int, int, int], num_classes: int, samples: int,
                    split: str) -> Arrays:
    """Gaussian inputs labelled by a fixed random linear map: learnable, not trivial.

    The whole split, from `synthetic_blocks`; refused past ``MAX_SYNTHETIC_MB``.
    """
    c, h, w = input_shape
    needed = c * h * w * samples + 2**21  # the images, and a row of floats per draw
    if needed > MAX_SYNTHETIC_MB * 2**20:
        raise CompressError(f"synthetic data of shape {c}x{h}x{w} with {samples:,} samples "
                            f"needs {needed / 2**30:,.1f} GiB, past the "
                            f"{MAX_SYNTHETIC_MB // 1024} GiB limit; ask for fewer samples or "
                            "a smaller shape")
    images = np.empty((samples, c, h, w), dtype=np.uint8)
    labels = np.empty(samples, dtype=np.int64)
    start = 0
    for block_images, block_labels in synthetic_blocks(input_shape, num_classes, samples, split):
        images[start:start + len(block_labels)] = block_images
        labels[start:start + len(block_labels)] = block_labels
        start += len(block_labels)
    return images, labels


def synthetic_blocks(input_shape: tuple[int, int, int], num_classes: int, samples: int,
                     split: str) -> Iterator[Arrays]:
    """The synthetic split in order, about a mebibyte of float32 draws at a time.

    Every ``SYNTHETIC_BLOCK`` samples come from a seeded stream of their own, so any split,
    or any part of one, is drawn alone. A stream gives the same numbers however its draws are
    cut, so a block too large to draw at once is drawn twice: first for its labels (a product
    over the whole block), then a piece at a time for its images. A reader that scores the
    pieces as they come (`held_out_batches`) holds about a mebibyte of the split."""
    c, h, w = input_shape
    features = c * h * w
    rows_per_draw = max(1, 2**20 // (4 * features))
    split_id = {"train": 0, "test": 1}[split]
    for start in range(0, samples, SYNTHETIC_BLOCK):
        seed = [SYNTHETIC_SEED, split_id, start // SYNTHETIC_BLOCK]
        count = min(SYNTHETIC_BLOCK, samples - start)
        if rows_per_draw >= count:
            x = np.random.default_rng(seed).standard_normal((count, features), dtype=np.float32)
            labels = _synthetic_labels(_pooled(x), num_classes)
            yield _synthetic_images(x, input_shape), labels
            continue
        rng = np.random.default_rng(seed)
        labels = _synthetic_labels(np.concatenate([
            _pooled(rng.standard_normal((min(rows_per_draw, count - row), features),
                                        dtype=np.float32))
            for row in range(0, count, rows_per_draw)]), num_classes)
        rng = np.random.default_rng(seed)
        for row in range(0, count, rows_per_draw):
            x = rng.standard_normal((min(rows_per_draw, count - row), features),
                                    dtype=np.float32)
            yield _synthetic_images(x, input_shape), labels[row:row + len(x)]


def _synthetic_images(x: np.ndarray, input_shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 images from standard normal draws (overwritten: computed in place, as
    ``x * 40 + 128`` would compute it, with no float copy)."""
    x *= 40
    x += 128
    return np.clip(x, 0, 255, out=x).astype(np.uint8).reshape(-1, *input_shape)


def _pooled(x: np.ndarray) -> np.ndarray:
    """``x`` with runs of consecutive features summed into at most ``SYNTHETIC_FEATURES``
    (a copy of it when it has no more): labels are a random linear map of the input whose
    projection stays small at any image size (at 3x224x224, 37 pixels share a weight)."""
    if x.shape[1] <= SYNTHETIC_FEATURES:
        return x.copy()
    run = -(-x.shape[1] // SYNTHETIC_FEATURES)
    return np.add.reduceat(x, np.arange(0, x.shape[1], run), axis=1)


def _synthetic_labels(x: np.ndarray, num_classes: int) -> np.ndarray:
    """argmax over classes of ``x @ projection``, the projection drawn a block of classes at
    a time (the same blocks for every split)."""
    best = np.full(len(x), -np.inf, dtype=np.float32)
    labels = np.zeros(len(x), dtype=np.int64)
    for first in range(0, num_classes, SYNTHETIC_BLOCK):
        count = min(SYNTHETIC_BLOCK, num_classes - first)
        rng = np.random.default_rng([SYNTHETIC_SEED, 2, first // SYNTHETIC_BLOCK])
        scores = x @ rng.standard_normal((x.shape[1], count), dtype=np.float32)
        top = scores.argmax(1)
        better = scores[np.arange(len(x)), top] > best
        best[better] = scores[np.arange(len(x)), top][better]
        labels[better] = first + top[better]
    return labels


def read_split(name: str, data_dir: str | None, split: str,
               input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10,
               samples: int | None = None) -> Arrays:
    """One split of an in-memory data set (``samples``: how many a synthetic split draws)."""
    if name not in ARRAY_DATASETS:
        raise CompressError(f"{name} is not read as arrays (use one of "
                            f"{', '.join(ARRAY_DATASETS)})")
    if name == "synthetic":
        return synthetic_split(input_shape, num_classes, samples or DEFAULT_SAMPLES[split],
                               split)
    if name.startswith("cifar"):
        return cifar_split(name, data_dir, split)
    return idx_split(name, data_dir, split)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (unbiased) of the first 10,000 images, scaled
    to [0, 1]: the normalisation a model trained on them expects."""
    x = images[:10000].astype(np.float32) / np.float32(255.0)
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    std = np.maximum(x.std(axis=(0, 2, 3), ddof=1, dtype=np.float64), 1e-6)
    return mean.astype(np.float32).tolist(), std.astype(np.float32).tolist()


def normalised(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 images scaled to [0, 1] and normalised: the same arithmetic, in float32, as the
    training splits use."""
    shift = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    scale = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (images.astype(np.float32) / np.float32(255.0) - shift) / scale


def normalised_batches(images: np.ndarray, labels: np.ndarray, mean: list[float],
                       std: list[float], batch_size: int) -> Iterator[Arrays]:
    """(normalised float32 images, labels) in order, a batch at a time."""
    for start in range(0, len(labels), batch_size):
        yield (normalised(images[start:start + batch_size], mean, std),
               labels[start:start + batch_size])


def rebatched(blocks: Iterable[Arrays], batch_size: int) -> Iterator[Arrays]:
    """(images, labels) blocks of any sizes regrouped into batches of ``batch_size`` (the
    last may be short), in order; holds at most one batch and one block."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    held = 0
    for block_images, block_labels in blocks:
        start = 0
        while start < len(block_labels):
            take = min(batch_size - held, len(block_labels) - start)
            images.append(block_images[start:start + take])
            labels.append(block_labels[start:start + take])
            held, start = held + take, start + take
            if held == batch_size:
                yield np.concatenate(images), np.concatenate(labels)
                images, labels, held = [], [], 0
    if held:
        yield np.concatenate(images), np.concatenate(labels)


def held_out_batches(name: str, data_dir: str | None, input_shape: tuple[int, int, int],
                 num_classes: int, samples: int | None, mean: list[float], std: list[float],
                 batch_size: int) -> tuple[int, Iterator[Arrays]]:
    """(how many test images, their normalised batches). A synthetic test split is drawn a
    block at a time as it is scored, so scoring holds one batch of it, never the split;
    files are read whole (the largest, CIFAR's, is 30 MB)."""
    if name == "synthetic":
        count = samples or DEFAULT_SAMPLES["test"]
        blocks = synthetic_blocks(input_shape, num_classes, count, "test")
        return count, ((normalised(x, mean, std), y) for x, y in rebatched(blocks, batch_size))
    images, labels = read_split(name, data_dir, "test", input_shape, num_classes, samples)
    if samples:
        images, labels = images[:samples], labels[:samples]
    return len(labels), normalised_batches(images, labels, mean, std, batch_size)
