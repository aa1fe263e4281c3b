"""The options only ``compress prune`` has, declared once (`compress.options`): the
second-order methods' settings and fine-tuning. The options it shares with training
(scope, floors, channel budgets, data) are the recipe's (`compress.recipe.Recipe`)."""

from __future__ import annotations

from dataclasses import dataclass

from compress.catalog import method_info
from compress.errors import CompressError
from compress.options import check_declared, option

SECOND_ORDER, FINETUNE = "Second order: cbs, cbs-s, woodfisher", "Fine-tuning"
BUDGET = "Latency budget: l1-filter, l2-filter"
BN_RECALIBRATE_IMAGES = 2048  # a one-shot cut leaves BatchNorm statistics stale


@dataclass
class PruneOptions:
    """A one-shot run's own settings. `second_order` hands the second-order ones to the
    methods (`compress.methods.cbs.options_from`), as the Python API's ``second_order``."""

    update: str | None = option(None, panel=SECOND_ORDER, choices=("cbs", "woodfisher", "none"),
                                shown="the method's own", help="cbs, woodfisher, magnitude: "
                                "how the kept weights move (cbs, woodfisher or none).")
    fisher_samples: int = option(1000, panel=SECOND_ORDER, low=1, help="Training images "
                                 "whose per-sample gradients form the Fisher.")
    damp: float | None = option(None, help="Fisher damping.", panel=SECOND_ORDER, low=0.0,
                                low_open=True, shown="1e-3 without convs, 1e-5 with")
    max_block: int = option(1024, panel=SECOND_ORDER, low=1, help="Most weights in one "
                            "Fisher block (whole rows).")
    max_memory_gb: float | None = option(None, panel=SECOND_ORDER, low=0.0, low_open=True,
                                         shown="half the free memory",
                                         help="Most memory (GiB) the Fisher blocks take at "
                                         "once; beyond it they are computed group by group, "
                                         "the gradients recomputed for each.")
    rmp_trials: int = option(50, help="cbs: randomised magnitude starts.", panel=SECOND_ORDER,
                             low=1)
    epsilon: float = option(1e-4, help="cbs: least cost reduction of a swap.",
                            panel=SECOND_ORDER, low=0.0)
    rho: int = option(10, help="cbs: swap window.", panel=SECOND_ORDER, low=1)
    tau: int = option(20, help="cbs: misses before a swap pass ends.", panel=SECOND_ORDER,
                      low=1)
    wf_scale: float = option(1.0, panel=SECOND_ORDER, low=0.0, low_open=True,
                             help="woodfisher update: scale of the summed single-weight "
                             "updates.")
    finetune_epochs: int = option(0, panel=FINETUNE, low=0, help="Epochs of fine-tuning after "
                                  "pruning (pruned weights stay zero).")
    bn_recalibrate: int = option(BN_RECALIBRATE_IMAGES, panel=FINETUNE, low=0,
                                 help="Training images that BatchNorm statistics are "
                                 "re-estimated on after the cut, before any fine-tuning "
                                 "(0: off).")

    def validate(self) -> PruneOptions:
        check_declared(self)
        return self

    def second_order(self) -> dict:
        """The second-order settings, as `prune_oneshot`'s ``second_order`` takes them."""
        return {"update": self.update, "fisher_samples": self.fisher_samples,
                "damp": self.damp, "max_block": self.max_block,
                "max_memory_gb": self.max_memory_gb,
                "rmp_trials": self.rmp_trials, "wf_scale": self.wf_scale,
                "epsilon": self.epsilon, "rho": self.rho, "tau": self.tau}


def check_one_shot(method: str, levels: list[float], target_macs: float | None,
                   budget_ms: float | None) -> None:
    """What ties a one-shot run's method to its target, checked without torch: the method
    exists, the sparsity levels are fractions (a list only for weights), and one target is
    given, of a kind the method can meet."""
    info = method_info(method, "one-shot")
    for level in levels:
        if not 0.0 <= level < 1.0:
            raise CompressError(f"--sparsity must be in [0, 1), got {level}")
    if len(set(levels)) != len(levels):
        raise CompressError("--sparsity lists a level twice")
    if len(levels) > 1 and info.granularity != "weights":
        raise CompressError("a --sparsity list sweeps weight pruning; give channel methods one "
                            "level")
    given = [flag for flag, value in (("--sparsity", levels or None),
                                      ("--target-macs", target_macs),
                                      ("--budget-ms", budget_ms)) if value is not None]
    if len(given) > 1:
        raise CompressError(f"give one of --sparsity, --target-macs and --budget-ms, not "
                            f"{' and '.join(given)}")
    for flag, value in (("--target-macs", target_macs), ("--budget-ms", budget_ms)):
        if value is not None and info.granularity != "channels":
            raise CompressError(f"{flag} sets a channel budget; method {method} removes "
                                f"{info.granularity}")
