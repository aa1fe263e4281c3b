"""What training and one-shot jobs share: the job, its epochs, its checkpoint and its
final figures."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from compress import batchnorm, distributed
from compress.checkpoint import (
    Checkpoint,
    save_checkpoint,
)
from compress.data import DataConfig, Splits
from compress.errors import CompressError
from compress.methods import TrainingPruner
from compress.pretrained import is_named, normalisation
from compress.recipe import (
    Recipe,
)
from compress.report import write_report
from compress.rundir import RunDir
from compress.training import (
    EpochResult,
    OptimConfig,
    evaluate,
    train_epoch,
)

FEW_VALIDATION_IMAGES = 50  # a validation split smaller than this is warned about


def small_validation_note(held_out: int) -> str | None:
    """A warning when the validation split is too small for its top-1 to mean much."""
    if held_out >= FEW_VALIDATION_IMAGES:
        return None
    return (f"validation on {held_out} image(s): its top-1 says little; use more "
            "--max-train-samples or a larger --val-fraction")


def data_config(recipe: Recipe) -> DataConfig:
    """The recipe's data set. An image folder read for named pretrained weights is
    normalised with the statistics those weights were trained with."""
    shape = tuple(recipe.input_shape)
    if recipe.image_size is not None:
        shape = (shape[0], recipe.image_size, recipe.image_size)
    config = DataConfig(name=recipe.data, data_dir=recipe.data_dir, input_shape=shape,
                        num_classes=recipe.num_classes, val_fraction=recipe.val_fraction,
                        max_train_samples=recipe.max_train_samples,
                        max_test_samples=recipe.max_test_samples, augment=recipe.augment,
                        workers=recipe.workers, skip_bad_images=recipe.skip_bad_images)
    if config.name == "imagefolder" and shape[0] == 3 and is_named(recipe.weights):
        stats = normalisation(recipe.weights)
        if stats is not None:
            config.mean, config.std = stats
    return config


def optim_config(recipe: Recipe) -> OptimConfig:
    return OptimConfig(epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                       momentum=recipe.momentum, nesterov=recipe.nesterov,
                       weight_decay=recipe.weight_decay, lr_schedule=recipe.lr_schedule,
                       warmup_epochs=recipe.warmup_epochs, precision=recipe.precision)


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
    notes: list[str] = field(default_factory=list)  # what the user should know, in words
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scale (`loss_scaler`)
    rewrap: Callable[[], nn.Module] | None = None  # a new DDP wrapper after a cut (torchrun)

    def current_structure(self) -> dict | None:
        """The cuts the model carries now: those it started with, then the pruner's."""
        cutter = self.pruner.cutter if self.pruner is not None else None
        return merge_structure(self.structure, cutter.structure if cutter else None)

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


PROGRESS_LINE_SECONDS = 15.0  # without a terminal: a task's progress line at most this often


class ProgressLines(Progress):
    """Progress for output that is not a terminal (a log file, a pipe), where bars cannot
    redraw: a task that runs longer than `PROGRESS_LINE_SECONDS` gets a line then, one
    every `PROGRESS_LINE_SECONDS` after, and one when it completes; a short task none."""

    def __init__(self, console: Console) -> None:
        super().__init__(console=console, disable=True)
        self._since: dict[int, float] = {}  # when the task began, or last had a line
        self._spoke: set[int] = set()  # tasks that had a line (they get a last one)

    def add_task(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 (rich's signature)
        task_id = super().add_task(*args, **kwargs)
        self._since[task_id] = time.monotonic()
        return task_id

    def update(self, task_id, **changes) -> None:  # noqa: ANN001 (rich's TaskID)
        super().update(task_id, **changes)
        self._line(task_id)

    def advance(self, task_id, advance: float = 1) -> None:  # noqa: ANN001
        super().advance(task_id, advance)
        self._line(task_id)

    def _line(self, task_id) -> None:  # noqa: ANN001
        task, now = self._tasks[task_id], time.monotonic()
        if task_id not in self._since:  # ended, its last line printed
            return
        done = task.total is not None and task.completed >= task.total
        if done and task_id not in self._spoke:
            del self._since[task_id]
            return
        if not done and now - self._since[task_id] < PROGRESS_LINE_SECONDS:
            return
        self._spoke.add(task_id)
        if done:
            del self._since[task_id]
        else:
            self._since[task_id] = now
        total = f"/{task.total:g}" if task.total is not None else ""
        info = f" {task.fields['info']}" if task.fields.get("info") else ""
        self.console.print(f"{task.description}: {task.completed:g}{total}{info} "
                           f"({task.elapsed or 0.0:.0f} s)", highlight=False, markup=False,
                           soft_wrap=True)


def progress_bars(console: Console, enabled: bool) -> Progress:
    """Bars on a terminal; lines now and then elsewhere; nothing when not ``enabled``."""
    if enabled and not console.is_terminal:
        return ProgressLines(console)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                    disable=not enabled, transient=True)


def training_cost(model: nn.Module, recipe: Recipe) -> TrainingCost:
    from compress.stats import count_macs

    macs = count_macs(model, tuple(recipe.input_shape))[0]
    return TrainingCost(macs, macs)


def epoch_checkpoint(job: Job, epoch: int, metrics: dict) -> Checkpoint:
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


def run_epochs(job: Job, console: Console, show_progress: bool,
                on_epoch: Callable[[EpochResult], None] | None) -> list[EpochResult]:
    cfg = optim_config(job.recipe)
    results: list[EpochResult] = []
    steps = job.splits.train.num_batches(cfg.batch_size, job.shard.world)
    with progress_bars(console, show_progress and job.shard.main) as progress:
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
                                    shard=job.shard, scaler=job.scaler, rewrap=job.rewrap)
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
            job.save(epoch_checkpoint(job, epoch + 1, {"val_top1": val_acc}))
            results.append(result)
            if on_epoch and job.shard.main:
                on_epoch(result)
    return results


def zero_share(tensors: list[torch.Tensor]) -> float:
    """Sparsity measured on the weights themselves, not read off masks."""
    total = sum(t.numel() for t in tensors)
    return sum(int((t == 0).sum()) for t in tensors) / total if total else 0.0


def _evaluated(job: Job, split, name: str, progress: Progress) -> tuple[float, float]:
    """`evaluate` on ``split``, with a progress task called ``name``."""
    task = progress.add_task(name, total=None, info="")

    def step(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return evaluate(job.model, split, device=job.device, pruner=job.pruner, shard=job.shard,
                    on_batch=step)


def finish(job: Job, console: Console | None = None, show_progress: bool = False,
           recalibrate: bool = True) -> dict:
    """Final figures: validation and test top-1, exact sparsity; report; final checkpoint.
    BatchNorm statistics are re-estimated first (``--bn-recalibrate``) unless
    ``recalibrate`` is false (a one-shot run re-estimates them after its cut instead)."""
    # dpf-filter cuts its channels if not yet done
    event = job.pruner.finalize() if job.pruner is not None else None
    if event is not None:
        job.run.log(event.kind, **{k: v for k, v in vars(event).items() if k != "kind"})
    distributed.broadcast_buffers(job.shard, job.model)  # the last step's own statistics
    recalibrated = recalibrate_batchnorm(job) if recalibrate else 0
    with progress_bars(console or Console(stderr=True), show_progress and job.shard.main) \
            as progress:
        val_acc, _ = _evaluated(job, job.splits.val, "final validation", progress)
        test_acc, _ = _evaluated(job, job.splits.test, "test", progress)
    pruner = job.pruner
    if pruner is not None and pruner.masks:
        distributed.check_identical(job.shard, pruner.masks, "pruning masks")
    distributed.check_identical(job.shard, {k: v for k, v in job.model.state_dict().items()
                                            if v.is_floating_point()}, "final weights")
    summary = {
        "run": str(job.run.path),
        "model": job.recipe.model,
        "data": job.splits.config.name,
        "method": job.recipe.method,
        **_pruner_figures(job),
        "val_top1": val_acc,
        "test_top1": test_acc,
        "test_samples": len(job.splits.test),
        **({"bn_recalibrated_images": recalibrated} if recalibrated else {}),
        **({"notes": list(job.notes)} if job.notes else {}),
        "processes": job.shard.world,
        **({"skipped_images": job.splits.skipped_images()}
           if job.splits.config.skip_bad_images else {}),
        "train_seconds": job.train_seconds,
        **(job.cost.summary() if job.cost else {}),
    }
    job.run.log("final", **summary)
    job.save(epoch_checkpoint(job, job.recipe.epochs, summary))
    if job.shard.main:
        write_report(job.run)
    return summary


def recalibrate_batchnorm(job: Job) -> int:
    """Re-estimate BatchNorm statistics on ``--bn-recalibrate`` training images, through
    the forward evaluation uses (`compress.batchnorm`); every process alike. Without it, a
    model whose statistics lag a short run gets a note. Returns the images used."""
    samples = min(job.recipe.bn_recalibrate, len(job.splits.train))
    if samples == 0:
        if batchnorm.slow_statistics(job.model):  # called once per job: one note
            job.notes.append("some BatchNorm layers update their statistics with momentum "
                             "below 0.05, which can lag a short run (validation far below "
                             "training accuracy): --bn-recalibrate 2048 re-estimates them")
        return 0
    with job.pruner.pruned() if job.pruner else nullcontext():
        used = batchnorm.reestimate(job.model, batchnorm.training_images(job.splits.train,
                                                                         samples), job.device)
    if used:
        job.run.log("bn_recalibrate", images=used)
    return used


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
        "sparsity": zero_share([pruner.pruned_tensor(n) for n in pruner.weights]),
        "prunable_params": sum(w.numel() for w in pruner.weights.values()),
        "coverage": pruner.coverage.describe(),
        "empty_layers": [n for n in pruner.weights if not pruner.masks[n].any()],
    }


def merge_structure(before: dict | None, cut) -> dict | None:
    if cut is None:
        return before
    from compress.structured.engine import Structure

    if before:
        cut = Structure.from_dict(before).merged(cut)
    return cut.to_dict()
