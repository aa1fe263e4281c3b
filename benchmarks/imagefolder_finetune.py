"""The practitioner's path on two cores: an image-folder tree of real images, a torchvision
MobileNetV3-small and ResNet-18 trained dense on it, thinned by activation density (ADP),
exported in int8 and timed; and how fast the loader feeds training.

The tree: Fashion-MNIST written as 64x64 PNG files in class folders (PIL's bicubic
resize), ``--train-per-class`` training images of each class from the training split and
``--test-per-class`` test images from the test split; validation is a share of train. Each
model, driven by the ``compress`` command line as a user would:

1. ``train-prune --method none`` (dense) on the folder with 3 channels, augmentation
   (random resized crop, flip), ``--workers`` decoding processes and BatchNorm statistics
   re-estimated at the end (``--bn-recalibrate``: MobileNetV3's lag a short run);
2. ``train-prune --method density --weights DENSE``: ADP from the dense run;
3. ``export`` of the dense run (fp32) and of the thinned run (fp32, and int8: static QDQ
   calibrated on training images); ``evaluate`` of every file on the test folder;
4. the three files timed interleaved in one onnxruntime process (1 thread, batch 1), and
   ``compress bench`` of the int8 file against the dense one.

Then the loader's images per second (``imagefolder_loader.py``'s measurement) on this tree
with 0, 1 and 2 workers, against the in-memory Fashion-MNIST split of as many images.

Runs and files are kept under ``--work`` and reused by a rerun, which redoes only the
evaluation and the timing (so that timing can be redone on a quiet machine).

    .venv/bin/python benchmarks/imagefolder_finetune.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from compress_cli import compress_json
from imagefolder_loader import SIDE, images_per_second
from PIL import Image

from compress.data import load_splits
from compress.dataconfig import DataConfig
from compress.datafiles import read_split
from export.runtime.latency import measure

MODELS = ("mobilenet_v3_small", "resnet18")
RESULTS = Path("benchmarks/results/imagefolder_finetune.json")


def write_tree(root: Path, train_per_class: int, test_per_class: int) -> None:
    """Fashion-MNIST's first images of each class as 64x64 PNG files (kept if there)."""
    if (root / "done").exists():
        return
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = read_split("fashion-mnist", None, split)
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in (labels == label).nonzero()[0][:per_class]:
                Image.fromarray(images[index, 0]).resize((SIDE, SIDE), Image.BICUBIC) \
                    .save(folder / f"{index}.png")
    (root / "done").write_text("")


def run_once(out: Path, *args: object) -> dict:
    """``compress train-prune ARGS --out OUT``'s summary, or the one a previous run saved."""
    saved = out.with_suffix(".json")
    if saved.exists():
        return json.loads(saved.read_text())
    started = time.perf_counter()
    summary = compress_json("train-prune", *args, "--out", out)
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    saved.write_text(json.dumps(summary))
    return summary


def export_once(run: Path, onnx: Path, *args: object) -> None:
    if not onnx.exists():
        compress_json("export", run, "--onnx", onnx, *args, quiet=False)


def model_rows(name: str, tree: Path, work: Path, args) -> dict:
    """Dense and ADP runs of one torchvision model, their files, accuracies and timings."""
    common = ("--model", f"torchvision.models:{name}", "--data", "imagefolder",
              "--data-dir", tree, "--input-shape", f"3,{SIDE},{SIDE}", "--workers",
              args.workers, "--batch-size", args.batch_size, "--seed", args.seed,
              "--bn-recalibrate", args.bn_recalibrate)
    dense = run_once(work / f"{name}-dense", *common, "--method", "none",
                     "--epochs", args.epochs, "--lr", args.lr)
    thin = run_once(work / f"{name}-density", *common, "--method", "density",
                    "--weights", work / f"{name}-dense", "--epochs", args.density_epochs,
                    "--lr", args.density_lr)
    files = {"dense fp32": work / f"{name}-dense.onnx",
             "ADP fp32": work / f"{name}-density.onnx",
             "ADP int8": work / f"{name}-density-int8.onnx"}
    export_once(work / f"{name}-dense", files["dense fp32"])
    export_once(work / f"{name}-density", files["ADP fp32"])
    export_once(work / f"{name}-density", files["ADP int8"], "--quantize", "int8")
    rows = {}
    for label, path in files.items():
        scored = compress_json("evaluate", path, "--data-dir", tree, quiet=False)
        rows[label] = {"file_bytes": path.stat().st_size, "test_top1": scored["top1"],
                       "test_samples": scored["samples"]}
    timed, _ = measure(list(files.values()), runs=args.runs)  # interleaved, one process
    for label, measured in zip(files, timed, strict=True):
        rows[label]["p50_ms"] = measured.latency()["p50"]
    shipped = compress_json("bench", files["ADP int8"], "--against", files["dense fp32"],
                            "--runs", args.runs, quiet=False)
    return {"dense": _run_facts(dense), "density": _run_facts(thin), "files": rows,
            "bench_int8_vs_dense_p50_ratio": shipped["ratio_p50"]}


def _run_facts(summary: dict) -> dict:
    keep = ("test_top1", "val_top1", "mac_ratio", "param_ratio", "cuts", "train_seconds",
            "wall_seconds", "notes")
    return {key: summary.get(key) for key in keep}


def loader_rows(tree: Path, repeats: int) -> list[dict]:
    """Images per second of training and evaluation passes over the tree's training images
    with 0, 1 and 2 workers, and over as many in-memory Fashion-MNIST images."""
    torch.set_num_threads(1)
    folder = load_splits(DataConfig(name="imagefolder", data_dir=str(tree),
                                    input_shape=(3, SIDE, SIDE), val_fraction=0.01,
                                    workers=0))
    count = len(folder.train)
    memory = load_splits(DataConfig(max_train_samples=count, val_fraction=0.01))
    rows = [{"source": "in memory, 28x28", "workers": None,
             "train_images_per_s": images_per_second(memory.train, True, repeats),
             "eval_images_per_s": images_per_second(memory.train, False, repeats)}]
    for workers in (0, 1, 2):
        folder = load_splits(DataConfig(name="imagefolder", data_dir=str(tree),
                                        input_shape=(3, SIDE, SIDE), val_fraction=0.01,
                                        workers=workers))
        rows.append({"source": f"image folder, {SIDE}x{SIDE} PNG, RGB", "workers": workers,
                     "train_images_per_s": images_per_second(folder.train, True, repeats),
                     "eval_images_per_s": images_per_second(folder.train, False, repeats)})
    return rows


def table(results: dict) -> str:
    lines = ["| model | file | test top-1 | MAC ratio | bytes | p50 (ms) | speed-up vs dense |",
             "|---|---|---|---|---|---|---|"]
    for name, result in results["models"].items():
        for label, row in result["files"].items():
            mac = "1.000" if label.startswith("dense") else \
                f"{result['density']['mac_ratio']:.3f}"
            dense = result["files"]["dense fp32"]
            lines.append(f"| {name} | {label} | {100 * row['test_top1']:.2f} | {mac} | "
                         f"{row['file_bytes']:,} | {row['p50_ms']:.3f} | "
                         f"{dense['p50_ms'] / row['p50_ms']:.2f}x |")
    lines += ["", "| source | workers | training pass (images/s) | evaluation pass (images/s) |",
              "|---|---|---|---|"]
    for row in results["loader"]:
        workers = "-" if row["workers"] is None else row["workers"]
        lines.append(f"| {row['source']} | {workers} | {row['train_images_per_s']:,.0f} | "
                     f"{row['eval_images_per_s']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=8, help="dense training")
    parser.add_argument("--density-epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--density-lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bn-recalibrate", type=int, default=2048,
                        help="training images BatchNorm statistics are re-estimated on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=300, help="bench's timed runs per file")
    parser.add_argument("--repeats", type=int, default=3, help="timed loader passes")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/compress-imagefolder-finetune"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="only print the saved table")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.results.read_text())))
        return
    tree = args.work / "images"
    args.work.mkdir(parents=True, exist_ok=True)
    write_tree(tree, args.train_per_class, args.test_per_class)
    results = {"settings": {k: str(v) for k, v in vars(args).items() if k != "table"},
               "machine": f"{platform.processor() or platform.machine()}, "
                          f"{torch.get_num_threads()} torch threads available",
               "models": {name: model_rows(name, tree, args.work, args) for name in args.models},
               "loader": loader_rows(tree, args.repeats)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
