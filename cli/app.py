"""The ``compress`` command line: a thin Typer layer over `compress` and `export`.

Every command exits 0 on success; on a user error it prints one line to stderr and exits
2 (``--debug`` shows the traceback instead). The commands live in `cli.commands`, the
output helpers they share in `cli.output`; this module only assembles the application.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cli import commands
from cli.output import STATE, friendly_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune image classifiers (DPF, magnitude, channel pruning, ...) and "
                       "report what it cost.")


@app.callback()
def main_options(debug: Annotated[bool, typer.Option(
        "--debug", help="Show full tracebacks on errors.")] = False) -> None:
    STATE["debug"] = debug


for name, command in (("train-prune", commands.train_prune), ("prune", commands.prune),
                      ("inspect", commands.inspect), ("evaluate", commands.evaluate),
                      ("export", commands.export_onnx), ("bench", commands.bench),
                      ("keygen", commands.keygen), ("sign", commands.sign),
                      ("verify", commands.verify)):
    app.command(name)(friendly_errors(command))


def main() -> None:
    import sys

    args = sys.argv[1:]
    if "--debug" in args[1:]:  # accepted after the command name too
        args.remove("--debug")
        args.insert(0, "--debug")
    app(args=args, prog_name="compress")
