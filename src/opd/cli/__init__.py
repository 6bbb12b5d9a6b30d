"""The `opd` command line: thin wrappers that parse, build a config, and call a component."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from opd.cli.common import PASSTHROUGH, console, fail, peer_failure, startup_interrupted
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
    try:
        if resume is not None:
            if not (resume / "config.yaml").is_file() and config is None:
                raise OpdError(f"--resume {resume}: no config.yaml there; is it a run directory?")
            cfg = load_config(config or resume / "config.yaml", overrides + ["--run_dir", str(resume)])
        else:
            cfg = load_config(config, overrides)
        run_training(cfg, resume=resume is not None, console=console)
    except KeyboardInterrupt:  # a Ctrl-C before the training loop took over the signal (loading, set-up)
        again = f"`opd train --resume {resume}`" if resume is not None else "the same command"
        fail(startup_interrupted(again))
    except RuntimeError as exc:
        lost = peer_failure(exc)
        if lost is None:
            raise
        fail(lost)
    except OpdError as exc:
        from opd.teachers.http import TeacherUnavailableError
        from opd.train.alarms import CollapseError
        from opd.train.trainer import NonFiniteLossError

        # 3: a non-finite step (stop_on_nan); 4: a declared collapse (stop_on_collapse); 5: the teacher
        # servers stayed down (resume redoes the step); 2: the rest.
        codes = ((NonFiniteLossError, 3), (CollapseError, 4), (TeacherUnavailableError, 5))
        fail(exc, next((c for t, c in codes if isinstance(exc, t)), 2))


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

    from opd.data import PromptRecord, encode_prompts, load_prompts, render_prompt, uses_chat
    from opd.device import resolve_device
    from opd.errors import TokenizerMismatchError
    from opd.evaluation.checks import (
        CheckResult,
        determinism_check,
        fidelity_self_test,
        pair_diagnostics,
        self_test_rollout,
    )
    from opd.generation.sampling import stop_ids_for
    from opd.models.loading import load_pair, load_pair_tokenizers, special_tokens_report

    results: list[CheckResult] = []
    target = resolve_device(device)  # before any loading: `--device cuda` without CUDA fails here
    t0 = time.perf_counter()
    try:
        toks = load_pair_tokenizers(
            student, teacher, student_trust_remote_code=trc, teacher_trust_remote_code=trc
        )
        s_tok, t_tok, rep = toks.student, toks.teacher, toks.report
        results.append(
            CheckResult("tokenizers", True, "identical vocabularies", rep if isinstance(rep, dict) else {})
        )
    except TokenizerMismatchError as exc:  # a finding; a missing or damaged file is an error (exit 2)
        results.append(CheckResult("tokenizers", False, str(exc)))
        _print_results(results)
        return False
    with console.status("loading models..."):
        pair = load_pair(student, teacher, student_dtype=s_dtype, teacher_dtype=t_dtype, device=target,
                         student_trust_remote_code=trc, teacher_trust_remote_code=trc, tokenizers=toks)  # fmt: skip
    s_model, t_model, vocab = pair.student, pair.teacher, pair.vocab_size
    console.print(f"models loaded on {target} in {time.perf_counter() - t0:.1f}s")
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
