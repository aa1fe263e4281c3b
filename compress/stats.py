"""Per-layer parameter counts, sparsity and MACs of a model or a checkpoint.

``macs`` counts multiply-accumulates of one forward pass on one sample as the dense kernels
run it (what ORT executes), with torch's own flop counter, which also sees attention's
matrix products; ``nonzero_macs`` takes from that the conv and linear MACs whose weight is
zero: the work a sparse kernel would do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from compress.masks import PRUNABLE_TYPES
from compress.modes import eval_mode


@dataclass
class LayerStats:
    name: str
    shape: list[int]
    params: int
    nonzero: int
    sparsity: float
    prunable: bool


def layer_stats(state_dict: dict[str, torch.Tensor], prunable: set[str]) -> list[LayerStats]:
    rows = []
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point() or name.endswith(("running_mean", "running_var")):
            continue
        n = tensor.numel()
        nz = int(torch.count_nonzero(tensor))
        rows.append(LayerStats(name, list(tensor.shape), n, nz, 1.0 - nz / n if n else 0.0,
                               name in prunable))
    return rows


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(dense MACs, MACs with non-zero weights) for one sample."""
    from torch.utils.flop_counter import FlopCounterMode

    skipped = [0]  # conv/linear MACs whose weight is zero

    def hook(module: nn.Module, inputs, output) -> None:
        w = module.weight
        if isinstance(module, nn.Linear):
            positions = output.numel() // output.shape[-1]
        else:  # conv: each output position reads in/groups * kernel weights
            positions = output[0, 0].numel()
        skipped[0] += positions * (w.numel() - int(torch.count_nonzero(w)))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, PRUNABLE_TYPES)]
    counter = FlopCounterMode(display=False)
    try:
        with eval_mode(model), torch.no_grad(), counter:
            device = next(model.parameters()).device
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    dense = int(counter.get_total_flops()) // 2
    return dense, max(0, dense - skipped[0])


def summarise(rows: list[LayerStats], macs: tuple[int, int] | None = None) -> dict:
    """The ``total`` block of ``inspect --json``."""
    params = sum(r.params for r in rows)
    nonzero = sum(r.nonzero for r in rows)
    p_params = sum(r.params for r in rows if r.prunable)
    p_nonzero = sum(r.nonzero for r in rows if r.prunable)
    return {
        "params": params,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "prunable_params": p_params,
        "prunable_nonzero": p_nonzero,
        "prunable_sparsity": 1.0 - p_nonzero / p_params if p_params else 0.0,
        "macs": macs[0] if macs else None,
        "nonzero_macs": macs[1] if macs else None,
    }


def rows_as_dicts(rows: list[LayerStats]) -> list[dict]:
    return [asdict(r) for r in rows]
