"""What each pruning method is, without importing it.

A recipe is checked, ``--help`` is written and a default sparsity is looked up before
torch loads (a bad ``--sparsity`` is refused in well under a second, not after the 5 s that
importing torch, torch-pruning and torchvision take). Each method's file registers its
builder with `compress.methods.registry.register`; this table says what the method is and
which module registers it, and the registry imports that module when the method is built.

Adding a method: one file under ``compress/methods/`` that calls ``register(NAME, build)``,
and its line here.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.errors import CompressError

GRANULARITIES = ("weights", "channels", "none")
WHEN = ("training", "one-shot")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    granularity: str  # "weights" (unstructured), "channels" (structured) or "none"
    when: str  # "training" or "one-shot"
    summary: str  # one line for --help and errors
    module: str  # the module whose import registers the builder
    needs_data: bool = False  # one-shot: the pruner reads training images
    reads: frozenset[str] = frozenset()  # training: the method's own recipe fields it reads


# recipe fields that only some training methods read (`unread_fields`)
SCHEDULE = frozenset({"sparsity", "scope", "refresh_every", "prune_start", "prune_end",
                      "freeze_at"})
MASKS = SCHEDULE | {"layer_floor", "skip_first", "skip_classifier"}
CUTS = frozenset({"round_to", "min_channels", "budget_ms", "budget_threads", "budget_precision",
                  "allocation", "latency_table"})
DENSITY = frozenset({"probe_samples", "density_start", "density_every", "density_stop",
                     "density_cuts", "density_until_settled", "density_tolerance"})
METHOD_FIELDS = MASKS | CUTS | DENSITY | {"feedback_decay", "target_macs"}


CATALOG: dict[str, MethodInfo] = {}


def declare(info: MethodInfo) -> MethodInfo:
    if info.granularity not in GRANULARITIES or info.when not in WHEN:
        raise ValueError(f"bad method declaration {info}")
    if info.name in CATALOG and CATALOG[info.name] != info:
        raise ValueError(f"method {info.name!r} is declared twice")
    CATALOG[info.name] = info
    return info


for _info in (
    MethodInfo("dpf", "weights", "training",
               "Dynamic Pruning with Feedback: pruned weights keep learning",
               "compress.methods.dpf", reads=MASKS | {"feedback_decay"}),
    MethodInfo("gmp", "weights", "training",
               "gradual magnitude pruning, same schedule, no feedback", "compress.methods.gmp",
               reads=MASKS),
    MethodInfo("none", "none", "training", "dense training, nothing pruned",
               "compress.methods.gmp"),
    MethodInfo("density", "channels", "training",
               "activation-density pruning: layers cut to their share of non-zero activations "
               "while training", "compress.methods.density", reads=DENSITY | CUTS),
    MethodInfo("dpf-filter", "channels", "training",
               "DPF on whole channels, masked channels cut at the end",
               "compress.methods.dpf_filter", reads=SCHEDULE | CUTS | {"feedback_decay"}),
    MethodInfo("magnitude", "weights", "one-shot",
               "global magnitude: zero the smallest weights", "compress.methods.magnitude"),
    MethodInfo("cbs", "weights", "one-shot",
               "Combinatorial Brain Surgeon: weights removed together, the rest moved to "
               "compensate", "compress.methods.cbs", needs_data=True),
    MethodInfo("cbs-s", "weights", "one-shot", "CBS selection alone (no weight update)",
               "compress.methods.cbs", needs_data=True),
    MethodInfo("woodfisher", "weights", "one-shot",
               "WoodFisher: second-order saliency and summed single-weight updates",
               "compress.methods.cbs", needs_data=True),
    MethodInfo("l1-filter", "channels", "one-shot",
               "remove the channels of smallest L1 norm (summed over coupled layers)",
               "compress.methods.filter_norm"),
    MethodInfo("l2-filter", "channels", "one-shot",
               "remove the channels of smallest squared L2 norm (coupled layers summed)",
               "compress.methods.filter_norm"),
    MethodInfo("shrink", "channels", "one-shot",
               "remove channels that unstructured pruning emptied (exact)",
               "compress.methods.shrink"),
):
    declare(_info)


def names(when: str) -> list[str]:
    """Methods that run ``when``: those that remove weights first, then channels."""
    infos = [i for i in CATALOG.values() if i.when == when]
    return [i.name for i in sorted(infos, key=lambda i: GRANULARITIES.index(i.granularity))]


def method_info(name: str, when: str) -> MethodInfo:
    """What ``name`` is among the methods that run ``when``; one clear line otherwise."""
    info = CATALOG.get(name)
    if info is None or info.when != when:
        flag = "train-prune" if when == "training" else "prune"
        hint = ""
        if info is not None:
            other = "compress prune" if info.when == "one-shot" else "compress train-prune"
            hint = f" ({name!r} is a method of {other})"
        raise CompressError(f"unknown method {name!r} for {flag}{hint}: use one of "
                            f"{', '.join(names(when))}")
    return info


def default_sparsity(name: str) -> float:
    """What ``--sparsity`` means when not given: 0.9 of the weights, 0.5 of the channels."""
    info = CATALOG.get(name)
    return 0.5 if info is not None and info.granularity == "channels" else 0.9


def unread_fields(name: str, given: set[str]) -> list[str]:
    """The method-specific recipe fields in ``given`` that training method ``name`` does not
    read (``--sparsity`` on dense training, ``--refresh-every`` on ADP, ...), sorted."""
    return sorted((given & METHOD_FIELDS) - CATALOG[name].reads)
