"""How fast the image-folder loader feeds training, against the in-memory path.

Writes the first ``--images`` Fashion-MNIST training images as 64x64 PNG files in class
folders (resized with PIL's bicubic filter), then times full passes over them: the
in-memory Fashion-MNIST split (the same images, 28x28 uint8 tensors), and the image
folder at 64x64 with 0, 1 and 2 decoding workers, each in a training pass (random resized
crop and flip) and an evaluation pass (resize and centre crop). Reported: images per
second, the best of ``--repeats`` passes after one warm-up pass (which starts the workers).

    .venv/bin/python benchmarks/imagefolder_loader.py --images 3000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from compress.data import load_splits
from compress.dataconfig import DataConfig
from compress.datafiles import read_split

SIDE = 64


def write_pngs(root: Path, count: int) -> None:
    images, labels = read_split("fashion-mnist", None, "train")
    for split, chosen in (("train", range(count)), ("test", range(count, count + 300))):
        for index in chosen:
            folder = root / split / f"class{labels[index]}"
            folder.mkdir(parents=True, exist_ok=True)
            big = Image.fromarray(images[index, 0]).resize((SIDE, SIDE), Image.BICUBIC)
            big.save(folder / f"{index}.png")


def images_per_second(split, shuffle: bool, repeats: int, batch_size: int = 128) -> float:
    generator = torch.Generator().manual_seed(0)
    best = float("inf")
    for attempt in range(repeats + 1):
        started = time.perf_counter()
        seen = sum(len(y) for _, y in split.batches(batch_size, shuffle, generator))
        if attempt:  # the first pass warms up (and starts the workers)
            best = min(best, time.perf_counter() - started)
    return seen / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    memory = load_splits(DataConfig(max_train_samples=args.images, val_fraction=0.01))
    rows = [("in memory, 28x28", "-", images_per_second(memory.train, True, args.repeats),
             images_per_second(memory.train, False, args.repeats))]
    with tempfile.TemporaryDirectory() as tmp:
        write_pngs(Path(tmp), args.images)
        for workers in (0, 1, 2):
            folder = load_splits(DataConfig(name="imagefolder", data_dir=tmp,
                                            input_shape=(1, SIDE, SIDE), val_fraction=0.01,
                                            workers=workers))
            rows.append((f"image folder, {SIDE}x{SIDE} PNG", str(workers),
                         images_per_second(folder.train, True, args.repeats),
                         images_per_second(folder.train, False, args.repeats)))
    print(f"{len(memory.train)} training images, batch 128, torch 1 thread")
    print("| source | workers | training pass (images/s) | evaluation pass (images/s) |")
    print("|---|---|---|---|")
    for source, workers, train, evaluation in rows:
        print(f"| {source} | {workers} | {train:,.0f} | {evaluation:,.0f} |")


if __name__ == "__main__":
    main()
