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
from dataclasses import dataclass, field
from pathlib import Path

from compress.catalog import default_sparsity, method_info
from compress.errors import CompressError
from compress.fileio import regular_file_size
from compress.model_specs import check_spec_from_file


def check_layer_floor(floor: float, sparsity: float) -> None:
    if not (math.isfinite(floor) and 0.0 <= floor <= 1.0 - sparsity):
        raise CompressError(f"--layer-floor must be between 0 and 1 - sparsity "
                            f"({1.0 - sparsity:.4g}), got {floor}")


@dataclass
class Recipe:
    # what to train, on what
    model: str = "lenet5"
    data: str = "fashion-mnist"
    data_dir: str | None = None
    input_shape: list[int] = field(default_factory=lambda: [1, 28, 28])
    num_classes: int = 10
    val_fraction: float = 0.1
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    weights: str | None = None
    # pruning
    method: str = "dpf"
    sparsity: float | None = None  # None: 0.9 of the weights, or 0.5 of the channels
    scope: str | None = None  # None: the method's own default (global for weights, layer
    # for channels)
    layer_floor: float | None = None  # least fraction of each layer a global threshold
    # keeps; None: `layer_floor_for`'s default (1 %), 0: the papers' exact rule
    refresh_every: int = 16
    prune_start: float = 0.0
    prune_end: float = 0.75
    freeze_at: float | None = None
    feedback_decay: float = 0.01
    skip_first: bool = False
    skip_classifier: bool = False
    # structured pruning: widths rounded to a multiple, never below a floor; or a MAC budget
    round_to: int = 8
    min_channels: int | None = None
    target_macs: float | None = None
    # activation-density pruning (method density): when to measure and cut, as fractions
    probe_samples: int = 512
    density_start: float = 0.2
    density_every: float = 0.15
    density_stop: float = 0.8
    density_cuts: int = 1
    density_until_settled: bool = False
    density_tolerance: float = 0.03
    # density / dpf-filter: cut at least as far as the p50 (ms, onnxruntime, batch 1) needs
    budget_ms: float | None = None
    budget_threads: int = 1  # onnxruntime threads the budget is measured with
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    seed: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def target_sparsity(self) -> float:
        """``sparsity``, or the method's default: 0.9 of the weights, 0.5 of the channels."""
        return self.sparsity if self.sparsity is not None else default_sparsity(self.method)

    def validate(self, when: str = "training") -> Recipe:
        """Check every field; ``when="one-shot"`` is the recipe of a `compress prune` run,
        whose method is a one-shot method and whose epochs (of fine-tuning) may be 0."""
        method_info(self.method, when)
        if not 0.0 <= self.target_sparsity() < 1.0:
            raise CompressError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope not in (None, "global", "layer"):
            raise CompressError(f"--scope must be global or layer, got {self.scope!r}")
        if self.layer_floor is not None:
            check_layer_floor(self.layer_floor, self.target_sparsity())
        if self.lr_schedule not in ("cosine", "step", "constant"):
            raise CompressError(f"--lr-schedule must be cosine, step or constant, "
                                f"got {self.lr_schedule!r}")
        if self.epochs < (1 if when == "training" else 0) or self.batch_size < 1 or \
                self.refresh_every < 1:
            raise CompressError("--epochs, --batch-size and --refresh-every must be at least 1")
        if self.round_to < 1:
            raise CompressError(f"--round-to must be at least 1, got {self.round_to}")
        if self.min_channels is not None and self.min_channels < 1:
            raise CompressError(f"--min-channels must be at least 1, got {self.min_channels}")
        if self.target_macs is not None and not (math.isfinite(self.target_macs)
                                                 and 0.0 < self.target_macs <= 1.0):
            raise CompressError(f"--target-macs must be in (0, 1], got {self.target_macs}")
        self._validate_density()
        if self.budget_ms is not None and not (math.isfinite(self.budget_ms)
                                               and self.budget_ms > 0):
            raise CompressError(f"--budget-ms must be a positive number, got {self.budget_ms}")
        if self.budget_threads < 1:
            raise CompressError(f"--budget-threads must be at least 1, got "
                                f"{self.budget_threads}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise CompressError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise CompressError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise CompressError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_epochs <= self.epochs:
            raise CompressError(f"--warmup-epochs must be in [0, --epochs], "
                                f"got {self.warmup_epochs}")
        if self.num_classes < 2:
            raise CompressError(f"--num-classes must be at least 2, got {self.num_classes}")
        for name in ("max_train_samples", "max_test_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CompressError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not 0.0 <= self.prune_start <= self.prune_end <= 1.0:
            raise CompressError("need 0 <= --prune-start <= --prune-end <= 1")
        if not 0.0 <= self.feedback_decay < 1.0:
            raise CompressError(f"--feedback-decay must be in [0, 1), got {self.feedback_decay}")
        if self.freeze_at is not None and not self.prune_end <= self.freeze_at <= 1.0:
            raise CompressError("--freeze-at must lie between --prune-end and 1")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise CompressError(f"--device must be cpu or cuda, got {self.device!r}")
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise CompressError(f"--input-shape must be C,H,W, got {self.input_shape}")
        return self

    def _validate_density(self) -> None:
        for name in ("density_start", "density_every", "density_stop"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise CompressError(f"--{name.replace('_', '-')} must be a fraction of the run "
                                    f"in [0, 1], got {value}")
        if self.density_start > self.density_stop:
            raise CompressError("need --density-start <= --density-stop")
        if self.density_every <= 0:
            raise CompressError("--density-every must be more than 0")
        if self.density_cuts < 1 or self.probe_samples < 1:
            raise CompressError("--density-cuts and --probe-samples must be at least 1")
        if not (math.isfinite(self.density_tolerance) and self.density_tolerance >= 0):
            raise CompressError(f"--density-tolerance must be >= 0, "
                                f"got {self.density_tolerance}")


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
