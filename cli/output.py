"""Output shared by the commands: consoles, one-line errors, JSON and summary tables."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from functools import wraps

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _console(stderr: bool = False) -> Console:
    """Rich wraps at 80 columns when the output is not a terminal; logs and pipes read
    better with whole lines, so they get 160 (an explicit COLUMNS still wins)."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=160)
    return console


out = _console()
err = _console(stderr=True)
STATE = {"debug": False}
EXIT_USER_ERROR = 2


def friendly_errors(command: Callable) -> Callable:
    """Turn errors into one line and an exit code, unless --debug."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        STATE["command"] = command.__name__
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            _exit_interrupted()
        except Exception as exc:
            _exit_with_one_line(exc)

    return wrapper


INTERRUPTED = {  # what Ctrl-C leaves behind, per command
    "train_prune": "interrupted: the run keeps its last completed epoch (or, before the "
                   "first, its recipe); continue it with the same command and --resume",
    "prune": "interrupted: --out keeps the last completed fine-tune epoch, or nothing if none "
             "finished; a prune run is not resumed: run the same command again, and it "
             "starts over in the same --out",
}


def _exit_interrupted() -> None:
    err.print(INTERRUPTED.get(STATE.get("command"), "interrupted; no half-written file is "
                                                    "left"), highlight=False, soft_wrap=True)
    raise typer.Exit(130) from None


def _exit_with_one_line(exc: Exception) -> None:
    """Exit 2 for what the user or the machine can fix, 1 for a bug in compress."""
    from compress.errors import CompressError, causes, first_line

    if any(isinstance(e, KeyboardInterrupt) for e in causes(exc)):
        _exit_interrupted()  # Ctrl-C inside a library that wraps every error (torch.onnx)
    if STATE["debug"]:
        traceback.print_exc()
    code, text = EXIT_USER_ERROR, None
    if isinstance(exc, CompressError):
        text = str(exc)
    elif isinstance(exc, ModuleNotFoundError) and exc.name in OPTIONAL_MODULES:
        text = (f"this command needs {exc.name}, which is not installed here; "
                f"{OPTIONAL_MODULES[exc.name]}")
    elif isinstance(exc, OSError) and exc.strerror:  # the machine (disk full, permissions)
        text = f"{exc.filename or 'a file'}: {exc.strerror}"
    elif type(exc).__module__.startswith("onnxruntime"):  # the model, not our code
        text = f"onnxruntime could not run the model: {first_line(exc, 300)}"
    else:  # a bug: one line by default, the traceback on --debug
        code = 1
        text = (f"internal error {type(exc).__name__}: {first_line(exc, 300)} (run with "
                "--debug for the traceback)")
    err.print(f"[red]error:[/red] {escape(text)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


OPTIONAL_MODULES = {  # what still works on a device without them
    "torch": "`compress bench` and `compress inspect MODEL.onnx` run without it",
    "torchvision": "`compress bench` and `compress inspect MODEL.onnx` run without it",
    "onnx": "`pip install onnx` (plain `compress bench` runs without it)",
    "cryptography": "`pip install cryptography` (only signing and --verify-key need it)",
}


def parse_shape(text: str | None) -> list[int] | None:
    from compress.errors import CompressError

    if text is None:
        return None
    try:
        shape = [int(part) for part in text.split(",")]
    except ValueError:
        raise CompressError(f"--input-shape must be C,H,W integers, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise CompressError(f"--input-shape must be three positive integers C,H,W, got {text!r}")
    return shape


def print_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def summary_table(summary: dict) -> Table:
    table = Table(show_header=False, box=None)
    rows = [("run directory", summary["run"]), ("model", summary["model"]),
            ("data", summary["data"]), ("method", summary["method"]),
            ("validation top-1", f"{summary['val_top1']:.4f}"),
            ("test top-1", f"{summary['test_top1']:.4f} ({summary['test_samples']} samples)"),
            ]
    structured = "original_macs" in summary
    if not structured or summary["sparsity"] > 0:
        target = summary.get("target_sparsity")
        rows.append(("prunable sparsity", f"{summary['sparsity']:.4f}" + (
            f" (target {target:.4f})" if target is not None else "")))
    if structured:
        rows += _structured_rows(summary)
    cost = _training_cost_row(summary)
    if cost is not None and structured:
        rows.append(cost)
    if summary.get("prunable_params"):
        zeros = round(summary["sparsity"] * summary["prunable_params"])
        rows.append(("pruned weights", f"{zeros} of {summary['prunable_params']} prunable"))
    if summary.get("coverage"):
        rows.append(("coverage", summary["coverage"]))
    if summary.get("empty_layers"):
        rows.append(("[yellow]warning[/yellow]",
                     f"{len(summary['empty_layers'])} layer(s) have no weight left: "
                     f"{', '.join(summary['empty_layers'])}; no signal passes through them "
                     "(keep part of every layer with --layer-floor, e.g. 0.01, or lower "
                     "--sparsity)"))
    if summary.get("skipped_images"):
        rows.append(("[yellow]skipped images[/yellow]", f"{summary['skipped_images']} "
                     "unreadable image(s) left out (--skip-bad-images)"))
    for note in summary.get("notes") or []:
        rows.append(("note", note))
    if "val_top1_before_finetune" in summary:
        rows.append(("val top-1 before fine-tune", f"{summary['val_top1_before_finetune']:.4f}"))
    for key, value in rows:
        label = key if key.startswith("[") else f"[bold]{key}[/bold]"
        table.add_row(label, escape(str(value)))
    return table


def _structured_rows(summary: dict) -> list[tuple[str, str]]:
    rows = []
    if summary.get("channel_sparsity") is not None:
        rows.append(("channels removed", f"{summary['channel_sparsity']:.4f} of each group's "
                                         "channels (before rounding)"))
    if summary.get("removed_channels") is not None:
        rows.append(("channels removed", f"{summary['removed_channels']} "
                                         f"({summary.get('folded_channels', 0)} folded into a "
                                         "bias)"))
    if summary.get("channels_removed_share") is not None:
        cuts = summary.get("cuts", 0)
        rows.append(("channels removed", f"{summary['channels_removed_share']:.4f} of the "
                                         f"prunable channels, in {cuts} cut"
                                         f"{'s' if cuts != 1 else ''}"))
    rows.append(("MACs", f"{summary['macs']:,} of {summary['original_macs']:,} "
                         f"({summary['mac_ratio']:.3f})"))
    rows.append(("parameters", f"{summary['params']:,} of {summary['original_params']:,} "
                               f"({summary['params'] / summary['original_params']:.3f})"))
    return rows


def _training_cost_row(summary: dict) -> tuple[str, str] | None:
    ratio = summary.get("training_mac_ratio")
    if ratio is None or summary.get("finetune_epochs") is not None:
        return None
    spent, dense = summary["training_macs"], summary["dense_training_macs"]
    return ("training MACs", f"{spent:.3g} of {dense:.3g} for dense training ({ratio:.3f}; "
                             "forward + backward = 3x forward)")


def show_summary(summary: dict, json_out: bool) -> None:
    if json_out:
        print_json(summary)
    else:
        out.print(summary_table(summary))
