"""Pruning methods, one per file; importing this package registers them all."""

from compress.methods import cbs, density, dpf_filter, filter_norm, shrink  # noqa: F401  (they register themselves)
from compress.methods.base import MaskPruner, Refresh, TrainingPruner
from compress.methods.dpf import DPF
from compress.methods.gmp import GMP
from compress.methods.magnitude import FixedMask, OneShotMagnitude
from compress.methods.registry import REGISTRY, MethodSpec, OneShotPruner, method

__all__ = ["DPF", "GMP", "REGISTRY", "FixedMask", "MaskPruner", "MethodSpec", "OneShotMagnitude",
           "OneShotPruner", "Refresh", "TrainingPruner", "method"]
