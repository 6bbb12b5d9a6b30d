"""`opd config show|fields` (what a run will use, every option there is) and `opd tiny` (a pair to try them on)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from opd.cli.common import PASSTHROUGH, console, fail
from opd.errors import OpdError


def tiny(
    out_dir: Path = typer.Argument(
        Path("runs/tiny"), help="where to write student/, teacher/, prompts.jsonl"
    ),
) -> None:
    """Build a tiny random student/teacher pair and a prompt file, for smoke runs with no download."""
    from opd.models.tiny import save_tiny_pair

    paths = save_tiny_pair(out_dir)
    for name, p in paths.items():
        console.print(f"{name}: {p}")


def config_show(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", "-c"),
) -> None:
    """Print the fully resolved config (defaults + YAML + overrides) as YAML."""
    from opd.config import dump_config, load_config

    try:
        sys.stdout.write(dump_config(load_config(config, list(ctx.args))))
    except OpdError as exc:
        fail(exc)


def config_fields() -> None:
    """List every config field (each is also a --section.field CLI option)."""
    from opd.config import field_paths

    table = Table(show_header=True)
    table.add_column("option")
    table.add_column("description")
    for path, desc in field_paths().items():
        table.add_row(f"--{path}", desc)
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command()(tiny)
    config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration.")
    config_app.command("show", context_settings=PASSTHROUGH)(config_show)
    config_app.command("fields")(config_fields)
    app.add_typer(config_app, name="config")
