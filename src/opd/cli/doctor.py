"""`opd doctor`: the pre-flight check of a student/teacher/prompt set (see `opd.evaluation.doctor`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from opd.cli.common import PASSTHROUGH, console, fail, load_command_config
from opd.errors import OpdError


def _verdict_table(res: dict[str, Any]) -> Table:
    from opd.report.doctor import _fmt

    best = res["recommended_template"]
    t = Table(title=f"opd doctor (template {best}, top-{res['k']})", show_header=True)
    t.add_column("teacher")
    for col in ("overlap", "mass s/t", "ovl adv", "H gap", "acc s/t", "only-T", "AUROC", "verdict"):
        t.add_column(col, justify="right" if col != "verdict" else "left")
    for name, info in res["teachers"].items():
        m = info["by_template"][best]
        t.add_row(
            name,
            _fmt(m.get("overlap_ratio")),
            f"{_fmt(m.get('overlap_mass_student'))}/{_fmt(m.get('overlap_mass_teacher'))}",
            _fmt(m.get("overlap_token_advantage")),
            _fmt(m.get("entropy_gap")),
            f"{_fmt(m.get('student_acc'), True)}/{_fmt(m.get('teacher_acc'), True)}",
            _fmt(m.get("teacher_only_share"), True),
            _fmt(m.get("reward_auroc")),
            info["verdict"]["code"],
        )
    return t


def register(app: typer.Typer) -> None:
    @app.command(context_settings=PASSTHROUGH)
    def doctor(
        ctx: typer.Context,
        config: Path | None = typer.Option(None, "--config", "-c", help="YAML with DoctorConfig fields"),
        student: str | None = typer.Option(None, "--student", help="student: dir, .gguf, hub id or lab:NAME"),
        teacher: list[str] = typer.Option([], "--teacher", help="teacher (repeatable: several teachers)"),
        prompts: str | None = typer.Option(
            None, "--prompts", help="problems (JSONL/Parquet/CSV), `answer` field"
        ),
        template: list[str] = typer.Option(
            [], "--template", help="prompt template (repeatable: compare them)"
        ),
        n_prompts: int | None = typer.Option(None, "--n-prompts", help="first N prompts [16]"),
        samples: int | None = typer.Option(None, "--samples", help="student rollouts per prompt [4]"),
        teacher_samples: int | None = typer.Option(
            None, "--teacher-samples", help="teacher samples per prompt [2]"
        ),
        max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="response budget [256]"),
        k: int | None = typer.Option(None, "--k", help="top-k of the overlap metrics [16]"),
        depth: list[float] = typer.Option([], "--depth", help="continuation depth, fraction (repeatable)"),
        continuation_rollouts: int | None = typer.Option(
            None, "--continuation-rollouts", help="[16]; 0 skips"
        ),
        verifier: str | None = typer.Option(
            None,
            "--verifier",
            help="answer checker as in `opd eval` [math]; lab: models default to the lab's own",
        ),
        student_dtype: str | None = typer.Option(None, "--student-dtype"),
        teacher_dtype: str | None = typer.Option(
            None, "--teacher-dtype", help="e.g. bfloat16 for big teachers"
        ),
        device: str | None = typer.Option(
            None, "--device", help="where the models run: auto | cpu | cuda | cuda:N [auto: GPU if any]"
        ),
        seed: int | None = typer.Option(None, "--seed"),
        out: str | None = typer.Option(None, "--out", help="output directory [doctor]"),
        plots: bool = typer.Option(True, "--plots/--no-plots"),
    ) -> None:
        """Before training: will OPD work for this pair? Compatibility, novelty, verdict and recipe.

        Forward passes and sampling only. Other fields: `--thresholds.min_overlap_mass 0.8`, `--temperature`,
        `--batch_size`, `--score_batch`, `--system_prompt` ... (see `opd.evaluation.doctor.DoctorConfig`).
        """
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from opd.evaluation.doctor import run_doctor
        from opd.progress import Progress  # plain progress lines when stderr is not a terminal
        from opd.report.doctor import write_doctor_report

        named = dict(
            student=student, teachers=teacher, prompts=prompts, templates=template, n_prompts=n_prompts,
            samples=samples, teacher_samples=teacher_samples, max_new_tokens=max_new_tokens, k=k, depths=depth,
            continuation_rollouts=continuation_rollouts, verifier=verifier, student_dtype=student_dtype,
            teacher_dtype=teacher_dtype, device=device, seed=seed, out=out,
        )  # fmt: skip
        try:
            cfg = load_command_config("doctor", config, options=named, extra=list(ctx.args))
            with Progress(
                TextColumn("[bold]opd doctor"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"),
                console=console, transient=False,
            ) as bar:  # fmt: skip
                task = bar.add_task("loading models", total=1.0)
                res = run_doctor(
                    cfg,
                    progress=lambda label, frac: bar.update(task, completed=frac, description=label),
                    log=lambda s: console.print(s),
                )
            paths = write_doctor_report(res, cfg.out, plots=plots)
        except OpdError as exc:
            fail(exc)
        Console().print(_verdict_table(res))
        for name, info in res["teachers"].items():
            console.print(f"[bold]{name}[/]: {info['verdict']['headline']} -> {info['verdict']['recipe']}")
        from opd.report.doctor import readability_note

        for name, caution in res["sample"]["noisy"].items():
            console.print(Text.assemble(("warning: ", "yellow"), f"{name}: {caution}"))
        for f in [readability_note(res), *res.get("flags", [])]:
            if f:
                console.print(Text.assemble(("note: ", "yellow"), f))
        console.print(f"report: {paths['html']} (also {paths['markdown'].name}, {paths['json'].name})")
