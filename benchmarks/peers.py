"""compress against the alternatives a user would pick, from the same trained model, with the
same fine-tuning budget, every file of a model timed interleaved in one process.

For each model and seed: a dense model is trained (``--dense-epochs``) on the first
``--train-samples`` Fashion-MNIST images; then, each fine-tuned or trained for
``--finetune-epochs`` from those dense weights:

* ``tp-uniform`` / ``tp-global``: torch-pruning's ``MagnitudePruner`` (L1 magnitude, every
  layer the same ratio / one global ranking, ``round_to=8``, the classifier left alone) at
  channel ratio ``--ratio``, then fine-tuned by compress's own loop (the peer is registered
  here as a one-shot method, so it gets the same BatchNorm re-estimation, fine-tuning and
  export);
* ``dpf-filter`` and ``density`` (ADP) while training, from the dense weights;
* ``l1-latency`` / ``l1-uniform``: ``compress prune --method l1-filter --budget-ms B``
  with ``--allocation latency`` / ``uniform``, B the measured fp32 p50 of ``tp-uniform``'s
  model (so that they meet the peer at its own latency), then fine-tuned;
* ``dpf-filter-latency`` / ``-uniform``, ``density-latency`` / ``-uniform``: ``train-prune``
  with ``--budget-ms B`` and that allocation (no ``--sparsity``: the budget alone decides).

Every run and the dense model are exported in fp32 and int8 (onnxruntime static QDQ); all
files of a model, every seed, are timed interleaved in one process (``--threads``, batch
1); test top-1 on the first ``--test-samples`` test images. NNCF is not compared: it does
not install here (no package index holds it), and its structured pruning was removed in
3.0 anyway. Results: ``benchmarks/results/peers.jsonl`` (a row per file and seed), the
table (mean ± std over seeds) and one accuracy-against-p50 plot per model
(``docs/peers-MODEL.png``). Runs and files are kept under ``--work``: a later call skips
every row already exported and times all files of the model again, interleaved.

    .venv/bin/python benchmarks/peers.py                               # hours on 2 cores
    .venv/bin/python benchmarks/peers.py --models lenet5 --seeds 0 --train-samples 600 \\
        --dense-epochs 1 --finetune-epochs 1 --runs 50 --work /tmp/peers-smoke \\
        --results /tmp/peers-smoke.jsonl                               # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path("benchmarks/results/peers.jsonl")
PLOTS = Path("docs")


def register_peers(ratio: float) -> None:
    """torch-pruning's MagnitudePruner as two one-shot methods of compress."""
    import torch
    import torch_pruning as tp
    from torch import nn

    from compress.catalog import CATALOG, MethodInfo
    from compress.methods.registry import OneShotPruner, OneShotResult, register
    from compress.stats import count_macs
    from compress.structured.engine import Structure, count_params

    class TorchPruningMagnitude(OneShotPruner):
        def __init__(self, request, global_pruning: bool) -> None:
            super().__init__(request)
            self.global_pruning = global_pruning

        def prune(self, model: nn.Module, data=None) -> OneShotResult:
            shape = self.request.input_shape
            original = {"params": count_params(model), "macs": count_macs(model, shape)[0]}
            widths = {n: m.out_channels for n, m in model.named_modules()
                      if isinstance(m, nn.Conv2d)}
            classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
            pruner = tp.pruner.MagnitudePruner(
                model, torch.randn(1, *shape), importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=ratio, global_pruning=self.global_pruning, round_to=8,
                ignored_layers=classifier)
            model.eval()
            pruner.step()
            history = [[str(n), bool(o), [int(i) for i in idx]]
                       for n, o, idx in pruner.DG.pruning_history()]
            kept = {n: [widths[n], m.out_channels] for n, m in model.named_modules()
                    if isinstance(m, nn.Conv2d) and m.out_channels != widths.get(n)}
            macs = count_macs(model, shape)[0]
            return OneShotResult(structure=Structure(history, kept, original),
                                 details={"mac_ratio": macs / original["macs"]})

    for name, global_pruning in (("tp-uniform", False), ("tp-global", True)):
        if name in CATALOG:
            continue
        register(MethodInfo(name, "channels", "one-shot",
                            f"torch-pruning MagnitudePruner, {name[3:]} (a peer)", __name__),
                 lambda request, g=global_pruning: TorchPruningMagnitude(request, g))


ROWS = ("dense", "tp-uniform", "tp-global", "dpf-filter", "density", "l1-latency", "l1-uniform",
        "dpf-filter-latency", "dpf-filter-uniform", "density-latency", "density-uniform")


def make_row(row: str, root: Path, model: str, seed: int, args) -> bool:
    """Train, prune or fine-tune one row's run into ``root / row``; False when it is left out."""
    from compress.errors import CompressError
    from compress.pipeline import prune_oneshot, train_prune
    from compress.recipe import Recipe
    from export.budget import latency_meter, layer_table_maker

    data = {"max_train_samples": args.train_samples, "max_test_samples": args.test_samples,
            "seed": seed}
    dense = root / "dense"
    finetune = {"finetune_epochs": args.finetune_epochs, "seed": seed, "show_progress": False}
    if row == "dense":
        train_prune(Recipe(model=model, method="none", epochs=args.dense_epochs,
                           **data).validate(), str(dense), show_progress=False)
    elif row.startswith("tp-"):
        prune_oneshot(str(dense), str(root / row), args.ratio, method=row, **finetune)
    elif row in ("dpf-filter", "density"):
        extra = {"sparsity": args.ratio} if row == "dpf-filter" else {}
        train_prune(Recipe(model=model, method=row, epochs=args.finetune_epochs,
                           weights=str(dense / "checkpoint.pt"), **extra, **data).validate(),
                    str(root / row), show_progress=False)
    elif row.startswith(("dpf-filter-", "density-")):
        method, allocation = row.rsplit("-", 1)
        budget = Recipe(model=model, method=method, epochs=args.finetune_epochs,
                        weights=str(dense / "checkpoint.pt"), allocation=allocation,
                        budget_ms=peer_budget_ms(root, args), budget_threads=args.threads,
                        **data).validate()
        try:
            train_prune(budget, str(root / row), show_progress=False,
                        latency=latency_meter(args.threads, args.runs),
                        table_maker=layer_table_maker(args.threads))
        except CompressError as exc:
            print(f"{model} seed {seed} {row}: {exc}", flush=True)
            return False
    else:
        try:
            prune_oneshot(str(dense), str(root / row), method="l1-filter",
                          budget_ms=peer_budget_ms(root, args), allocation=row[3:],
                          latency=latency_meter(args.threads, args.runs),
                          table_maker=layer_table_maker(args.threads), **finetune)
        except CompressError as exc:  # a budget the cut cannot meet: the row is left out
            print(f"{model} seed {seed} {row}: {exc}", flush=True)
            return False
    return True


def peer_budget_ms(root: Path, args) -> float:
    """The measured fp32 p50 of tp-uniform's model: the budget compress's cuts must meet
    (measured once per model and seed, kept in ``peer-p50.json``)."""
    from compress.checkpoint import load_checkpoint
    from export.budget import onnx_p50_ms

    kept = root / "peer-p50.json"
    if kept.is_file():
        return float(json.loads(kept.read_text())["p50_ms"])
    peer = load_checkpoint(root / "tp-uniform" / "checkpoint.pt")
    p50 = onnx_p50_ms(peer.build_model(), tuple(peer.data.input_shape), threads=args.threads,
                      runs=args.runs)
    kept.write_text(json.dumps({"p50_ms": p50}))
    return p50


def files_for(model: str, seed: int, args) -> None:
    """fp32 and int8 files of every row of one model and seed, skipping rows already exported
    (a later call resumes where an earlier one stopped)."""
    from export.onnx_export import export_checkpoint

    root = args.work / model / f"seed-{seed}"
    for row in args.rows:
        paths = {p: root / "files" / f"{row}-{p}.onnx" for p in ("fp32", "int8")}
        if all(path.is_file() for path in paths.values()) or (root / f"{row}.left-out").exists():
            continue
        print(f"{model} seed {seed}: {row}", flush=True)
        if not make_row(row, root, model, seed, args):
            (root / f"{row}.left-out").touch()
            continue
        paths["fp32"].parent.mkdir(parents=True, exist_ok=True)
        for precision, path in paths.items():
            export_checkpoint(root / row, path, quantize="none" if precision == "fp32" else
                              precision, verify=False)


def model_files(model: str, args) -> list[dict]:
    """Every exported file of a model, all seeds found in the work folder."""
    files = []
    for seed in args.seeds:
        for path in sorted((args.work / model / f"seed-{seed}" / "files").glob("*.onnx")):
            row, precision = path.stem.rsplit("-", 1)
            if row in args.rows:
                files.append({"model": model, "seed": seed, "row": row,
                              "precision": precision, "path": path})
    return files


def measure_files(files: list[dict], args) -> None:
    """p50 of every file (interleaved in this process), test top-1 and size, in place."""
    from export.onnx_inspect import inspect_onnx
    from export.runtime.evaluation import evaluate_onnx
    from export.runtime.latency import measure

    measured, _ = measure([f["path"] for f in files], threads=args.threads, runs=args.runs)
    for f, m in zip(files, measured, strict=True):
        f["p50_ms"] = m.latency()["p50"]
        f["bytes"] = m.file_bytes
        f["test_top1"] = evaluate_onnx(f["path"])["top1"]
        f["macs"] = inspect_onnx(f["path"])["total"]["macs"]


def table(rows: list[dict]) -> str:
    """Mean ± std over seeds per model, row and precision; speed-up and MAC share against the
    dense fp32 file of the same model."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["row"], r["precision"]), []).append(r)
    lines = ["| model | file | precision | test top-1 | p50 (ms) | speed-up vs dense fp32 | "
             "MACs vs dense | bytes | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for (model, row, precision), found in sorted(groups.items(), key=_order):
        dense = groups[(model, "dense", "fp32")]
        top1 = [100 * r["test_top1"] for r in found]
        p50 = statistics.mean(r["p50_ms"] for r in found)
        std = statistics.stdev(top1) if len(top1) > 1 else 0.0
        macs = statistics.mean(r["macs"] for r in found) / statistics.mean(
            r["macs"] for r in dense)
        lines.append(f"| {model} | {row} | {precision} | {statistics.mean(top1):.2f} ± "
                     f"{std:.2f} | {p50:.3f} | "
                     f"{statistics.mean(r['p50_ms'] for r in dense) / p50:.2f}x | "
                     f"{macs:.2f} | {int(statistics.mean(r['bytes'] for r in found)):,} | "
                     f"{len(found)} |")
    return "\n".join(lines)


def _order(item: tuple) -> tuple:
    (model, row, precision), _ = item
    return model, ROWS.index(row) if row in ROWS else len(ROWS), precision


def plot(rows: list[dict], model: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    found_rows = [r for r in rows if r["model"] == model]
    names = [row for row in ROWS if any(r["row"] == row for r in found_rows)]
    colours = plt.get_cmap("tab20")
    for k, name in enumerate(names):
        for precision, marker in (("fp32", "o"), ("int8", "s")):
            found = [r for r in found_rows if (r["row"], r["precision"]) == (name, precision)]
            if not found:
                continue
            top1 = [100 * r["test_top1"] for r in found]
            ax.errorbar(statistics.mean(r["p50_ms"] for r in found), statistics.mean(top1),
                        yerr=statistics.stdev(top1) if len(top1) > 1 else 0.0, fmt=marker,
                        color=colours(k), capsize=3,
                        label=name if precision == "fp32" else None)
    ax.set_xscale("log")
    ax.plot([], [], "o", color="grey", label="fp32 (circle)")
    ax.plot([], [], "s", color="grey", label="int8 (square)")
    ax.set_xlabel("p50 latency (ms, onnxruntime, 1 thread, batch 1; log scale)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{model}: accuracy against latency (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    path = PLOTS / f"peers-{model}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["vgg-small", "resnet20", "mobilenetv2-32"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--train-samples", type=int, default=6000)
    parser.add_argument("--test-samples", type=int, default=10000)
    parser.add_argument("--dense-epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.5, help="channel ratio of the peers")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/compress-peers"),
                        help="runs and files; kept, so that a later call resumes")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true",
                        help="only print the table and draw the plots from --results")
    args = parser.parse_args()
    if args.report:
        rows = [json.loads(line) for line in args.results.read_text().splitlines() if line]
        for model in dict.fromkeys(r["model"] for r in rows):
            print(f"plot: {plot(rows, model)}")
        print(table(rows))
        return
    register_peers(args.ratio)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    for model in args.models:
        for seed in args.seeds:
            files_for(model, seed, args)
        files = model_files(model, args)
        measure_files(files, args)
        rows = [{k: v for k, v in f.items() if k != "path"} | {"settings": settings}
                for f in files]
        save_rows(args.results, model, rows)
        print(table(rows), flush=True)
        print(f"plot: {plot(rows, model)}", flush=True)


def save_rows(results: Path, model: str, rows: list[dict]) -> None:
    """Replace the model's rows in the results file (other models' rows are kept)."""
    kept = []
    if results.is_file():
        kept = [line for line in results.read_text().splitlines()
                if line and json.loads(line)["model"] != model]
    results.parent.mkdir(parents=True, exist_ok=True)
    part = results.with_suffix(".part")
    part.write_text("".join(line + "\n" for line in kept + [json.dumps(r) for r in rows]))
    part.replace(results)


if __name__ == "__main__":
    main()
