"""Pruning methods, one per file."""

from compress.methods.base import MaskPruner, Refresh
from compress.methods.dpf import DPF
from compress.methods.gmp import GMP
from compress.methods.magnitude import OneShotMagnitude

__all__ = ["DPF", "GMP", "MaskPruner", "OneShotMagnitude", "Refresh"]
