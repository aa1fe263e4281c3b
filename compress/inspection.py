"""What ``compress inspect`` and ``compress evaluate`` report for a run or checkpoint."""

from __future__ import annotations

from pathlib import Path

from compress.checkpoint import load_checkpoint, unfinished_note
from compress.data import DATASETS, load_splits
from compress.errors import CompressError
from compress.stats import count_macs, layer_stats, rows_as_dicts, summarise
from compress.training import evaluate


def inspect_checkpoint(path: str | Path) -> dict:
    """Per-layer shapes, counts and sparsity, totals with MACs, and the run's metadata."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    prunable = set(ckpt.masks) if ckpt.masks else {
        k for k, v in ckpt.state_dict.items() if k.endswith(".weight") and v.dim() > 1}
    rows = layer_stats(ckpt.state_dict, prunable)
    model = ckpt.build_model()
    macs = count_macs(model, ckpt.data.input_shape)
    return {
        "total": summarise(rows, macs),
        "layers": rows_as_dicts(rows),
        "structure": structure_summary(ckpt.structure, macs[0],
                                       sum(r.params for r in rows)),
        "metadata": {
            "model": ckpt.model_spec,
            "method": ckpt.method,
            "data": ckpt.data.to_dict(),
            "metrics": ckpt.metrics,
            "recipe": ckpt.recipe,
            "versions": ckpt.versions,
            "unfinished": unfinished_note(ckpt),
        },
    }


def structure_summary(structure: dict | None, macs: int, params: int) -> dict | None:
    """Widths before and after each channel cut, and params / MACs against the original;
    None for a model whose channels were never cut."""
    if not structure:
        return None
    original = structure.get("original") or {}
    o_params, o_macs = original.get("params"), original.get("macs")
    return {
        "widths": [{"layer": root, "original": first, "kept": kept}
                   for root, (first, kept) in structure.get("widths", {}).items()],
        "original_params": o_params, "original_macs": o_macs,
        "params_ratio": params / o_params if o_params else None,
        "macs_ratio": macs / o_macs if o_macs else None,
    }


def evaluate_checkpoint(path: str | Path, data: str | None = None,
                        data_dir: str | None = None, batch_size: int = 512,
                        max_test_samples: int | None = None) -> dict:
    """Top-1 on the test split of the data set recorded in the run (or the one given); the
    first ``max_test_samples`` images only, when given."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    config = ckpt.data
    if data is not None:
        if data not in DATASETS:
            raise CompressError(f"unknown data set {data!r}: use one of {', '.join(DATASETS)}")
        config.name = data
        config.data_dir = data_dir
    elif data_dir is not None:
        config.data_dir = data_dir
    if max_test_samples is not None:  # else the slice the run recorded, if any
        config.max_test_samples = max_test_samples
    splits = load_splits(config)
    model = ckpt.build_model()
    top1, loss = evaluate(model, splits.test, batch_size)
    return {"top1": top1, "loss": loss, "samples": len(splits.test), "split": "test",
            "data": config.name, "unfinished": unfinished_note(ckpt)}
