"""`opd generate`, `opd sft` and `opd cold-start`: the off-policy cold start (paper, Recipe A) as commands.

Kept out of cli.py so the recipe commands can grow without touching the training CLI; `register(app)`
adds them. Like `opd train`, every config field is a ``--section.field VALUE`` option on top of an
optional ``--config FILE.yaml``; expected failures (`OpdError`) print one red line and exit with 2.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from opd.cli_common import PASSTHROUGH, console, fail, is_main, peer_failure, startup_interrupted
from opd.errors import OpdError
from opd.progress import Progress  # plain progress lines when stderr is not a terminal


def _progress(name: str, enabled: bool = True) -> Progress:
    return Progress(
        TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.description}"), console=console, disable=not enabled, transient=False,
    )  # fmt: skip


def generate_with_progress(cfg: Any, log: Callable[[str], Any] | None = None) -> Any:
    """`opd.generate.run_generate` with a progress bar (in samples) and a one-line summary."""
    from opd.generate import run_generate

    log = log or console.print
    progress = _progress("opd generate")
    task = None

    def on_batch(done: int, total: int) -> None:
        nonlocal task
        if task is None:  # started at the first batch, so a refused resume prints no empty bar
            progress.start()
            task = progress.add_task("", total=total)
        progress.update(task, completed=done, total=total)

    try:
        result = run_generate(cfg, log=log, on_batch=on_batch)
    finally:
        progress.stop()
    s = result.summary
    by_filter = ", ".join(f"{k} {v}" for k, v in s["rejected_by_filter"].items()) or "no filters"
    log(
        f"[green]done[/]: kept {s['kept']}/{s['total']} responses in {result.paths.out} "
        f"(rejected {s['rejected']}: {by_filter}; a response may fail several filters); "
        f"this run generated {result.generated}, wrote {result.written}; summary in {result.paths.summary}"
    )
    return result


def sft_with_progress(cfg: Any, *, resume: bool, log: Callable[[str], Any] | None = None) -> Any:
    """Set up and run an `opd.sft.SFTTrainer` with a progress bar; returns the trainer."""
    from opd.sft import SFTTrainer

    log = log or (lambda m: console.print(m) if is_main() else None)
    trainer = SFTTrainer(cfg, resume=resume, log=log)
    trainer.setup()
    main = trainer.acc.is_main_process
    rep = trainer.data_report
    if main:
        log(
            f"sft: {rep['used']} examples ({rep['target_tokens']} target tokens; {rep['skipped_too_long']} "
            f"skipped as longer than {rep['max_seq_len']}), {trainer.total_steps - trainer.start_step} step(s) "
            f"into {cfg.run_dir} on {trainer.acc.num_processes} process(es)"
        )
    with _progress("opd sft", main) as progress:
        task = progress.add_task("", total=trainer.total_steps, completed=trainer.start_step)

        def on_step(step: int, m: dict[str, float]) -> None:
            desc = f"loss {m['loss']:.4g} | lr {m['lr']:.2e} | {m['tokens_per_s']:.0f} tok/s"
            progress.update(task, completed=step, description=desc)

        trainer.train(on_step=on_step)
    if main:
        final = (
            f", final model in {cfg.run_dir}/final"
            if cfg.save_final
            else " (save_final false: no final model)"
        )
        log(f"[green]done[/]: metrics in {cfg.run_dir}/metrics.jsonl{final}")
    return trainer


def register(app: typer.Typer) -> None:
    """Add the recipe commands to the `opd` app."""

    @app.command(context_settings=PASSTHROUGH)
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
        from opd.generate import GENERATE_ALIASES, GenerateConfig

        try:
            cfg = load_config(config, list(ctx.args), model=GenerateConfig, aliases=GENERATE_ALIASES)
            generate_with_progress(cfg)
        except KeyboardInterrupt:  # while the model loads; generation itself stops on its own
            fail(startup_interrupted("the same command (finished samples are kept)"))
        except OpdError as exc:
            fail(exc)

    @app.command(context_settings=PASSTHROUGH)
    def sft(
        ctx: typer.Context,
        config: Path | None = typer.Option(None, "--config", "-c", help="YAML with SFTConfig fields"),
        resume: Path | None = typer.Option(
            None, "--resume", help="continue RUN_DIR from its last checkpoint"
        ),
    ) -> None:
        """Supervised fine-tuning on response tokens (prompt tokens masked), e.g. on `opd generate` output.

        Options: --model STUDENT --data teacher.jsonl --run_dir runs/sft [--epochs 1 --batch_size 32
        --micro_batch_size 4 --optim.lr 1e-5 --max_seq_len 8192 ...]; `--resume RUN_DIR` continues.
        """
        from opd.config import load_config
        from opd.sft import SFT_ALIASES, SFTConfig

        overrides = list(ctx.args)
        try:
            if resume is not None:
                if not (resume / "config.yaml").is_file() and config is None:
                    raise OpdError(f"--resume {resume}: no config.yaml there; is it an sft run directory?")
                cfg = load_config(
                    config or resume / "config.yaml", [*overrides, "--run_dir", str(resume)],
                    model=SFTConfig, aliases=SFT_ALIASES,
                )  # fmt: skip
            else:
                cfg = load_config(config, overrides, model=SFTConfig, aliases=SFT_ALIASES)
            trainer = sft_with_progress(cfg, resume=resume is not None)
            trainer.acc.end_training()
        except KeyboardInterrupt:  # while models load; the training loop stops on its own
            fail(startup_interrupted(f"`opd sft --resume {resume}`" if resume else "the same command"))
        except RuntimeError as exc:
            lost = peer_failure(exc)
            if lost is None:
                raise
            fail(lost)
        except OpdError as exc:
            from opd.trainer import NonFiniteLossError

            fail(exc, 3 if isinstance(exc, NonFiniteLossError) else 2)

    @app.command("cold-start", context_settings=PASSTHROUGH)
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
        from opd.cold_start import ColdStartConfig, run_cold_start
        from opd.config import load_config

        try:
            cfg = load_config(config, list(ctx.args), model=ColdStartConfig, aliases={})
            out = run_cold_start(cfg, log=lambda m: console.print(m) if is_main() else None)
            if is_main():
                console.print(f"[green]cold start done[/]: {json.dumps({k: str(v) for k, v in out.items()})}")
        except KeyboardInterrupt:
            fail(startup_interrupted("the same command (finished stages are skipped)"))
        except RuntimeError as exc:
            lost = peer_failure(exc)
            if lost is None:
                raise
            fail(lost)
        except OpdError as exc:
            from opd.trainer import NonFiniteLossError

            fail(exc, 3 if isinstance(exc, NonFiniteLossError) else 2)
