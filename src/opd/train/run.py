"""A whole OPD training as `opd train` (and the cold start's last stage) runs it.

Set-up, a start-up report of what was loaded and how the first prompt renders, the scoring self-test,
the loop under a progress bar, and the ordered multi-process teardown whatever happens. Errors are
raised for the caller (the CLI turns them into one line and an exit code), never printed here.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from opd.config import TrainConfig
from opd.errors import InterruptedRun, OpdError, StorageError
from opd.generation.build import rollout_engine_in_process
from opd.progress import bar
from opd.teachers.build import teacher_engine_in_process
from opd.teachers.http import TeacherUnavailableError
from opd.train.alarms import CollapseError
from opd.train.loop import apply_dist_timeout, configure_cuda_allocator, finished_run
from opd.train.trainer import NonFiniteLossError, OPDTrainer


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def run_training(cfg: TrainConfig, *, resume: bool, console: Console | None = None) -> None:
    """Set up an `OPDTrainer`, report what it loaded, self-test the scoring path, train with a progress
    bar, and tear the processes down in order whatever happens (errors are raised, not printed)."""
    from opd.models.loading import apply_model_defaults

    console = console or Console(stderr=True, soft_wrap=True)
    if resume:
        done = finished_run(
            Path(cfg.run_dir), steps=cfg.steps, save_final=cfg.save_final, command="opd train"
        )
        if done is not None:  # nothing to train, and nothing on disk is touched
            if os.environ.get("RANK", "0") == "0":
                console.print(Text(done))
            return
    # lab:NAME models train with the lab's template and evaluate with its verifier unless told otherwise;
    # a resumed run's config.yaml names both, so this applies only to a new run
    cfg = apply_model_defaults(cfg, [cfg.student.path, cfg.teacher.path],
                               {"template": "data.template", "verifier": "eval.verifier"},
                               console.print if os.environ.get("RANK", "0") == "0" else None)  # fmt: skip
    # before the accelerator touches CUDA: the allocator reads its settings once, when CUDA starts
    configure_cuda_allocator(allowed=cfg.expandable_segments, engine_in_process=vllm_in_process(cfg))
    trainer = OPDTrainer(cfg, resume=resume, log=lambda m: console.print(m) if _is_main() else None)
    # before set-up's first collective: a hung rank fails the others, a long wait for rank 0 does not
    apply_dist_timeout(trainer.acc, cfg.dist_timeout_s)
    ok = False
    try:
        trainer.setup()
        main = trainer.acc.is_main_process
        if main:
            _startup_report(trainer, console)
        if cfg.startup_checks:
            _fidelity_at_startup(trainer, console)
        remaining = trainer.total_steps - trainer.start_step
        if main:
            console.print(
                f"training {remaining} step(s) into {cfg.run_dir} on {trainer.acc.num_processes} process(es)"
            )
        with bar("opd train", console=console, enabled=main) as progress:
            task = progress.add_task("", total=trainer.total_steps, completed=trainer.start_step)

            def on_step(step: int, m: dict) -> None:
                desc = (
                    f"loss {m['loss']:.4g} | overlap {m.get('overlap_ratio', float('nan')):.3f} | "
                    f"H_s {m.get('entropy_student', float('nan')):.3f} | len {m['response_len_mean']:.0f} | "
                    f"{m['tokens_per_s']:.0f} tok/s"
                )
                progress.update(task, completed=step, description=desc)

            trainer.train(on_step=on_step)
        ok = True
    except (InterruptedRun, TeacherUnavailableError, CollapseError, NonFiniteLossError, StorageError):
        ok = True  # every process stopped at the same point: the ordered teardown may still barrier
        raise
    finally:
        trainer._teardown(ok=ok)
    if main:
        final = f", final model in {cfg.run_dir}/final" if cfg.save_final else " (save_final false: no model)"
        console.print(f"[green]done[/]: metrics in {cfg.run_dir}/metrics.jsonl{final}")
    trainer.acc.end_training()


def vllm_in_process(cfg: TrainConfig) -> bool:
    """Whether a vLLM engine (rollouts or teacher) will share the training process and its GPU."""
    return rollout_engine_in_process(cfg.rollout) or teacher_engine_in_process(cfg.teacher)


def _startup_report(trainer: OPDTrainer, console: Console) -> None:
    from opd.models.loading import special_tokens_report
    from opd.teachers.build import describe_teacher

    cfg = trainer.cfg
    table = Table(title="opd: student / teacher", show_header=True)
    table.add_column("")
    table.add_column("student")
    table.add_column("teacher")
    s_rep = special_tokens_report(trainer.tokenizer, trainer._unwrapped())
    about = describe_teacher(cfg.teacher)
    table.add_row("path", cfg.student.path, about.pop("path"))
    table.add_row("dtype", cfg.student.dtype, about.pop("dtype"))
    for key, value in about.items():
        table.add_row(key, "", value)
    # special tokens of an in-process teacher; of an engine or server only the tokenizer is seen here
    model = trainer.teacher.model
    t_rep = special_tokens_report(trainer.teacher_tokenizer, model) if model is not None else {}
    for key in sorted(set(s_rep) | set(t_rep)):
        table.add_row(str(key), str(s_rep.get(key)), str(t_rep.get(key, "-" if t_rep else "(engine)")))
    table.add_row("shared vocabulary", str(trainer.vocab_size), str(trainer.vocab_size))
    console.print(table)
    for note in (
        trainer.tokenizer_report.get("warnings", []) if isinstance(trainer.tokenizer_report, dict) else []
    ):
        console.print(f"[yellow]warning:[/] {note}")
    first = trainer.prompt_texts[0]
    console.print(
        Panel(
            first,
            title=f"first prompt as rendered (template: {cfg.data.template}); the teacher scores these exact ids",
        )
    )
    console.print(f"stop ids: {trainer.stop_ids}; pad id: {trainer.tokenizer.pad_token_id}")
    try:
        from opd.data import render_prompt

        t_text = render_prompt(
            trainer.records[0], trainer.teacher_tokenizer, template=cfg.data.template,
            chat_template_kwargs=cfg.data.chat_template_kwargs, system_prompt=cfg.data.system_prompt,
        )  # fmt: skip
        if t_text != first:
            console.print(Panel(t_text, title="[yellow]the teacher's own template renders it differently"))
    except OpdError:
        pass


def _fidelity_at_startup(trainer: OPDTrainer, console: Console) -> None:
    from opd.evaluation.checks import fidelity_self_test, self_test_rollout

    model = trainer._unwrapped()
    prompts = trainer.prompt_ids[:2]
    roll = self_test_rollout(model, prompts, pad_id=trainer.tokenizer.pad_token_id, stop_ids=trainer.stop_ids,
                             max_new_tokens=min(16, trainer.cfg.rollout.max_new_tokens), seed=trainer.cfg.seed,
                             vocab_size=trainer.vocab_size)  # fmt: skip
    res = fidelity_self_test(model, roll, vocab_size=trainer.vocab_size, k=trainer.cfg.diagnostics.k)
    if trainer.acc.is_main_process:
        console.print(("[green]ok[/] " if res.ok else "[red]FAILED[/] ") + f"{res.name}: {res.detail}")
    if not res.ok:
        raise OpdError(
            f"{res.name} failed: {res.detail}; the scoring path is inconsistent, refusing to train"
        )
    trainer.teacher_fidelity()  # engine teachers only: engine vs HF scores, a warning when they differ
