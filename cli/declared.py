"""Typer flags built from the option declarations (`compress.options`), so that a field's
help, default, panel and spelling are written once, beside the field.

A command takes the declared options as ``**fields`` and names its own flags (``--out``,
``--json``...) as ordinary parameters; `declared_flags` adds the declared ones to its
signature, each defaulting to None (not given), so a recipe file or the command's own
default can fill what the command line leaves out.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable
from typing import Annotated

import typer

from compress.options import declarations, shown_default


def _flag_type(hint: object) -> object:
    """The type a flag parses: a list (``--input-shape``) is given as text, ``C,H,W``."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    allowed = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    kind = allowed[0]
    if typing.get_origin(kind) is list:
        kind = str
    return kind | None


def flags_of(cls: type, names: Iterable[str] | None = None,
             changes: dict[str, dict] | None = None) -> list[inspect.Parameter]:
    """Keyword parameters, one per declared field of ``cls`` (those in ``names``, in that
    order, where given). ``changes[field]`` may set a command's own ``help``, ``shown``
    default or ``panel`` for a field it reads differently."""
    declared = declarations(cls)
    hints = typing.get_type_hints(cls)
    changes = changes or {}
    params = []
    for name in names if names is not None else declared:
        field, meaning = declared[name]
        change = changes.get(name, {})
        info = typer.Option(*((meaning.flag,) if meaning.flag else ()),
                            help=change.get("help", meaning.help),
                            show_default=change.get("shown", shown_default(field, meaning)),
                            rich_help_panel=change.get("panel", meaning.panel))
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[_flag_type(hints[name]), info]))
    return params


def declared_flags(*groups: list[inspect.Parameter], lead: int = 0) -> Callable:
    """Give a command taking ``**fields`` the declared flags of ``groups``, after its first
    ``lead`` parameters and before the rest (``--help`` shows panels in the order their
    first flag comes, and a panel's flags in order)."""
    def add(command: Callable) -> Callable:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params = own[:lead] + [p for group in groups for p in group] + own[lead:]
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command
    return add
