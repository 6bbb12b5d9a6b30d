"""`opd prompts ...`: template alignment, teacher-aligned selection and de-duplication (Recipe B).

A separate module with a `register(app)` hook so the prompt tools stay out of the training CLI's way;
`opd.cli` calls `register` at import. Every option is a field of the command's pydantic config in
`opd.recipes.prompts` and can come from `--config FILE.yaml` instead; options typed on the command line win.
Options default to None here so that "not given" is distinguishable from "given the default", and
the defaults live in one place (the config classes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from opd.cli.common import console, fail, load_command_config
from opd.errors import ConfigError, OpdError

if TYPE_CHECKING:
    from opd.recipes.prompts import SelectConfig

prompts_app = typer.Typer(
    no_args_is_help=True,
    help="Teacher-aligned prompt sets (paper Recipe B): compare templates, select, de-duplicate.",
)
err = console  # progress, notes and errors
_CONFIG_HELP = "YAML file with any of this command's options (command-line options win)"


def register(app: typer.Typer) -> None:
    """Attach the `prompts` command group to the main `opd` app."""
    app.add_typer(prompts_app, name="prompts")


def _out(soft_wrap: bool = True) -> Console:
    # Built per call so tests' captured stdout (and a redirected stdout) is the one written to.
    # soft_wrap=False where panels hold prompts: soft wrapping would crop long lines inside a panel.
    return Console(soft_wrap=soft_wrap)


def _require(cfg: Any, *names: str) -> None:
    missing = [n for n in names if not getattr(cfg, n)]
    if missing:
        raise ConfigError(
            f"missing required option(s): {', '.join('--' + m.replace('_', '-') for m in missing)} "
            "(or set them in --config FILE.yaml)"
        )


def _short(s: str, limit: int = 70) -> str:
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------------
# render


@prompts_app.command("render")
def render(
    config: Path | None = typer.Option(None, "--config", "-c", help=_CONFIG_HELP),
    prompts: str | None = typer.Option(None, "--prompts", help="prompt file (JSONL / Parquet / CSV)"),
    model: str | None = typer.Option(
        None, "--model", help="model whose tokenizer renders (dir, .gguf, hub id)"
    ),
    teacher: str | None = typer.Option(None, "--teacher", help="also render with the teacher's tokenizer"),
    template: str | None = typer.Option(None, "--template", help="first template (default chat:dapo)"),
    vs_template: str | None = typer.Option(
        None, "--vs-template", help="second template (default chat:boxed)"
    ),
    n: int | None = typer.Option(None, "--n", help="problems to show (default 3)"),
    chat_template_kwargs: str | None = typer.Option(None, "--chat-template-kwargs", help="YAML mapping"),
    system_prompt: str | None = typer.Option(None, "--system-prompt"),
    trust_remote_code: bool | None = typer.Option(None, "--trust-remote-code/--no-trust-remote-code"),
) -> None:
    """Render the same problems under two templates: both texts, a word diff and token counts.

    Template alignment (paper finding 6a): a run whose prompts look like the teacher's own raises
    overlap and accuracy. Templates: raw, chat, dapo, boxed, a format string with {prompt}, chat:<x>.
    """
    try:
        cfg = load_command_config("prompts render", config, options={
            "prompts": prompts, "model": model, "teacher": teacher, "template": template,
            "vs_template": vs_template, "n": n, "chat_template_kwargs": chat_template_kwargs,
            "system_prompt": system_prompt, "trust_remote_code": trust_remote_code,
        })  # fmt: skip
        _require(cfg, "prompts", "model")
        _render(cfg)
    except OpdError as exc:
        fail(exc)


def _render(cfg: Any) -> None:
    from opd.data import load_prompts, render_prompt, uses_chat, validate_template
    from opd.models.loading import load_tokenizer
    from opd.recipes.prompts import PROMPTS_OPTIONS

    for t in (cfg.template, cfg.vs_template):
        validate_template(t)
    records = load_prompts(
        cfg.prompts, prompt_field=cfg.prompt_field, messages_field=cfg.messages_field, answer_field=None,
        options=PROMPTS_OPTIONS,
    )[: cfg.n]  # fmt: skip
    toks = {"student": load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)}
    if cfg.teacher:
        toks["teacher"] = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    templates = (cfg.template, cfg.vs_template)
    out = _out(soft_wrap=False)
    plain = out.color_system is None  # no colours: mark the diff git-style so it is still readable

    def rendered(tok: Any, rec: Any, tpl: str) -> tuple[str, int]:
        # an error names the option that gave this template
        which = "--template" if tpl == cfg.template else "--vs-template"
        text = render_prompt(rec, tok, template=tpl, chat_template_kwargs=cfg.chat_template_kwargs,
                             system_prompt=cfg.system_prompt, options={**PROMPTS_OPTIONS, "template": which})  # fmt: skip
        return text, len(tok(text, add_special_tokens=not uses_chat(tpl))["input_ids"])

    counts: dict[tuple[str, str], list[int]] = {}
    for i, rec in enumerate(records):
        out.rule(Text(f"problem {i + 1}/{len(records)}  ({rec.source})"))
        base: dict[str, str] = {}
        for tpl in templates:
            text, n_tok = rendered(toks["student"], rec, tpl)
            base[tpl] = text
            counts.setdefault(("model", tpl), []).append(n_tok)
            out.print(Panel(Text(text), title=Text(f"{tpl}  ·  {n_tok} tokens"), title_align="left"))
        legend = "[-removed-] {+added+}" if plain else "red = only in the first, green = only in the second"
        out.print(Panel(_diff_text(base[cfg.template], base[cfg.vs_template], plain),
                        title=Text(f"diff {cfg.template} → {cfg.vs_template}  ({legend})"), title_align="left"))  # fmt: skip
        if "teacher" in toks:
            for tpl in templates:
                text, n_tok = rendered(toks["teacher"], rec, tpl)
                counts.setdefault(("teacher", tpl), []).append(n_tok)
                if text == base[tpl]:
                    out.print(f"teacher tokenizer renders {tpl} identically ({n_tok} tokens)")
                else:
                    out.print(Panel(_diff_text(base[tpl], text, plain), title_align="left",
                                    title=Text(f"teacher's rendering of {tpl} differs from the model's "
                                               f"({n_tok} tokens; {legend})")))  # fmt: skip
    out.print(_counts_table(counts))


def _diff_text(a: str, b: str, plain: bool) -> Text:
    """The diff as styled text; without colours (`plain`) marked git-style so it is still readable."""
    from opd.recipes.prompts import diff_segments

    txt = Text()
    for op, seg in diff_segments(a, b):
        if op == "equal":
            txt.append(seg)
        elif op == "delete":
            txt.append(f"[-{seg}-]" if plain else seg, style="bold red strike")
        else:
            txt.append(f"{{+{seg}+}}" if plain else seg, style="bold green underline")
    return txt


def _counts_table(counts: dict[tuple[str, str], list[int]]) -> Table:
    table = Table(title="token counts (mean over the shown problems)")
    table.add_column("tokenizer")
    table.add_column("template")
    table.add_column("mean tokens", justify="right")
    for (who, tpl), vals in counts.items():
        table.add_row(who, tpl, f"{sum(vals) / len(vals):.1f}")
    return table


# --------------------------------------------------------------------------------------------------
# select


@prompts_app.command("select")
def select(
    config: Path | None = typer.Option(None, "--config", "-c", help=_CONFIG_HELP),
    student: str | None = typer.Option(None, "--student", help="student model: dir, .gguf or hub id"),
    teacher: str | None = typer.Option(None, "--teacher", help="teacher model (same tokenizer)"),
    candidates: str | None = typer.Option(None, "--candidates", help="candidate pool to rank"),
    teacher_prompts: str | None = typer.Option(None, "--teacher-prompts", help="the teacher's own prompts"),
    n: int | None = typer.Option(None, "--n", help="size of the selected set (default 256)"),
    mix: float | None = typer.Option(None, "--mix", help="random non-aligned fraction (default 0.25)"),
    score: str | None = typer.Option(
        None,
        "--score",
        help="overlap_ratio | overlap_mass | teacher_advantage | neg_reverse_kl (default overlap_mass)",
    ),
    out: str | None = typer.Option(None, "--out", help="selected JSONL (default selected.jsonl)"),
    scores_out: str | None = typer.Option(None, "--scores-out", help="per-prompt scores JSONL"),
    rollouts: int | None = typer.Option(None, "--rollouts", help="student rollouts per prompt (default 2)"),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="default 64"),
    k: int | None = typer.Option(None, "--k", help="top-k of the overlap metrics (default 16)"),
    template: str | None = typer.Option(None, "--template", help="training template (default chat)"),
    teacher_dtype: str | None = typer.Option(None, "--teacher-dtype", help="default float32"),
    student_dtype: str | None = typer.Option(None, "--student-dtype", help="default float32"),
    device: str | None = typer.Option(
        None, "--device", help="where the student and teacher run: auto | cpu | cuda | cuda:N (default auto)"
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="prompts per generate call (default 8)"),
    seed: int | None = typer.Option(None, "--seed"),
    score_teacher_prompts: bool | None = typer.Option(
        None, "--score-teacher-prompts/--no-score-teacher-prompts", help="default score them"
    ),
    trust_remote_code: bool | None = typer.Option(None, "--trust-remote-code/--no-trust-remote-code"),
) -> None:
    """Build a teacher-aligned prompt set: teacher prompts and/or the pool's most aligned, plus a random mix.

    Each prompt is scored on the student's own rollouts: overlap ratio / mass with the teacher's
    top-k, student entropy, reverse KL and the teacher advantage r̄ (paper finding 6b). The report
    shows the entropy cost of the aligned part against the mixed-in part.
    """
    try:
        cfg = load_command_config("prompts select", config, options={
            "student": student, "teacher": teacher, "candidates": candidates,
            "teacher_prompts": teacher_prompts, "n": n, "mix": mix, "score": score, "out": out,
            "scores_out": scores_out, "rollouts": rollouts, "max_new_tokens": max_new_tokens, "k": k,
            "template": template, "teacher_dtype": teacher_dtype, "student_dtype": student_dtype,
            "device": device, "batch_size": batch_size, "seed": seed, "score_teacher_prompts": score_teacher_prompts,
            "trust_remote_code": trust_remote_code,
        })  # fmt: skip
        _require(cfg, "student", "teacher")
        if not cfg.candidates and not cfg.teacher_prompts:
            raise ConfigError(
                "give --candidates POOL and/or --teacher-prompts FILE: there is nothing to select from"
            )
        _select(cfg)
    except OpdError as exc:
        fail(exc)


def _select(cfg: SelectConfig) -> None:
    """`run_selection` with a spinner and a progress bar, then the entropy-cost table and the files.

    Apart from `select` so that a config object alone runs it (the device tests do).
    """
    from opd.recipes.prompts import REPORT_KEYS, run_selection

    t0 = time.perf_counter()
    sel = run_selection(cfg, log=err.print, status=err.status, scoring=_scoring_bar)
    table = Table(title=f"selected {len(sel.chosen)} prompts (ranked by {cfg.score}, mix {cfg.mix})")
    table.add_column("part", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True, min_width=3)
    for key in REPORT_KEYS:
        table.add_column(_SHORT.get(key, key), justify="right", no_wrap=True)
    for name, label in _PART_LABELS.items():
        if name in sel.summary:
            stats = sel.summary[name]
            table.add_row(label, str(stats["count"]), *(_fmt(stats[key]) for key in REPORT_KEYS))
    out = _out()
    out.print(table)
    out.print(
        "H_s = student entropy, overlap = top-k overlap ratio, mass = overlap mass (mean of student and "
        "teacher), r̄ = teacher advantage (mean log q − log p), rKL = reverse KL; means over prompts. "
        "Teacher-aligned prompts lower the student's entropy (paper finding 6b); compare H_s of "
        "the aligned and mixed-in parts to see what the mix buys back."
    )
    out.print(f"wrote {sel.out_path} ({len(sel.chosen)} prompts), {sel.scores_path}, {sel.summary_path} "
              f"in {time.perf_counter() - t0:.1f}s")  # fmt: skip


@contextmanager
def _scoring_bar(total: int) -> Iterator[Callable[[int], None]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from opd.progress import Progress  # plain progress lines when stderr is not a terminal

    with Progress(
        TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=err,
    ) as progress:  # fmt: skip
        task = progress.add_task("", total=total)
        yield lambda n: progress.advance(task, n)


_PART_LABELS = {  # summary part -> table row; the tree marks show the aligned part's two sources
    "aligned": "aligned",
    "aligned_teacher_prompts": "├ teacher prompts",
    "aligned_top_candidates": "└ top candidates",
    "mixed_in": "mixed in",
    "final": "final set",
    "pool": "pool (scored)",
}
_SHORT = {  # short headers keep the table inside 80 columns; the footer line spells them out
    "entropy_student": "H_s",
    "overlap_ratio": "overlap",
    "overlap_mass": "mass",
    "teacher_advantage": "r̄",
    "reverse_kl": "rKL",
}


# --------------------------------------------------------------------------------------------------
# dedup


@prompts_app.command("dedup")
def dedup(
    input: str | None = typer.Argument(None, help="prompts to filter (JSONL / Parquet / CSV)"),
    config: Path | None = typer.Option(None, "--config", "-c", help=_CONFIG_HELP),
    against: str | None = typer.Option(None, "--against", help="reference prompts to de-duplicate against"),
    threshold: float | None = typer.Option(
        None, "--threshold", help="embedding cosine to drop at (default 0.6)"
    ),
    use_embeddings: bool | None = typer.Option(
        None, "--embeddings/--no-embeddings", help="embedding matching (all-MiniLM-L6-v2) (default on)"
    ),
    self_dedup: bool | None = typer.Option(
        None, "--self-dedup/--no-self-dedup", help="also drop repeats within INPUT (default off)"
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="texts per embedding forward (default 64)"
    ),
    device: str | None = typer.Option(
        None, "--device", help="where the embedding model runs: cpu | auto | cuda | cuda:N (default cpu)"
    ),
    out: str | None = typer.Option(None, "--out", help="kept records (default INPUT stem + .dedup.jsonl)"),
    report: str | None = typer.Option(
        None, "--report", help="removed records (default OUT stem + .report.jsonl)"
    ),
) -> None:
    """Drop prompts of INPUT that repeat --against: exact (normalised) match or embedding cosine >= 0.6.

    The paper's rule for its control prompt sets. With --self-dedup, repeats within INPUT go too (the
    first of each group stays) and --against becomes optional. Writes the kept records unchanged, and a report of
    every removed record with the reason, the cosine and the prompt it matched.
    """
    try:
        cfg = load_command_config("prompts dedup", config, options={
            "input": input, "against": against, "threshold": threshold, "use_embeddings": use_embeddings,
            "self_dedup": self_dedup, "batch_size": batch_size, "device": device, "out": out, "report": report,
        })  # fmt: skip
        _require(cfg, "input", *(() if cfg.self_dedup else ("against",)))
        _dedup(cfg)
    except OpdError as exc:
        fail(exc)


def _dedup(cfg: Any) -> None:
    from opd.data import load_prompts, prompt_columns
    from opd.device import resolve_device
    from opd.recipes.prompts import PROMPTS_OPTIONS, dedup_records, file_stem, get_embedder, write_jsonl

    t0 = time.perf_counter()
    device = resolve_device(cfg.device) if cfg.use_embeddings else None  # a bad device fails first
    src = Path(cfg.input)
    out_path = Path(cfg.out) if cfg.out else src.with_name(file_stem(src) + ".dedup.jsonl")
    report_path = (
        Path(cfg.report) if cfg.report else out_path.with_name(file_stem(out_path) + ".report.jsonl")
    )
    for p in (out_path, report_path):
        if p.resolve() in {Path(f).resolve() for f in (cfg.input, cfg.against) if f}:
            raise ConfigError(f"refusing to overwrite an input file with the output: {p}")
    fields = prompt_columns(cfg)
    cands = load_prompts(src, **fields, options={**PROMPTS_OPTIONS, "prompts": "INPUT"})
    ref = (
        load_prompts(cfg.against, **fields, options={**PROMPTS_OPTIONS, "prompts": "--against"})
        if cfg.against
        else []
    )
    how = "exact + embedding" if cfg.use_embeddings else "exact only"
    with err.status(f"de-duplicating {len(cands)} prompts against {len(ref)} ({how})..."):
        kept, rows = dedup_records(cands, ref, threshold=cfg.threshold, use_embeddings=cfg.use_embeddings,
                                   batch_size=cfg.batch_size, self_dedup=cfg.self_dedup,
                                   embedder=get_embedder(device) if device is not None else None)  # fmt: skip
    write_jsonl(out_path, (r.raw for r in kept))
    write_jsonl(report_path, rows)

    out = _out()
    if rows:
        table = Table(title=f"removed {len(rows)} of {len(cands)}")
        for col in ("source", "reason", "cosine", "prompt", "matched"):
            table.add_column(col, overflow="fold")
        for r in rows[:50]:
            score = "1 (exact)" if r["reason"] == "exact" else f"{r['score']:.3f}"
            matched = f"{r['matched_source']}: {_short(r['matched_text'], 50)}"
            table.add_row(r["source"], r["reason"], score, Text(_short(r["text"], 50)), Text(matched))
        out.print(table)
        if len(rows) > 50:
            out.print(f"... and {len(rows) - 50} more in {report_path}")
    n_exact = sum(r["reason"] == "exact" for r in rows)
    thr = f" (cosine >= {cfg.threshold})" if cfg.use_embeddings else ""
    out.print(
        f"kept {len(kept)} of {len(cands)}; removed {n_exact} exact, {len(rows) - n_exact} embedding{thr}; "
        f"wrote {out_path} and {report_path} in {time.perf_counter() - t0:.1f}s"
    )
