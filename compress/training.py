"""A plain training loop: SGD with Nesterov momentum, a cosine or step schedule, a pruner.

`train_epoch` runs one epoch and `evaluate` one split; `compress.pipeline` strings them into
a run. The pruner hooks are the same three lines a user puts in their own loop (see
`compress.methods.base`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compress.distributed import SINGLE, Shard, sum_over_ranks
from compress.errors import CompressError
from compress.methods.base import TrainingPruner
from compress.modes import eval_mode

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class OptimConfig:
    """The optimisation a run asked for; built from its recipe (`compress.jobs.runner.
    optim_config`), whose declarations hold the defaults, so none are repeated here."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    lr_schedule: str
    warmup_epochs: float
    precision: str  # fp32, bf16 or fp16: the forward and backward passes (`autocast`)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the generator that orders batches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only; biases and norm parameters are exempt."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_factor(cfg: OptimConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at each step: warm-up, then the schedule."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.lr_schedule == "step":
            return 0.1 ** sum(progress >= m for m in (0.5, 0.75))
        return 1.0

    return factor


@torch.no_grad()
def evaluate(model: nn.Module, split, batch_size: int = 512, device: torch.device | None = None,
             pruner: TrainingPruner | None = None, shard: Shard = SINGLE,
             on_batch: Callable[[int, int], None] | None = None) -> tuple[float, float]:
    """(top-1, mean loss) on ``split``; a DPF model is evaluated pruned, dense weights kept.
    Under torchrun each process takes its share of the split and the counts are summed.
    ``on_batch(done, total)`` hears of each batch (a progress bar)."""
    device = device or next(model.parameters()).device
    correct, loss_sum, seen = 0, 0.0, 0
    total = split.num_batches(batch_size, shard.world)
    with eval_mode(model), pruner.pruned() if pruner else nullcontext():
        for done, (x, y) in enumerate(split.batches(batch_size, shard=(shard.rank, shard.world)),
                                      1):
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            if on_batch:
                on_batch(done, total)
    correct, loss_sum, seen = sum_over_ranks(shard, [correct, loss_sum, seen])
    return (correct / seen, loss_sum / seen) if seen else (0.0, float("nan"))


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    train_acc: float
    val_acc: float
    val_loss: float
    sparsity: float
    seconds: float
    lr: float
    refreshes: list[dict] = field(default_factory=list)


class Diverged(CompressError):
    pass


def train_epoch(model: nn.Module, split, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: OptimConfig,
                generator: torch.Generator, device: torch.device, epoch: int,
                pruner: TrainingPruner | None = None,
                on_step: Callable[[int, float, float], None] | None = None,
                on_refresh: Callable[[dict], None] | None = None,
                shard: Shard = SINGLE, scaler: torch.amp.GradScaler | None = None,
                rewrap: Callable[[], nn.Module] | None = None) -> tuple[float, float]:
    """One pass over ``split``; returns (mean loss, accuracy) of the pruned network.

    Under torchrun ``model`` is the DistributedDataParallel wrapper, each process reads its
    shard of every batch, and the divergence check uses the loss of all processes so that
    they all stop at the same step; after a step that cut channels ``rewrap`` gives the
    wrapper around the thinner model. With ``cfg.precision`` bf16 or fp16 the forward pass and
    the loss run under `torch.autocast` (fp16 needs ``scaler``, see `loss_scaler`); the
    weights, their gradients, masks and cuts stay fp32."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in split.batches(cfg.batch_size, shuffle=True, generator=generator,
                              shard=(shard.rank, shard.world)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with pruner.pruned() if pruner else nullcontext():
            with autocast(cfg.precision, device):
                out = model(x)
                loss = F.cross_entropy(out.float(), y)
            if not shard.active and not torch.isfinite(loss):
                _diverged(float(loss.detach()), epoch, cfg)
            (scaler.scale(loss) if scaler else loss).backward()
        if shard.active:
            total = sum_over_ranks(shard, [float(loss.detach())])[0]
            if not math.isfinite(total):
                _diverged(total, epoch, cfg)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        if pruner is not None:
            event = pruner.step()
            cut = event is not None and bool(vars(event).get("widths"))
            if event is not None and on_refresh:
                on_refresh(vars(event))
            if cut and rewrap is not None:
                model = rewrap()
        batch = len(y)
        loss_sum += float(loss.detach()) * batch
        correct += int((out.argmax(1) == y).sum())
        seen += batch
        if on_step:
            on_step(batch, loss_sum / seen, correct / seen)
    loss_sum, correct, seen = sum_over_ranks(shard, [loss_sum, correct, seen])
    return loss_sum / max(1, seen), correct / max(1, seen)


def autocast(precision: str, device: torch.device):
    """`torch.autocast` to ``precision`` on ``device``'s type; nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def loss_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without a loss scale; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def _diverged(loss: float, epoch: int, cfg: OptimConfig) -> None:
    raise Diverged(f"training diverged: loss is {loss} in epoch {epoch + 1}; lower --lr "
                   f"(now {cfg.lr})")
