"""Options declared once: each field of a recipe (`compress.recipe.Recipe`) or of the
one-shot settings (`compress.prune_options.PruneOptions`) carries its help, its ``--help``
panel and its allowed values beside its type and default. The command line builds its
flags from these declarations (``cli/declared.py``), the recipe file reader checks types
against them, and `check_declared` checks every bound, so a default or a range is written
in one place.

Why dataclasses with metadata rather than pydantic: every command reads these declarations
as it starts (for ``--help`` and for validation before torch loads), and pydantic's import
alone costs more than the rest of a refused command; the recipe reader already checks
types with bounds of its own (`compress.recipe`), so pydantic would add a second checker
rather than replace one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from compress.errors import CompressError


@dataclass(frozen=True)
class Declared:
    """What a field means to a user: ``help`` and ``panel`` for ``--help``; ``flag`` when the
    command line spells it otherwise (``--skip-first/--prune-first``); ``shown`` is the
    default as ``--help`` shows it where the value alone says too little; the bounds
    (``low``/``high``, each exclusive when ``*_open``) and ``choices`` are checked by
    `check_declared`."""

    help: str
    panel: str
    flag: str | None = None
    shown: str | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None


def option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
           **declared: Any) -> Any:
    """A dataclass field with its `Declared` meaning attached."""
    return dataclasses.field(default=default, default_factory=factory,
                             metadata={"declared": Declared(**declared)})


def declarations(cls: type) -> dict[str, tuple[dataclasses.Field, Declared]]:
    """Every declared field of dataclass ``cls``, in order."""
    return {f.name: (f, f.metadata["declared"]) for f in dataclasses.fields(cls)
            if "declared" in f.metadata}


def default_of(declared_field: dataclasses.Field) -> Any:
    if declared_field.default is not dataclasses.MISSING:
        return declared_field.default
    return declared_field.default_factory()


def shown_default(declared_field: dataclasses.Field, declared: Declared) -> str:
    """The default as ``--help`` shows it."""
    if declared.shown is not None:
        return declared.shown
    value = default_of(declared_field)
    if value is None:
        return "none"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _range_text(d: Declared) -> str:
    if d.low is not None and d.high is not None:
        return f"in {'(' if d.low_open else '['}{d.low:g}, {d.high:g}{')' if d.high_open else ']'}"
    if d.low is not None:
        if d.low_open:
            return "a positive number" if d.low == 0 else f"more than {d.low:g}"
        return ">= 0" if d.low == 0 else f"at least {d.low:g}"
    return f"at most {d.high:g}" if not d.high_open else f"less than {d.high:g}"


def bound_error(name: str, value: Any, d: Declared) -> str | None:
    """The one-line complaint about ``value`` for field ``name``, or None when it fits."""
    if value is None:
        return None
    if d.choices is not None and value not in d.choices:
        options = ", ".join(d.choices[:-1]) + f" or {d.choices[-1]}"
        return f"{flag_name(name)} must be {options}, got {value!r}"
    if d.low is None and d.high is None or isinstance(value, (str, bool, list)):
        return None
    fits = math.isfinite(value)
    if d.low is not None:
        fits = fits and (value > d.low if d.low_open else value >= d.low)
    if d.high is not None:
        fits = fits and (value < d.high if d.high_open else value <= d.high)
    return None if fits else f"{flag_name(name)} must be {_range_text(d)}, got {value}"


def check_declared(instance: Any) -> None:
    """Refuse the first field of dataclass ``instance`` outside its declared bounds."""
    for name, (_, declared) in declarations(type(instance)).items():
        problem = bound_error(name, getattr(instance, name), declared)
        if problem:
            raise CompressError(problem)
