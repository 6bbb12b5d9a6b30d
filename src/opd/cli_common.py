"""Pieces every `opd` command module shares: the stderr console, pass-through options, error exit."""

from __future__ import annotations

import os
import traceback

import typer
from rich.console import Console
from rich.text import Text

# Progress, notes and errors go to stderr so stdout stays clean for data (e.g. `opd config show`).
console = Console(stderr=True, soft_wrap=True)

# Set to 1 to see the traceback behind an error message (`fail`); `opd --debug` sets it.
DEBUG_ENV = "OPD_DEBUG"

# Commands whose every config field is a `--section.field VALUE` option take unknown options through.
PASSTHROUGH = {
    "allow_extra_args": True,
    "ignore_unknown_options": True,
    "help_option_names": ["-h", "--help"],
}


def fail(exc: Exception, code: int = 2) -> None:
    """One red line instead of a traceback; the message is printed literally (no rich markup). An
    exception's own ``exit_code`` (e.g. `opd.errors.InterruptedRun`: 130) wins over ``code``.

    With ``OPD_DEBUG=1`` in the environment (the CLI's ``--debug``) the traceback of what caused the
    error (the library exception opd translated, e.g. a torch or gguf error) is printed first: the one
    line is for users, the traceback for a bug report. The red line stays last either way.
    """
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        console.print(Text("".join(traceback.format_exception(exc)), style="dim"))
    console.print(Text.assemble(("error: ", "bold red"), str(exc)))
    raise typer.Exit(getattr(exc, "exit_code", code))


def is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process
