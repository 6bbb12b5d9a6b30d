"""Pieces every `opd` command module shares: the stderr console, pass-through options, error exit."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.text import Text

# Progress, notes and errors go to stderr so stdout stays clean for data (e.g. `opd config show`).
console = Console(stderr=True, soft_wrap=True)

# Commands whose every config field is a `--section.field VALUE` option take unknown options through.
PASSTHROUGH = {
    "allow_extra_args": True,
    "ignore_unknown_options": True,
    "help_option_names": ["-h", "--help"],
}


def fail(exc: Exception, code: int = 2) -> None:
    """One red line instead of a traceback; the message is printed literally (no rich markup). An
    exception's own ``exit_code`` (e.g. `opd.errors.InterruptedRun`: 130) wins over ``code``."""
    console.print(Text.assemble(("error: ", "bold red"), str(exc)))
    raise typer.Exit(getattr(exc, "exit_code", code))


def is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process
