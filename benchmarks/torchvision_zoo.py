"""Every torchvision classifier through the channel engine: prune, export, check, time
(the shared steps are in zoo.py, with live weights: ViTs start with a zero classifier).

Input 3x64x64, except inception_v3 (299x299: its auxiliary head needs 17x17 maps) and the
ViTs and maxvit_t (224x224: fixed position embeddings and window partitions).

    .venv/bin/python benchmarks/torchvision_zoo.py [--models NAME ...] [--timeout 1800]
"""

from __future__ import annotations

from pathlib import Path

import zoo

INPUT = {  # models that need more than 3x64x64
    "inception_v3": (3, 299, 299),
    **{name: (3, 224, 224) for name in (
        "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "maxvit_t")},
}
DEFAULT_INPUT = (3, 64, 64)
RESULTS = Path("benchmarks/results/torchvision_zoo.jsonl")


def all_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


if __name__ == "__main__":
    zoo.main(__file__, __doc__.splitlines()[0], all_names,
             lambda name: f"torchvision.models:{name}",
             lambda name: INPUT.get(name, DEFAULT_INPUT), RESULTS)
