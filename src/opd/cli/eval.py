"""`opd eval`: avg@k / pass@k of one or more models on a problem set, and gap recovery.

Kept out of cli.py so the command can grow without touching the training CLI; `register(app)` adds it.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from opd.cli.common import load_command_config
from opd.errors import ConfigError, OpdError


def _fmt(x: Any, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{100 * x:.1f}%" if pct else f"{x:.1f}"
    return str(x)


def _parse_name_as(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--name-as {item!r}: expected NAME=PATH, e.g. --name-as before=runs/x/init")
        if name.strip() in out:
            raise ConfigError(f"--name-as: the name {name.strip()!r} is given twice")
        out[name.strip()] = path.strip()
    return out


def _summary_table(name: str, path: str, summary: dict[str, Any], seconds: float) -> Table:
    k = summary["samples"]
    t = Table(title=f"opd eval: {name} ({path})", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row(f"avg@{k}", _fmt(summary[f"avg@{k}"]))
    shown = sorted({1, 2, 4, 8, 16, 32, 64, k} & set(range(1, k + 1)))
    for kk in shown:
        t.add_row(f"pass@{kk}", _fmt(summary[f"pass@{kk}"]))
    t.add_row("mean length (tokens)", _fmt(summary["mean_length"], pct=False))
    t.add_row("truncation rate", _fmt(summary["truncation_rate"]))
    t.add_row("no final answer", _fmt(summary["no_answer_rate"]))
    t.add_row("verifier errors", str(summary["verifier_errors"]))
    t.add_row("problems x samples", f"{summary['n_problems']} x {k}")
    t.add_row("time", f"{seconds:.1f}s")
    return t


def run_eval_command(cfg: Any, out: Console) -> dict[str, Any]:
    """Evaluate every model of `cfg` in turn; print per-model and comparison tables; return the comparison."""
    from opd.data import load_prompts, prompt_columns, validate_template
    from opd.device import resolve_device
    from opd.evaluation.eval import EVAL_OPTIONS, check_answers, model_entries, portable_names
    from opd.evaluation.verify import get_verifier
    from opd.files import atomic_write_text, json_safe
    from opd.models.loading import apply_model_defaults

    if not cfg.prompts:
        raise ConfigError("missing --prompts: a problem file with an `answer` field")
    device = resolve_device(cfg.device)  # before any loading: `--device cuda` without CUDA fails here
    entries, roles = model_entries(cfg)
    cfg = apply_model_defaults(cfg, [p for _, p in entries], {"verifier": "verifier", "template": "template"},
                               out.print)  # fmt: skip
    validate_template(cfg.template)
    records = load_prompts(cfg.prompts, **prompt_columns(cfg), options=EVAL_OPTIONS)
    if cfg.max_problems is not None:
        records = records[: cfg.max_problems]
    check_answers(records)  # before loading any model
    verifier = get_verifier(cfg.verifier)
    k = cfg.samples
    stems = portable_names([name for name, _ in entries])  # file names: `lab:student` -> lab_student
    summaries = {
        name: _evaluate_one(cfg, name, path, records, verifier, device, out, stems[name])
        for name, path in entries
    }
    out.print(_comparison_table(summaries, roles, k, len(records)))
    comparison: dict[str, Any] = {"models": summaries, "roles": roles, "metric": f"avg@{k}"}
    if {"before", "after", "teacher"} <= set(roles):
        comparison["gap_recovery"] = _gap_recovery(summaries, roles, k, out)
    elif roles:
        missing = sorted({"before", "after", "teacher"} - set(roles))
        out.print(
            f"[yellow]gap recovery needs --before, --after and --teacher; missing {', '.join(missing)}[/]"
        )
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(cfg.out) / "comparison.json", json.dumps(json_safe(comparison), indent=2) + "\n")
    return comparison


def _evaluate_one(
    cfg: Any, name: str, path: str, records: list[Any], verifier: Any, device: Any, out: Console, stem: str
) -> dict[str, Any]:
    """Load one model, evaluate, release it, write and print its results (as OUT/STEM.*); return its summary.

    One model at a time, memory released in between, so a teacher and a student that do not fit
    together still compare on one device.
    """
    from opd.evaluation.eval import EVAL_OPTIONS, evaluate, release_memory, write_results
    from opd.models.loading import load_model, load_tokenizer, model_defaults, prepare_tokenizer

    own = model_defaults(path).get("verifier")  # named by the unreadable-answers warning
    t0 = time.perf_counter()
    tok = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    prepare_tokenizer(tok)
    model = load_model(path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, device=device)
    try:
        res = evaluate(
            model, tok, records, samples=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, verifier=verifier,
            template=cfg.template, chat_template_kwargs=cfg.chat_template_kwargs,
            system_prompt=cfg.system_prompt, max_prompt_tokens=cfg.max_prompt_tokens, seed=cfg.seed,
            strict=cfg.strict, keep_texts=cfg.keep_texts, label=f"opd eval {name}",
            suggest_verifier=own if own != getattr(verifier, "name", None) else None, options=EVAL_OPTIONS,
        )  # fmt: skip
    finally:
        del model
        release_memory(device)
    seconds = time.perf_counter() - t0
    res.summary.update(
        {
            "model": path,
            "name": name,
            "prompts": cfg.prompts,
            "seconds": round(seconds, 2),
            "device": str(device),
        }
    )
    files = write_results(res, cfg.out, stem)
    out.print(_summary_table(name, path, res.summary, seconds))
    if res.summary["verifier_errors"]:
        out.print(
            f"[yellow]warning:[/] {res.summary['verifier_errors']} sample(s) could not be graded "
            "(verifier error, counted wrong); see `reason` in the samples file, or use --strict"
        )
    out.print(f"wrote {files['samples']} and {files['summary']}")
    return res.summary


def _comparison_table(
    summaries: dict[str, dict[str, Any]], roles: dict[str, str], k: int, n_problems: int
) -> Table:
    cmp = Table(title=f"opd eval: comparison ({n_problems} problems x {k} samples)", show_header=True)
    for col in ("model", f"avg@{k}", "pass@1", f"pass@{k}", "mean length", "truncation", "no answer"):
        cmp.add_column(col, justify="left" if col == "model" else "right")
    for name, s in summaries.items():
        role = [r for r, n in roles.items() if n == name]
        label = name + (f" ({', '.join(role)})" if role else "")
        cmp.add_row(label, _fmt(s[f"avg@{k}"]), _fmt(s["pass@1"]), _fmt(s[f"pass@{k}"]),
                    _fmt(s["mean_length"], pct=False), _fmt(s["truncation_rate"]), _fmt(s["no_answer_rate"]))  # fmt: skip
    return cmp


def _gap_recovery(summaries: dict[str, dict[str, Any]], roles: dict[str, str], k: int, out: Console) -> float:
    """The before/after/teacher gap recovery of avg@k, printed with its arithmetic; NaN when undefined."""
    from opd.evaluation.eval import gap_recovery

    acc = {r: summaries[roles[r]][f"avg@{k}"] for r in ("before", "after", "teacher")}
    with warnings.catch_warnings():  # the n/a case is explained in the printed line itself
        warnings.simplefilter("ignore", RuntimeWarning)
        rec = gap_recovery(acc["before"], acc["after"], acc["teacher"])
    out.print(
        f"gap recovery (avg@{k}): ({_fmt(acc['after'])} - {_fmt(acc['before'])}) / "
        f"({_fmt(acc['teacher'])} - {_fmt(acc['before'])}) = "
        + ("n/a (teacher equals the student before training)" if math.isnan(rec) else f"{100 * rec:.1f}%")
    )
    return rec


def register(app: typer.Typer) -> None:
    """Add the `eval` command to the opd CLI."""

    @app.command("eval")
    def eval_command(
        config: Path | None = typer.Option(None, "--config", "-c", help="YAML with any of the options below"),
        model: list[str] = typer.Option([], "--model", "-m", help="model: dir, .gguf or hub id (repeatable)"),
        name_as: list[str] = typer.Option(
            [], "--name-as", help="NAME=PATH: a model shown as NAME (repeatable)"
        ),
        before: str | None = typer.Option(None, "--before", help="student before training: name or path"),
        after: str | None = typer.Option(None, "--after", help="student after training: name or path"),
        teacher: str | None = typer.Option(None, "--teacher", help="teacher: name or path"),
        prompts: str | None = typer.Option(None, "--prompts", help="problems with an `answer` field"),
        samples: int | None = typer.Option(None, "--samples", "-k", help="samples per problem [16]"),
        temperature: float | None = typer.Option(None, "--temperature", help="[0.7]"),
        top_p: float | None = typer.Option(None, "--top-p", help="[0.95]"),
        max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="[1024]"),
        batch_size: int | None = typer.Option(None, "--batch-size", help="problems per generate call [8]"),
        template: str | None = typer.Option(
            None, "--template", help="raw | chat | dapo | boxed | ... [chat]"
        ),
        chat_template_kwargs: str | None = typer.Option(
            None, "--chat-template-kwargs", help="YAML mapping, e.g. '{enable_thinking: false}'"
        ),
        system_prompt: str | None = typer.Option(None, "--system-prompt"),
        max_prompt_tokens: int | None = typer.Option(None, "--max-prompt-tokens", help="[4096]"),
        prompt_field: str | None = typer.Option(
            None, "--prompt-field", help="column of the prompt text; null: ignore it [prompt]"
        ),
        messages_field: str | None = typer.Option(
            None, "--messages-field", help="column of chat messages; null: ignore it [messages]"
        ),
        answer_field: str | None = typer.Option(None, "--answer-field", help="[answer]"),
        max_problems: int | None = typer.Option(None, "--max-problems", help="only the first N problems"),
        verifier: str | None = typer.Option(None, "--verifier", help="math | exact | module:callable [math]"),
        strict: bool | None = typer.Option(None, "--strict/--no-strict", help="stop on a verifier error"),
        seed: int | None = typer.Option(None, "--seed"),
        dtype: str | None = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 | auto"),
        device: str | None = typer.Option(
            None, "--device", help="where the models run: auto | cpu | cuda | cuda:N [auto: GPU if any]"
        ),
        trust_remote_code: bool | None = typer.Option(None, "--trust-remote-code/--no-trust-remote-code"),
        out: str | None = typer.Option(None, "--out", "-o", help="output directory [eval]"),
        keep_texts: bool | None = typer.Option(None, "--keep-texts/--no-keep-texts", help="texts in samples"),
    ) -> None:
        """Sample k answers per problem from each model, grade them, report avg@k, pass@k, gap recovery.

        Writes OUT/NAME.samples.jsonl, OUT/NAME.summary.json per model and OUT/comparison.json.
        """
        err = Console(stderr=True, soft_wrap=True)
        try:
            # text values are read as after --section.field (load_command_config): --chat-template-kwargs as
            # a YAML mapping, `--messages-field null` ignores that column as `messages_field: null` does
            named = dict(
                models=list(model), named=_parse_name_as(list(name_as)) or None, before=before, after=after,
                teacher=teacher, prompts=prompts, samples=samples, temperature=temperature, top_p=top_p,
                max_new_tokens=max_new_tokens, batch_size=batch_size, template=template,
                chat_template_kwargs=chat_template_kwargs, system_prompt=system_prompt, max_prompt_tokens=max_prompt_tokens,
                prompt_field=prompt_field, messages_field=messages_field, answer_field=answer_field,
                max_problems=max_problems, verifier=verifier, strict=strict, seed=seed, dtype=dtype, device=device,
                trust_remote_code=trust_remote_code, out=out, keep_texts=keep_texts,
            )  # fmt: skip
            cfg = load_command_config("eval", config, options=named)
            run_eval_command(cfg, Console(soft_wrap=True))
        except OpdError as exc:
            err.print(f"[bold red]error:[/] {' '.join(str(exc).split())}")
            raise typer.Exit(2) from None
