"""The `opd` command line: thin wrappers that parse, build a config, and call a component."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from opd.cli_common import PASSTHROUGH, console, fail, is_main, peer_failure, startup_interrupted
from opd.errors import OpdError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="On-policy distillation of LLMs.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration.")
app.add_typer(config_app, name="config")


@app.callback()
def _global_options(
    debug: bool = typer.Option(
        False, "--debug", help="on an error, print the full traceback too (sets OPD_DEBUG=1)"
    ),
) -> None:
    # Errors are one line by default; a bug report needs the traceback, which opd.cli_common.fail prints
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

    overrides = list(ctx.args)
    try:
        if resume is not None:
            if not (resume / "config.yaml").is_file() and config is None:
                raise OpdError(f"--resume {resume}: no config.yaml there; is it a run directory?")
            cfg = load_config(config or resume / "config.yaml", overrides + ["--run_dir", str(resume)])
        else:
            cfg = load_config(config, overrides)
        _run_training(cfg, resume=resume is not None)
    except KeyboardInterrupt:  # a Ctrl-C before the training loop took over the signal (loading, set-up)
        again = f"`opd train --resume {resume}`" if resume is not None else "the same command"
        fail(startup_interrupted(again))
    except RuntimeError as exc:
        lost = peer_failure(exc)
        if lost is None:
            raise
        fail(lost)
    except OpdError as exc:
        from opd.alarms import CollapseError
        from opd.teacher_http import TeacherUnavailableError
        from opd.trainer import NonFiniteLossError

        # 3: a non-finite step (stop_on_nan); 4: a declared collapse (stop_on_collapse); 5: the teacher
        # servers stayed down (resume redoes the step); 2: the rest.
        codes = ((NonFiniteLossError, 3), (CollapseError, 4), (TeacherUnavailableError, 5))
        fail(exc, next((c for t, c in codes if isinstance(exc, t)), 2))


def _run_training(cfg, *, resume: bool) -> None:
    from opd.alarms import CollapseError
    from opd.errors import InterruptedRun, StorageError
    from opd.progress import bar
    from opd.teacher_http import TeacherUnavailableError
    from opd.trainer import NonFiniteLossError, OPDTrainer, _apply_dist_timeout

    trainer = OPDTrainer(cfg, resume=resume, log=lambda m: console.print(m) if is_main() else None)
    _apply_dist_timeout(trainer.acc)  # before set-up's first collective: a dead rank fails the others fast
    ok = False
    try:
        trainer.setup()
        main = trainer.acc.is_main_process
        if main:
            _startup_report(trainer)
        if cfg.startup_checks:
            _fidelity_at_startup(trainer)
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


def _startup_report(trainer) -> None:
    from opd.models import special_tokens_report

    cfg = trainer.cfg
    table = Table(title="opd: student / teacher", show_header=True)
    table.add_column("")
    table.add_column("student")
    table.add_column("teacher")
    s_rep = special_tokens_report(trainer.tokenizer, trainer._unwrapped())
    tc = cfg.teacher
    if tc.backend == "hf":
        t_rep = special_tokens_report(trainer.teacher_tokenizer, trainer.teacher.model)
        table.add_row("path", cfg.student.path, tc.path)
        table.add_row("dtype", cfg.student.dtype, tc.dtype)
    else:  # an engine teacher: what the trainer can see is its tokenizer and where it runs
        t_rep = {}
        where = ", ".join(tc.urls) if tc.backend == "http" else tc.path
        table.add_row("path", cfg.student.path, f"{tc.backend}: {where}")
        table.add_row("dtype", cfg.student.dtype, tc.vllm_dtype if tc.backend == "vllm" else "(server's)")
        table.add_row("teacher returns", "", f"top-{tc.top_k} log-probs per position")
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


def _fidelity_at_startup(trainer) -> None:
    from opd.checks import fidelity_self_test, self_test_rollout

    model = trainer._unwrapped()
    prompts = trainer.prompt_ids[:2]
    roll = self_test_rollout(model, prompts, pad_id=trainer.tokenizer.pad_token_id, stop_ids=trainer.stop_ids,
                             max_new_tokens=min(16, trainer.cfg.rollout.max_new_tokens), seed=trainer.cfg.seed)  # fmt: skip
    res = fidelity_self_test(model, roll, vocab_size=trainer.vocab_size, k=trainer.cfg.diagnostics.k)
    if trainer.acc.is_main_process:
        console.print(("[green]ok[/] " if res.ok else "[red]FAILED[/] ") + f"{res.name}: {res.detail}")
    if not res.ok:
        raise OpdError(
            f"{res.name} failed: {res.detail}; the scoring path is inconsistent, refusing to train"
        )
    trainer.teacher_fidelity()  # engine teachers only: engine vs HF scores, a warning when they differ


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
    student, teacher, prompts, template, s_dtype, t_dtype, max_new, n_prompts, k, trc, device="auto"
) -> bool:
    import time

    from opd.checks import (
        CheckResult,
        determinism_check,
        fidelity_self_test,
        pair_diagnostics,
        self_test_rollout,
    )
    from opd.data import PromptRecord, encode_prompts, load_prompts, render_prompt, uses_chat
    from opd.device import resolve_device
    from opd.models import (
        check_tokenizers,
        freeze_teacher,
        load_model,
        load_tokenizer,
        prepare_tokenizer,
        shared_vocab_size,
        special_tokens_report,
    )
    from opd.sampling import stop_ids_for

    results: list[CheckResult] = []
    target = resolve_device(device)  # before any loading: `--device cuda` without CUDA fails here
    t0 = time.perf_counter()
    s_tok = load_tokenizer(student, trust_remote_code=trc)
    t_tok = load_tokenizer(teacher, trust_remote_code=trc)
    prepare_tokenizer(s_tok)
    prepare_tokenizer(t_tok)
    try:
        rep = check_tokenizers(s_tok, t_tok)
        results.append(
            CheckResult("tokenizers", True, "identical vocabularies", rep if isinstance(rep, dict) else {})
        )
    except OpdError as exc:
        results.append(CheckResult("tokenizers", False, str(exc)))
        _print_results(results)
        return False
    with console.status("loading models..."):
        s_model = load_model(student, dtype=s_dtype, trust_remote_code=trc, device=target)
        t_model = freeze_teacher(load_model(teacher, dtype=t_dtype, trust_remote_code=trc, device=target))
    console.print(f"models loaded on {target} in {time.perf_counter() - t0:.1f}s")
    vocab = shared_vocab_size(s_model, t_model, s_tok)
    results.append(
        CheckResult("vocabulary", True, f"shared real vocabulary {vocab}; padded rows are sliced away")
    )
    s_rep, t_rep = special_tokens_report(s_tok, s_model), special_tokens_report(t_tok, t_model)
    results.append(CheckResult("special tokens", True, f"student {s_rep} | teacher {t_rep}"))
    for w in rep.get("warnings", []) if isinstance(rep, dict) else []:
        results.append(CheckResult("template/EOS", False, w))

    records = load_prompts(prompts)[:n_prompts] if prompts else [
        PromptRecord(text=t, messages=None, answer=None, source=f"builtin:{i}", raw={})
        for i, t in enumerate(["What is 12 + 30?", "Name a prime number larger than 10."][:n_prompts])
    ]  # fmt: skip
    texts = [render_prompt(r, s_tok, template=template) for r in records]
    console.print(Panel(texts[0], title=f"rendered prompt (student tokenizer, template {template})"))
    try:
        t_text = render_prompt(records[0], t_tok, template=template)
        if t_text != texts[0]:
            results.append(CheckResult("rendered prompt", False, "the teacher's tokenizer renders the prompt differently: "
                                       f"{t_text!r}"))  # fmt: skip
    except OpdError:
        pass
    ids = encode_prompts(texts, s_tok, max_prompt_tokens=100_000, sources=[r.source for r in records],
                         add_special_tokens=not uses_chat(template))  # fmt: skip
    stop = stop_ids_for(s_tok, s_model)
    with console.status("self-test rollouts and scoring..."):
        roll = self_test_rollout(
            s_model, ids, pad_id=s_tok.pad_token_id, stop_ids=stop, max_new_tokens=max_new
        )
        results.append(fidelity_self_test(s_model, roll, vocab_size=vocab, k=k))
        results.append(determinism_check(t_model, roll))
        diag = pair_diagnostics(s_model, t_model, roll, vocab_size=vocab, k=k)
    results.append(CheckResult("pair metrics (informational)", True,
                               ", ".join(f"{k_}={v:.4g}" for k_, v in diag.items() if "/" not in k_), diag))  # fmt: skip
    _print_results(results)
    console.print(f"check finished in {time.perf_counter() - t0:.1f}s")
    return all(r.ok for r in results if r.name not in ("template/EOS", "rendered prompt"))


def _print_results(results) -> None:
    soft = ("template/EOS", "rendered prompt")
    out = Console(soft_wrap=True)
    out.print("[bold]opd check[/]")
    for r in results:
        mark = "[green]ok[/]" if r.ok else ("[yellow]warn[/]" if r.name in soft else "[red]FAIL[/]")
        out.print(f"  {mark} {r.name}: {r.detail}")


@app.command()
def tiny(
    out_dir: Path = typer.Argument(
        Path("runs/tiny"), help="where to write student/, teacher/, prompts.jsonl"
    ),
) -> None:
    """Build a tiny random student/teacher pair and a prompt file, for smoke runs with no download."""
    from opd.tiny import save_tiny_pair

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


from opd.cli_eval import register as _register_eval  # noqa: E402

_register_eval(app)

from opd.cli_prompts import register as _register_prompts  # noqa: E402

_register_prompts(app)

from opd.cli_recipes import register as _register_recipes  # noqa: E402

_register_recipes(app)

from opd.cli_doctor import register as _register_doctor  # noqa: E402

_register_doctor(app)

from opd.cli_analyze import register as _register_analyze  # noqa: E402

_register_analyze(app)

from opd.cli_serve import register as _register_serve  # noqa: E402

_register_serve(app)

from opd.lab.cli import register as _register_lab  # noqa: E402

_register_lab(app)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
