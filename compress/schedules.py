"""Sparsity schedules: plain functions of the training step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CubicSchedule:
    """Gradual pruning schedule of Zhu & Gupta (2017).

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` for ``t0 <= t <= t1``,
    ``s_i`` before ``t0`` and ``s_f`` after ``t1``. Sparsity rises fast at first, while the
    network has redundant weights to spare, and slowly near the end.
    """

    final_sparsity: float
    start_step: int
    end_step: int
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        if self.end_step < self.start_step:
            raise ValueError("end_step must not come before start_step")

    def __call__(self, step: int) -> float:
        if step >= self.end_step:
            return self.final_sparsity
        if step <= self.start_step:
            return self.initial_sparsity
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        gap = self.initial_sparsity - self.final_sparsity
        return self.final_sparsity + gap * (1.0 - progress) ** 3


def constant_schedule(sparsity: float):
    """A schedule that is at ``sparsity`` from the first step (one-shot, then fixed)."""
    return CubicSchedule(final_sparsity=sparsity, start_step=0, end_step=0,
                         initial_sparsity=sparsity)
