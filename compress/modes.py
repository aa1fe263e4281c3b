"""A model in eval mode for a while, then back in the mode it was in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the body (BatchNorm on its running statistics, dropout
    off), then back in training mode if it was, also when the body raises: a failing
    forward must not leave a training run in eval mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
