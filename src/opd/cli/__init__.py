"""The `opd` command line: one thin module per command (parse options, build a config, call the library,
print), assembled into one typer app here."""

from __future__ import annotations

import os
from typing import Any

import typer
from typer.core import TyperGroup


def _escape_help(command: Any) -> None:
    """Help text is shown literally: typer renders it as rich markup, which would swallow the square
    brackets of `[default]`-style notes and `[http://a:8000, http://b:8000]` examples. Escaped in place,
    once per built command tree, for this group, its commands, their options and every subgroup (those
    the lab and other packages add through entry points too)."""
    from rich.markup import escape

    if getattr(command, "_opd_help_escaped", False):
        return
    command._opd_help_escaped = True
    if getattr(command, "rich_markup_mode", "rich") == "rich":
        for attr in ("help", "short_help", "epilog"):
            text = getattr(command, attr, None)
            if isinstance(text, str):
                setattr(command, attr, escape(text))
        for param in getattr(command, "params", []):
            if isinstance(getattr(param, "help", None), str):
                param.help = escape(param.help)
    for sub in getattr(command, "commands", {}).values():
        _escape_help(sub)


class OpdGroup(TyperGroup):
    """The root `opd` group: its whole command tree's help text is escaped (`_escape_help`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _escape_help(self)

    def invoke(self, ctx: Any) -> Any:
        """Every command: an OS error on a named path that no command worded (an unwritable ``--out``, a
        prompt file this user may not read) is one line too (`opd.cli.common.os_error`), not a traceback."""
        try:
            return super().invoke(ctx)
        except OSError as exc:
            from opd.cli.common import fail, os_error

            if os_error(exc) is None:
                raise
            fail(exc)


app = typer.Typer(
    cls=OpdGroup, add_completion=False, no_args_is_help=True, help="On-policy distillation of LLMs."
)


def version() -> str:
    """opd's version: the installed package's metadata, else `opd.__version__` (a source tree on the path)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("opd")
    except PackageNotFoundError:
        import opd

        return opd.__version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"opd {version()}")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: bool = typer.Option(
        False, "--debug", help="on an error, print the full traceback too (sets OPD_DEBUG=1)"
    ),
    show_version: bool = typer.Option(
        False, "--version", "-V", is_eager=True, callback=_print_version, help="print opd's version and exit"
    ),
) -> None:
    # Errors are one line by default; a bug report needs the traceback, which opd.cli.common.fail prints
    # when OPD_DEBUG is set. The environment carries it into torchrun workers and subprocesses as well.
    if debug:
        os.environ["OPD_DEBUG"] = "1"


def _add_commands(app: typer.Typer) -> None:
    """Every command, one module each under opd/cli, and those installed packages declare in the
    ``opd.commands`` entry-point group (opd's own lab registers ``opd lab`` and ``opd demo`` that way, so
    nothing outside opd/lab imports the lab; from a source tree without metadata, `opd.runtime.entry_points`
    supplies opd's own)."""
    from opd.cli import analyze, check, config, doctor, eval, prompts, recipes, serve, train
    from opd.runtime import entry_points

    for module in (train, check, config, eval, prompts, recipes, doctor, analyze, serve):
        module.register(app)
    for ep in entry_points("opd.commands"):
        ep.load()(app)


_add_commands(app)


def main() -> None:  # pragma: no cover
    app()
