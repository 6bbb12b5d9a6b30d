"""`opd check`: is this student/teacher pair fit to be distilled (`opd.evaluation.checks.run_checks`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.panel import Panel

from opd.cli.common import console, fail
from opd.errors import OpdError

if TYPE_CHECKING:
    from opd.evaluation.checks import CheckResult


def check(
    student: str = typer.Option(..., "--student", help="student model: dir, .gguf or hub id"),
    teacher: str = typer.Option(..., "--teacher", help="teacher model: dir, .gguf or hub id"),
    prompts: Path | None = typer.Option(None, "--prompts", help="prompt file for the rendered-prompt check"),
    template: str | None = typer.Option(
        None, "--template", help="prompt template (default chat; lab: models default to the lab's, raw)"
    ),
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
        template = template or _default_template(student, teacher)
        ok = _check(student, teacher, prompts, template, student_dtype, teacher_dtype, max_new_tokens, n_prompts, k,
                    trust_remote_code, device)  # fmt: skip
    except OpdError as exc:
        fail(exc)
    if not ok:
        raise typer.Exit(1)


def _default_template(student: str, teacher: str) -> str:
    """``chat``, or the template both models bring (`opd.models.loading.model_defaults`: ``lab:`` models
    bring the lab's), announced in one line."""
    from opd.models.loading import model_defaults_note, shared_model_defaults

    defaults, specs = shared_model_defaults([student, teacher])
    if "template" not in defaults:
        return "chat"
    console.print(model_defaults_note(specs, {"template": defaults["template"]}, {"template": "--template"}))
    return defaults["template"]


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


def register(app: typer.Typer) -> None:
    app.command()(check)
