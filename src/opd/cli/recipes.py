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
    console,
    fail,
    is_main,
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
    from opd.config import load_config
    from opd.recipes.generate import GENERATE_ALIASES, GenerateConfig

    try:
        cfg = load_config(config, list(ctx.args), model=GenerateConfig, aliases=GENERATE_ALIASES)
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
    from opd.config import load_config
    from opd.train.sft import SFT_ALIASES, SFTConfig

    overrides = list(ctx.args)
    with training_errors(f"`opd sft --resume {resume}`" if resume else "the same command"):
        if resume is not None:
            if not (resume / "config.yaml").is_file() and config is None:
                raise OpdError(f"--resume {resume}: no config.yaml there; is it an sft run directory?")
            cfg = load_config(
                config or resume / "config.yaml", [*overrides, "--run_dir", str(resume)],
                model=SFTConfig, aliases=SFT_ALIASES,
            )  # fmt: skip
        else:
            cfg = load_config(config, overrides, model=SFTConfig, aliases=SFT_ALIASES)
        from opd.train.sft import sft_with_progress

        log = lambda m: console.print(m) if is_main() else None  # noqa: E731
        trainer = sft_with_progress(cfg, resume=resume is not None, log=log)
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
    from opd.config import load_config
    from opd.recipes.cold_start import ColdStartConfig, run_cold_start

    with training_errors("the same command (finished stages are skipped)"):
        cfg = load_config(config, list(ctx.args), model=ColdStartConfig, aliases={})
        out = run_cold_start(cfg, log=lambda m: console.print(m) if is_main() else None)
        if is_main():
            console.print(f"[green]cold start done[/]: {json.dumps({k: str(v) for k, v in out.items()})}")


def register(app: typer.Typer) -> None:
    """Add the recipe commands to the `opd` app."""
    app.command("generate", context_settings=PASSTHROUGH)(generate)
    app.command("sft", context_settings=PASSTHROUGH)(sft)
    app.command("cold-start", context_settings=PASSTHROUGH)(cold_start)
