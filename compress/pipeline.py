"""The jobs behind ``compress train-prune`` and ``compress prune``, run end to end: the
names a training script imports (``from compress.pipeline import train_prune``). They live
in `compress.jobs`: `compress.jobs.train`, `compress.jobs.prune` and what both share,
`compress.jobs.runner`.
"""

from __future__ import annotations

from compress.jobs.prune import prune_oneshot, prune_sweep
from compress.jobs.runner import Job, TrainingCost, data_config, optim_config
from compress.jobs.train import make_pruner, probe_batches, train_prune

__all__ = ["Job", "TrainingCost", "data_config", "make_pruner", "optim_config",
           "probe_batches", "prune_oneshot", "prune_sweep", "train_prune"]
