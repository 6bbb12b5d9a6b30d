"""The `opd` command line: thin wrappers that parse, build a config, and call a component."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from opd.cli.common import PASSTHROUGH, console, fail, training_errors
from opd.errors import OpdError

if TYPE_CHECKING:
    from opd.evaluation.checks import CheckResult

app = typer.Typer(add_completion=False, no_args_is_help=True, help="On-policy distillation of LLMs.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration.")
app.add_typer(config_app, name="config")


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


@app.command(context_settings=PASSTHROUGH)
def train(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML recipe (see configs/)"),
    resume: Path | None = typer.Option(None, "--resume", help="continue RUN_DIR from its last checkpoint"),
) -> None:
    """Distil a student from a teacher on the student's own rollouts.

    Every config field is also an option, e.g. --loss.signal sampled --rollout.max_new_tokens 512;
    `opd config fields` lists them all.
    """
    from opd.config import load_config
    from opd.train.run import run_training

    overrides = list(ctx.args)
    rerun = f"`opd train --resume {resume}`" if resume is not None else "the same command"
    with training_errors(rerun):
        if resume is not None:
            if not (resume / "config.yaml").is_file() and config is None:
                raise OpdError(f"--resume {resume}: no config.yaml there; is it a run directory?")
            cfg = load_config(config or resume / "config.yaml", overrides + ["--run_dir", str(resume)])
        else:
            cfg = load_config(config, overrides)
        run_training(cfg, resume=resume is not None, console=console)


@app.command()
def check(
    student: str = typer.Option(..., "--student", help="student model: dir, .gguf or hub id"),
    teacher: str = typer.Option(..., "--teacher", help="teacher model: dir, .gguf or hub id"),
    prompts: Path | None = typer.Option(None, "--prompts", help="prompt file for the rendered-prompt check"),
    template: str = typer.Option("chat", "--template"),
    student_dtype: str = typer.Option("float32", "--student-dtype"),
    teacher_dtype: str = typer.Option("float32", "--teacher-dtype"),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="length of the self-test rollouts"),
    n_prompts: int = typer.Option(2, "--n-prompts"),
    k: int = typer.Option(16, "--k"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    device: str = typer.Option(
        "auto", "--device", help="where both models run: auto (GPU when available) | cpu | cuda | cuda:N"
    ),
) -> None:
    """Tokenizer/vocabulary compatibility, EOS/pad handling, and the teacher-fidelity self-test."""
    try:
        ok = _check(student, teacher, prompts, template, student_dtype, teacher_dtype, max_new_tokens, n_prompts, k,
                    trust_remote_code, device)  # fmt: skip
    except OpdError as exc:
        fail(exc)
    if not ok:
        raise typer.Exit(1)


def _check(
    student: str, teacher: str, prompts: Path | None, template: str, s_dtype: str, t_dtype: str, max_new: int,
    n_prompts: int, k: int, trc: bool, device: str = "auto",
) -> bool:  # fmt: skip
    """Run the checks, print the verdict table; True when the pair passed (warnings aside)."""
    import time

    from opd.evaluation.checks import checks_passed, run_checks

    t0 = time.perf_counter()
    results = run_checks(
        student, teacher, prompts=prompts, template=template, student_dtype=s_dtype, teacher_dtype=t_dtype,
        max_new_tokens=max_new, n_prompts=n_prompts, k=k, trust_remote_code=trc, device=device,
        log=console.print, status=console.status, show_prompt=_show_prompt,
    )  # fmt: skip
    _print_results(results)
    if results[0].ok:  # the tokenizers agreed, so every check ran (a mismatch stops at once)
        console.print(f"check finished in {time.perf_counter() - t0:.1f}s")
    return checks_passed(results)


def _show_prompt(text: str, template: str) -> None:
    console.print(Panel(text, title=f"rendered prompt (student tokenizer, template {template})"))


def _print_results(results: list[CheckResult]) -> None:
    from opd.evaluation.checks import SOFT_CHECKS

    out = Console(soft_wrap=True)
    out.print("[bold]opd check[/]")
    for r in results:
        mark = "[green]ok[/]" if r.ok else ("[yellow]warn[/]" if r.name in SOFT_CHECKS else "[red]FAIL[/]")
        out.print(f"  {mark} {r.name}: {r.detail}")


@app.command()
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


@config_app.command("show")
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


config_app.registered_commands[-1].context_settings = PASSTHROUGH


@config_app.command("fields")
def config_fields() -> None:
    """List every config field (each is also a --section.field CLI option)."""
    from opd.config import field_paths

    table = Table(show_header=True)
    table.add_column("option")
    table.add_column("description")
    for path, desc in field_paths().items():
        table.add_row(f"--{path}", desc)
    Console().print(table)


def _add_commands(app: typer.Typer) -> None:
    """The other commands, one module each under opd/cli, and those installed packages declare in the
    ``opd.commands`` entry-point group (opd's own lab registers ``opd lab`` and ``opd demo`` that way, so
    nothing outside opd/lab imports the lab)."""
    from importlib.metadata import entry_points

    from opd.cli import analyze, doctor, eval, prompts, recipes, serve

    for module in (eval, prompts, recipes, doctor, analyze, serve):
        module.register(app)
    for ep in entry_points(group="opd.commands"):
        ep.load()(app)


_add_commands(app)


def main() -> None:  # pragma: no cover
    app()
