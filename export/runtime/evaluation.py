"""Accuracy of an exported model in onnxruntime, on the data set recorded in it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.dataconfig import DATASETS, DataConfig
from compress.datafiles import ARRAY_DATASETS, channel_stats, held_out_batches, read_split
from compress.errors import CompressError
from export.limits import MAX_TENSOR_MB
from export.ort import load_onnxruntime
from export.runtime.isolated import in_child
from export.session import open_session, single_input

SCORING_BATCH_INPUT_MB = 1.0  # what one scoring batch's inputs may take (`scoring_batch_size`)


def ort_session(path: str | Path):
    return open_session(path)


def split_top1(session, split, batch_size: int = 512) -> float:
    """Top-1 of ``session`` on a torch split (what `compress.data` loads)."""
    return batches_top1(session, ((x.numpy(), y.numpy()) for x, y in split.batches(batch_size)))


def batches_top1(session, batches) -> float:
    """Top-1 of ``session`` on (float32 images, labels) numpy batches."""
    spec = single_input(session, "the model")
    correct = seen = 0
    for x, y in batches:
        expected = [d for d in spec.shape[1:]]
        if all(isinstance(d, int) for d in expected) and list(x.shape[1:]) != expected:
            raise CompressError(f"the model takes inputs of shape {tuple(expected)}, the data "
                                f"gives {tuple(x.shape[1:])}; pass the matching --data")
        logits = session.run(None, {spec.name: x.astype(np.float32, copy=False)})[0]
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return correct / seen if seen else 0.0


def scoring_batches(config: DataConfig, batch_size: int):
    """(test images, normalised batches) of ``config``'s data set. In-memory data sets are
    read with numpy alone, normalised as the model was trained (the recorded mean and std):
    a device scores a file without torch. Image folders are decoded through torchvision."""
    if config.name not in ARRAY_DATASETS:
        from compress.data import load_splits

        split = load_splits(config).test
        return len(split), ((x.numpy(), y.numpy()) for x, y in split.batches(batch_size))
    channels = config.input_shape[0]
    mean, std = config.mean, config.std
    if not mean or not std or len(mean) != channels or len(std) != channels:
        train = read_split(config.name, config.data_dir, "train", config.input_shape,
                           config.num_classes, config.max_train_samples)[0]
        mean, std = channel_stats(train)
        del train
    return held_out_batches(config.name, config.data_dir, config.input_shape, config.num_classes,
                        config.max_test_samples, mean, std, batch_size)


def scoring_batch_size(input_shape: tuple[int, ...]) -> int:
    """The default batch for scoring in onnxruntime: as many images as fit
    ``SCORING_BATCH_INPUT_MB`` of float32 input, from 1 to 512. onnxruntime's activations grow
    with the batch (ResNet-18 at 224x224 and batch 512 took 3 GB beside a 0.2 GB session),
    and a CPU's throughput hardly does; 28x28 images still go 334 at a time."""
    image_bytes = 4 * max(1, int(np.prod(input_shape)))
    return max(1, min(512, int(SCORING_BATCH_INPUT_MB * 2**20) // image_bytes))


def data_config_from_onnx(path: str | Path, meta: dict, data: str | None,
                          data_dir: str | None):
    """The data set to evaluate on: ``--data`` or what the file's metadata ``meta`` records."""
    if str(path).lower().endswith(".ort") and data is None:
        raise CompressError(f"{path} is an ORT-format file, which carries no metadata; "
                            "pass --data (and --data-dir)")
    recorded = meta.get("dataset")
    if data is None and not isinstance(recorded, dict):
        raise CompressError(f"{path} records no readable data set; pass --data")
    try:
        config = DataConfig.from_dict(recorded) if isinstance(recorded, dict) else DataConfig()
    except (CompressError, TypeError, ValueError) as exc:
        raise CompressError(f"{path} records an unreadable data set ({exc}); pass "
                            "--data") from None
    if data is not None:
        if data not in DATASETS:
            raise CompressError(f"unknown data set {data!r}: use one of {', '.join(DATASETS)}")
        if data != config.name:  # the recorded normalisation is another data set's
            config.mean = config.std = None
        config.name, config.data_dir = data, data_dir
    elif data_dir is not None:
        config.data_dir = data_dir
    return config


def evaluate_onnx(path: str | Path, data: str | None = None, data_dir: str | None = None,
                  batch_size: int | None = None, *, max_test_samples: int | None = None,
                  ignore_digest: bool = False,
                  max_tensor_mb: float = MAX_TENSOR_MB) -> dict:
    """Test-split top-1 of the ONNX model, in onnxruntime, once the file proved intact;
    ``batch_size`` None: `scoring_batch_size`."""
    if not Path(path).is_file():
        raise CompressError(f"no model file at {path}")
    meta, integrity = {}, {"status": "skipped", "differs": []}  # ORT format has no record
    if not str(path).lower().endswith(".ort"):  # onnxruntime reads the file itself after
        meta, integrity = in_child(checked_metadata, str(path), ignore_digest, max_tensor_mb,
                                   meanwhile=load_onnxruntime)
    config = data_config_from_onnx(path, meta, data, data_dir)
    if max_test_samples is not None:  # else the slice the run recorded, if any
        config.max_test_samples = max_test_samples
    unfinished = unfinished_export_note(meta)
    session = ort_session(path)
    batch_size = batch_size or scoring_batch_size(config.input_shape)
    samples, batches = scoring_batches(config, batch_size)
    return {"top1": batches_top1(session, batches), "samples": samples,
            "split": "test", "data": config.name, "batch_size": batch_size,
            "runtime": "onnxruntime",
            "unfinished": unfinished, "integrity": integrity}


def checked_metadata(path: str, ignore_digest: bool, max_tensor_mb: float) -> tuple[dict, dict]:
    """(metadata, integrity record) of a file whose digests, sizes and packed stream are
    checked: a damaged stream can still run, and would give a wrong figure. Run in
    `in_child`, so that onnx is imported there."""
    from export.metadata import model_metadata
    from export.onnx_inspect import load_checked, packed_layout

    model, report = load_checked(path, ignore_digest=ignore_digest, max_tensor_mb=max_tensor_mb)
    try:
        packed_layout(model)
    except CompressError as exc:
        raise CompressError(f"{path}: {exc}") from None
    return model_metadata(model), report.to_dict()


def unfinished_export_note(metadata: dict) -> str | None:
    """A warning for a file exported from a run that stopped before its last epoch."""
    if metadata.get("training_finished") is not False:
        return None
    return ("this file was exported from a run that stopped before its last epoch, so its "
            "sparsity and accuracy may be short of the target")
