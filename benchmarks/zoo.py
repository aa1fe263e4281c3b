"""What torchvision_zoo.py and timm_zoo.py share: every model of a zoo through the channel
engine, one process each: built with live weights, pruned, exported, checked, timed.

For each model: built (seed 0) with 10 classes and given live weights (`live_weights`), saved
as a compress checkpoint on synthetic data, half of its channels cut with ``compress prune
--method l1-filter --sparsity 0.5`` (rounded to multiples of 8), both models exported, the
pruned export's parity with PyTorch checked in onnxruntime (max |difference| on random
inputs, beside the largest |logit|), and both timed interleaved at 1 thread, batch 1.

Each model runs in its own process with a time limit, so that one failure, hang or memory
blow-up is recorded and the sweep goes on. Results are appended to a JSON-lines file (a
rerun skips models already there) and printed as a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

TIME_BUDGET_S = 20.0  # timing per model: about this long in total, within 10..300 runs
LIVE_BATCHES = 4  # random batches that re-estimate BatchNorm statistics (`live_weights`)


def live_weights(model, shape: tuple[int, ...]) -> list[str]:
    """Make an untrained model's output depend on its input, as a trained one's does: a
    weight matrix a zoo initialises to zero (ViT heads) is drawn from N(0, 0.02), and
    BatchNorm statistics are re-estimated on random inputs (untrained statistics leave
    some networks, GoogLeNet's, with logits that underflow to a constant). Returns what was
    changed."""
    import torch
    from torch import nn

    changed = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, 0.02)
                changed.append(name)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if norms:
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # a plain average over the batches below
            model.train()
            for _ in range(LIVE_BATCHES):
                model(torch.randn(8, *shape))
            changed.append(f"{len(norms)} BatchNorm statistics")
    return changed


def _dense_export(checkpoint: Path, path: Path) -> None:
    """The unpruned model as ONNX; past protobuf's 2 GB limit, with external data."""
    from export.onnx_export import export_checkpoint

    try:
        export_checkpoint(checkpoint, path, pack="none", verify=False)
    except Exception as exc:  # noqa: BLE001 - any failure: try the large-model route
        if "2GB" not in str(exc) and "2 GB" not in str(exc) and "too large" not in str(exc):
            raise
        import torch

        from compress.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint)
        model = ckpt.build_model().eval()
        example = torch.randn(1, *ckpt.data.input_shape)
        torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=True,
                          opset_version=20)


def _output_scale(run: Path, shape: tuple[int, ...]) -> float:
    """Largest |logit| of the pruned model on random inputs: what ``max_abs_diff`` is
    relative to."""
    import torch

    from compress.checkpoint import load_checkpoint

    model = load_checkpoint(run).build_model().eval()
    with torch.no_grad():
        return float(model(torch.randn(2, *shape)).abs().max())


def run_one(name: str, spec: str, shape: tuple[int, ...], out: Path) -> None:
    """Prune, export, verify and time one model; write its row as JSON to ``out``."""
    import torch

    from compress.checkpoint import Checkpoint, save_checkpoint
    from compress.data import DataConfig
    from compress.models import build_model
    from compress.pipeline import prune_oneshot
    from compress.recipe import Recipe
    from compress.stats import count_macs
    from export.onnx_export import export_checkpoint
    from export.runtime.latency import measure

    torch.manual_seed(0)
    torch.set_num_threads(2)
    row: dict = {"model": name, "input": "x".join(map(str, shape)), "stage": "build"}
    started = time.perf_counter()
    try:
        model = build_model(spec, 10, shape)
        row["live"] = live_weights(model, shape)
        model.eval()
        row["params"] = sum(p.numel() for p in model.parameters())
        row["macs"] = count_macs(model, shape)[0]
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            recipe = Recipe(model=spec, data="synthetic", input_shape=list(shape),
                            max_train_samples=40, max_test_samples=8, method="none",
                            batch_size=8)
            data = DataConfig(name="synthetic", input_shape=shape, num_classes=10,
                              max_train_samples=40, max_test_samples=8)
            save_checkpoint(Checkpoint(spec, data, model.state_dict(), recipe=recipe.to_dict()),
                            tmp / "dense.pt")
            del model
            row["stage"] = "prune"
            summary = prune_oneshot(str(tmp / "dense.pt"), str(tmp / "cut"), 0.5,
                                    method="l1-filter", batch_size=8, show_progress=False)
            row.update(params_after=summary["params"], macs_after=summary["macs"],
                       mac_ratio=summary["mac_ratio"],
                       prune_seconds=round(summary["prune_seconds"], 1))
            row["stage"] = "export"
            result = export_checkpoint(tmp / "cut", tmp / "cut.onnx", pack="none", verify=True)
            row["max_abs_diff"] = result.verify.max_abs_diff_vs_torch
            row["output_scale"] = _output_scale(tmp / "cut", shape)
            row["stage"] = "dense export"
            _dense_export(tmp / "dense.pt", tmp / "dense.onnx")
            row["stage"] = "timing"
            probe, _ = measure([tmp / "dense.onnx"], runs=2, warmup=1)
            per_run = max(probe[0].latency()["p50"], 1e-3) / 1e3
            runs = int(min(300, max(10, TIME_BUDGET_S / 2 / per_run)))
            timed, _ = measure([tmp / "dense.onnx", tmp / "cut.onnx"], runs=runs,
                               warmup=min(20, runs))
            dense_p50, cut_p50 = (m.latency()["p50"] for m in timed)
            row.update(dense_p50_ms=dense_p50, p50_ratio=cut_p50 / dense_p50, runs=runs)
            row["stage"] = "done"
    except BaseException as exc:  # noqa: BLE001 - recorded, the sweep goes on
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}" \
            if str(exc).strip() else type(exc).__name__
    row["seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(row))


def table(rows: list[dict]) -> str:
    lines = ["| model | input | params (M) | params after | MACs (M) | MAC ratio | "
             "max abs diff (of max abs logit) | p50 ratio (1 thread) | dense p50 (ms) | "
             "seconds | result |", "|---" * 11 + "|"]
    for r in rows:
        def num(key: str, fmt: str, r: dict = r) -> str:
            return format(r[key], fmt) if r.get(key) is not None else "-"
        result = "ok" if r.get("stage") == "done" else "not run yet" \
            if r.get("stage") == "not run yet" else \
            f"failed at {r.get('stage')}: {r.get('error', '?')}".replace("|", "/")
        params = f"{r['params'] / 1e6:.2f}" if r.get("params") else "-"
        after = f"{r['params_after'] / r['params']:.3f}" if r.get("params_after") else "-"
        macs = f"{r['macs'] / 1e6:.1f}" if r.get("macs") else "-"
        lines.append(f"| {r['model']} | {r['input']} | {params} | {after} | {macs} | "
                     f"{num('mac_ratio', '.3f')} | {num('max_abs_diff', '.1e')} "
                     f"({num('output_scale', '.1e')}) | "
                     f"{num('p50_ratio', '.3f')} | {num('dense_p50_ms', '.2f')} | "
                     f"{num('seconds', '.0f')} | {result} |")
    ok = sum(r.get("stage") == "done" for r in rows)
    lines.append(f"\n{ok} of {len(rows)} models pruned, exported, verified and timed.")
    return "\n".join(lines)


def short_cause(row: dict) -> str:
    """A failure in a few words, for the compact table."""
    error = row.get("error", "")
    if "torch-pruning's dependency graph" in error:
        return "torch-pruning's graph"
    if "after the cut it fails" in error:
        found = re.search(r"at module \S+ \((\w+)\)", error)
        return f"cut breaks {found.group(1)}" if found else "cut breaks a layer"
    return {"process": "out of memory", "time limit": "time limit",
            "export": "torch's export"}.get(row.get("stage"), row.get("stage", "?"))


def compact_table(rows: list[dict], across: int = 3) -> str:
    """Model, MAC ratio and p50 ratio, ``across`` models per line; a failure in a few
    words."""
    cells = []
    for r in rows:
        if r.get("stage") == "done":
            cells.append(f"{r['model']} | {r['mac_ratio']:.2f} | {r['p50_ratio']:.2f}")
        else:
            cells.append(f"{r['model']} | - | {short_cause(r)}")
    cells += [" | | "] * (-len(cells) % across)
    head = "| " + " | ".join(["model | MAC ratio | p50 ratio"] * across) + " |"
    lines = [head, "|" + "---|" * 3 * across]
    lines += ["| " + " | ".join(cells[i:i + across]) + " |"
              for i in range(0, len(cells), across)]
    return "\n".join(lines)


def main(script: str, description: str, all_names: Callable[[], list[str]],
         spec_of: Callable[[str], str], input_of: Callable[[str], tuple[int, ...]],
         results: Path) -> None:
    """The command line of a zoo script (see the module)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    parser.add_argument("--results", type=Path, default=results)
    parser.add_argument("--table", action="store_true",
                        help="only print the table of the results so far (not yet run: '-')")
    parser.add_argument("--compact", action="store_true",
                        help="with --table: model, MAC ratio and p50 ratio, three per line")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--row", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, spec_of(args.one), input_of(args.one), args.row)
        return
    names = args.models or all_names()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            row = json.loads(line)
            done[row["model"]] = row
    for name in names:
        if name in done or args.table:
            continue
        done[name] = _in_child(script, name, args.timeout)
        with open(args.results, "a") as f:
            f.write(json.dumps(done[name]) + "\n")
        row = done[name]
        print(f"{name}: {row.get('stage')} {row.get('error', '')} ({row['seconds']} s)",
              flush=True)
    rows = [done.get(n, {"model": n, "input": "-", "stage": "not run yet"}) for n in names]
    print(compact_table(rows) if args.compact else table(rows))


def _in_child(script: str, name: str, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        row_file = Path(tmp) / "row.json"
        started = time.perf_counter()
        try:
            subprocess.run([sys.executable, script, "--one", name, "--row", str(row_file)],
                           timeout=timeout, check=False, env=os.environ.copy(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            row = json.loads(row_file.read_text()) if row_file.exists() else \
                {"model": name, "input": "-", "stage": "process",
                 "error": "the process died (out of memory?)"}
        except subprocess.TimeoutExpired:
            row = {"model": name, "input": "-", "stage": "time limit",
                   "error": f"over {timeout} s"}
        row.setdefault("seconds", round(time.perf_counter() - started, 1))
    return row
