"""Training recipes: every flag of ``train-prune`` as a key of a flat YAML mapping.

Precedence is flags > recipe file > defaults. Keys may be written with ``-`` or ``_``.
Unknown keys and values of the wrong type are errors that name the key. The resolved
recipe is written to each run directory as ``recipe.yaml`` and can be fed back unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from compress.catalog import default_sparsity, method_info
from compress.errors import CompressError
from compress.fileio import regular_file_size
from compress.model_specs import check_spec_from_file
from compress.options import check_declared, option


def check_layer_floor(floor: float, sparsity: float) -> None:
    if not (math.isfinite(floor) and 0.0 <= floor <= 1.0 - sparsity):
        raise CompressError(f"--layer-floor must be between 0 and 1 - sparsity "
                            f"({1.0 - sparsity:.4g}), got {floor}")


# the panels of ``train-prune --help`` (and of ``prune --help``, for the fields it shares)
MODEL_DATA, METHOD, SCHEDULE = "Model and data", "Method", "Schedule: dpf, gmp, dpf-filter"
CHANNELS, DENSITY = "Channels: density, dpf-filter", "Activation density (ADP): density"
TRAINING = "Training"
FRACTION = dict(low=0.0, high=1.0)  # a share of something, or a point in the run


@dataclass
class Recipe:
    """Every option of a training run, declared once (`compress.options`)."""

    # what to train, on what
    model: str = option("lenet5", help="Registered name or module:callable.", panel=MODEL_DATA)
    data: str = option("fashion-mnist", panel=MODEL_DATA, help="fashion-mnist, mnist, cifar10, "
                       "cifar100, imagefolder or synthetic.")
    data_dir: str | None = option(None, help="Where the data set lies.", panel=MODEL_DATA,
                                  shown="the data set's usual place")
    input_shape: list[int] = option(factory=lambda: [1, 28, 28], panel=MODEL_DATA,
                                    help="C,H,W for synthetic data.")
    num_classes: int = option(10, help="Classes of synthetic data.", panel=MODEL_DATA, low=2)
    val_fraction: float = option(0.1, panel=MODEL_DATA, low=0.0, high=1.0, low_open=True,
                                 high_open=True, help="Share of the training images held out "
                                 "for validation.")
    max_train_samples: int | None = option(None, help="Use a slice of the training set.",
                                           panel=MODEL_DATA, shown="all", low=1)
    max_test_samples: int | None = option(None, help="Use a slice of the test set.",
                                          panel=MODEL_DATA, shown="all", low=1)
    weights: str | None = option(
        None, help="Start from these weights: a file, or published weights by name "
        "(torchvision:ResNet18_Weights.DEFAULT, timm:resnet18.a1_in1k).", panel=MODEL_DATA)
    image_size: int | None = option(None, panel=MODEL_DATA, low=8, shown="--input-shape's",
                                    help="imagefolder: side of the square crop the model "
                                    "sees (sets --input-shape's H and W).")
    augment: bool | None = option(None, panel=MODEL_DATA, shown="on for cifar and "
                                  "imagefolder", help="Augment training images (random "
                                  "crop and flip).")
    workers: int | None = option(None, panel=MODEL_DATA, low=0, shown="the usable cores",
                                 help="imagefolder: processes decoding images.")
    skip_bad_images: bool = option(False, panel=MODEL_DATA, help="imagefolder: leave out "
                                   "an unreadable image (counted in the summary) instead of "
                                   "stopping.")
    # pruning
    method: str = option("dpf", help="The method (see `compress methods`).", panel=METHOD)
    sparsity: float | None = option(  # None: `default_sparsity` of the method
        None, panel=METHOD, low=0.0, high=1.0, high_open=True,
        help="Share removed: of the prunable weights (dpf, gmp), or of each layer's channels "
        "(dpf-filter).", shown="0.9 of weights, 0.5 of channels")
    scope: str | None = option(None, help="global (one threshold) or layer.", panel=METHOD,
                               choices=("global", "layer"),
                               shown="global for weights, layer for channels")
    layer_floor: float | None = option(  # None: `layer_floor_for`'s default
        None, panel=METHOD, help="Least fraction of each layer the global threshold keeps "
        "(0: the papers' rule, which can empty a layer).",
        shown="0.01, or half of what the sparsity leaves")
    refresh_every: int = option(16, help="Mask refresh period in steps.", panel=SCHEDULE, low=1)
    prune_start: float = option(0.0, help="Fraction of training when pruning starts.",
                                panel=SCHEDULE, **FRACTION)
    prune_end: float = option(0.75, help="Fraction of training when the target is reached.",
                              panel=SCHEDULE, **FRACTION)
    freeze_at: float | None = option(None, panel=SCHEDULE, shown="--prune-end", help="Fraction "
                                     "of training after which the mask is fixed.")
    feedback_decay: float = option(0.01, panel=METHOD, low=0.0, high=1.0, high_open=True,
                                   help="dpf, dpf-filter: per-step shrink of pruned dense "
                                   "weights (0 = the paper's rule).")
    skip_first: bool = option(False, help="Leave the first layer dense.", panel=METHOD,
                              flag="--skip-first/--prune-first")
    skip_classifier: bool = option(False, help="Leave the classifier dense.", panel=METHOD,
                                   flag="--skip-classifier/--prune-classifier")
    # structured pruning: widths rounded to a multiple, never below a floor; or a MAC budget
    round_to: int = option(8, panel=CHANNELS, low=1, help="Kept widths are multiples of this "
                           "(onnxruntime's kernels are fastest on multiples of 8).")
    min_channels: int | None = option(None, help="No layer keeps fewer channels.",
                                      panel=CHANNELS, shown="1", low=1)
    target_macs: float | None = option(None, panel=CHANNELS, low=0.0, high=1.0, low_open=True,
                                       help="Keep at most this fraction of the dense MACs "
                                       "instead of --sparsity.")
    # activation-density pruning (method density): when to measure and cut, as fractions
    probe_samples: int = option(512, help="Training images the activations are measured on.",
                                panel=DENSITY, low=1)
    density_start: float = option(0.2, help="No cut before this fraction of the run.",
                                  panel=DENSITY, **FRACTION)
    density_every: float = option(0.15, help="Least fraction of the run between cuts.",
                                  panel=DENSITY, low=0.0, high=1.0, low_open=True)
    density_stop: float = option(0.8, help="No cut after this fraction of the run.",
                                 panel=DENSITY, **FRACTION)
    density_cuts: int = option(1, help="Most cuts.", panel=DENSITY, low=1)
    density_until_settled: bool = option(
        False, panel=DENSITY, flag="--density-until-settled/--density-fixed-cuts",
        help="Cut until no width changes, instead of --density-cuts times.")
    density_tolerance: float = option(0.03, panel=DENSITY, low=0.0, help="Layer densities "
                                      "count as settled when none moved more than this since "
                                      "the last measurement.")
    # density / dpf-filter: cut at least as far as the p50 (ms, onnxruntime, batch 1) needs
    budget_ms: float | None = option(None, panel=CHANNELS, low=0.0, low_open=True,
                                     help="Cut at least as far as an onnxruntime p50 (batch "
                                     "1) of this many ms needs, measured here.")
    budget_threads: int = option(1, help="onnxruntime threads --budget-ms is measured with.",
                                 panel=CHANNELS, low=1)
    budget_precision: str = option("fp32", panel=CHANNELS, choices=("fp32", "int8"),
                                   help="--budget-ms: the precision the p50 is measured in "
                                   "(int8: export with --quantize int8 or auto).")
    allocation: str = option("latency", panel=CHANNELS, choices=("latency", "uniform"),
                             help="--budget-ms: each group's width from a layer table "
                             "(latency), or one channel share for every group (uniform).")
    latency_table: str | None = option(None, panel=CHANNELS, shown="made here",
                                       help="--budget-ms: `compress bench --layer-table`'s "
                                       "table, made on the device; without it one is made "
                                       "on this machine.")
    # optimisation
    epochs: int = option(10, help="Epochs of training.", panel=TRAINING, low=0)
    batch_size: int = option(128, help="Images per step.", panel=TRAINING, low=1)
    lr: float = option(0.05, help="Peak learning rate.", panel=TRAINING, low=0.0,
                       low_open=True)
    momentum: float = option(0.9, help="SGD momentum.", panel=TRAINING, low=0.0, high=1.0,
                             high_open=True)
    nesterov: bool = option(True, help="Nesterov momentum.", panel=TRAINING)
    weight_decay: float = option(5e-4, help="L2 weight decay.", panel=TRAINING, low=0.0)
    lr_schedule: str = option("cosine", help="cosine, step or constant.", panel=TRAINING,
                              choices=("cosine", "step", "constant"))
    warmup_epochs: float = option(0.0, help="Epochs of linear learning-rate warm-up.",
                                  panel=TRAINING, low=0.0)
    precision: str = option(
        "fp32", help="fp32; bf16 (CPU and CUDA) or fp16 (CUDA, with a loss scaler): autocast "
        "for training's forward and backward passes. Weights, masks and cuts stay fp32.",
        panel=TRAINING, choices=("fp32", "bf16", "fp16"))
    bn_recalibrate: int = option(
        0, help="Training images that BatchNorm statistics are re-estimated on after the "
        "last epoch (0: off).", panel=TRAINING, low=0)
    seed: int = option(0, help="Seed of weights, data order and masks.", panel=TRAINING)
    device: str = option("cpu", help="cpu or cuda.", panel=TRAINING)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def target_sparsity(self) -> float:
        """``sparsity``, or the method's default: 0.9 of the weights, 0.5 of the channels."""
        return self.sparsity if self.sparsity is not None else default_sparsity(self.method)

    def validate(self, when: str = "training") -> Recipe:
        """Check every field: its declared bounds, then what ties fields together.
        ``when="one-shot"`` is the recipe of a `compress prune` run, whose method is a
        one-shot method and whose epochs (of fine-tuning) may be 0."""
        method_info(self.method, when)
        check_declared(self)
        if self.layer_floor is not None:
            check_layer_floor(self.layer_floor, self.target_sparsity())
        if when == "training" and self.epochs < 1:
            raise CompressError(f"--epochs must be at least 1, got {self.epochs}")
        if self.warmup_epochs > self.epochs:
            raise CompressError(f"--warmup-epochs must be in [0, --epochs], "
                                f"got {self.warmup_epochs}")
        if self.prune_start > self.prune_end:
            raise CompressError("need 0 <= --prune-start <= --prune-end <= 1")
        if self.freeze_at is not None and not self.prune_end <= self.freeze_at <= 1.0:
            raise CompressError("--freeze-at must lie between --prune-end and 1")
        if self.density_start > self.density_stop:
            raise CompressError("need --density-start <= --density-stop")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise CompressError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise CompressError("--precision fp16 trains on CUDA only (the CPU has no fp16 "
                                "training path); use --precision bf16 on the CPU")
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise CompressError(f"--input-shape must be C,H,W, got {self.input_shape}")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}


MAX_RECIPE_INT = 2**31 - 1  # no count or seed a recipe holds is larger
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of text


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and \
        abs(value) <= MAX_RECIPE_INT


def _check_type(key: str, value, annotation) -> object:
    hint = typing.get_type_hints(Recipe)[key]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool) \
                and (isinstance(value, float) or abs(value) <= MAX_RECIPE_INT):
            return float(value)
        if origin is int and _integer(value):
            return value
        if origin in (bool, str) and isinstance(value, origin):
            return value
        if origin is list and isinstance(value, list) and len(value) <= 16 and \
                all(_integer(v) for v in value):
            return value
    names = "/".join("a list of integers" if typing.get_origin(k) is list else
                     getattr(k, "__name__", str(k)) for k in allowed)
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    bound = f" of at most {MAX_RECIPE_INT}" if "int" in names else ""
    raise CompressError(f"recipe key {key!r} must be {names}{bound}, got {shown}")


RENAMED = {"threads": "budget_threads"}  # keys of recipes saved by earlier versions


def recipe_from_mapping(mapping: dict, base: Recipe | None = None) -> Recipe:
    """Overlay ``mapping`` on ``base`` (or the defaults), checking keys and types."""
    values = (base or Recipe()).to_dict()
    for raw_key, value in mapping.items():
        key = RENAMED.get(str(raw_key).replace("-", "_"), str(raw_key).replace("-", "_"))
        if key not in FIELDS:
            raise CompressError(f"unknown recipe key {raw_key!r}")
        values[key] = _check_type(key, value, FIELDS[key].type)
    return Recipe(**values)


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe; every problem becomes a one-line `CompressError`."""
    return recipe_from_mapping(read_recipe_mapping(path))


def given_fields(recipe_path: str | None, overrides: dict) -> dict:
    """The fields a command line sets: a recipe file's keys, then the flags given (not
    None), type-checked, with the values a `Recipe` would hold."""
    mapping = read_recipe_mapping(recipe_path) if recipe_path else {}
    mapping.update({k: v for k, v in overrides.items() if v is not None})
    recipe = recipe_from_mapping(mapping)
    return {key: getattr(recipe, key) for key in
            (RENAMED.get(str(k).replace("-", "_"), str(k).replace("-", "_")) for k in mapping)}


@functools.cache
def _recipe_loader() -> type:
    """YAML's safe loader without anchors and aliases: a recipe never needs them, and a few
    hundred bytes of nested aliases expand to gigabytes. (yaml is imported when a recipe is
    read or written: the command line reads `Recipe`'s defaults at every start.)"""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed "
                                                  "in a recipe", event.start_mark)
            return super().compose_node(parent, index)

    return RecipeLoader


def read_recipe_mapping(path: str | Path) -> dict:
    """A YAML recipe file as the mapping it holds."""
    import yaml

    path = Path(path)
    try:
        regular_file_size(path, MAX_RECIPE_BYTES / 2**20, "a recipe", f"recipe {path}")
        data = yaml.load(path.read_text(), Loader=_recipe_loader())
    except OSError as exc:
        raise CompressError(f"cannot read recipe {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CompressError(f"recipe {path} is not a text (YAML) file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CompressError(f"recipe {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CompressError(f"recipe {path} must be a mapping of keys to values")
    if "model" in data:
        check_spec_from_file(data["model"], f"recipe {path}")
    return data


def dump_recipe(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def resolve_recipe(recipe_path: str | None, overrides: dict) -> Recipe:
    """The recipe file (or the defaults) with the command line's values over it, checked:
    needs no torch, so a bad value is refused before torch loads."""
    base = load_recipe(recipe_path) if recipe_path else Recipe()
    return recipe_from_mapping({k: v for k, v in overrides.items() if v is not None},
                               base).validate()
