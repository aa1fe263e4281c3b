"""``report.md`` and its PNG plots, written from a run directory's own files."""

from __future__ import annotations

import io

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from compress.catalog import CATALOG  # noqa: E402
from compress.checkpoint import load_checkpoint  # noqa: E402
from compress.fileio import atomic_write  # noqa: E402
from compress.rundir import REPORT_NAME, RunDir  # noqa: E402
from compress.stats import layer_stats, summarise  # noqa: E402


def _no_mask_coverage(ckpt) -> str:
    return "whole channels cut (below); no weight masked" if ckpt.structure else \
        "dense run, nothing pruned"


def _trains(method: str) -> bool:
    info = CATALOG.get(method)
    return info is None or info.when == "training"


def _save_png(fig, path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def _training_plot(epochs: list[dict], refreshes: list[dict], path) -> None:
    fig, (ax_acc, ax_sp) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = [e["epoch"] for e in epochs]
    ax_acc.plot(xs, [e["train_acc"] for e in epochs], marker="o", label="train (pruned)")
    ax_acc.plot(xs, [e["val_acc"] for e in epochs], marker="o", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="top-1", title="accuracy")
    ax_acc.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    if refreshes:
        steps = [r["step"] for r in refreshes]
        line_sp = ax_sp.plot(steps, [r["sparsity"] for r in refreshes], marker=".",
                             label="sparsity")
        ax_fl = ax_sp.twinx()
        line_fl = ax_fl.plot(steps, [r["flips"] for r in refreshes], color="tab:red",
                             alpha=0.5, marker=".", label="mask flips per refresh")
        ax_fl.set_ylabel("fraction of mask flipped per refresh")
        ax_fl.set_yscale("symlog", linthresh=1e-4)
        ax_sp.legend(line_sp + line_fl, [ln.get_label() for ln in line_sp + line_fl],
                     loc="center right")
    else:
        ax_sp.plot(xs, [e["sparsity"] for e in epochs], marker="o")
    ax_sp.set(xlabel="optimizer step" if refreshes else "epoch", ylabel="sparsity",
              title="sparsity over training", ylim=(0, 1))
    ax_sp.grid(alpha=0.3)
    _save_png(fig, path)


def _layers_plot(rows, path) -> None:
    prunable = [r for r in rows if r.prunable] or rows
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(prunable) + 2), 3.6))
    ax.bar(range(len(prunable)), [r.sparsity for r in prunable])
    ax.set_xticks(range(len(prunable)), [r.name for r in prunable], rotation=60, ha="right",
                  fontsize=7)
    ax.set(ylabel="sparsity", title="sparsity per layer", ylim=(0, 1))
    ax.grid(alpha=0.3, axis="y")
    _save_png(fig, path)


def _width_history(events: list[dict]) -> dict[str, list[tuple[int, int]]]:
    """Per layer cut during training, its width at step 0 and after every cut."""
    history: dict[str, list[tuple[int, int]]] = {}
    for e in events:
        if e["event"] in ("density", "cut"):
            for root, (before, after) in (e.get("widths") or {}).items():
                history.setdefault(root, [(0, before)]).append((e["step"], after))
    return history


def _widths_plot(events: list[dict], path) -> bool:
    """Widths per layer over training and, for ADP, densities per layer; False if none."""
    widths = _width_history(events)
    readings = [e for e in events if e["event"] == "density"]
    if not widths and not readings:
        return False
    last = max((e.get("step", 0) for e in events if "step" in e), default=1)
    fig, (ax_w, ax_d) = plt.subplots(1, 2, figsize=(11, 3.8))
    for root, points in widths.items():
        steps = [s for s, _ in points] + [last]
        values = [w for _, w in points] + [points[-1][1]]
        ax_w.step(steps, values, where="post", label=root)
    ax_w.set(xlabel="optimizer step", ylabel="channels", title="widths over training")
    ax_w.grid(alpha=0.3)
    if widths:
        ax_w.legend(fontsize=6, ncol=2)
    roots = list(readings[0]["layers"]) if readings else []
    for root in roots:
        points = [(e["step"], e["layers"][root]) for e in readings if root in e["layers"]]
        ax_d.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=root)
    ax_d.set(xlabel="optimizer step", ylabel="share of activations non-zero",
             title="activation density per layer", ylim=(0, 1))
    ax_d.grid(alpha=0.3)
    if roots:
        ax_d.legend(fontsize=6, ncol=2)
    _save_png(fig, path)
    return True


def _cost_lines(metrics: dict) -> list[str]:
    ratio = metrics.get("training_mac_ratio")
    if ratio is None:
        return []
    return [f"- training MACs: {metrics['training_macs']:.3g}, {ratio:.3f} of "
            f"{metrics['dense_training_macs']:.3g} for the same schedule on the network the "
            "run started from (forward and backward counted as 3x the forward MACs of the "
            "network as it was at each step)", ""]


def write_report(run: RunDir) -> None:
    """Plots under ``plots/`` and a markdown summary of the run."""
    ckpt = load_checkpoint(run.checkpoint)
    events = run.read_events()
    epochs = [e for e in events if e["event"] == "epoch"]
    refreshes = [e for e in events if e["event"] == "refresh"]
    prunable = set(ckpt.masks) if ckpt.masks else {
        k for k, v in ckpt.state_dict.items() if k.endswith(".weight") and v.dim() > 1}
    rows = layer_stats(ckpt.state_dict, prunable)
    total = summarise(rows)
    (run.path / "plots").mkdir(exist_ok=True)
    if epochs:
        _training_plot(epochs, refreshes, run.path / "plots" / "training.png")
    _layers_plot(rows, run.path / "plots" / "layers.png")
    m = ckpt.metrics
    lines = [
        f"# Run report: {ckpt.model_spec} on {ckpt.data.name}, method {ckpt.method}",
        "",
        f"- validation top-1: {m.get('val_top1', float('nan')):.4f}; "
        f"test top-1: {m.get('test_top1', float('nan')):.4f} "
        f"({m.get('test_samples', '?')} test samples)",
        f"- prunable sparsity: {total['prunable_sparsity']:.4f} "
        f"({total['prunable_params'] - total['prunable_nonzero']} of "
        f"{total['prunable_params']} prunable weights are zero); overall sparsity "
        f"{total['sparsity']:.4f} of {total['params']} parameters",
        f"- coverage: {m.get('coverage') or _no_mask_coverage(ckpt)}",
        f"- seed {ckpt.recipe.get('seed')}, {_count(ckpt.recipe.get('epochs'), 'epoch')} of "
        f"{'training' if _trains(ckpt.method) else 'fine-tuning'}, "
        f"torch {ckpt.versions.get('torch')}",
        "",
    ]
    if epochs:
        seconds = sum(e["seconds"] for e in epochs)
        lines += ["![accuracy and sparsity](plots/training.png)", "",
                  f"Training time: {seconds:.1f} s over {_count(len(epochs), 'epoch')}.", ""]
    if refreshes:
        late = refreshes[-max(1, len(refreshes) // 10):]
        lines += [f"Mask refreshes: {len(refreshes)}; mean fraction of the mask flipped per "
                  f"refresh, last 10 %: {sum(r['flips'] for r in late) / len(late):.2e}.", ""]
    if _widths_plot(events, run.path / "plots" / "widths.png"):
        lines += ["## Widths over training", "", "![widths and densities](plots/widths.png)",
                  ""]
    lines += _cost_lines(m)
    lines += _structure_lines(ckpt)
    lines += ["![sparsity per layer](plots/layers.png)", "",
              "| layer | shape | params | non-zero | sparsity |", "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {'x'.join(map(str, r.shape))} | {r.params} | {r.nonzero} | "
              f"{r.sparsity:.4f} |" for r in rows if r.prunable]
    run.write_text(REPORT_NAME, "\n".join(lines) + "\n")


def _structure_lines(ckpt) -> list[str]:
    """Widths before and after each channel cut, params and MACs against the original."""
    if not ckpt.structure:
        return []
    from compress.inspection import structure_summary
    from compress.stats import count_macs

    model = ckpt.build_model()
    macs = count_macs(model, ckpt.data.input_shape)[0]
    summary = structure_summary(ckpt.structure, macs, sum(p.numel() for p in model.parameters()))
    lines = ["## Channels cut", ""]
    if summary["macs_ratio"] is not None:
        lines += [f"- MACs per sample: {macs:,}, {summary['macs_ratio']:.3f} of the original "
                  f"{summary['original_macs']:,}",
                  f"- parameters: {summary['params_ratio']:.3f} of the original "
                  f"{summary['original_params']:,}", ""]
    lines += ["| leading layer (and its coupled layers) | original width | kept | share |",
              "|---|---|---|---|"]
    lines += [f"| {w['layer']} | {w['original']} | {w['kept']} | "
              f"{w['kept'] / w['original']:.3f} |" for w in summary["widths"] if w["original"]]
    return lines + [""]


def _count(n, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
