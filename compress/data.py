"""Data sets as train / validation / test splits.

Validation is carved from the training set with a fixed split seed, so every decision the
tool makes (early choices, best-iteration picks) uses it; the test split is touched only
for final figures.

Small image sets (MNIST, Fashion-MNIST, CIFAR, synthetic) are held in memory as uint8 and
batched by slicing, which is several times faster than a per-item ``DataLoader`` on two
cores. ImageFolder trees go through torchvision's ``ImageFolder`` and a ``DataLoader``.
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from compress.errors import CompressError, first_line
from compress.fileio import regular_file_size
from compress.safe_pickle import load_cifar_batch

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class DataConfig:
    """Everything needed to rebuild the same splits later (saved in each checkpoint)."""

    name: str = "fashion-mnist"
    data_dir: str | None = None
    input_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    val_fraction: float = 0.1
    split_seed: int = 0
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    augment: bool | None = None
    # per-channel normalisation computed from the training images (filled by load_splits);
    # kept so an exported model can be fed without the training data at hand
    mean: list[float] | None = None
    std: list[float] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    def portable(self) -> dict:
        """``to_dict`` without the machine's own path: an exported file names its data set,
        and the machine that reads it finds the data itself (or is given --data-dir)."""
        return {**self.to_dict(), "data_dir": None}

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        """The config a checkpoint or file records; fields this version does not know are
        ignored, malformed ones refused in one line."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in dict(d).items() if k in known}
        try:
            d["input_shape"] = tuple(int(v) for v in d.get("input_shape", (1, 28, 28)))
        except (TypeError, ValueError):
            raise CompressError(f"the recorded input shape {d.get('input_shape')!r} is not "
                                "a list of integers") from None
        if len(d["input_shape"]) != 3 or min(d["input_shape"]) < 1:
            raise CompressError(f"the recorded input shape {list(d['input_shape'])} is not "
                                "C, H, W")
        for name, (fits, what) in _RECORDED.items():
            if name in d and not fits(d[name]):
                raise CompressError(f"the recorded data set's {name} is {d[name]!r}, not "
                                    f"{what}")
        return cls(**d)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _numbers(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int | float) and
                                           not isinstance(v, bool) for v in value)


_RECORDED = {  # what a recorded DataConfig field must be (files can be damaged)
    "name": (lambda v: isinstance(v, str), "a name"),
    "data_dir": (lambda v: v is None or isinstance(v, str), "a path"),
    "num_classes": (_count, "a positive count"),
    "val_fraction": (lambda v: isinstance(v, int | float) and not isinstance(v, bool)
                     and 0 <= v < 1, "a fraction"),
    "split_seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "max_train_samples": (lambda v: v is None or _count(v), "a positive count"),
    "max_test_samples": (lambda v: v is None or _count(v), "a positive count"),
    "augment": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "mean": (lambda v: v is None or _numbers(v), "a list of numbers"),
    "std": (lambda v: v is None or _numbers(v), "a list of numbers"),
}

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
    """A torchvision data set served through a ``DataLoader``."""

    def __init__(self, dataset, indices: list[int] | None = None) -> None:
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, index: torch.Tensor, augment: bool | None = None) -> FolderSplit:
        return FolderSplit(self.dataset, [self.indices[i] for i in index.tolist()])

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None,
                shard: Shard | None = None) -> Iterator[Batch]:
        order = (torch.randperm(len(self), generator=generator) if shuffle
                 else torch.arange(len(self)))
        order = shard_order(order, shard, pad=shuffle)
        sub = torch.utils.data.Subset(self.dataset, [self.indices[i] for i in order.tolist()])
        yield from torch.utils.data.DataLoader(sub, batch_size=batch_size, num_workers=0)

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


# -- readers --------------------------------------------------------------------------------
MAX_SYNTHETIC_MB = 4096  # what drawing one synthetic split may take
MAX_IDX_MB = 2048  # Fashion-MNIST's training images take 45 MiB


def _read_idx(path: Path) -> np.ndarray:
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


def _find_idx_dir(name: str, data_dir: str | None) -> Path:
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


def _load_idx_set(name: str, data_dir: str | None):
    root = _find_idx_dir(name, data_dir)

    def load(stem: str) -> np.ndarray:
        path = root / stem if (root / stem).exists() else root / f"{stem}.gz"
        return _read_idx(path)

    out = {}
    for split, (img, lab) in IDX_FILES.items():
        images, labels = load(img), load(lab)
        if len(images) != len(labels):
            raise CompressError(f"{name} {split}: {len(images)} images but {len(labels)} labels")
        out[split] = (torch.from_numpy(images.copy()).unsqueeze(1),
                      torch.from_numpy(labels.astype(np.int64)))
    return out


def _load_cifar(name: str, data_dir: str | None):
    if not data_dir:
        raise CompressError(f"{name} needs --data-dir (torchvision's on-disk layout)")
    ten = name == "cifar10"
    root = Path(data_dir) / ("cifar-10-batches-py" if ten else "cifar-100-python")
    if not root.is_dir():
        raise CompressError(f"{name}: {root} not found (torchvision's on-disk layout expected)")
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"],
             "test": ["test_batch"] if ten else ["test"]}
    label_key = "labels" if ten else "fine_labels"
    out = {}
    for split, names in files.items():
        data, labels = [], []
        for fname in names:
            entry = load_cifar_batch(root / fname)
            try:
                images = entry["data"]
                if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or \
                        images.size % 3072:
                    raise ValueError("its data are not uint8 images of 3x32x32")
                batch_labels = entry[label_key]
                if not isinstance(batch_labels, list) or len(batch_labels) * 3072 != \
                        images.size or not all(type(v) is int for v in batch_labels):
                    raise ValueError("its labels are not one integer per image")
            except KeyError as exc:
                raise CompressError(f"{name}: {root / fname} is not a CIFAR batch: it has "
                                    f"no {exc.args[0]!r}") from None
            except ValueError as exc:
                raise CompressError(f"{name}: {root / fname} is not a CIFAR batch: "
                                    f"{first_line(exc)}") from None
            data.append(images.reshape(-1, 3, 32, 32))
            labels += batch_labels
        out[split] = (torch.from_numpy(np.concatenate(data)), torch.tensor(labels))
    return out


def _synthetic(config: DataConfig):
    """Gaussian inputs labelled by a fixed random linear map: learnable, not trivial."""
    g = torch.Generator().manual_seed(1234)
    c, h, w = config.input_shape
    samples = max(config.max_train_samples or 2048, config.max_test_samples or 512)
    needed = 4 * c * h * w * (samples + config.num_classes)  # float32 draws, projection
    if needed > MAX_SYNTHETIC_MB * 2**20:
        raise CompressError(f"synthetic data of shape {c}x{h}x{w} with {samples:,} samples and "
                            f"{config.num_classes:,} classes needs {needed / 2**30:,.1f} GiB "
                            f"to draw, past the {MAX_SYNTHETIC_MB // 1024} GiB limit; ask for "
                            "fewer samples or a smaller shape")
    proj = torch.randn(c * h * w, config.num_classes, generator=g)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, c, h, w, generator=g)
        y = (x.flatten(1) @ proj).argmax(1)
        return (x * 40 + 128).clamp(0, 255).to(torch.uint8), y

    return {"train": make(config.max_train_samples or 2048),
            "test": make(config.max_test_samples or 512)}


def _image_folder(config: DataConfig) -> Splits:
    from torchvision import datasets, transforms

    if not config.data_dir:
        raise CompressError("imagefolder needs --data-dir with train/ and test/ (or val/)")
    root = Path(config.data_dir)
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise CompressError(f"imagefolder: {root} must hold train/ and test/ (or val/)")
    c, h, w = config.input_shape
    tf = transforms.Compose([
        transforms.Grayscale(1) if c == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.Resize((h, w)), transforms.ToTensor(),
        transforms.Normalize([0.5] * c, [0.5] * c),
    ])
    train = datasets.ImageFolder(str(root / "train"), transform=tf)
    test = datasets.ImageFolder(str(test_dir), transform=tf)
    config.num_classes = len(train.classes)
    config.mean, config.std = [0.5] * c, [0.5] * c
    return _split(FolderSplit(train), FolderSplit(test), config)


def _split(train, test, config: DataConfig) -> Splits:
    g = torch.Generator().manual_seed(config.split_seed)
    order = torch.randperm(len(train), generator=g)
    if config.max_train_samples:
        order = order[:config.max_train_samples]
    n_val = max(1, int(round(config.val_fraction * len(order))))
    if len(order) - n_val < 1:
        raise CompressError(f"{config.name}: {len(order)} training images leave none for "
                            "training after the validation split; use more samples")
    val, train_part = train.subset(order[:n_val], augment=False), train.subset(order[n_val:])
    if config.max_test_samples and config.max_test_samples < len(test):
        test = test.subset(torch.arange(config.max_test_samples))
    return Splits(train_part, val, test, config)


def _channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images[:10000].float() / 255.0
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()


def load_splits(config: DataConfig) -> Splits:
    """Read ``config.name`` and split it; raises `CompressError` with a fix on failure."""
    if config.name not in DATASETS:
        raise CompressError(f"unknown data set {config.name!r}: use one of {', '.join(DATASETS)}")
    if config.data_dir and not Path(config.data_dir).is_dir():
        raise CompressError(f"data directory {config.data_dir} does not exist")
    if not 0.0 < config.val_fraction < 1.0:
        raise CompressError(f"validation fraction must be in (0, 1), got {config.val_fraction}")
    if config.name == "imagefolder":
        return _image_folder(config)
    if config.name == "synthetic":
        raw = _synthetic(config)
    elif config.name in ("cifar10", "cifar100"):
        raw = _load_cifar(config.name, config.data_dir)
        config.num_classes = 10 if config.name == "cifar10" else 100
    else:
        raw = _load_idx_set(config.name, config.data_dir)
        config.num_classes = 10
    train_x, train_y = raw["train"]
    config.input_shape = tuple(int(d) for d in train_x.shape[1:])
    augment = config.augment if config.augment is not None else config.name.startswith("cifar")
    mean, std = _channel_stats(train_x)
    config.mean, config.std = mean, std
    train = TensorSplit(train_x, train_y, mean, std, augment)
    test = TensorSplit(*raw["test"], mean, std, augment=False)
    return _split(train, test, config)
