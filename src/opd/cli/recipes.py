"""`opd generate`, `opd sft` and `opd cold-start`: the off-policy cold start (paper, Recipe A) as commands.

Kept out of cli.py so the recipe commands can grow without touching the training CLI; `register(app)`
adds them. Like `opd train`, every config field is a ``--section.field VALUE`` option on top of an
optional ``--config FILE.yaml``; expected failures (`OpdError`) print one red line and exit with 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from opd.cli.common import (
    PASSTHROUGH,
    config_command,
    console,
    fail,
    is_main,
    load_command_config,
    load_run_config,
    startup_interrupted,
    training_errors,
)
from opd.errors import OpdError


def generate(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with GenerateConfig fields"),
) -> None:
    """Teacher responses to a prompt file, filtered, as chat-format SFT data (resumable).

    Options: --model TEACHER --prompts P --out OUT.jsonl [--samples 1 --temperature 1.0 --top-p 1.0
    --max-new-tokens N --template chat --batch-size 8 --filters truncated,no_answer,repetition
    --seed 0 --device auto]. Rerun the same command after an interruption to finish the file.
    """
    try:
        cfg = load_command_config("generate", config, extra=list(ctx.args))
        from opd.recipes.generate import generate_with_progress

        generate_with_progress(cfg, log=console.print)
    except KeyboardInterrupt:  # while the model loads; generation itself stops on its own
        fail(startup_interrupted("the same command (finished samples are kept)"))
    except OpdError as exc:
        fail(exc)


def sft(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with SFTConfig fields"),
    resume: Path | None = typer.Option(None, "--resume", help="continue RUN_DIR from its last checkpoint"),
) -> None:
    """Supervised fine-tuning on response tokens (prompt tokens masked), e.g. on `opd generate` output.

    Options: --model STUDENT --data teacher.jsonl --run_dir runs/sft [--epochs 1 --batch_size 32
    --micro_batch_size 4 --optim.lr 1e-5 --max_seq_len 8192 ...]; `--resume RUN_DIR` continues.
    """
    with training_errors(f"`opd sft --resume {resume}`" if resume else "the same command"):
        cfg = load_run_config("sft", config, list(ctx.args), resume, "an sft run directory")
        from opd.train.sft import sft_with_progress

        log = lambda m: console.print(m) if is_main() else None  # noqa: E731
        trainer = sft_with_progress(cfg, resume=resume is not None, log=log)
        if trainer is not None:  # None: the resumed run was already finished
            trainer.acc.end_training()


def cold_start(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML recipe, e.g. configs/cold_start_tiny.yaml"
    ),
) -> None:
    """Recipe A: teacher responses -> SFT of the student -> OPD on held-out, de-duplicated prompts.

    Sections generate / sft / opd / dedup plus work_dir, sft_prompts, opd_prompts; any field is an
    option (--opd.loss.k 8, --generate.device cuda:1). Rerun the same command to continue: finished
    stages are skipped.
    """
    from opd.recipes.cold_start import run_cold_start

    with training_errors("the same command (finished stages are skipped)"):
        cfg = load_command_config("cold-start", config, extra=list(ctx.args))
        out = run_cold_start(cfg, log=lambda m: console.print(m) if is_main() else None)
        if is_main():
            console.print(f"[green]cold start done[/]: {json.dumps({k: str(v) for k, v in out.items()})}")


# The fields each command's --help shows, with a one-line help each (`opd config fields --command NAME`
# lists all of them with their full descriptions).
GENERATE_MAIN = (
    ("model", "the teacher that answers: local dir, .gguf file, hub id or lab:NAME"),
    ("prompts", "prompts: JSONL, Parquet or CSV with `prompt` or `messages`"),
    ("out", "output JSONL of chat-format SFT examples (rerun to finish an interrupted file)"),
    ("samples", "responses per prompt"),
    ("max_new_tokens", "response budget in tokens (the paper: 7168)"),
    ("template", "how a prompt is rendered: chat | raw | dapo | boxed | chat:NAME | '... {prompt} ...'"),
    ("filters", "drop truncated, no_answer, repetition, incorrect responses (comma list; none: keep all)"),
    ("device", "where the teacher runs: auto | cpu | cuda | cuda:N"),
)
SFT_MAIN = (
    ("model", "the student to fine-tune: local dir, .gguf file, hub id or lab:NAME"),
    ("data", "training examples: JSONL with `messages` or prompt/response (e.g. `opd generate` output)"),
    ("run_dir", "output directory: config.yaml, metrics.jsonl, checkpoints/, final/"),
    ("epochs", "passes over the data (ignored when steps is set)"),
    ("steps", "optimizer steps; null: epochs x examples / batch_size"),
    ("batch_size", "examples per optimizer step, across all processes"),
    ("micro_batch_size", "examples per forward/backward"),
    ("optim.lr", "AdamW learning rate (the paper's SFT: 1e-5)"),
    ("max_seq_len", "longest prompt + response in tokens; longer examples are skipped and counted"),
)
COLD_START_MAIN = (
    ("work_dir", "where every stage writes (teacher.jsonl, sft/, opd/)"),
    ("generate.model", "the teacher that writes the SFT data (default: opd.teacher.path)"),
    ("sft.model", "the student to fine-tune (default: opd.student.path)"),
    ("sft_prompts", "prompts the teacher answers for SFT (default: generate.prompts)"),
    (
        "opd_prompts",
        "held-out prompts for OPD, de-duplicated against sft_prompts (default: opd.data.prompts)",
    ),
    ("opd.student.path", "the student (before SFT)"),
    ("opd.teacher.path", "the teacher of the OPD stage"),
    ("opd.steps", "OPD optimizer steps"),
)


def register(app: typer.Typer) -> None:
    """Add the recipe commands to the `opd` app."""
    app.command("generate", cls=config_command("generate", GENERATE_MAIN), context_settings=PASSTHROUGH)(
        generate
    )
    app.command("sft", cls=config_command("sft", SFT_MAIN), context_settings=PASSTHROUGH)(sft)
    app.command(
        "cold-start", cls=config_command("cold-start", COLD_START_MAIN), context_settings=PASSTHROUGH
    )(cold_start)
