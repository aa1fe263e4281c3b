"""``compress prune``: prune a trained model once with a one-shot method, then optionally
fine-tune it, end to end."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn

from compress import distributed
from compress.catalog import default_sparsity
from compress.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_weights_into,
)
from compress.data import Splits, load_splits
from compress.errors import CompressError, first_line
from compress.jobs.runner import (
    Job,
    data_config,
    finish,
    merge_structure,
    optim_config,
    progress_bars,
    recalibrate_batchnorm,
    run_epochs,
    small_validation_note,
    training_cost,
    zero_share,
)
from compress.masks import Coverage, layer_floor_for, prunable_weights
from compress.methods import FixedMask, MaskPruner, TrainingPruner, method
from compress.methods.registry import OneShotPruner, OneShotRequest, OneShotResult
from compress.model_specs import trust_model_spec
from compress.models import build_model
from compress.prune_options import BN_RECALIBRATE_IMAGES, check_one_shot
from compress.recipe import (
    Recipe,
    dump_recipe,
    recipe_from_mapping,
)
from compress.rundir import RunDir
from compress.training import (
    EpochResult,
    evaluate,
    loss_scaler,
    lr_factor,
    make_optimizer,
    resolve_device,
    seed_everything,
)


@dataclass
class PruneSource:
    """Where `prune_oneshot` takes its model from: a run directory or checkpoint, or a
    model factory with optional weights (a plain state_dict or a compress checkpoint)."""

    checkpoint: str | None = None
    model: str | None = None
    weights: str | None = None


def _source_recipe(source: PruneSource) -> tuple[Recipe, Checkpoint | None]:
    if source.checkpoint is not None:
        if source.model or source.weights:
            raise CompressError("give a run directory or checkpoint, or --model [--weights], "
                                "not both")
        ckpt = load_checkpoint(source.checkpoint)
        base = recipe_from_mapping(ckpt.recipe) if ckpt.recipe else Recipe(model=ckpt.model_spec)
        data = ckpt.data
        return recipe_from_mapping({
            "model": ckpt.model_spec, "data": data.name, "data_dir": data.data_dir,
            "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "max_train_samples": data.max_train_samples,
            "max_test_samples": data.max_test_samples, "weights": None}, base), ckpt
    if source.model is None:
        raise CompressError("give a run directory or checkpoint to prune, or --model")
    return Recipe(model=source.model, weights=source.weights), None


def _source_model(source: PruneSource, ckpt: Checkpoint | None, recipe: Recipe,
                  splits: Splits) -> tuple[nn.Module, dict | None, list[str]]:
    """The model to prune, the structure it already carries, and warnings."""
    if ckpt is not None:
        return ckpt.build_model(), ckpt.structure, []
    model = build_model(recipe.model, splits.config.num_classes, splits.config.input_shape)
    if source.weights is None:
        return model, None, [f"{recipe.model} has no trained weights (no --weights): it is "
                             "pruned as initialised"]
    structure, notes = load_weights_into(
        model, source.weights, recipe.model,
        (splits.config.num_classes, splits.config.input_shape))
    return model, structure, notes


def _prune_recipe(base: Recipe, name: str, request: OneShotRequest, finetune_epochs: int,
                  lr: float | None, batch_size: int | None, seed: int,
                  overrides: dict) -> Recipe:
    """The recipe a prune run records: what was asked, and how it was fine-tuned."""
    fields = {"method": name, "sparsity": request.sparsity or 0.0,
              "scope": request.scope, "layer_floor": request.layer_floor,
              "round_to": request.round_to, "min_channels": request.min_channels,
              "target_macs": request.target_macs, "epochs": finetune_epochs,
              "lr": lr if lr is not None else base.lr / 10,
              "batch_size": batch_size or base.batch_size, "seed": seed,
              "skip_first": request.coverage.skip_first,
              "skip_classifier": request.coverage.skip_classifier, "warmup_epochs": 0.0,
              **{k: v for k, v in overrides.items() if v is not None}}
    return recipe_from_mapping(fields, base).validate("one-shot")


def _finetune_pruner(model: nn.Module, result: OneShotResult, source_sparse: bool,
                     coverage: Coverage) -> MaskPruner | None:
    """Fine-tuning keeps what pruning zeroed at zero; a thinner dense model trains freely."""
    if result.masks is not None:
        return FixedMask(model, result.masks, coverage)
    if source_sparse:
        return FixedMask.from_zeros(model, coverage)
    return None


def prune_oneshot(checkpoint: str | None, out: str, sparsity: float | None = None, *,
                  method: str = "magnitude", scope: str | None = None,
                  finetune_epochs: int = 0, bn_recalibrate: int = BN_RECALIBRATE_IMAGES,
                  lr: float | None = None,
                  batch_size: int | None = None, seed: int = 0,
                  coverage: Coverage = Coverage(), layer_floor: float | None = None,
                  round_to: int = 8, min_channels: int | None = None,
                  target_macs: float | None = None, budget_ms: float | None = None,
                  latency: Callable | None = None, second_order: dict | None = None,
                  allocation: str = "latency", latency_table: dict | None = None,
                  table_maker: Callable | None = None,
                  reuse: OneShotPruner | None = None, model: str | None = None,
                  weights: str | None = None, data_overrides: dict | None = None,
                  console: Console | None = None, show_progress: bool = True,
                  on_epoch: Callable[[EpochResult], None] | None = None,
                  on_start: Callable[[], None] | None = None) -> dict:
    """Prune a trained model once with a registered one-shot method, optionally fine-tune.

    ``on_start`` is called once every input has been checked, before any work (a command
    line prints its banner there, so that a bad input is one line alone). ``model``, named by
    the caller, is trusted (see `compress.model_specs`)."""
    trust_model_spec(model)
    shard = distributed.from_env()
    spec = _one_shot_spec(method)  # the parameter shadows the registry's `method`
    check_one_shot(method, [] if sparsity is None else [sparsity], target_macs, budget_ms)
    if budget_ms is not None and not (budget_ms > 0 and budget_ms < float("inf")):
        raise CompressError(f"--budget-ms must be a positive number, got {budget_ms}")
    if sparsity is None and target_macs is None and budget_ms is None and \
            spec.info.name != "shrink":
        sparsity = default_sparsity(spec.info.name)
    if finetune_epochs < 0:
        raise CompressError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    console = console or Console(stderr=True)
    source = PruneSource(checkpoint, model, weights)
    base, ckpt = _source_recipe(source)
    request = OneShotRequest(sparsity=sparsity, scope=scope, coverage=coverage,
                             layer_floor=layer_floor_for(layer_floor, sparsity),
                             round_to=round_to,
                             min_channels=min_channels, target_macs=target_macs,
                             budget_ms=budget_ms, latency=latency,
                             second_order=second_order, allocation=allocation,
                             latency_table=latency_table, table_maker=table_maker)
    if bn_recalibrate < 0:
        raise CompressError(f"--bn-recalibrate must be >= 0, got {bn_recalibrate}")
    recipe = _prune_recipe(base, spec.info.name, request, finetune_epochs, lr, batch_size, seed,
                           {**(data_overrides or {}), "bn_recalibrate": bn_recalibrate})
    if reuse is not None:  # a sweep: the same pruner (and what it computed) at a new level
        reuse.request.sparsity = sparsity
        request, pruner = reuse.request, reuse
    else:
        pruner = spec.build(request)  # the request's input shape is set once data is read
    _check_processes(shard, pruner, spec.info.name, finetune_epochs)
    run = RunDir(out).create(resumable=False, restartable=True) if shard.main else None
    try:
        device = distributed.start(shard, recipe.device) if shard.active else \
            resolve_device(recipe.device)
        generator = seed_everything(recipe.seed)
        splits = load_splits(data_config(recipe))
        request.input_shape = splits.config.input_shape
        net, structure, warnings = _source_model(source, ckpt, recipe, splits)
        warnings += filter(None, [small_validation_note(len(splits.val))])
        _check_runs_on(net, recipe)
        pruner.check(net)
    except BaseException as error:
        if run is not None:
            run.discard_if_unused()
        distributed.agree(shard, error)  # every process stops, none waits for the others
        raise
    distributed.agree(shard, None)
    if not shard.main:
        return _share_of_the_gradients(shard, pruner, net, splits, coverage)
    if on_start:
        on_start()
    for note in warnings:
        console.print(f"warning: {note}", highlight=False, markup=False, soft_wrap=True)
    weights = [w.detach() for w in prunable_weights(net, coverage).values()]
    source_sparse = ckpt is not None and ckpt.method != "none" and zero_share(weights) > 0
    started = time.perf_counter()
    try:
        with progress_bars(console, show_progress) as progress:
            _report_progress(pruner, progress)
            result = pruner.prune(net, splits)
            _agree_on_the_result(shard, net, coverage)
    except BaseException:
        run.discard_if_unused()  # nothing was written: the same --out works next time
        distributed.stop(shard)
        raise
    distributed.stop(shard)  # what follows runs in this process alone
    seconds = time.perf_counter() - started
    with run.discarded_unless_checkpointed():  # --out stays usable if no epoch finished
        run.write_text("recipe.yaml", dump_recipe(recipe))
        structure = merge_structure(structure, result.structure)
        net.to(device)
        job = _job_for(recipe, run, splits, net, _finetune_pruner(net, result, source_sparse,
                                                                  coverage),
                       generator, device, structure)
        recalibrated = recalibrate_batchnorm(job)  # the cut left the statistics stale
        before, _ = evaluate(job.model, job.splits.val, device=job.device, pruner=job.pruner)
        run.log("oneshot", source=str(checkpoint or model), method=spec.info.name,
                seconds=seconds, val_top1=before, bn_recalibrated_images=recalibrated,
                **result.details)
        if finetune_epochs > 0:
            run_epochs(job, console, show_progress, on_epoch)
        summary = finish(job, console, show_progress, recalibrate=False)
        summary["bn_recalibrated_images"] = recalibrated
    if spec.info.granularity == "channels":  # a weight-sparsity target is not what was asked
        summary["target_sparsity"] = None
    summary.update(result.details)
    summary["val_top1_before_finetune"] = before
    summary["finetune_epochs"] = finetune_epochs
    summary["source"] = str(checkpoint or model)
    summary["prune_seconds"] = seconds
    summary["notes"] = summary.get("notes", []) + result.notes + warnings
    return summary


def prune_sweep(checkpoint: str | None, out: str, sparsities: list[float],
                **options) -> list[dict]:
    """`prune_oneshot` at every level of ``sparsities``, one run each under ``out``
    (``out/sparsity-S``), with one pruner: a second-order method computes its gradients and
    Fisher blocks once. Returns the summaries in order."""
    check_one_shot(options.get("method", "magnitude"), sparsities, options.get("target_macs"),
                   options.get("budget_ms"))
    if distributed.from_env().active:
        raise CompressError("under torchrun, prune takes one --sparsity level; sweep in one "
                            "process")
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise CompressError(f"--out {out} already exists and is not empty")
    spec = _one_shot_spec(options.get("method", "magnitude"))
    summaries, reuse = [], None
    on_start = options.pop("on_start", None)
    for level in sparsities:
        if reuse is None:
            reuse = spec.build(_request_for(level, options))
        run = root / f"sparsity-{level:g}"
        summaries.append(prune_oneshot(checkpoint, str(run), level, reuse=reuse,
                                       on_start=on_start, **options))
        on_start = None
    return summaries


def _check_processes(shard: distributed.Shard, pruner: OneShotPruner, name: str,
                     finetune_epochs: int) -> None:
    """Under torchrun, prune shares out the gradients of a second-order method, and nothing
    else."""
    if not shard.active:
        return
    if not pruner.runs_across_processes:
        raise CompressError(f"under torchrun, prune shares out the gradients of cbs, cbs-s and "
                            f"woodfisher; run {name} without torchrun")
    if finetune_epochs > 0:
        raise CompressError("under torchrun, prune does not fine-tune; run it without torchrun "
                            "to give --finetune-epochs")
    pruner.shard = shard


def _share_of_the_gradients(shard: distributed.Shard, pruner: OneShotPruner, net: nn.Module,
                            splits: Splits, coverage: Coverage) -> dict:
    """A torchrun process other than the first: it computes its share of the gradients,
    checks that it reached the first process's weights, and leaves the writing to it."""
    try:
        pruner.prune(net, splits)
        _agree_on_the_result(shard, net, coverage)
    finally:
        distributed.stop(shard)
    return {"processes": shard.world, "rank": shard.rank}


def _agree_on_the_result(shard: distributed.Shard, net: nn.Module, coverage: Coverage) -> None:
    distributed.check_identical(shard, dict(prunable_weights(net, coverage)), "pruned weights")


def _request_for(sparsity: float, options: dict) -> OneShotRequest:
    return OneShotRequest(sparsity=sparsity, scope=options.get("scope"),
                          coverage=options.get("coverage", Coverage()),
                          layer_floor=layer_floor_for(options.get("layer_floor"), sparsity),
                          second_order=options.get("second_order"))


def _report_progress(pruner: OneShotPruner, progress: Progress) -> None:
    """Point the pruner's stage reports (``pruner.progress(stage, done, total)``, for those
    that report any) at progress bars, one per stage."""
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total, info="")
        progress.update(tasks[stage], completed=done, total=total)

    pruner.progress = update


def _check_runs_on(model: nn.Module, recipe: Recipe) -> None:
    """A model that cannot run on the data's input shape is the user's to fix: say so."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *recipe.input_shape))
    except Exception as exc:
        raise CompressError(f"model {recipe.model!r} does not run on inputs of shape "
                            f"{tuple(recipe.input_shape)}: {first_line(exc)}") from None


def _one_shot_spec(name: str):
    return method(name, "one-shot")


def _job_for(recipe: Recipe, run: RunDir, splits: Splits, model: nn.Module,
             pruner: TrainingPruner | None, generator: torch.Generator, device: torch.device,
             structure: dict | None) -> Job:
    """A fine-tuning job around an already pruned model."""
    cfg = optim_config(recipe)
    cfg.epochs = max(1, cfg.epochs)  # the schedule needs a length even with no epochs
    steps_per_epoch = splits.train.num_batches(cfg.batch_size)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(cfg, steps_per_epoch * cfg.epochs, steps_per_epoch))
    return Job(recipe, run, splits, model, pruner, optimizer, scheduler, generator, device,
               structure=structure, cost=training_cost(model, recipe),
               scaler=loss_scaler(recipe.precision, device))
