"""`opd train`: the main command, a YAML recipe and `--section.field` options over `opd.train.run`."""

from __future__ import annotations

from pathlib import Path

import typer

from opd.cli.common import PASSTHROUGH, config_command, console, load_run_config, training_errors


def train(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML recipe (see configs/)"),
    resume: Path | None = typer.Option(None, "--resume", help="continue RUN_DIR from its last checkpoint"),
) -> None:
    """Distil a student from a teacher on the student's own rollouts.

    Settings come from a YAML recipe (--config FILE.yaml, see configs/) with options on top, e.g.
    opd train --student S --teacher T --prompts P.jsonl --run_dir runs/x --steps 100
    """
    from opd.train.run import run_training

    rerun = f"`opd train --resume {resume}`" if resume is not None else "the same command"
    with training_errors(rerun):
        cfg = load_run_config("train", config, list(ctx.args), resume, "a run directory")
        run_training(cfg, resume=resume is not None, console=console)


# The fields `opd train --help` shows, with a one-line help each (short forms: opd.config.ALIASES; the
# full descriptions are the fields', in `opd config fields`).
MAIN_OPTIONS = (
    ("student.path", "the student to train: local dir, .gguf file, hub id or lab:NAME"),
    ("teacher.path", "the teacher, in the same forms; must share the student's tokenizer"),
    ("data.prompts", "training prompts: JSONL, Parquet or CSV with `prompt` or `messages`"),
    ("data.template", "how a prompt is rendered: chat | raw | dapo | boxed | chat:NAME | '... {prompt} ...'"),
    ("run_dir", "output directory: config.yaml, metrics.jsonl, checkpoints/, final/"),
    ("steps", "optimizer steps; null: one epoch of the prompts"),
    ("prompts_per_step", "prompts per optimizer step, across all processes"),
    ("rollout.rollouts_per_prompt", "student responses sampled per prompt"),
    ("rollout.max_new_tokens", "response budget in tokens (the paper: 7168)"),
    ("optim.lr", "AdamW learning rate (the paper: 1e-6)"),
    ("loss.signal", "tokens the loss sees: the sampled one, the top-k set, or the whole vocabulary"),
    ("loss.divergence", "reverse KL (the paper's), forward KL, JSD or total variation"),
    ("loss.k", "size of the top-k set of signal topk (the paper: 16)"),
    ("teacher.dtype", "bfloat16 halves a big teacher's memory and time"),
    ("eval.prompts", "held-out problems with an `answer`, for avg@k during training"),
    ("eval.every", "evaluate on eval.prompts every N steps (0: off)"),
)


def register(app: typer.Typer) -> None:
    app.command(cls=config_command("train", MAIN_OPTIONS), context_settings=PASSTHROUGH)(train)
