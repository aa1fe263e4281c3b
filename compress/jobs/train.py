"""``compress train-prune``: train a model, pruning it while it trains, end to end.

Resolves its inputs, trains, writes a run directory (checkpoint after every epoch, metrics
as they happen, report at the end) and returns a summary dict.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from rich.console import Console
from torch import nn

from compress import distributed
from compress.catalog import CATALOG
from compress.checkpoint import (
    Checkpoint,
    apply_structure,
    load_checkpoint,
    load_state,
    load_weights_into,
)
from compress.data import Splits, first_batches, load_splits
from compress.errors import CompressError
from compress.jobs.runner import Job, data_config, finish, optim_config, run_epochs, training_cost
from compress.methods import TrainingPruner, method
from compress.methods.latency_budget import LatencyBudget, LatencyTools
from compress.model_specs import trust_model_spec
from compress.models import build_model
from compress.recipe import (
    Recipe,
    dump_recipe,
    load_recipe,
    recipe_from_mapping,
)
from compress.rundir import RunDir
from compress.training import (
    Diverged,
    EpochResult,
    loss_scaler,
    lr_factor,
    make_optimizer,
    resolve_device,
    seed_everything,
)


def make_pruner(recipe: Recipe, model: nn.Module, total_steps: int) -> TrainingPruner | None:
    """The pruner of ``recipe.method`` (None for dense training), schedule in steps."""
    spec = method(recipe.method, "training")
    try:
        return spec.build(model, recipe, total_steps)
    except ValueError as exc:
        raise CompressError(str(exc)) from None


def _build_job(recipe: Recipe, run: RunDir, resume_state: Checkpoint | None,
               shard: distributed.Shard = distributed.SINGLE,
               latency: LatencyTools | None = None) -> Job:
    device = distributed.device_for(shard, recipe.device) if shard.active \
        else resolve_device(recipe.device)  # train_prune has joined the process group
    generator = seed_everything(recipe.seed)
    splits = load_splits(data_config(recipe))
    model = build_model(recipe.model, splits.config.num_classes, splits.config.input_shape)
    structure, notes = None, []
    if resume_state is not None:
        structure = resume_state.structure
        apply_structure(model, structure, splits.config.input_shape)
    elif recipe.weights:
        structure, notes = load_weights_into(
            model, recipe.weights, recipe.model,
            (splits.config.num_classes, splits.config.input_shape))
    model.to(device)
    cfg = optim_config(recipe)
    steps_per_epoch = splits.train.num_batches(cfg.batch_size, shard.world)
    total_steps = steps_per_epoch * cfg.epochs
    pruner = make_pruner(recipe, model, total_steps)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(cfg, total_steps, steps_per_epoch))
    if recipe.budget_ms is not None:
        if pruner is None:
            raise CompressError(f"--budget-ms on train-prune sets how far density and "
                                f"dpf-filter cut; method {recipe.method} has no cut to set")
        if latency is None:
            raise CompressError("a latency budget needs a way to measure latency: pass "
                                "latency=export.budget.latency_meter(threads) to train_prune "
                                "(the command line does)")
        if recipe.allocation == "latency" and latency.table is None and \
                latency.table_maker is None:
            raise CompressError("--allocation latency needs a layer table: pass latency_table= "
                                "or table_maker=export.budget.layer_table_maker(threads) to "
                                "train_prune (the command line does)")
        pruner.set_budget(LatencyBudget(recipe.budget_ms, latency.latency, recipe.allocation,
                                        latency.table, latency.table_maker))
    if pruner is not None:
        if shard.active and recipe.budget_ms is not None:
            raise CompressError("--budget-ms measures latency on this machine, which each "
                                "torchrun process would measure differently; run it without "
                                "torchrun")
        pruner.attach(optimizer, probe_batches(splits, recipe.probe_samples, device)
                      if pruner.needs_probe else [])
    job = Job(recipe, run, splits, model, pruner, optimizer, scheduler, generator, device,
              shard=shard, structure=structure, cost=training_cost(model, recipe),
              notes=notes, scaler=loss_scaler(recipe.precision, device))
    if resume_state is not None:
        _restore(job, resume_state)
    job.train_model = model
    return job


def probe_batches(splits: Splits, samples: int, device: torch.device) -> list[torch.Tensor]:
    """The first ``samples`` training images, unaugmented, in batches: a fixed probe set."""
    return [x.to(device) for x, _ in first_batches(splits.train, samples)]


def _wrap_for_ranks(job: Job) -> None:
    """DistributedDataParallel around the model: a collective, so only once every process
    has built its job (see `distributed.agree`), and again after each cut (`Job.rewrap`)."""
    if job.shard.active:
        job.rewrap = lambda: _wrapped(job)
        _wrapped(job)


def _wrapped(job: Job) -> nn.Module:
    device = job.device
    job.train_model = torch.nn.parallel.DistributedDataParallel(
        job.model, device_ids=[device.index] if device.type == "cuda" else None)
    return job.train_model


def _restore(job: Job, ckpt: Checkpoint) -> None:
    state = ckpt.training_state or {}
    if not state:
        raise CompressError(f"{job.run.checkpoint} holds no training state to resume from")
    trained_by = int(state.get("processes", 1))
    if trained_by != job.shard.world:  # the batches, steps and schedule depend on it
        how = (f"torchrun --nproc_per_node={trained_by}" if trained_by > 1
               else "one process, without torchrun")
        raise CompressError(f"{job.run.path} was trained by {trained_by} process(es) and this "
                            f"is {job.shard.world}; resume it with {how}")
    load_state(job.model, ckpt.state_dict)
    if job.pruner is not None:
        pruner_state = dict(state["pruner"])
        if state.get("dense_weights"):  # format 1 kept DPF's dense weights beside its state
            pruner_state.setdefault("dense_weights", state["dense_weights"])
        job.pruner.load_state_dict(pruner_state)
    job.optimizer.load_state_dict(state["optimizer"])
    job.scheduler.load_state_dict(state["scheduler"])
    job.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    job.start_epoch = int(state["epoch"])
    job.train_seconds = float(state.get("train_seconds", 0.0))
    cost = state.get("training_cost")
    if cost and job.cost is not None:
        job.cost.spent, job.cost.dense_spent = float(cost["spent"]), float(cost["dense_spent"])
        job.cost.dense_macs = int(cost.get("dense_macs", job.cost.dense_macs))


def train_prune(recipe: Recipe, out: str, *, resume: bool = False,
                requested: dict | None = None,
                console: Console | None = None, show_progress: bool = True,
                on_epoch: Callable[[EpochResult], None] | None = None,
                on_start: Callable[[Job], None] | None = None,
                latency: Callable | None = None, latency_table: dict | None = None,
                table_maker: Callable | None = None) -> dict:
    """Train (and prune during training) per ``recipe``; write the run to ``out``.

    ``latency`` measures a model's p50 in ms for ``recipe.budget_ms`` (the command line
    passes `export.budget.latency_meter`; compress itself never imports export); with
    ``recipe.allocation == "latency"`` the widths come from ``latency_table`` (read from
    ``recipe.latency_table`` by the caller) or one ``table_maker`` makes
    (`export.budget.layer_table_maker`).

    With ``resume``, ``requested`` holds the fields the command line gave: they must equal
    the saved recipe's. Under torchrun every process runs this; see `compress.distributed`.
    ``recipe.model`` is trusted (see `compress.model_specs`): it was named by the caller or
    checked when a file was read; the run's own checkpoint may then name it."""
    trust_model_spec(recipe.model)
    console = console or Console(stderr=True)
    shard = distributed.from_env()
    if shard.active:
        distributed.start(shard, recipe.device)
    try:
        return _train_prune(recipe, out, resume, shard, console, show_progress, on_epoch,
                            on_start, requested or {},
                            None if latency is None else
                            LatencyTools(latency, latency_table, table_maker))
    finally:
        distributed.stop(shard)


def _train_prune(recipe: Recipe, out: str, resume: bool, shard: distributed.Shard,
                 console: Console, show_progress: bool,
                 on_epoch: Callable[[EpochResult], None] | None,
                 on_start: Callable[[Job], None] | None, requested: dict,
                 latency: LatencyTools | None) -> dict:
    run = RunDir(out, writer=shard.main)
    try:
        return _run_job(recipe, run, resume, shard, console, show_progress, on_epoch,
                        on_start, requested, latency)
    finally:
        run.unlock()


def _run_job(recipe: Recipe, run: RunDir, resume: bool, shard: distributed.Shard,
             console: Console, show_progress: bool,
             on_epoch: Callable[[EpochResult], None] | None,
             on_start: Callable[[Job], None] | None, requested: dict,
             latency: LatencyTools | None) -> dict:
    job, error = None, None
    try:
        job = _start_job(recipe, run, resume, shard, requested, latency)
    except CompressError as exc:
        error = exc
    distributed.agree(shard, error)  # every process stops if one could not start
    _wrap_for_ranks(job)
    if on_start and shard.main:
        on_start(job)
    try:
        run_epochs(job, console, show_progress, on_epoch)
    except Diverged as exc:
        kept = (f"the run up to its last good epoch is kept in {run.path}"
                if run.checkpoint.exists() else
                f"no epoch finished, so {run.path} holds only its recipe and log")
        raise CompressError(f"{exc}; {kept}") from None
    return finish(job, console, show_progress)


def _start_job(recipe: Recipe, run: RunDir, resume: bool, shard: distributed.Shard,
               requested: dict | None = None, latency: LatencyTools | None = None) -> Job:
    resume_state = None
    if resume and run.stopped_before_first_epoch():  # start it again, same recipe
        recipe = load_recipe(run.recipe).validate()
        _check_same_recipe(recipe.to_dict(), requested or {}, run)
        run.restart()
    elif resume:
        run.for_resume()
        resume_state = load_checkpoint(run.checkpoint)
        info = CATALOG.get(resume_state.method)
        if info is not None and info.when == "one-shot":
            raise CompressError(f"{run.path} is a one-shot prune run; --resume continues "
                                "train-prune runs (fine-tune it again with `compress prune`)")
        recipe = recipe_from_mapping(resume_state.recipe).validate()
        _check_same_recipe(recipe.to_dict(), requested or {}, run)
    else:
        run.create()
    try:
        job = _build_job(recipe, run, resume_state, shard, latency)
    except BaseException:
        run.discard_if_unused()  # a bad model or data set must not block the same --out
        raise
    if job.start_epoch >= recipe.epochs:
        raise CompressError(f"{run.path} already finished all {recipe.epochs} epoch(s) of its "
                            "recipe; there is nothing to resume")
    if resume:
        run.keep_events_through_epoch(job.start_epoch)
    else:
        run.write_text("recipe.yaml", dump_recipe(recipe))
    return job


def _check_same_recipe(saved: dict, requested: dict, run: RunDir) -> None:
    """Flags given with --resume must repeat the saved recipe; name the ones that do not."""
    differ = [f"--{key.replace('_', '-')} {value} (saved: {saved.get(key)})"
              for key, value in requested.items() if saved.get(key) != value and
              not (key == "input_shape" and list(value or []) == list(saved.get(key) or []))]
    if differ:
        raise CompressError(f"--resume continues {run.path} with its saved recipe; these "
                            f"differ from it: {', '.join(differ)} (drop them, or start a new "
                            "run)")
