"""`opd config show|fields` (what a run will use, every option there is) and `opd tiny` (a pair to try them on)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from opd.cli.common import (
    COMMAND_CONFIGS,
    PASSTHROUGH,
    command_config,
    config_field_rows,
    console,
    fail,
    load_command_config,
)
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
    from opd.config import dump_config

    try:
        sys.stdout.write(dump_config(load_command_config("train", config, extra=list(ctx.args))))
    except OpdError as exc:
        fail(exc)


def config_fields(
    section: str | None = typer.Argument(
        None, help="only this section or field (a dotted prefix), e.g. loss, teacher, rollout.max_new_tokens"
    ),
    command: str = typer.Option(
        "train", "--command", "-C", help=f"whose config: {' | '.join(COMMAND_CONFIGS)}"
    ),
) -> None:
    """List every config field of a command (train by default) with what it takes, its default and what it
    does. For train, sft, generate, cold-start and doctor each is also a --section.field VALUE option; every
    command takes them as keys of its --config YAML file."""
    try:
        model, aliases, options = command_config(command)
        rows = config_field_rows(model)
        if section:
            picked = [r for r in rows if r[0] == section or r[0].startswith(section.rstrip(".") + ".")]
            if not picked:
                sections = sorted({r[0].split(".")[0] for r in rows if "." in r[0]})
                raise OpdError(
                    f"no field or section {section!r} in {command}'s config; its sections: {', '.join(sections)} "
                    f"(`opd config fields{'' if command == 'train' else ' --command ' + command}` lists all fields)"
                )
            rows = picked
    except OpdError as exc:
        fail(exc)
    # One block per field (names, what it takes, default; the description indented below), read at any
    # width and by grep. Text, never markup: descriptions hold examples in square brackets ([http://a:8000])
    # that rich would swallow.
    out = Console()
    what = (
        "also a --section.field VALUE option" if options else f"a key of `opd {command} --config FILE.yaml`"
    )
    out.print(Text(f"opd {command}: {len(rows)} config field(s), each {what}", style="bold"))
    last = None
    for path, kind, default, desc in rows:
        head = path.rsplit(".", 1)[0] if "." in path else ""
        if head != last:
            out.print(Text(f"\n{head or '(top level)'}", style="bold underline"))
            last = head
        names = (
            ", ".join([f"--{a}" for a, p in aliases.items() if p == path] + [f"--{path}"])
            if options
            else path
        )
        head_line = Text.assemble(
            "  ", (names, "bold cyan"), " ", (f"<{kind}>", "yellow"), f"  [default: {default}]"
        )
        out.print(head_line, soft_wrap=True)
        indent = " " * 6
        body = textwrap.fill(desc or "(no description)", max(40, out.width - 1), initial_indent=indent,
                             subsequent_indent=indent)  # fmt: skip
        out.print(Text(body), soft_wrap=True)
    if not options:
        console.print(
            f"These are the keys of `opd {command} --config FILE.yaml`; `opd {command} --help` lists its "
            "command-line options.",
            markup=False,
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command()(tiny)
    config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration.")
    config_app.command("show", context_settings=PASSTHROUGH)(config_show)
    config_app.command("fields")(config_fields)
    app.add_typer(config_app, name="config")
