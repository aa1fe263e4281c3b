"""CPU latency in onnxruntime of dense, DPF-packed, int8 and int8 + DPF models.

For LeNet-5 and ResNet-20 on Fashion-MNIST it trains a dense model and a DPF model at
sparsity 0.9, exports four files per architecture:

- dense:      the dense model, fp32 (--pack none)
- dpf packed: the DPF model, fp32 values, occupancy-tree packed (--pack bitmask)
- int8:       the dense model, static int8 QDQ (--quantize int8 --pack none)
- int8 + dpf: the DPF model, static int8 QDQ, packed (--quantize int8 --pack bitmask)

and times the four of a kind in alternating blocks in one process (batch 1) at 1 and at 2
threads: p50 and p90, their ratio to dense, the median of 5 session starts, file size and
test top-1 in onnxruntime (full test split). Latency does not depend on how well a model
is trained, so the models train briefly (see TRAINING); the accuracies are those of these
short runs, not of the best the methods reach.

    .venv/bin/python benchmarks/latency.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from compress.pipeline import train_prune
from compress.recipe import Recipe
from export.onnx_export import export_checkpoint
from export.ort import load_onnxruntime
from export.runtime.evaluation import evaluate_onnx
from export.runtime.latency import cpu_name, measure
from export.session import open_session

ort = load_onnxruntime()  # with its telemetry off (export/ort.py)

TRAINING = {  # brief on purpose: latency is what is measured
    "lenet5": dict(epochs=2),
    "resnet20": dict(epochs=1, max_train_samples=5000, batch_size=64),
}
VARIANTS = {  # name: (trained model, export options)
    "dense": ("dense", dict(pack="none")),
    "dpf packed": ("dpf", dict(pack="bitmask")),
    "int8": ("dense", dict(pack="none", quantize="int8")),
    "int8 + dpf": ("dpf", dict(pack="bitmask", quantize="int8")),
}


def train(model: str, root: Path, sparsity: float, seed: int) -> dict[str, Path]:
    runs = {}
    for name, method in (("dense", "none"), ("dpf", "dpf")):
        out = root / f"{model}-{name}"
        recipe = Recipe(model=model, method=method, sparsity=sparsity, seed=seed,
                        **TRAINING[model]).validate()
        train_prune(recipe, str(out), show_progress=False)
        runs[name] = out
    return runs


def session_start_ms(path: Path, threads: int, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        open_session(path, threads=threads)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet20"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}; {cpu_name()}; batch 1; {args.runs} timed runs per "
          f"model in 5 alternating blocks after 20 warm-up runs; seed {args.seed}\n")
    print("| model | threads | variant | size | test top-1 | start (ms) | p50 (ms) | p90 (ms) "
          "| p50 / dense | p90 / dense |")
    print("|---" * 10 + "|")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for model in args.models:
            runs = train(model, tmp, args.sparsity, args.seed)
            files = {}
            for variant, (trained, options) in VARIANTS.items():
                path = tmp / f"{model}-{variant.replace(' ', '')}.onnx"
                export_checkpoint(runs[trained], path, **options)
                files[variant] = path
            top1 = {v: evaluate_onnx(p)["top1"] for v, p in files.items()}
            for threads in args.threads:
                measurements, _ = measure(list(files.values()), threads=threads,
                                          runs=args.runs)
                lat = {v: m.latency() for v, m in zip(files, measurements, strict=True)}
                for variant, path in files.items():
                    start = session_start_ms(path, threads)
                    print(f"| {model} | {threads} | {variant} | "
                          f"{path.stat().st_size / 1024:.1f} KiB | {top1[variant]:.4f} | "
                          f"{start:.1f} | {lat[variant]['p50']:.3f} | "
                          f"{lat[variant]['p90']:.3f} | "
                          f"{lat[variant]['p50'] / lat['dense']['p50']:.3f} | "
                          f"{lat[variant]['p90'] / lat['dense']['p90']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
