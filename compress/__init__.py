"""compress: prune PyTorch image classifiers during training or in one shot.

The pieces a training loop needs::

    from compress import DPF, CubicSchedule

    pruner = DPF(model, CubicSchedule(0.9, 0, int(0.75 * total_steps)), refresh_every=16)
    for x, y in loader:
        optimizer.zero_grad()
        with pruner.pruned():
            loss_fn(model(x), y).backward()
        optimizer.step()
        pruner.step()
"""

from importlib import import_module

__version__ = "0.1.0"

# Names resolve on first use, so `import compress.errors` (as the torch-free ONNX tools do)
# does not pull in torch.
_EXPORTS = {
    "CompressError": "compress.errors",
    "Coverage": "compress.masks",
    "magnitude_masks": "compress.masks",
    "prunable_weights": "compress.masks",
    "DPF": "compress.methods",
    "GMP": "compress.methods",
    "MaskPruner": "compress.methods",
    "OneShotMagnitude": "compress.methods",
    "CubicSchedule": "compress.schedules",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
