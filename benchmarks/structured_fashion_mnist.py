"""Structured pruning on Fashion-MNIST: which method gives the thinnest, fastest, most
accurate network for one training budget?

For each model and seed, one process per run (``compress`` on the command line):

* ``dense``: ``train-prune --method none`` for ``--epochs``;
* ``density``: ADP for the same epochs (defaults: one cut);
* ``dpf-filter``: DPF on channels for the same epochs, ``--sparsity`` channel share;
* ``l1-filter+ft``: the dense run pruned once to the MAC ratio ADP reached
  (``--target-macs``), then ``--finetune-epochs`` of fine-tuning;
* ``tp-magnitude+ft``: torch-pruning's own ``MagnitudePruner`` (L2 group magnitude), its
  ratio bisected to the same MACs, the same fine-tuning.

Reported: test top-1 mean ± std over seeds, parameters, inference MACs, training MACs
(3x forward MACs per sample at each step; the one-shot rows add their fine-tuning to the
dense run's), and the onnxruntime p50 ratio at batch 1 against the dense export of the same
seed, all exports timed interleaved in one process. The validation split (10 % of the
training slice) is what runs are checked on; the test split is only reported.

    .venv/bin/python benchmarks/structured_fashion_mnist.py            # the README table
    .venv/bin/python benchmarks/structured_fashion_mnist.py --table    # print it again
    .venv/bin/python benchmarks/structured_fashion_mnist.py --redo dpf-filter  # one method

A results file already holding some seeds is resumed; one written with other training
settings is refused rather than mixed into the same table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from compress_cli import compress_json

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "structured_fashion_mnist.json"
TRAINING_SETTINGS = ("epochs", "finetune_epochs", "train_samples", "filter_sparsity")
METHODS = ("dense", "density", "dpf-filter", "l1-filter+ft", "tp-magnitude+ft")


def tp_magnitude(dense_run: Path, out: Path, target_macs: float) -> Path:
    """torch-pruning's MagnitudePruner, ratio bisected to ``target_macs`` of the dense MACs,
    saved as a compress checkpoint (its pruning history is the structure we store)."""
    import copy

    import torch
    import torch_pruning as tp

    from compress.checkpoint import load_checkpoint, save_checkpoint
    from compress.stats import count_macs
    from compress.structured.engine import ENGINE, STRUCTURE_VERSION, count_params
    from compress.structured.rules import classifier_layers

    ckpt = load_checkpoint(dense_run / "checkpoint.pt")
    dense = ckpt.build_model().eval()
    shape = tuple(ckpt.data.input_shape)
    dense_macs = count_macs(dense, shape)[0]

    def cut(ratio: float):
        model = copy.deepcopy(dense)
        pruner = tp.pruner.MagnitudePruner(
            model, torch.randn(1, *shape), importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=classifier_layers(model), round_to=8)
        pruner.step()
        return model, pruner.DG.pruning_history()

    low, high = 0.0, 0.95
    for _ in range(10):
        middle = (low + high) / 2
        model, _ = cut(middle)
        if count_macs(model, shape)[0] <= target_macs * dense_macs:
            high = middle
        else:
            low = middle
    model, history = cut(high)
    ckpt.structure = {"engine": ENGINE, "version": STRUCTURE_VERSION,
                      "history": [[n, bool(o), [int(i) for i in idxs]] for n, o, idxs in history],
                      "widths": {}, "original": {"params": count_params(dense),
                                                 "macs": dense_macs}}
    ckpt.state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt.masks, ckpt.training_state = None, None
    path = out / "tp_magnitude.pt"
    save_checkpoint(ckpt, path)
    return path


def one_seed(model: str, seed: int, args, work: Path) -> dict[str, dict]:
    common = ["--model", model, "--max-train-samples", args.train_samples, "--seed", seed,
              "--batch-size", 128]
    rows = {}
    rows["dense"] = compress_json("train-prune", *common, "--method", "none", "--epochs",
                                  args.epochs, "--out", work / "dense")
    rows["density"] = compress_json("train-prune", *common, "--method", "density",
                                    "--epochs", args.epochs, "--out", work / "density")
    rows["dpf-filter"] = compress_json("train-prune", *common, "--method", "dpf-filter",
                                       "--sparsity", args.filter_sparsity, "--epochs",
                                       args.epochs, "--out", work / "dpf-filter")
    target = rows["density"]["mac_ratio"]
    rows["l1-filter+ft"] = compress_json("prune", work / "dense", "--method", "l1-filter",
                                         "--target-macs", target, "--finetune-epochs",
                                         args.finetune_epochs, "--out", work / "l1-filter")
    tp_ckpt = tp_magnitude(work / "dense", work, target)
    rows["tp-magnitude+ft"] = compress_json(
        "train-prune", *common, "--method", "none", "--weights", tp_ckpt,
        "--epochs", args.finetune_epochs, "--lr", 0.005, "--out", work / "tp")
    runs = {"dense": "dense", "density": "density", "dpf-filter": "dpf-filter",
            "l1-filter+ft": "l1-filter", "tp-magnitude+ft": "tp"}
    return _with_latency(rows, runs, work, args)


TRAINED_WITH = {"density": [], "dpf-filter": ["--sparsity"]}  # methods --redo can rerun


def redo_seed(model: str, seed: int, method: str, args, work: Path) -> dict:
    """``method``'s row of one seed measured again (after a change to that method), timed
    against the same seed's dense run trained again (same seed: the same weights)."""
    common = ["--model", model, "--max-train-samples", args.train_samples, "--seed", seed,
              "--batch-size", 128, "--epochs", args.epochs]
    extra = ["--sparsity", args.filter_sparsity] if TRAINED_WITH[method] else []
    rows = {"dense": compress_json("train-prune", *common, "--method", "none",
                                   "--out", work / "dense"),
            method: compress_json("train-prune", *common, "--method", method, *extra,
                                  "--out", work / method)}
    return _with_latency(rows, {"dense": "dense", method: method}, work, args)[method]


def _with_latency(rows: dict, runs: dict, work: Path, args) -> dict:
    from compress.checkpoint import load_checkpoint
    from compress.stats import count_macs
    from export.onnx_export import export_checkpoint
    from export.runtime.latency import measure

    paths = []
    for name, folder in runs.items():
        path = work / f"{folder}.onnx"
        export_checkpoint(work / folder, path, pack="none")
        paths.append(path)
        ckpt = load_checkpoint(work / folder / "checkpoint.pt")
        net = ckpt.build_model()
        rows[name] = {"test_top1": rows[name]["test_top1"], "val_top1": rows[name]["val_top1"],
                      "params": sum(p.numel() for p in net.parameters()),
                      "macs": count_macs(net, tuple(ckpt.data.input_shape))[0],
                      "training_macs": rows[name].get("training_macs"),
                      "train_seconds": rows[name].get("train_seconds")}
    dense_train = rows["dense"]["training_macs"]
    for name in ("l1-filter+ft", "tp-magnitude+ft"):  # fine-tuning comes on top of dense
        if name not in rows:  # --redo of a training method
            continue
        rows[name]["training_macs"] = dense_train + (rows[name]["training_macs"] or 0)
        if rows[name]["train_seconds"] is not None and rows["dense"]["train_seconds"]:
            rows[name]["train_seconds"] += rows["dense"]["train_seconds"]
    measurements, _ = measure(paths, threads=1, runs=args.runs)
    dense_p50 = measurements[0].latency()["p50"]
    for name, m in zip(runs, measurements, strict=True):
        rows[name]["p50_ms"] = m.latency()["p50"]
        rows[name]["p50_ratio"] = m.latency()["p50"] / dense_p50
    return rows


def table(results: dict) -> str:
    lines = ["| model | method | test top-1 (mean ± std) | params | MACs | training MACs vs "
             "dense | training time vs dense | p50 vs dense (1 thread) |",
             "|---|---|---|---|---|---|---|---|"]
    for model, seeds in results["models"].items():
        dense = statistics.mean(s["dense"]["params"] for s in seeds.values())
        dense_macs = statistics.mean(s["dense"]["macs"] for s in seeds.values())
        dense_train = statistics.mean(s["dense"]["training_macs"] for s in seeds.values())
        for method in METHODS:
            rows = [s[method] for s in seeds.values() if method in s]
            if not rows:
                continue
            top1 = [100 * r["test_top1"] for r in rows]
            std = statistics.stdev(top1) if len(top1) > 1 else 0.0
            params = statistics.mean(r["params"] for r in rows)
            macs = statistics.mean(r["macs"] for r in rows)
            train = statistics.mean(r["training_macs"] for r in rows)
            speed = statistics.mean(r["p50_ratio"] for r in rows)
            times = [r["train_seconds"] / s["dense"]["train_seconds"] for s, r in
                     ((s, s[method]) for s in seeds.values() if method in s)
                     if r.get("train_seconds") and s["dense"].get("train_seconds")]
            wall = f"{statistics.mean(times):.2f}" if times else "-"
            lines.append(f"| {model} | {method} | {statistics.mean(top1):.2f} ± {std:.2f} | "
                         f"{params / 1e3:.1f}k ({params / dense:.3f}) | "
                         f"{macs / 1e6:.2f}M ({macs / dense_macs:.3f}) | "
                         f"{train / dense_train:.3f} | {wall} | {speed:.3f} |")
    return "\n".join(lines)


def _redo(results: dict, args) -> None:
    for model, seeds in results["models"].items():
        for seed, rows in seeds.items():
            with tempfile.TemporaryDirectory(prefix="compress-sfm-") as folder:
                rows[args.redo] = redo_seed(model, int(seed), args.redo, args, Path(folder))
            args.results.write_text(json.dumps(results, indent=1))
            print(f"{model} seed {seed}: {args.redo} measured again", file=sys.stderr,
                  flush=True)


def training_settings(settings: dict) -> dict:
    """The settings that change what a row measures (not which rows, nor timing runs)."""
    return {k: v for k, v in settings.items() if k in TRAINING_SETTINGS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg-small", "resnet20"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=6000)
    parser.add_argument("--filter-sparsity", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--redo", choices=sorted(TRAINED_WITH),
                        help="measure this method's rows again for every seed already done")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    path = args.results
    results = json.loads(path.read_text()) if path.exists() else {"models": {}}
    if not args.table:
        settings = training_settings(vars(args))
        saved = training_settings(results.get("settings", {}))
        if results["models"] and saved != settings:
            sys.exit(f"{path} was measured with {saved}; these settings are {settings}: "
                     "give another --results")
        results["settings"] = {k: v for k, v in vars(args).items()
                               if k not in ("table", "results", "redo")}
        if args.redo:
            _redo(results, args)
        for model in args.models:
            for seed in args.seeds:
                done = results["models"].setdefault(model, {})
                if str(seed) in done:
                    continue
                with tempfile.TemporaryDirectory(prefix="compress-sfm-") as folder:
                    done[str(seed)] = one_seed(model, seed, args, Path(folder))
                path.parent.mkdir(exist_ok=True)
                path.write_text(json.dumps(results, indent=1))
                print(f"{model} seed {seed} done", file=sys.stderr, flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
