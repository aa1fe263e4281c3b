"""What a data set is, as a checkpoint or an exported file records it (no torch needed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from compress.errors import CompressError

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")


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
    augment: bool | None = None  # None: on for CIFAR and image folders, off for the rest
    workers: int | None = None  # image folders: decoding processes (None: the usable cores)
    skip_bad_images: bool = False  # image folders: leave out (and count) unreadable images
    # per-channel normalisation computed from the training images (filled by load_splits);
    # kept so an exported model can be fed without the training data at hand
    mean: list[float] | None = None
    std: list[float] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    def portable(self) -> dict:
        """``to_dict`` without what belongs to the machine (its path, how it reads the
        images): an exported file names its data set, and the machine that reads it finds
        the data itself (or is given --data-dir)."""
        recorded = self.to_dict()
        for machine_only in ("data_dir", "workers", "skip_bad_images"):
            recorded.pop(machine_only)
        return {**recorded, "data_dir": None}

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
    "workers": (lambda v: v is None or isinstance(v, int) and not isinstance(v, bool)
                and v >= 0, "a count"),
    "skip_bad_images": (lambda v: isinstance(v, bool), "true or false"),
    "mean": (lambda v: v is None or _numbers(v), "a list of numbers"),
    "std": (lambda v: v is None or _numbers(v), "a list of numbers"),
}
