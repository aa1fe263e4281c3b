"""The interface of every pruner that acts while training, and what every mask-based
pruner shares: masks, a schedule, refreshes and telemetry.

A pruner wraps a model in a user's own loop in three lines::

    with pruner.pruned():          # forward and backward see the pruned weights
        loss = loss_fn(model(x), y)
        loss.backward()
    optimizer.step()
    pruner.step()                  # advance the schedule; refresh the mask when due

Subclasses decide what the pruned weights do between refreshes (`DPF` keeps training
them, `GMP` holds them at zero) and how they are scored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from compress.errors import CompressError
from compress.masks import (
    Coverage,
    canonical_zeros,
    flip_fraction,
    layer_floor_for,
    magnitude_masks,
    mask_sparsity,
    prunable_weights,
)
from compress.schedules import CubicSchedule

if TYPE_CHECKING:
    from compress.methods.latency_budget import LatencyBudget
    from compress.structured.cutter import TrainingCutter


@dataclass
class Refresh:
    """One mask recomputation, kept for telemetry."""

    step: int
    target_sparsity: float
    sparsity: float
    flips: float


class TrainingPruner(ABC):
    """What the training loop and the pipeline call on a pruner that acts while training.

    The pipeline calls nothing else, and probes for nothing: a method overrides the hooks it
    needs and inherits the defaults (which do nothing, or refuse in one line) for the rest.
    """

    name = "pruner"
    granularity = "weights"  # "weights": masks on weights; "channels": the network thins
    needs_probe = False  # whether `attach` needs fixed probe batches of training images
    cutter: TrainingCutter | None = None  # what cuts channels, for "channels" methods
    masks: dict[str, torch.Tensor]  # keep-masks by parameter name; empty if nothing is masked

    def attach(self, optimizer: torch.optim.Optimizer, probe: list[torch.Tensor]) -> None:
        """The optimizer (a channel cut moves its state to the thinner parameters) and, for
        a method that `needs_probe`, the fixed probe batches."""
        if self.cutter is not None:
            self.cutter.optimizer = optimizer

    def set_budget(self, budget: LatencyBudget) -> None:
        """A floor on how far the method cuts: ``budget.budget_ms`` of p50, measured by
        ``budget.latency``, widths allocated as ``budget.allocation`` says."""
        raise CompressError(f"--budget-ms on train-prune sets how far density and dpf-filter "
                            f"cut; method {self.name} has no cut to set")

    @contextmanager
    def pruned(self) -> Iterator[None]:
        """Run forward/backward (or evaluation) on the pruned network."""
        yield

    @abstractmethod
    def step(self) -> object | None:
        """Call once after each ``optimizer.step()``; an event to log, or None."""

    @property
    @abstractmethod
    def sparsity(self) -> float:
        """Share of the prunable weights (or channels) removed so far."""

    @abstractmethod
    def pruned_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state as the pruned network sees it."""

    @abstractmethod
    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict`'s output."""

    def finalize(self) -> object | None:
        """After the last epoch: a last change to make (an event to log), or None."""
        return None

    def summary(self) -> dict:
        """Figures for the run summary beyond sparsity."""
        return {}


class MaskPruner(TrainingPruner):
    """Keeps one boolean keep-mask per prunable weight and refreshes it on a schedule.

    ``refresh_every`` is the period ``p`` in optimizer steps. Refreshes stop after
    ``freeze_step`` (default: when the schedule reaches its target), after which the mask
    is fixed; a refresh is always forced at the schedule's end so the target is met exactly.
    """

    name = "mask"

    def __init__(self, model: nn.Module, schedule: CubicSchedule, *, refresh_every: int = 16,
                 scope: str = "global", coverage: Coverage = Coverage(),
                 freeze_step: int | None = None, layer_floor: float = 0.0) -> None:
        if refresh_every < 1:
            raise ValueError("refresh_every must be at least 1")
        self.model = model
        self.schedule = schedule
        self.refresh_every = refresh_every
        self.scope = scope
        self.layer_floor = layer_floor
        self.coverage = coverage
        self.freeze_step = schedule.end_step if freeze_step is None else freeze_step
        if self.freeze_step < schedule.end_step:
            raise ValueError("the mask cannot freeze before the schedule reaches its target")
        self.weights = self.maskable_weights()
        if not self.weights:
            raise ValueError("the model has no conv or linear weights to prune")
        if layer_floor > 0:  # fail now rather than at the last refresh
            magnitude_masks(self.scores(), schedule.final_sparsity, scope, layer_floor)
        self.masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in self.weights.items()}
        self.step_count = 0
        self.history: list[Refresh] = []
        self.refresh()

    # -- scoring and masking -------------------------------------------------------------
    def maskable_weights(self) -> dict[str, nn.Parameter]:
        """The parameters this pruner masks: the conv and linear weights ``coverage`` keeps."""
        return prunable_weights(self.model, self.coverage)

    def scores(self) -> dict[str, torch.Tensor]:
        """Magnitudes the next mask is ranked by."""
        return {n: w.detach() for n, w in self.weights.items()}

    def refresh(self) -> Refresh:
        """Recompute the masks for the current step's target sparsity."""
        target = self.schedule(self.step_count)
        new = magnitude_masks(self.scores(), target, self.scope, self.layer_floor)
        event = Refresh(self.step_count, target, mask_sparsity(new),
                        flip_fraction(self.masks, new))
        self.masks = new
        self._sync_mask_cache()
        self.history.append(event)
        self.after_refresh()
        return event

    def _sync_mask_cache(self) -> None:
        """Float copies of the masks for in-place multiplies, and the sparsity figure."""
        self._float_masks = {n: m.to(self.weights[n].dtype) for n, m in self.masks.items()}
        self._sparsity = mask_sparsity(self.masks)

    def after_refresh(self) -> None:
        """Hook: what a method does to the weights right after a new mask."""

    def refresh_due(self) -> bool:
        step = self.step_count
        if step > self.freeze_step:
            return False
        return step % self.refresh_every == 0 or step == self.schedule.end_step

    # -- training hooks ------------------------------------------------------------------
    def step(self) -> Refresh | None:
        """Call once after each ``optimizer.step()``."""
        self.step_count += 1
        self.after_optimizer_step()
        return self.refresh() if self.refresh_due() else None

    def after_optimizer_step(self) -> None:
        """Hook: keep invariants after the optimizer moved the weights."""

    # -- results -------------------------------------------------------------------------
    @property
    def sparsity(self) -> float:
        return self._sparsity

    def pruned_tensor(self, name: str) -> torch.Tensor:
        """The weight as the pruned network sees it (zeros canonical)."""
        w = self.weights[name].detach()
        return canonical_zeros(torch.where(self.masks[name], w, torch.zeros_like(w)))

    def pruned_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state with masks applied, leaving the live weights untouched."""
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for name in self.weights:
            state[name] = self.pruned_tensor(name).clone()
        return state

    def apply_masks(self) -> None:
        """Make the pruning permanent in the live weights (e.g. before export)."""
        with torch.no_grad():
            for name, w in self.weights.items():
                w.copy_(self.pruned_tensor(name))

    def state_dict(self) -> dict:
        return {
            "method": self.name,
            "step_count": self.step_count,
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "history": [vars(h) for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.masks) - set(state["masks"])
        if missing:
            raise ValueError(f"pruner state lacks masks for {sorted(missing)}")
        self.step_count = int(state["step_count"])
        self.masks = {n: state["masks"][n].to(torch.bool) for n in self.masks}
        self._sync_mask_cache()
        self.history = [Refresh(**h) for h in state["history"]]
        self.after_refresh()


def schedule_options(recipe, total_steps: int) -> tuple[CubicSchedule, dict]:
    """The cubic schedule and the common `MaskPruner` options a training recipe asks for."""
    schedule = CubicSchedule(recipe.target_sparsity(), round(recipe.prune_start * total_steps),
                             round(recipe.prune_end * total_steps))
    freeze = None if recipe.freeze_at is None else round(recipe.freeze_at * total_steps)
    options = dict(refresh_every=recipe.refresh_every, scope=recipe.scope or "global",
                   layer_floor=layer_floor_for(recipe.layer_floor, recipe.target_sparsity()),
                   coverage=Coverage(recipe.skip_first, recipe.skip_classifier),
                   freeze_step=freeze)
    return schedule, options
