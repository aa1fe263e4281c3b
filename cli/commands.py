"""Subcommands; each one parses flags, calls the library and prints the result."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cli.declared import declared_flags, flags_of
from cli.output import err, out, parse_shape, print_json, show_summary
from cli.timelimit import time_limit_option, time_limited
from compress.catalog import CATALOG, default_sparsity, names, unread_fields
from compress.model_specs import trust_model_spec
from compress.options import check_declared
from compress.prune_options import FINETUNE, PruneOptions
from compress.recipe import TRAINING, Recipe
from export.limits import MAX_INPUT_MB, MAX_TENSOR_MB

Opt = typer.Option
IgnoreDigest = Annotated[bool, Opt("--ignore-digest", help="Use a file that fails its "
                                                         "integrity check anyway.")]
MaxTensorMb = Annotated[float, Opt(help="Largest tensor (MiB) a file may declare or make "
                                        "onnxruntime compute per sample.")]
TrustedModel = Annotated[str | None, Opt(
    "--model", help="The module:callable the checkpoint names, when it is neither registered "
                    "nor torchvision's: a file never chooses code to run by itself.")]
VerifyKey = Annotated[str | None, Opt("--verify-key", help="Public key (PEM): refuse the file "
                                                        "unless it is signed by this key and "
                                                        "unchanged since.")]
# the commands that only read a file stop after this long (cli/timelimit.py); evaluate and
# bench do real work on a legitimate model too, so they get more
INSPECT_TIME_LIMIT_S, RUN_TIME_LIMIT_S = 600, 1800
InspectTimeLimit = time_limit_option(INSPECT_TIME_LIMIT_S)
RunTimeLimit = time_limit_option(RUN_TIME_LIMIT_S)


RUN = "Run"


def methods_help(when: str) -> str:
    """The ``--method`` help, from the method catalog: each name with what it removes."""
    kinds = {"weights": "weights", "channels": "channels", "none": "dense"}
    return ", ".join(f"{name} ({kinds[CATALOG[name].granularity]})" for name in names(when)) \
        + "."


@declared_flags(flags_of(Recipe, changes={"method": {"help": methods_help("training")}}))
def train_prune(
    recipe: Annotated[str | None, Opt(help="YAML recipe; flags override it.",
                                      rich_help_panel=RUN)] = None,
    out_dir: Annotated[str | None, Opt("--out", help="Run directory to create.",
                                       show_default="runs/MODEL-METHOD-TIME",
                                       rich_help_panel=RUN)] = None,
    resume: Annotated[bool, Opt(help="Continue the run in --out.", rich_help_panel=RUN)]
    = False,
    threads: Annotated[int | None, Opt(help="torch threads.", rich_help_panel=TRAINING,
                                       show_default="OMP_NUM_THREADS, else the usable cores "
                                                    "split among torchrun's processes")
                       ] = None,
    json_out: Annotated[bool, Opt("--json", help="Print the summary as JSON.",
                                  rich_help_panel=RUN)] = False,
    quiet: Annotated[bool, Opt(help="No progress display.", rich_help_panel=RUN)] = False,
    **fields: object,
) -> None:
    """Train a model, pruning it during training (DPF, GMP, ADP, DPF-filter) or not at
    all."""
    trust_model_spec(fields["model"])
    from compress.errors import CompressError
    from compress.recipe import given_fields, resolve_recipe

    overrides = dict(fields, input_shape=parse_shape(fields["input_shape"]))
    requested = None
    if resume:
        if out_dir is None:
            raise CompressError("--resume continues the run in --out; name it: --out RUN")
        requested = given_fields(recipe, overrides)  # checked against the saved recipe
        resolved = Recipe()
    else:  # checked before torch loads: a bad value is refused at once
        resolved = resolve_recipe(recipe, overrides)
    from compress.distributed import is_main_process
    from compress.pipeline import train_prune as run_train_prune
    from compress.rundir import new_run_name
    from compress.threads import use_threads

    chosen_threads, busy = use_threads(threads)
    if not resume:
        out_dir = out_dir or new_run_name(resolved.model, resolved.method)
    unread = [] if resume else unread_fields(resolved.method, {
        key for key, value in overrides.items() if value is not None})

    def on_start(job) -> None:
        if unread:  # on stderr, so also beside --json
            flags = ", ".join("--" + name.replace("_", "-") for name in unread)
            err.print(escape(f"warning: --method {job.recipe.method} does not read {flags}; "
                             "they change nothing in this run"), highlight=False,
                      soft_wrap=True)
        from compress.jobs.runner import small_validation_note

        note = small_validation_note(len(job.splits.val))
        if note:
            err.print(f"warning: {note}", highlight=False, soft_wrap=True)
        if json_out:
            return
        r = job.recipe
        target = "" if r.method == "none" else \
            f", at most {r.density_cuts} cut(s)" if r.method == "density" else \
            f", sparsity {r.target_sparsity()}"
        err.print(escape(f"compress train-prune: {r.model} on {r.data}, method {r.method}"
                         + target
                         + f", {r.epochs} epoch{'s' if r.epochs != 1 else ''}, seed {r.seed}"
                         + f", {chosen_threads} thread(s) -> {out_dir}"
                         + (" (resumed)" if resume else "")),
                  highlight=False, soft_wrap=True)
        if busy:  # once the run starts: a refused command stays one line
            err.print(escape(f"warning: {busy}"), highlight=False, soft_wrap=True)

    def on_epoch(result) -> None:
        if not json_out and not quiet:
            err.print(f"epoch {result.epoch}: loss {result.train_loss:.4f}  "
                      f"val top-1 {result.val_acc:.4f}  sparsity {result.sparsity:.4f}  "
                      f"({result.seconds:.1f} s)", highlight=False)

    main_process = is_main_process()  # under torchrun only rank 0 prints
    latency = given_table = table_maker = None
    if resolved.budget_ms is None and resolved.latency_table is not None:
        from compress.errors import CompressError

        raise CompressError("--latency-table is read with --budget-ms")
    if resolved.budget_ms is not None:
        from export.budget import latency_meter

        latency = latency_meter(resolved.budget_threads,
                                precision=resolved.budget_precision)
        given_table, table_maker = _latency_table(resolved)
    summary = run_train_prune(resolved, out_dir, resume=resume, requested=requested,
                              latency=latency, latency_table=given_table,
                              table_maker=table_maker, console=err,
                              show_progress=not quiet and not json_out and main_process,
                              on_epoch=on_epoch, on_start=on_start)
    if main_process:
        show_summary(summary, json_out)


# the recipe fields `prune` shares with train-prune, and how prune reads them differently
PRUNE_SHARED = ("model", "weights", "data", "data_dir", "input_shape", "num_classes",
                "max_train_samples", "max_test_samples", "workers", "skip_bad_images",
                "scope", "layer_floor",
                "skip_first", "skip_classifier", "target_macs", "budget_ms", "budget_threads",
                "budget_precision", "allocation", "latency_table", "round_to", "min_channels",
                "lr", "batch_size", "seed")
ONE_SHOT_CHANNELS = "Channels: " + ", ".join(
    name for name in names("one-shot") if CATALOG[name].granularity == "channels")
PRUNE_CHANGES = {
    "model": {"help": "Prune this model (registered name or module:callable) instead of a "
                      "run.", "shown": "none"},
    "weights": {"help": "With --model: its weights (state_dict or compress checkpoint)."},
    "data": {"help": "Override the recorded data set.", "shown": "the run's"},
    "scope": {"panel": "Method"},
    "target_macs": {"panel": ONE_SHOT_CHANNELS},
    "budget_ms": {"panel": ONE_SHOT_CHANNELS, "help": "Cut until the exported model's p50 at "
                  "batch 1, measured with onnxruntime here, is at most this many ms."},
    "budget_threads": {"panel": ONE_SHOT_CHANNELS},
    "budget_precision": {"panel": ONE_SHOT_CHANNELS},
    "allocation": {"panel": ONE_SHOT_CHANNELS},
    "latency_table": {"panel": ONE_SHOT_CHANNELS},
    "round_to": {"panel": ONE_SHOT_CHANNELS},
    "min_channels": {"panel": ONE_SHOT_CHANNELS},
    "lr": {"panel": FINETUNE, "help": "Fine-tune learning rate.", "shown": "the run's lr / 10"},
    "batch_size": {"panel": FINETUNE, "shown": "the run's"},
    "seed": {"panel": FINETUNE},
    "skip_first": {"shown": "False"},
    "skip_bad_images": {"shown": "False"},
    "skip_classifier": {"shown": "False"},
}


@declared_flags(flags_of(Recipe, PRUNE_SHARED, PRUNE_CHANGES), flags_of(PruneOptions), lead=3)
def prune(
    checkpoint: Annotated[str | None, typer.Argument(
        help="Run directory or checkpoint (or give --model).", show_default=False)] = None,
    method: Annotated[str, Opt(help=methods_help("one-shot"), rich_help_panel="Method")
                      ] = "magnitude",
    sparsity: Annotated[str | None, Opt(help="Fraction of prunable weights (magnitude, cbs, "
                                             "...) or of channels (l1/l2-filter) removed; "
                                             "weights: a list such as 0.5,0.7,0.9 sweeps, one "
                                             "run per level under --out.",
                                        show_default="0.9 for weights, 0.5 for channels",
                                        rich_help_panel="Method")] = None,
    evaluate: Annotated[bool, Opt("--evaluate/--no-evaluate", rich_help_panel=RUN,
                                  help="A sweep's table shows test top-1 too.")] = False,
    threads: Annotated[int | None, Opt(help="torch threads (default: OMP_NUM_THREADS, else the "
                                            "usable cores).", rich_help_panel=RUN)] = None,
    out_dir: Annotated[str | None, Opt("--out", help="Run directory to create.",
                                       show_default="runs/pruned-METHOD-TIME",
                                       rich_help_panel=RUN)] = None,
    json_out: Annotated[bool, Opt("--json", help="Print the summary as JSON.",
                                  rich_help_panel=RUN)] = False,
    quiet: Annotated[bool, Opt(help="No progress display.", rich_help_panel=RUN)] = False,
    **fields: object,
) -> None:
    """Prune a model in one shot (weights or whole channels), then optionally fine-tune."""
    trust_model_spec(fields["model"])
    from compress.prune_options import check_one_shot
    from compress.recipe import check_layer_floor, recipe_from_mapping

    # every value is checked before torch loads: a bad one is refused at once
    fields["input_shape"] = parse_shape(fields["input_shape"])
    given = {key: value for key, value in fields.items()
             if key in PRUNE_SHARED and value is not None}
    shared = recipe_from_mapping(given)
    levels = _levels(sparsity)
    settings = PruneOptions(**{key: value for key, value in fields.items()
                               if key not in PRUNE_SHARED and value is not None})
    check_one_shot(method, levels, shared.target_macs, shared.budget_ms)
    check_declared(shared)
    settings.validate()
    if shared.layer_floor is not None:
        for level in levels or [default_sparsity(method)]:
            check_layer_floor(shared.layer_floor, level)
    from compress.masks import Coverage
    from compress.pipeline import prune_oneshot

    def on_epoch(result) -> None:
        if not json_out and not quiet:
            err.print(f"fine-tune epoch {result.epoch}: loss {result.train_loss:.4f}  "
                      f"val top-1 {result.val_acc:.4f}  ({result.seconds:.1f} s)",
                      highlight=False)

    latency = given_table = table_maker = None
    if shared.budget_ms is None and shared.latency_table is not None:
        from compress.errors import CompressError

        raise CompressError("--latency-table is read with --budget-ms")
    if shared.budget_ms is not None:
        from export.budget import latency_meter

        latency = latency_meter(shared.budget_threads, precision=shared.budget_precision)
        given_table, table_maker = _latency_table(shared)
    amount = f"latency budget {shared.budget_ms} ms ({shared.budget_threads} thread(s), " \
        f"{shared.budget_precision})" \
        if shared.budget_ms is not None \
        else f"MAC budget {shared.target_macs}" if shared.target_macs is not None else \
        f"sparsity {sparsity}" if sparsity is not None else "no sparsity target"
    from compress.rundir import new_run_name
    from compress.threads import use_threads

    chosen_threads, busy = use_threads(threads)
    out_dir = str(out_dir or new_run_name("pruned", method))
    source = checkpoint or given.get("model")

    from compress.distributed import is_main_process

    main_process = is_main_process()  # under torchrun only rank 0 prints

    def banner() -> None:  # once the inputs are checked: a bad one is one line alone
        if not json_out and main_process:
            err.print(escape(f"compress prune: {method}, {amount}, "
                             f"{settings.finetune_epochs} fine-tune epoch(s), "
                             f"{chosen_threads} thread(s), {source} -> {out_dir}"),
                      highlight=False, soft_wrap=True)
            if busy:
                err.print(escape(f"warning: {busy}"), highlight=False, soft_wrap=True)

    data_keys = ("data", "data_dir", "input_shape", "num_classes", "max_train_samples",
                 "max_test_samples", "workers", "skip_bad_images")
    options = dict(method=method, scope=given.get("scope"),
                   layer_floor=given.get("layer_floor"), round_to=shared.round_to,
                   min_channels=shared.min_channels, target_macs=shared.target_macs,
                   budget_ms=shared.budget_ms, latency=latency,
                   second_order=settings.second_order(), model=given.get("model"),
                   allocation=shared.allocation, latency_table=given_table,
                   table_maker=table_maker,
                   weights=given.get("weights"), finetune_epochs=settings.finetune_epochs,
                   bn_recalibrate=settings.bn_recalibrate,
                   lr=given.get("lr"), batch_size=given.get("batch_size"), seed=shared.seed,
                   coverage=Coverage(shared.skip_first, shared.skip_classifier),
                   data_overrides={key: given.get(key) for key in data_keys},
                   console=err, show_progress=not quiet and not json_out and main_process,
                   on_epoch=on_epoch, on_start=banner)
    if len(levels) > 1:
        from compress.pipeline import prune_sweep

        summaries = prune_sweep(checkpoint, out_dir, levels, **options)
        table = sweep_table(summaries, evaluate)
        (Path(out_dir) / "sweep.md").write_text(table + "\n")
        if json_out:
            print_json({"runs": summaries, "table": table})
        else:
            out.print(table, highlight=False, markup=False)
        return
    summary = prune_oneshot(checkpoint, out_dir, levels[0] if levels else None, **options)
    if main_process:
        show_summary(summary, json_out)


def _latency_table(settings) -> tuple[dict | None, object]:
    """For a latency allocation: the given table (read as untrusted JSON, with a warning
    where it was made with other threads or on another CPU), or a maker of one here."""
    if settings.allocation != "latency":
        if settings.latency_table is not None:
            from compress.errors import CompressError

            raise CompressError("--latency-table is read by --allocation latency only")
        return None, None
    from export.budget import layer_table_maker, table_warnings

    if settings.latency_table is None:
        return None, layer_table_maker(settings.budget_threads, settings.budget_precision)
    from compress.jsontext import read_json_file

    table = read_json_file(settings.latency_table, "--latency-table")
    if not isinstance(table, dict):
        from compress.errors import CompressError

        raise CompressError(f"--latency-table {settings.latency_table} is not a layer table")
    for note in table_warnings(table, settings.budget_threads, settings.budget_precision):
        err.print(escape(f"warning: {note}"), highlight=False, soft_wrap=True)
    return table, None


def sweep_table(summaries: list[dict], with_test: bool) -> str:
    """One row per sparsity level: held-out loss and top-1 (test top-1 with --evaluate)."""
    head = "| sparsity | held-out loss | validation top-1 |" + (" test top-1 |" if with_test
                                                              else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summaries:
        loss = s.get("heldout_loss")
        row = f"| {s['sparsity']:.4f} | {loss:.4f} |" if loss is not None else \
            f"| {s['sparsity']:.4f} | - |"
        row += f" {s['val_top1']:.4f} |"
        if with_test:
            row += f" {s['test_top1']:.4f} |"
        lines.append(row)
    return "\n".join(lines)


def _levels(text: str | None) -> list[float]:
    """``--sparsity`` as a list: one number, or several separated by commas."""
    if text is None:
        return []
    from compress.errors import CompressError

    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CompressError(f"--sparsity must be a number or a list such as 0.5,0.7,0.9, "
                            f"got {text!r}") from None


def _warn_unfinished(note: str | None) -> None:
    if note:
        err.print(escape(f"warning: {note}"), highlight=False, soft_wrap=True)


@time_limited
def inspect(
    path: Annotated[str, typer.Argument(help="Run directory, checkpoint or ONNX file.")],
    ignore_digest: IgnoreDigest = False,
    max_tensor_mb: MaxTensorMb = MAX_TENSOR_MB,
    model: TrustedModel = None,
    verify_key: VerifyKey = None,
    json_out: Annotated[bool, Opt("--json")] = False,
    time_limit: InspectTimeLimit = INSPECT_TIME_LIMIT_S,  # applied by @time_limited
) -> None:
    """Per-layer shapes, parameters, non-zeros and sparsity, with totals and MACs."""
    trust_model_spec(model)
    verified_by = check_signed([path], verify_key)  # before anything else reads the file
    if path.lower().endswith(".ort"):
        from compress.errors import CompressError

        raise CompressError(f"{path}: ORT-format files cannot be inspected; inspect the .onnx "
                            "export it was made from")
    if path.lower().endswith(".onnx"):
        from export.onnx_inspect import inspect_onnx
        from export.runtime.evaluation import unfinished_export_note

        report = inspect_onnx(path, ignore_digest=ignore_digest, max_tensor_mb=max_tensor_mb)
        _warn_unfinished(unfinished_export_note(report["metadata"]))
        report["metadata"].setdefault("model", path)
        report["metadata"].setdefault("method", "unknown")
        report["signature"] = _signature(path, verified_by)
    else:
        from compress.inspection import inspect_checkpoint

        report = inspect_checkpoint(path)
        _warn_unfinished(report["metadata"].get("unfinished"))
    if json_out:
        print_json(report)
        return
    table = Table(title=escape(f"{path}: {report['metadata']['model']} "
                               f"({report['metadata']['method']})"))
    for col in ("layer", "shape", "params", "non-zero", "sparsity"):
        table.add_column(col, justify="left" if col in ("layer", "shape") else "right")
    for row in report["layers"]:
        mark = "" if row["prunable"] else " [dim](not pruned)[/dim]"
        table.add_row(escape(row["name"]) + mark, "x".join(map(str, row["shape"])),
                      str(row["params"]), str(row["nonzero"]), f"{row['sparsity']:.4f}")
    t = report["total"]
    table.add_section()
    table.add_row("[bold]total[/bold]", "", str(t["params"]), str(t["nonzero"]),
                  f"{t['sparsity']:.4f}")
    table.add_row("[bold]prunable[/bold]", "", str(t["prunable_params"]),
                  str(t["prunable_nonzero"]), f"{t['prunable_sparsity']:.4f}")
    out.print(table)
    out.print(f"MACs per sample: {t['macs']:,} as dense kernels run it; {t['nonzero_macs']:,} "
              "involve a non-zero weight", highlight=False, soft_wrap=True)
    if report.get("structure"):
        _print_structure(report["structure"])
    if "file_bytes" in t:
        out.print(escape(f"file: {t['file_bytes']:,} bytes; {_packing_line(report['packing'])}"),
                  highlight=False, soft_wrap=True)
    if report.get("signature", {}).get("signed"):
        out.print(_signature_line(report["signature"]), highlight=False, soft_wrap=True)
    for note in report.get("warnings", []):
        err.print(escape(f"warning: {note}"), highlight=False, soft_wrap=True)


def _threads(threads: int | None) -> str | None:
    """Set torch's threads for this command; the warning to print when other work shares
    the cores (after the command's result, so that an error stays one line)."""
    from compress.threads import use_threads

    return use_threads(threads)[1]


def _warn_busy(busy: str | None, quiet: bool) -> None:
    if busy and not quiet:
        err.print(escape(f"warning: {busy}"), highlight=False, soft_wrap=True)


def _warn_damaged(path: str, integrity: dict) -> None:
    if integrity["status"] == "unchecked":
        err.print(escape(f"warning: {path}: integrity not checked ({integrity['reason']})"),
                  highlight=False, soft_wrap=True)
    if integrity["status"] == "damaged":
        err.print(escape(f"warning: {path} is damaged (its {' and '.join(integrity['differs'])}"
                         " differ from what was exported); figures measured anyway"),
                  highlight=False, soft_wrap=True)


def _print_structure(structure: dict) -> None:
    """Channel widths before and after the cut, and what the cut saved."""
    table = Table(title="channel groups cut (leader and its coupled layers)")
    for col in ("leading layer", "original", "kept", "share kept"):
        table.add_column(col, justify="left" if col == "leading layer" else "right")
    for row in structure["widths"]:
        table.add_row(escape(row["layer"]), str(row["original"]), str(row["kept"]),
                      f"{row['kept'] / row['original']:.3f}" if row["original"] else "-")
    out.print(table)
    parts = []
    if structure.get("params_ratio") is not None:
        parts.append(f"params {structure['params_ratio']:.3f} of the original "
                     f"{structure['original_params']:,}")
    if structure.get("macs_ratio") is not None:
        parts.append(f"MACs {structure['macs_ratio']:.3f} of the original "
                     f"{structure['original_macs']:,}")
    if parts:
        out.print("structured: " + "; ".join(parts), highlight=False, soft_wrap=True)


def _packing_line(packing: dict | None) -> str:
    if packing is None:
        return "no weight is packed"
    coding = ", exact, exponent-coded" if packing["value_coding"] != "plain" else ""
    return (f"{packing['weights']} weights packed in one stream: mask {packing['mask_bytes']:,}"
            f" bytes ({packing['mask_levels']}-level tree), {packing['values_stored']:,} "
            f"values {packing['values']}{coding} in {packing['value_bits']} bits each")


@time_limited
def evaluate(
    path: Annotated[str, typer.Argument(help="Run directory, checkpoint or ONNX file.")],
    data: Annotated[str | None, Opt(help="Override the recorded data set.")] = None,
    data_dir: Annotated[str | None, Opt()] = None,
    batch_size: Annotated[int | None, Opt(help="Images per batch (default: for an ONNX file "
                                              "as many as fit 1 MiB of input, at most 512, "
                                              "so scoring holds little beyond the session; "
                                              "for a checkpoint 512).")] = None,
    max_test_samples: Annotated[int | None, Opt(help="Evaluate on the first N test images "
                                                     "only.")] = None,
    threads: Annotated[int | None, Opt(help="torch threads (default: OMP_NUM_THREADS, else the "
                                            "usable cores).")]
    = None,
    ignore_digest: IgnoreDigest = False,
    max_tensor_mb: MaxTensorMb = MAX_TENSOR_MB,
    model: TrustedModel = None,
    verify_key: VerifyKey = None,
    json_out: Annotated[bool, Opt("--json")] = False,
    time_limit: RunTimeLimit = RUN_TIME_LIMIT_S,  # applied by @time_limited
) -> None:
    """Top-1 accuracy on the test split."""
    trust_model_spec(model)
    from compress.errors import CompressError

    verified_by = check_signed([path], verify_key)  # before anything else reads the file
    if batch_size is not None and batch_size < 1:
        raise CompressError(f"--batch-size must be at least 1, got {batch_size}")
    if max_test_samples is not None and max_test_samples < 1:
        raise CompressError(f"--max-test-samples must be at least 1, got {max_test_samples}")
    busy = None if path.lower().endswith((".onnx", ".ort")) else _threads(threads)
    if path.lower().endswith((".onnx", ".ort")):
        from export.runtime.evaluation import evaluate_onnx

        result = evaluate_onnx(path, data, data_dir, batch_size,
                               max_test_samples=max_test_samples, ignore_digest=ignore_digest,
                               max_tensor_mb=max_tensor_mb)
        _warn_damaged(path, result["integrity"])
        _warn_unfinished(result.get("unfinished"))
        result["signature"] = _signature(path, verified_by)
    else:
        from compress.inspection import evaluate_checkpoint

        result = evaluate_checkpoint(path, data, data_dir, batch_size or 512, max_test_samples)
        _warn_unfinished(result.get("unfinished"))
    if json_out:
        print_json(result)
    else:
        out.print(f"test top-1 {result['top1']:.4f} on {result['samples']} samples of "
                  f"{result['data']}", highlight=False)
    _warn_busy(busy, json_out)


SLOW_STAGE_SECONDS = 10.0  # without a terminal, an export step this long gets a line


class ExportStages:
    """Where an export is: a spinner naming the step on a terminal (gone when it ends, so
    a refusal stays one line); elsewhere a line for each step that took long, once done."""

    def __init__(self) -> None:
        self._step: tuple[str, float] | None = None
        self._status = err.status("export") if err.is_terminal else None

    def __enter__(self) -> ExportStages:
        if self._status is not None:
            self._status.start()
        return self

    def __call__(self, what: str) -> None:
        self._close_step()
        self._step = (what, time.monotonic())
        if self._status is not None:
            self._status.update(f"export: {what} ...")

    def _close_step(self) -> None:
        if self._step is not None and self._status is None:
            what, began = self._step
            took = time.monotonic() - began
            if took >= SLOW_STAGE_SECONDS:
                err.print(f"export: {what}: {took:.0f} s", highlight=False, markup=False,
                          soft_wrap=True)
        self._step = None

    def __exit__(self, *exc_info: object) -> None:
        self._close_step()
        if self._status is not None:
            self._status.stop()


def export_onnx(
    source: Annotated[str, typer.Argument(help="Run directory or checkpoint.")],
    onnx_path: Annotated[str, Opt("--onnx", help="ONNX file to write.")],
    pack: Annotated[str, Opt(help="auto (pack where smaller), none, or bitmask.")] = "auto",
    values: Annotated[str, Opt(help="Precision of packed values: fp32, fp16 or int8.")]
    = "fp32",
    opset: Annotated[int, Opt(help="ai.onnx opset (18-26).")] = 20,
    verify: Annotated[bool, Opt("--verify/--no-verify",
                                help="Check, compare with PyTorch, confirm folding.")] = True,
    file_format: Annotated[str, Opt("--format", help="onnx, or ort for onnxruntime minimal "
                                                     "(mobile) builds: weights unpacked.")]
    = "onnx",
    overwrite: Annotated[bool, Opt(help="Replace an existing file at --onnx.")] = False,
    quantize: Annotated[str, Opt(help="none; int8: static QDQ, per-channel weights, "
                                      "calibrated on training images; auto: int8 only where "
                                      "it runs faster here and keeps validation top-1.")]
    = "none",
    max_accuracy_drop: Annotated[float, Opt(help="--quantize auto: most validation top-1 "
                                                 "(points) int8 may lose.")] = 0.5,
    bench_threads: Annotated[int, Opt(help="--quantize auto: onnxruntime threads the two "
                                           "files are timed with.")] = 1,
    calibration_samples: Annotated[int | None, Opt(help="Training images that calibrate "
                                                        "--quantize int8.",
                                                        show_default="512, or all when fewer")]
    = None,
    data_dir: Annotated[str | None, Opt(help="Where the run's data set lies now, if it "
                                             "moved (calibration and the accuracy check).")]
    = None,
    threads: Annotated[int | None, Opt(help="torch threads (default: OMP_NUM_THREADS, else the "
                                            "usable cores).")]
    = None,
    sign: Annotated[str | None, Opt("--sign", help="Private key (from `compress keygen`) "
                                                  "that signs the file.")] = None,
    model: TrustedModel = None,
    allow_constant_output: Annotated[bool, Opt(
        "--allow-constant-output", help="Export a model whose output does not depend on its "
        "input (an untrained architecture to time), with a warning.")] = False,
    json_out: Annotated[bool, Opt("--json")] = False,
) -> None:
    """Export to one self-contained ONNX file with packed sparse weights and metadata."""
    trust_model_spec(model)
    from export.onnx_export import export_checkpoint

    busy = _threads(threads)
    choice = None
    with ExportStages() as stages:
        common = dict(pack=pack, values=values, opset=opset, verify=verify,
                      file_format=file_format, calibration_samples=calibration_samples,
                      data_dir=data_dir, sign=sign, on_stage=None if json_out else stages,
                      allow_constant_output=allow_constant_output)
        if quantize not in ("none", "int8", "auto"):
            from compress.errors import CompressError

            raise CompressError(f"--quantize must be one of none, int8, auto, got "
                                f"{quantize!r}")
        if quantize == "auto":
            from export.precision_choice import export_measured_precision

            result, choice = export_measured_precision(
                source, onnx_path, threads=bench_threads, max_drop=max_accuracy_drop / 100,
                overwrite=overwrite, **common)
            quantize = "int8" if choice["chosen"] == "int8" else "none"
        else:
            result = export_checkpoint(source, onnx_path, overwrite=overwrite,
                                       measure_accuracy=verify, quantize=quantize, **common)
    accuracy = result.accuracy
    _warn_unfinished(result.unfinished)
    if result.verify is not None and result.verify.constant_output:
        err.print("warning: the model's output does not depend on its input (the same logits "
                  "for every sample); exported as asked (--allow-constant-output), but it "
                  "classifies nothing", highlight=False, soft_wrap=True)
    payload = {"path": result.path, "file_bytes": result.file_bytes, "packed": result.packed,
               "values": result.values, "exponent_width": result.exponent_width,
               "quantize": quantize, "opset": result.opset,
               "verify": vars(result.verify) if result.verify else None, "accuracy": accuracy,
               "signed_by": result.signed_by, "precision_choice": choice}
    if json_out:
        print_json(payload)
        return
    if choice is not None:
        p50 = choice["p50_ms"]
        out.print(escape(f"--quantize auto kept {choice['chosen']}: {choice['reason']} (p50 "
                         f"{p50['fp32']:.3f} ms fp32, {p50['int8']:.3f} ms int8, "
                         f"{choice['threads']} thread(s))"), highlight=False, soft_wrap=True)
    stored = "int8 (QDQ)" if quantize == "int8" else result.values
    if result.value_bits:
        stored += f" (exact, exponent-coded in {result.value_bits} bits)"
    what = ("ORT format, weights unpacked" if file_format == "ort" else
            f"{len(result.packed)} weights packed, values {stored}")
    out.print(escape(f"wrote {result.path}: {result.file_bytes:,} bytes, {what}, opset "
                     f"{result.opset}"),
              highlight=False, soft_wrap=True)
    if result.verify:
        v = result.verify
        if quantize == "int8":
            against = (f"on random inputs the int8 model is {v.max_abs_diff_vs_torch:.2e} "
                       "from PyTorch at most (its activation ranges fit real images; the "
                       "accuracy below is the measure)")
        elif result.values == "fp32":
            against = (f"onnxruntime vs PyTorch max |diff| {v.max_abs_diff_vs_torch:.2e} "
                       f"(tolerance {v.tolerance:.2e})")
        else:
            against = (f"onnxruntime matches the decoded {result.values} weights; vs PyTorch "
                       f"max |diff| {v.max_abs_diff_vs_torch:.2e} from {result.values} rounding")
        folded = (f"; decoder folded at load ({v.optimized_nodes} nodes after basic "
                  "optimization)" if result.packed else "")
        if file_format == "ort":
            out.print(f"verified the ONNX export before conversion: onnx.checker ok; {against}; "
                      "the ORT-format file reproduces its outputs", highlight=False,
                      soft_wrap=True)
        else:
            out.print(f"verified: onnx.checker ok; {against}{folded}", highlight=False,
                      soft_wrap=True)
    if accuracy and "error" not in accuracy:
        out.print(f"validation top-1: PyTorch {accuracy['torch_val_top1']:.4f}, onnxruntime "
                  f"{accuracy['onnx_val_top1']:.4f} ({accuracy['delta'] * 100:+.2f} points, "
                  f"{accuracy['samples']} samples)", highlight=False, soft_wrap=True)
    elif accuracy:
        out.print(escape(f"accuracy not measured: {accuracy['error']}"), highlight=False)
    if result.signed_by:
        out.print(escape(f"signed by key {result.signed_by} ({sign})"), highlight=False,
                  soft_wrap=True)
    if result.packed:
        out.print("note: onnxruntime has no sparse Conv/Gemm kernels; unstructured sparsity "
                  "makes the file smaller, not the model faster", highlight=False,
                  soft_wrap=True)
    _warn_busy(busy, False)


EXIT_OVER_BUDGET = 3
PROFILE_RUNS = 100  # profiled runs after the timed ones (at most --runs)
SLOWEST_NODES = 12


def _print_profile(summary: dict, model: str) -> None:
    by_type = Table(title=escape(f"{Path(model).name}: time by operator type "
                                 f"({summary['runs']} profiled runs; kernels "
                                 f"{summary['kernel_ms_per_run']:.3f} ms per run)"))
    for col in ("operator", "nodes", "ms / run", "share"):
        by_type.add_column(col, justify="left" if col == "operator" else "right")
    for row in summary["by_op_type"]:
        by_type.add_row(escape(row["op_type"]), str(row["nodes"]), f"{row['ms_per_run']:.4f}",
                        f"{row['share']:.1%}")
    out.print(by_type)
    shown = summary["by_node"][:SLOWEST_NODES]
    nodes = Table(title=escape(f"{Path(model).name}: slowest nodes of the optimized graph "
                               f"({len(shown)} of {len(summary['by_node'])})"))
    for col in ("node", "operator", "layer", "ms / run", "share"):
        nodes.add_column(col, justify="right" if col in ("ms / run", "share") else "left")
    for row in shown:
        nodes.add_row(escape(row["node"]), escape(row["op_type"]), escape(row["layer"] or "-"),
                      f"{row['ms_per_run']:.4f}", f"{row['share']:.1%}")
    out.print(nodes)
    if summary.get("by_layer"):
        layers = Table(title=escape(f"{Path(model).name}: slowest layers, their MAC rate and "
                                    "its share of this CPU's peak"))
        for col in ("layer", "ms / run", "share", "M MACs", "GMAC/s", "of peak"):
            layers.add_column(col, justify="left" if col == "layer" else "right")
        for row in summary["by_layer"][:SLOWEST_NODES]:
            rate, top = row["gmacs_per_s"], row["share_of_peak"]
            layers.add_row(escape(row["layer"]), f"{row['ms_per_run']:.4f}",
                           f"{row['share']:.1%}",
                           f"{row['macs'] / 1e6:.2f}" if row["macs"] else "-",
                           f"{rate:.2f}" if rate else "-", f"{top:.1%}" if top else "-")
        out.print(layers)


@time_limited
def bench(
    model: Annotated[str, typer.Argument(help="ONNX (or .ort) file to time.")],
    against: Annotated[str | None, Opt(help="A second model, timed interleaved.")] = None,
    threads: Annotated[int, Opt(help="onnxruntime intra-op threads.")] = 1,
    batch: Annotated[int, Opt(help="Batch size of the random input.")] = 1,
    runs: Annotated[int, Opt(help="Timed runs per model.")] = 200,
    warmup: Annotated[int, Opt(help="Untimed runs per model first.")] = 20,
    budget_ms: Annotated[float | None, Opt(help="Exit 3 when --percentile is above this.")]
    = None,
    percentile: Annotated[str, Opt(help="p50, p90 or p99, for --budget-ms.")] = "p90",
    profile: Annotated[bool, Opt(help="Then profile MODEL: time per operator type and per "
                                      "layer.")] = False,
    max_input_mb: Annotated[float, Opt(help="Largest random input (MiB) to allocate.")]
    = MAX_INPUT_MB,
    peak: Annotated[bool, Opt(help="Rate MODEL: its MACs, the GMAC/s it reaches and their "
                                   "share of this CPU's peak, measured on a large conv and "
                                   "matmul (about a second).")] = True,
    layer_table: Annotated[str | None, Opt(help="Then time each prunable layer of MODEL alone "
                                                "at a grid of its widths, and write the table "
                                                "to this JSON file.")] = None,
    table_widths: Annotated[int, Opt(help="--layer-table: widths per axis.")] = 6,
    table_step: Annotated[int, Opt(help="--layer-table: widths are multiples of this.")] = 8,
    overwrite: Annotated[bool, Opt(help="Replace an existing --layer-table file.")] = False,
    ignore_digest: IgnoreDigest = False,
    max_tensor_mb: MaxTensorMb = MAX_TENSOR_MB,
    verify_key: VerifyKey = None,
    json_out: Annotated[bool, Opt("--json")] = False,
    time_limit: RunTimeLimit = RUN_TIME_LIMIT_S,  # applied by @time_limited
) -> None:
    """Latency of a model in onnxruntime (needs no torch): p50/p90/p99, start time, ratio,
    and how close it runs to what the CPU can do."""
    verified_by = check_signed([model] + ([against] if against else []), verify_key)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from export.runtime.latency import bench as run_bench
    from export.runtime.latency import budget_verdict

    budget_verdict({"latency_ms": {}}, None, percentile)  # check the flag before timing
    if layer_table is not None:  # checked before minutes of timing, not after
        from compress.errors import CompressError

        if Path(layer_table).exists() and not overwrite:
            raise CompressError(f"--layer-table {layer_table} already exists; pass --overwrite "
                                "to replace it")
        if table_widths < 1 or table_step < 1:
            raise CompressError("--table-widths and --table-step must be at least 1")
    with Progress(TextColumn("timing"), BarColumn(), MofNCompleteColumn(), console=err,
                  transient=True, disable=json_out or not err.is_terminal) as progress:
        task = progress.add_task("bench", total=runs * (2 if against else 1))
        result = run_bench(model, against, threads=threads, batch=batch, runs=runs,
                           warmup=warmup, profile_runs=min(runs, PROFILE_RUNS) if profile else 0,
                           ignore_digest=ignore_digest, max_tensor_mb=max_tensor_mb,
                           max_input_mb=max_input_mb, rate=peak,
                           on_progress=lambda done, total: progress.update(task,
                                                                           completed=done))
    result = budget_verdict(result, budget_ms, percentile)
    if layer_table is not None:
        result["layer_table"] = _write_layer_table(model, layer_table, threads, batch,
                                                   table_widths, table_step, json_out,
                                                   result["latency_ms"]["p50"])
    result["signature"] = _signature(model, verified_by)
    if result["against"]:
        result["against"]["signature"] = _signature(against, verified_by)
    _warn_damaged(model, result["integrity"])
    if result["against"]:
        _warn_damaged(against, result["against"]["integrity"])
    for note in result["warnings"]:
        err.print(escape(f"warning: {note}"), highlight=False, soft_wrap=True)
    if json_out:
        print_json(result)
    else:
        table = Table(title=escape(f"onnxruntime {result['onnxruntime']}, {result['threads']} "
                                   f"thread(s), batch {result['batch']}, {result['runs']} runs "
                                   f"after {result['warmup']} warm-up; {result['cpu']}"))
        for col in ("model", "file", "start (ms)", "p50 (ms)", "p90 (ms)", "p99 (ms)",
                    "mean (ms)"):
            table.add_column(col, justify="left" if col == "model" else "right",
                             overflow="fold" if col == "model" else "ellipsis")
        rows = [result] + ([result["against"]] if result["against"] else [])
        for row in rows:
            lat = row["latency_ms"]
            table.add_row(escape(Path(row["model"]).name), f"{row['file_bytes']:,}",
                          f"{row['session_start_ms']:.1f}", f"{lat['p50']:.3f}",
                          f"{lat['p90']:.3f}", f"{lat['p99']:.3f}", f"{lat['mean']:.3f}")
        out.print(table)
        out.print(escape(f"throughput of {Path(result['model']).name}: "
                         f"{result['throughput_per_s']:.1f} samples/s; peak RSS of the process "
                         f"{result['peak_rss_mb']:.0f} MiB; providers "
                         f"{', '.join(result['providers'])}"), highlight=False, soft_wrap=True)
        if result["ratio_p50"] is not None:
            out.print(f"p50 ratio (model / against): {result['ratio_p50']:.3f}",
                      highlight=False)
        if result.get("gmacs_per_s"):
            out.print(escape(_rating_line(result)), highlight=False, soft_wrap=True)
        if result["profile"]:
            _print_profile(result["profile"], result["model"])
        if budget_ms is not None:
            verdict = "within" if result["within_budget"] else "OVER"
            out.print(f"{percentile} {result['latency_ms'][percentile]:.3f} ms is {verdict} "
                      f"the budget of {budget_ms} ms", highlight=False)
    if budget_ms is not None and not result["within_budget"]:
        raise typer.Exit(EXIT_OVER_BUDGET)


def _write_layer_table(model: str, out_path: str, threads: int, batch: int, points: int,
                       step: int, quiet: bool, p50_ms: float) -> dict:
    """Time MODEL's layers alone (`export.runtime.layer_table`), write the table atomically
    and say what it predicts for the file as it is."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from compress.fileio import atomic_write_text
    from export.runtime.layer_table import full_width_ms
    from export.runtime.layer_table import layer_table as make_table

    with Progress(TextColumn("layer table"), BarColumn(), MofNCompleteColumn(), console=err,
                  transient=True, disable=quiet or not err.is_terminal) as progress:
        task = progress.add_task("table", total=None)
        table = make_table(model, threads=threads, batch=batch, points=points, step=step,
                           on_progress=lambda done, total: progress.update(
                               task, completed=done, total=total))
    atomic_write_text(out_path, json.dumps(table, indent=1) + "\n")
    summary = {"path": out_path, "layers": len(table["layers"]),
               "timings": sum(len(e["times_ms"]) for e in table["layers"]),
               "full_width_ms": full_width_ms(table), "measured_p50_ms": p50_ms}
    if not quiet:
        err.print(escape(f"layer table: {summary['layers']} layers, {summary['timings']} "
                         f"timings -> {out_path}; its layers at full width add up to "
                         f"{summary['full_width_ms']:.3f} ms against the file's measured p50 "
                         f"{p50_ms:.3f} ms"), highlight=False, soft_wrap=True)
    return summary


def _rating_line(result: dict) -> str:
    """How close the file runs to this CPU's measured peak, in words."""
    line = (f"{result['macs'] / 1e6:,.1f} M MACs per sample at p50: "
            f"{result['gmacs_per_s']:.2f} GMAC/s ({result['precision']})")
    if result["share_of_peak"] is None:
        return line + "; the peak is unknown (the onnx package is needed to measure it)"
    return line + (f", {100 * result['share_of_peak']:.1f} % of the "
                   f"{result['peak_gmacs_per_s'][result['precision']]:.1f} GMAC/s this CPU "
                   f"reaches on a large conv or matmul at {result['threads']} thread(s)")


def check_signed(paths: list[str], verify_key: str | None,
                 option: str = "--verify-key") -> str | None:
    """With ``--verify-key``, refuse (one line) any of ``paths`` that is not signed by that
    key or was changed since; returns the key's fingerprint (None without the flag)."""
    if verify_key is None:
        return None
    from compress.errors import CompressError
    from export.signing import SIGNED_SUFFIXES, load_public_key, verify_file

    key = load_public_key(verify_key, option)
    for path in paths:
        if not path.lower().endswith(SIGNED_SUFFIXES):
            raise CompressError(f"{option} checks signed exports (.onnx or .ort files); "
                                f"{path} is not one")
        fingerprint = verify_file(path, key)
    return fingerprint


def _signature(path: str, verified_by: str | None) -> dict:
    """The ``signature`` entry of the JSON outputs: read from the file; ``verified`` only
    when ``--verify-key`` checked it (a failed check has refused the file already)."""
    from export.signing import signature_info

    return {**signature_info(path), "verified": verified_by is not None}


def _signature_line(signature: dict) -> str:
    state = "verified" if signature["verified"] else "not verified (pass --verify-key PUB)"
    return f"signed by key {signature['key']}: {state}"


def keygen(
    out_path: Annotated[str, Opt("--out", help="Private key file to create; the public key "
                                               "goes to the same name + .pub.")],
    json_out: Annotated[bool, Opt("--json")] = False,
) -> None:
    """Make an Ed25519 key pair for signing exports (never overwrites a key)."""
    from export.signing import generate_key

    private, public, fingerprint = generate_key(out_path)
    if json_out:
        print_json({"private_key": str(private), "public_key": str(public),
                    "key": fingerprint})
        return
    out.print(escape(f"wrote {private} (private: keep it where exports are made, mode 0600, "
                     f"out of the repository) and {public} (public: ship it to the devices "
                     f"that verify); key {fingerprint}"), highlight=False, soft_wrap=True)


def sign(
    path: Annotated[str, typer.Argument(help="Exported .onnx or .ort file, signed in place.")],
    key: Annotated[str, Opt("--key", help="Private key from `compress keygen`.")],
    json_out: Annotated[bool, Opt("--json")] = False,
) -> None:
    """Sign an exported file in place (a signature it had is replaced)."""
    from compress.errors import CompressError
    from export.signing import check_signable, load_private_key, sign_file

    private = load_private_key(key)
    check_signable(path)
    if not Path(path).is_file():
        raise CompressError(f"no model file at {path}")
    if path.lower().endswith(".onnx"):  # a signature would vouch for damage
        from export.onnx_inspect import load_checked

        load_checked(path)
    fingerprint = sign_file(path, private)
    if json_out:
        print_json({"path": path, "key": fingerprint})
    else:
        out.print(escape(f"signed {path} with key {fingerprint}"), highlight=False,
                  soft_wrap=True)


def verify(
    path: Annotated[str, typer.Argument(help="Signed .onnx or .ort file.")],
    key: Annotated[str, Opt("--key", help="Public key (PEM) the file must be signed by.")],
    json_out: Annotated[bool, Opt("--json")] = False,
) -> None:
    """Check that a file is signed by KEY and unchanged since (needs no torch, no onnx)."""
    fingerprint = check_signed([path], key, "--key")
    if json_out:
        print_json({"path": path, "signed": True, "key": fingerprint, "verified": True})
    else:
        out.print(escape(f"{path}: signed by key {fingerprint}: verified"), highlight=False,
                  soft_wrap=True)
