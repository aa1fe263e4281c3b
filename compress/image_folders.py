"""Image folders as practitioners lay them out: ``D/train/<class>/*``, ``D/test/<class>/*``
and, when present, ``D/val/<class>/*`` (else validation is a share of train), in any format
PIL decodes.

Training images get a random resized crop and a horizontal flip (``augment``), evaluation
images a resize to ``size / 0.875`` and a centre crop (torchvision's reference recipe).
Normalisation is measured on the training images, as the in-memory sets do, unless the
run already recorded it. An image that cannot be read is one line naming it, or, with
``skip_bad_images``, left out of its batch and counted. Batches come from a ``DataLoader``
with ``workers`` decoding processes that live as long as the split, pinned memory on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.errors import CompressError, first_line

CROP_FRACTION = 0.875  # evaluation: resize to size / this, then centre-crop to size
STATS_IMAGES = 512  # training images the per-channel mean and std are measured on
LAYOUT = "train/<class>/<images> and test/<class>/<images> (val/ optional)"


def default_workers() -> int:
    """Decoding processes: the cores this process may use."""
    return len(os.sched_getaffinity(0))


@dataclass
class BadImages:
    """Images that could not be read, shared by the splits of one data set."""

    skip: bool = False
    paths: set[str] = field(default_factory=set)


class CheckedImages(torch.utils.data.Dataset):
    """An ``ImageFolder``'s samples, each read with ``transform``; a file that cannot be
    read becomes a zero image and the reason, so that the main process decides (workers
    cannot raise a one-line error)."""

    def __init__(self, samples: list[tuple[str, int]], transform, shape: tuple[int, ...],
                 mode: str) -> None:
        self.samples, self.transform, self.shape, self.mode = samples, transform, shape, mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert(self.mode)), label, ""
        except Exception as exc:  # PIL raises many kinds on a damaged or foreign file
            return torch.zeros(self.shape), label, f"{path} ({first_line(exc)[:120]})"


class _Order(torch.utils.data.Sampler):
    """The indices of the next pass, set before each one (the loader and its workers stay)."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class FolderLoader:
    """One ``DataLoader`` over a data set, its workers kept between passes."""

    def __init__(self, dataset: CheckedImages, workers: int) -> None:
        self.dataset, self.workers, self.order = dataset, workers, _Order()
        self._loaders: dict[int, torch.utils.data.DataLoader] = {}

    def batches(self, indices: list[int], batch_size: int, bad: BadImages
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.order.indices = indices
        for x, y, problems in self._loader(batch_size):
            if any(problems):
                x, y = _without_bad(x, y, problems, bad)
                if not len(y):
                    continue
            yield x, y

    def _loader(self, batch_size: int) -> torch.utils.data.DataLoader:
        if batch_size not in self._loaders:
            self._loaders[batch_size] = torch.utils.data.DataLoader(
                self.dataset, batch_size=batch_size, sampler=self.order,
                num_workers=self.workers, persistent_workers=self.workers > 0,
                pin_memory=torch.cuda.is_available())
        return self._loaders[batch_size]


def _without_bad(x: torch.Tensor, y: torch.Tensor, problems: list[str], bad: BadImages
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    first = next(p for p in problems if p)
    if not bad.skip:
        raise CompressError(f"cannot read image {first}; remove it or pass --skip-bad-images")
    keep = torch.tensor([not p for p in problems])
    bad.paths.update(p.rsplit(" (", 1)[0] for p in problems if p)
    return x[keep], y[keep]


@dataclass
class FolderSets:
    """The data sets of one image-folder tree: training images with and without
    augmentation, the validation folder's (None: a share of train) and the test folder's."""

    train: CheckedImages
    train_plain: CheckedImages
    val: CheckedImages | None
    test: CheckedImages
    classes: list[str]
    mean: list[float]
    std: list[float]


def _scan(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision import datasets

    try:
        scanned = datasets.ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as exc:
        raise CompressError(f"imagefolder: {folder}: {first_line(exc)} (expected "
                            f"{LAYOUT})") from None
    return scanned.classes, scanned.samples


def _transforms(shape: tuple[int, int, int], augment: bool, mean: list[float] | None,
                std: list[float] | None):
    from torchvision import transforms

    _, h, w = shape
    side = round(max(h, w) / CROP_FRACTION)
    tail = [transforms.ToTensor()] + ([transforms.Normalize(mean, std)] if mean else [])
    plain = transforms.Compose([transforms.Resize(side), transforms.CenterCrop((h, w)), *tail])
    if not augment:
        return plain, plain
    train = transforms.Compose([transforms.RandomResizedCrop((h, w)),
                                transforms.RandomHorizontalFlip(), *tail])
    return train, plain


def _measured_stats(samples: list[tuple[str, int]], shape: tuple[int, int, int], mode: str,
                    workers: int, bad: BadImages) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to `STATS_IMAGES` training images spread over the
    set (every class), as the evaluation transform shows them."""
    _, plain = _transforms(shape, False, None, None)
    step = max(1, len(samples) // STATS_IMAGES)
    chosen = samples[::step][:STATS_IMAGES]
    loader = FolderLoader(CheckedImages(chosen, plain, shape, mode), min(workers, 2))
    total = torch.zeros(shape[0], dtype=torch.float64)
    squares, count = torch.zeros_like(total), 0
    for x, _ in loader.batches(list(range(len(chosen))), 64, bad):
        x = x.double().transpose(0, 1).reshape(shape[0], -1)
        total += x.sum(1)
        squares += (x * x).sum(1)
        count += x.shape[1]
    mean = total / max(count, 1)
    std = (squares / max(count, 1) - mean * mean).clamp_min(1e-12).sqrt().clamp_min(1e-6)
    return mean.tolist(), std.tolist()


def folder_sets(root: Path, shape: tuple[int, int, int], augment: bool, workers: int,
                bad: BadImages, mean: list[float] | None = None,
                std: list[float] | None = None) -> FolderSets:
    """The data sets of ``root`` (see the module); ``mean``/``std``: a run's recorded
    normalisation, else measured."""
    if not (root / "train").is_dir():
        raise CompressError(f"imagefolder: {root} has no train/ folder (expected {LAYOUT})")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test_dir is None:
        raise CompressError(f"imagefolder: {root} has no test/ (or val/) folder (expected "
                            f"{LAYOUT})")
    val_dir = root / "val" if test_dir.name == "test" and (root / "val").is_dir() else None
    classes, train_samples = _scan(root / "train")
    held_out = {}
    for folder in filter(None, (val_dir, test_dir)):
        their_classes, held_out[folder.name] = _scan(folder)
        if their_classes != classes:
            extra = sorted(set(their_classes) ^ set(classes))[:5]
            raise CompressError(f"imagefolder: the classes of {folder} differ from train/'s "
                                f"(not in both: {', '.join(extra) or 'same names, other order'})")
    mode = "L" if shape[0] == 1 else "RGB"
    if mean is None or std is None:
        mean, std = _measured_stats(train_samples, shape, mode, workers, bad)
    train_tf, plain_tf = _transforms(shape, augment, mean, std)

    def images(samples: list[tuple[str, int]], transform) -> CheckedImages:
        return CheckedImages(samples, transform, shape, mode)

    return FolderSets(train=images(train_samples, train_tf),
                      train_plain=images(train_samples, plain_tf),
                      val=images(held_out["val"], plain_tf) if val_dir else None,
                      test=images(held_out[test_dir.name], plain_tf), classes=classes,
                      mean=mean, std=std)
