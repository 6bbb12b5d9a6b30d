"""The `opd` command line: one thin module per command (parse options, build a config, call the library,
print), assembled into one typer app here."""

from __future__ import annotations

import os

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="On-policy distillation of LLMs.")


@app.callback()
def _global_options(
    debug: bool = typer.Option(
        False, "--debug", help="on an error, print the full traceback too (sets OPD_DEBUG=1)"
    ),
) -> None:
    # Errors are one line by default; a bug report needs the traceback, which opd.cli.common.fail prints
    # when OPD_DEBUG is set. The environment carries it into torchrun workers and subprocesses as well.
    if debug:
        os.environ["OPD_DEBUG"] = "1"


def _add_commands(app: typer.Typer) -> None:
    """Every command, one module each under opd/cli, and those installed packages declare in the
    ``opd.commands`` entry-point group (opd's own lab registers ``opd lab`` and ``opd demo`` that way, so
    nothing outside opd/lab imports the lab)."""
    from importlib.metadata import entry_points

    from opd.cli import analyze, check, config, doctor, eval, prompts, recipes, serve, train

    for module in (train, check, config, eval, prompts, recipes, doctor, analyze, serve):
        module.register(app)
    for ep in entry_points(group="opd.commands"):
        ep.load()(app)


_add_commands(app)


def main() -> None:  # pragma: no cover
    app()
