"""`opd train`: the main command, a YAML recipe and `--section.field` options over `opd.train.run`."""

from __future__ import annotations

from pathlib import Path

import typer

from opd.cli.common import PASSTHROUGH, console, training_errors
from opd.errors import OpdError


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


def register(app: typer.Typer) -> None:
    app.command(context_settings=PASSTHROUGH)(train)
