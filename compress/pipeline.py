"""The jobs behind ``compress train-prune`` and ``compress prune``, run end to end.

Each job resolves its inputs, trains or prunes, writes a run directory (checkpoint after
every epoch, metrics as they happen, report at the end) and returns a summary dict.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from compress import distributed
from compress.checkpoint import (
    Checkpoint,
    apply_structure,
    load_checkpoint,
    load_state,
    load_weights_into,
    save_checkpoint,
)
from compress.data import DataConfig, Splits, first_batches, load_splits
from compress.errors import CompressError, first_line
from compress.masks import Coverage, layer_floor_for, prunable_weights
from compress.methods import REGISTRY, FixedMask, MaskPruner, TrainingPruner, method
from compress.methods.registry import OneShotPruner, OneShotRequest, OneShotResult
from compress.model_specs import trust_model_spec
from compress.models import build_model
from compress.recipe import (
    Recipe,
    dump_recipe,
    load_recipe,
    recipe_from_mapping,
)
from compress.report import write_report
from compress.rundir import RunDir
from compress.training import (
    Diverged,
    EpochResult,
    OptimConfig,
    evaluate,
    lr_factor,
    make_optimizer,
    resolve_device,
    seed_everything,
    train_epoch,
)


def data_config(recipe: Recipe) -> DataConfig:
    return DataConfig(name=recipe.data, data_dir=recipe.data_dir,
                      input_shape=tuple(recipe.input_shape), num_classes=recipe.num_classes,
                      val_fraction=recipe.val_fraction,
                      max_train_samples=recipe.max_train_samples,
                      max_test_samples=recipe.max_test_samples)


def optim_config(recipe: Recipe) -> OptimConfig:
    return OptimConfig(epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                       momentum=recipe.momentum, nesterov=recipe.nesterov,
                       weight_decay=recipe.weight_decay, lr_schedule=recipe.lr_schedule,
                       warmup_epochs=recipe.warmup_epochs)


def make_pruner(recipe: Recipe, model: nn.Module, total_steps: int) -> TrainingPruner | None:
    """The pruner of ``recipe.method`` (None for dense training), schedule in steps."""
    spec = method(recipe.method, "training")
    try:
        return spec.build(model, recipe, total_steps)
    except ValueError as exc:
        raise CompressError(str(exc)) from None


def resolve_recipe(recipe_path: str | None, overrides: dict) -> Recipe:
    base = load_recipe(recipe_path) if recipe_path else Recipe()
    return recipe_from_mapping({k: v for k, v in overrides.items() if v is not None},
                               base).validate()


@dataclass
class TrainingCost:
    """Training MACs: forward and backward are counted as 3x the forward MACs of the network
    as it is at each step, against the same schedule run on the dense network."""

    dense_macs: int  # forward MACs per sample of the network the run started from
    macs: int  # forward MACs per sample now
    spent: float = 0.0
    dense_spent: float = 0.0
    after_step: int | None = None  # the width of a cut made at the step being counted

    def add(self, samples: int) -> None:
        self.spent += 3.0 * self.macs * samples
        self.dense_spent += 3.0 * self.dense_macs * samples
        if self.after_step is not None:
            self.macs, self.after_step = self.after_step, None

    def state(self) -> dict:
        return {"spent": self.spent, "dense_spent": self.dense_spent}

    def summary(self) -> dict:
        return {"training_macs": self.spent, "dense_training_macs": self.dense_spent,
                "training_mac_ratio": self.spent / self.dense_spent if self.dense_spent
                else None}


@dataclass
class Job:
    """What one training job holds while it runs."""

    recipe: Recipe
    run: RunDir
    splits: Splits
    model: nn.Module
    pruner: TrainingPruner | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    device: torch.device
    start_epoch: int = 0
    shard: distributed.Shard = distributed.SINGLE
    train_model: nn.Module | None = None  # the DistributedDataParallel wrapper under torchrun
    structure: dict | None = None  # the channel cuts the model carries (checkpoint format 2)
    cost: TrainingCost | None = None  # MACs spent training, against dense training
    train_seconds: float = 0.0  # wall time of the training passes (no evaluation)

    def current_structure(self) -> dict | None:
        """The cuts the model carries now: those it started with, then the pruner's."""
        cutter = self.pruner.cutter if self.pruner is not None else None
        return _merge_structure(self.structure, cutter.structure if cutter else None)

    def save(self, ckpt: Checkpoint) -> None:
        """Write the checkpoint beside the last one and rename it into place: a write that
        fails (a full disk) leaves the last good checkpoint, and says so."""
        if not self.shard.main:
            return
        try:
            save_checkpoint(ckpt, self.run.checkpoint)
        except OSError as exc:
            kept = ("its last good checkpoint is kept and resumes with --resume"
                    if self.run.checkpoint.exists() else "no checkpoint was written yet")
            raise CompressError(f"cannot write the checkpoint in {self.run.path} "
                                f"({exc.strerror or exc}); {kept}") from None


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                    disable=not enabled, transient=True)


def _build_job(recipe: Recipe, run: RunDir, resume_state: Checkpoint | None,
               shard: distributed.Shard = distributed.SINGLE,
               latency: Callable | None = None) -> Job:
    device = distributed.device_for(shard, recipe.device) if shard.active \
        else resolve_device(recipe.device)  # train_prune has joined the process group
    generator = seed_everything(recipe.seed)
    splits = load_splits(data_config(recipe))
    model = build_model(recipe.model, splits.config.num_classes, splits.config.input_shape)
    structure = None
    if resume_state is not None:
        structure = resume_state.structure
        apply_structure(model, structure, splits.config.input_shape)
    elif recipe.weights:
        structure = load_weights_into(model, recipe.weights, recipe.model)
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
        pruner.set_budget(recipe.budget_ms, latency)
    if pruner is not None:
        if shard.active and pruner.granularity == "channels":
            raise CompressError(f"--method {recipe.method} changes the network while it trains "
                                "and runs in one process; run it without torchrun")
        pruner.attach(optimizer, probe_batches(splits, recipe.probe_samples, device)
                      if pruner.needs_probe else [])
    job = Job(recipe, run, splits, model, pruner, optimizer, scheduler, generator, device,
              shard=shard, structure=structure, cost=_cost_for(model, recipe))
    if resume_state is not None:
        _restore(job, resume_state)
    job.train_model = model
    return job


def probe_batches(splits: Splits, samples: int, device: torch.device) -> list[torch.Tensor]:
    """The first ``samples`` training images, unaugmented, in batches: a fixed probe set."""
    return [x.to(device) for x, _ in first_batches(splits.train, samples)]


def _cost_for(model: nn.Module, recipe: Recipe) -> TrainingCost:
    from compress.stats import count_macs

    macs = count_macs(model, tuple(recipe.input_shape))[0]
    return TrainingCost(macs, macs)


def _wrap_for_ranks(job: Job) -> None:
    """DistributedDataParallel around the model: a collective, so only once every process
    has built its job (see `distributed.agree`)."""
    if job.shard.active:
        device = job.device
        job.train_model = torch.nn.parallel.DistributedDataParallel(
            job.model, device_ids=[device.index] if device.type == "cuda" else None)


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


def _checkpoint(job: Job, epoch: int, metrics: dict) -> Checkpoint:
    pruner = job.pruner
    state_dict = pruner.pruned_state_dict() if pruner else {
        k: v.detach().clone() for k, v in job.model.state_dict().items()}
    training_state = {
        "epoch": epoch,
        "optimizer": job.optimizer.state_dict(),
        "scheduler": job.scheduler.state_dict(),
        "generator": job.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "pruner": pruner.state_dict() if pruner else None,
        "processes": job.shard.world,
        "training_cost": {**job.cost.state(), "dense_macs": job.cost.dense_macs}
        if job.cost else None,
        "train_seconds": job.train_seconds,
    }
    return Checkpoint(
        model_spec=job.recipe.model, data=job.splits.config,
        state_dict={k: v.cpu() for k, v in state_dict.items()}, method=job.recipe.method,
        masks={k: v.cpu() for k, v in pruner.masks.items()} if pruner and pruner.masks
        else None,
        recipe=job.recipe.to_dict(), metrics=metrics, training_state=training_state,
        structure=job.current_structure())


def _run_epochs(job: Job, console: Console, show_progress: bool,
                on_epoch: Callable[[EpochResult], None] | None) -> list[EpochResult]:
    cfg = optim_config(job.recipe)
    results: list[EpochResult] = []
    steps = job.splits.train.num_batches(cfg.batch_size, job.shard.world)
    with _progress(console, show_progress and job.shard.main) as progress:
        for epoch in range(job.start_epoch, cfg.epochs):
            task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps, info="")
            started = time.perf_counter()
            refreshes: list[dict] = []

            def on_step(batch: int, loss: float, acc: float, task=task) -> None:
                if job.cost is not None:
                    job.cost.add(batch * job.shard.world)
                sparsity = job.pruner.sparsity if job.pruner else 0.0
                progress.update(task, advance=1, info=f"loss {loss:.3f}  acc {acc:.3f}  "
                                                      f"sparsity {sparsity:.3f}")

            def on_refresh(event: dict, refreshes=refreshes) -> None:
                kind = event.pop("kind", "refresh")
                if kind == "refresh":
                    refreshes.append(event)
                if event.get("widths") and job.cost is not None:  # the network got thinner
                    job.cost.after_step = job.pruner.cutter.macs()
                job.run.log(kind, **event)

            loss, acc = train_epoch(job.train_model or job.model, job.splits.train,
                                    job.optimizer, job.scheduler, cfg, job.generator,
                                    job.device, epoch, job.pruner, on_step, on_refresh,
                                    shard=job.shard)
            train_seconds = time.perf_counter() - started
            job.train_seconds += train_seconds
            val_acc, val_loss = evaluate(job.model, job.splits.val, device=job.device,
                                         pruner=job.pruner, shard=job.shard)
            result = EpochResult(epoch + 1, loss, acc, val_acc, val_loss,
                                 job.pruner.sparsity if job.pruner else 0.0, train_seconds,
                                 job.scheduler.get_last_lr()[0], refreshes)
            progress.remove_task(task)
            job.run.log("epoch", **{k: v for k, v in vars(result).items() if k != "refreshes"},
                        mean_flips=(sum(r["flips"] for r in refreshes) / len(refreshes)
                                    if refreshes else 0.0),
                        params=sum(p.numel() for p in job.model.parameters()),
                        macs=job.cost.macs if job.cost else None,
                        training_macs=job.cost.spent if job.cost else None)
            job.save(_checkpoint(job, epoch + 1, {"val_top1": val_acc}))
            results.append(result)
            if on_epoch and job.shard.main:
                on_epoch(result)
    return results


def train_prune(recipe: Recipe, out: str, *, resume: bool = False,
                requested: dict | None = None,
                console: Console | None = None, show_progress: bool = True,
                on_epoch: Callable[[EpochResult], None] | None = None,
                on_start: Callable[[Job], None] | None = None,
                latency: Callable | None = None) -> dict:
    """Train (and prune during training) per ``recipe``; write the run to ``out``.

    ``latency`` measures a model's p50 in ms for ``recipe.budget_ms`` (the command line
    passes `export.budget.latency_meter`; compress itself never imports export).

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
                            on_start, requested or {}, latency)
    finally:
        distributed.stop(shard)


def _train_prune(recipe: Recipe, out: str, resume: bool, shard: distributed.Shard,
                 console: Console, show_progress: bool,
                 on_epoch: Callable[[EpochResult], None] | None,
                 on_start: Callable[[Job], None] | None, requested: dict,
                 latency: Callable | None) -> dict:
    run = RunDir(out, writer=shard.main)
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
        _run_epochs(job, console, show_progress, on_epoch)
    except Diverged as exc:
        kept = (f"the run up to its last good epoch is kept in {out}"
                if run.checkpoint.exists() else
                f"no epoch finished, so {out} holds only its recipe and log")
        raise CompressError(f"{exc}; {kept}") from None
    return _finish(job)


def _start_job(recipe: Recipe, run: RunDir, resume: bool, shard: distributed.Shard,
               requested: dict | None = None, latency: Callable | None = None) -> Job:
    resume_state = None
    if resume and run.stopped_before_first_epoch():  # start it again, same recipe
        recipe = load_recipe(run.recipe).validate()
        _check_same_recipe(recipe.to_dict(), requested or {}, run)
        run.restart()
    elif resume:
        run.for_resume()
        resume_state = load_checkpoint(run.checkpoint)
        spec = REGISTRY.get(resume_state.method)
        if spec is not None and spec.when == "one-shot":
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


def _zero_share(tensors: list[torch.Tensor]) -> float:
    """Sparsity measured on the weights themselves, not read off masks."""
    total = sum(t.numel() for t in tensors)
    return sum(int((t == 0).sum()) for t in tensors) / total if total else 0.0


def _finish(job: Job) -> dict:
    """Final figures: validation and test top-1, exact sparsity; report; final checkpoint."""
    # dpf-filter cuts its channels if not yet done
    event = job.pruner.finalize() if job.pruner is not None else None
    if event is not None:
        job.run.log(event.kind, **{k: v for k, v in vars(event).items() if k != "kind"})
    val_acc, val_loss = evaluate(job.model, job.splits.val, device=job.device, pruner=job.pruner,
                                 shard=job.shard)
    test_acc, test_loss = evaluate(job.model, job.splits.test, device=job.device,
                                   pruner=job.pruner, shard=job.shard)
    pruner = job.pruner
    if pruner is not None and pruner.masks:
        distributed.check_identical(job.shard, pruner.masks, "pruning masks")
    summary = {
        "run": str(job.run.path),
        "model": job.recipe.model,
        "data": job.splits.config.name,
        "method": job.recipe.method,
        **_pruner_figures(job),
        "val_top1": val_acc,
        "test_top1": test_acc,
        "test_samples": len(job.splits.test),
        "processes": job.shard.world,
        "train_seconds": job.train_seconds,
        **(job.cost.summary() if job.cost else {}),
    }
    job.run.log("final", **summary)
    job.save(_checkpoint(job, job.recipe.epochs, summary))
    if job.shard.main:
        write_report(job.run)
    return summary


def _pruner_figures(job: Job) -> dict:
    """What the pruner did: weight sparsity for mask pruners; channels, parameters and MACs
    against the original network for pruners that make it thinner."""
    pruner = job.pruner
    if pruner is None:
        return {"target_sparsity": 0.0, "sparsity": 0.0, "prunable_params": None,
                "coverage": None, "empty_layers": []}
    if pruner.granularity == "channels":
        from compress.stats import count_macs
        from compress.structured.engine import count_params

        structure = job.current_structure() or {}
        original = structure.get("original") or {}
        params = count_params(job.model)
        macs = count_macs(job.model, tuple(job.recipe.input_shape))[0]
        first_params = original.get("params", params)
        first_macs = original.get("macs", macs)
        now = pruner.cutter.widths()
        first = {root: (structure.get("widths") or {}).get(root, [width])[0]
                 for root, width in now.items()}
        share = 1.0 - sum(now.values()) / sum(first.values()) if first else 0.0
        return {"target_sparsity": None, "sparsity": 0.0, **pruner.summary(),
                "channels_removed_share": share,
                "params": params, "macs": macs, "original_params": first_params,
                "original_macs": first_macs,
                "mac_ratio": macs / first_macs if first_macs else None,
                "param_ratio": params / first_params if first_params else None}
    return {
        "target_sparsity": job.recipe.target_sparsity(),
        "sparsity": _zero_share([pruner.pruned_tensor(n) for n in pruner.weights]),
        "prunable_params": sum(w.numel() for w in pruner.weights.values()),
        "coverage": pruner.coverage.describe(),
        "empty_layers": [n for n in pruner.weights if not pruner.masks[n].any()],
    }


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
    return model, load_weights_into(model, source.weights, recipe.model), []


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
                  finetune_epochs: int = 0, lr: float | None = None,
                  batch_size: int | None = None, seed: int = 0,
                  coverage: Coverage = Coverage(), layer_floor: float | None = None,
                  round_to: int = 8, min_channels: int | None = None,
                  target_macs: float | None = None, budget_ms: float | None = None,
                  latency: Callable | None = None, second_order: dict | None = None,
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
    if distributed.from_env().active:
        raise CompressError("compress prune runs in one process; run it without torchrun")
    spec = _one_shot_spec(method)  # the parameter shadows the registry's `method`
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise CompressError(f"--sparsity must be in [0, 1), got {sparsity}")
    given = [f for f, v in (("--sparsity", sparsity), ("--target-macs", target_macs),
                            ("--budget-ms", budget_ms)) if v is not None]
    if len(given) > 1:
        raise CompressError(f"give one of --sparsity, --target-macs and --budget-ms, not "
                            f"{' and '.join(given)}")
    for flag, value in (("--target-macs", target_macs), ("--budget-ms", budget_ms)):
        if value is not None and spec.granularity != "channels":
            raise CompressError(f"{flag} sets a channel budget; method {method} removes "
                                f"{spec.granularity}")
    if budget_ms is not None and not (budget_ms > 0 and budget_ms < float("inf")):
        raise CompressError(f"--budget-ms must be a positive number, got {budget_ms}")
    if sparsity is None and target_macs is None and budget_ms is None and \
            spec.name != "shrink":
        sparsity = 0.5 if spec.granularity == "channels" else 0.9
    if finetune_epochs < 0:
        raise CompressError("--finetune-epochs must not be negative")
    console = console or Console(stderr=True)
    source = PruneSource(checkpoint, model, weights)
    base, ckpt = _source_recipe(source)
    request = OneShotRequest(sparsity=sparsity, scope=scope, coverage=coverage,
                             layer_floor=layer_floor_for(layer_floor, sparsity),
                             round_to=round_to,
                             min_channels=min_channels, target_macs=target_macs,
                             budget_ms=budget_ms, latency=latency,
                             second_order=second_order)
    recipe = _prune_recipe(base, spec.name, request, finetune_epochs, lr, batch_size, seed,
                           data_overrides or {})
    if reuse is not None:  # a sweep: the same pruner (and what it computed) at a new level
        reuse.request.sparsity = sparsity
        request, pruner = reuse.request, reuse
    else:
        pruner = spec.build(request)  # the request's input shape is set once data is read
    run = RunDir(out).create(resumable=False)
    try:
        device = resolve_device(recipe.device)
        generator = seed_everything(recipe.seed)
        splits = load_splits(data_config(recipe))
        request.input_shape = splits.config.input_shape
        net, structure, warnings = _source_model(source, ckpt, recipe, splits)
        _check_runs_on(net, recipe)
        pruner.check(net)
    except BaseException:
        run.discard_if_unused()
        raise
    if on_start:
        on_start()
    for note in warnings:
        console.print(f"warning: {note}", highlight=False, markup=False, soft_wrap=True)
    weights = [w.detach() for w in prunable_weights(net, coverage).values()]
    source_sparse = ckpt is not None and ckpt.method != "none" and _zero_share(weights) > 0
    started = time.perf_counter()
    try:
        with _progress(console, show_progress) as progress:
            _report_progress(pruner, progress)
            result = pruner.prune(net, splits)
    except BaseException:
        run.discard_if_unused()  # nothing was written: the same --out works next time
        raise
    seconds = time.perf_counter() - started
    with run.discarded_unless_checkpointed():  # --out stays usable if no epoch finished
        run.write_text("recipe.yaml", dump_recipe(recipe))
        structure = _merge_structure(structure, result.structure)
        net.to(device)
        job = _job_for(recipe, run, splits, net, _finetune_pruner(net, result, source_sparse,
                                                                  coverage),
                       generator, device, structure)
        before, _ = evaluate(job.model, job.splits.val, device=job.device, pruner=job.pruner)
        run.log("oneshot", source=str(checkpoint or model), method=spec.name,
                seconds=seconds, val_top1=before, **result.details)
        if finetune_epochs > 0:
            _run_epochs(job, console, show_progress, on_epoch)
        summary = _finish(job)
    if spec.granularity == "channels":  # a weight-sparsity target is not what was asked
        summary["target_sparsity"] = None
    summary.update(result.details)
    summary["val_top1_before_finetune"] = before
    summary["finetune_epochs"] = finetune_epochs
    summary["source"] = str(checkpoint or model)
    summary["prune_seconds"] = seconds
    summary["notes"] = result.notes + warnings
    return summary


def prune_sweep(checkpoint: str | None, out: str, sparsities: list[float],
                **options) -> list[dict]:
    """`prune_oneshot` at every level of ``sparsities``, one run each under ``out``
    (``out/sparsity-S``), with one pruner: a second-order method computes its gradients and
    Fisher blocks once. Returns the summaries in order."""
    if len(set(sparsities)) != len(sparsities):
        raise CompressError("--sparsity lists a level twice")
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise CompressError(f"--sparsity values must be in [0, 1), got {s}")
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise CompressError(f"--out {out} already exists and is not empty")
    spec = _one_shot_spec(options.get("method", "magnitude"))
    if spec.granularity != "weights":
        raise CompressError("a --sparsity list sweeps weight pruning; give channel methods one "
                            "level")
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


def _merge_structure(before: dict | None, cut) -> dict | None:
    if cut is None:
        return before
    from compress.structured.engine import Structure

    if before:
        cut = Structure.from_dict(before).merged(cut)
    return cut.to_dict()


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
               structure=structure, cost=_cost_for(model, recipe))
