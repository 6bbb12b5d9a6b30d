"""`opd generate`: teacher responses for an off-policy cold start (paper, Recipe A), filtered and resumable.

The output is SFT data in chat format, one JSON object per kept response::

    {"messages": [...prompt messages..., {"role": "assistant", "content": RESPONSE}],
     "prompt": ORIGINAL_TEXT, "response": RESPONSE, "answer": ..., "source": "file:line",
     "prompt_index": i, "sample_index": j, "n_tokens": N, "template": TEMPLATE}

The prompt messages are the ones the teacher was shown: a text prompt becomes one user message with the
template's format already filled in (``chat:boxed`` writes the boxed instruction into the message), so
`opd sft` renders `messages` with plain ``template: chat``. With a non-chat template (``raw``, ``dapo``,
a format string) the teacher saw no chat template; train on those with the same template and the
`prompt`/`response` fields instead.

Rejected responses go to ``OUT.rejected.jsonl`` (same fields plus ``reasons``: filter -> detail), and
``OUT.summary.json`` counts kept/rejected and each filter's rejections (a response failing several
filters counts once for each) next to the settings.

Filters (each switchable with ``filters``; default ``truncated,no_answer,repetition``):

- ``truncated``: no stop token within ``max_new_tokens`` (`truncated_reason`).
- ``no_answer``: `opd.evaluation.verify.extract_final_answer` finds no ``\\boxed{}`` / ``Answer:`` (`no_answer_reason`).
- ``repetition``: degenerate loops (`repetition_reason`; thresholds below).
- ``incorrect``: the verifier says the answer is wrong (`incorrect_reason`; needs ``answer`` on every
  prompt). OFF by default: the paper's released code filters truncation, missing answer and repetition
  only, and keeping wrong-but-well-formed teacher responses is part of reproducing it.

Resume: the job appends each finished batch to the two files with flush + fsync, after first writing
the settings to ``OUT.meta.json``. A rerun with the same settings reads both files, cuts a torn last line
left by a kill, and generates only the batches that still miss a (prompt_index, sample_index) pair.
`opd.generation.sampling.sample_responses` seeds each batch by its first prompt index, and batches are always the
same fixed slices of the prompt list, so a resumed job writes exactly the lines an uninterrupted one
would have, in the same order. A rerun with different settings is refused.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from opd.config import (
    VERIFIER_HELP,
    AnswerColumn,
    ChatTemplateKwargs,
    Dtype,
    MessagesColumn,
    PromptColumn,
    SystemPrompt,
    TrustRemoteCode,
)
from opd.data import file_sha256, option_names
from opd.errors import ConfigError, DataError
from opd.files import atomic_write_text, json_safe
from opd.progress import bar

if TYPE_CHECKING:
    from opd.data import PromptRecord
    from opd.generation.rollout import SamplingParams
    from opd.generation.sampling import Sample

FILTERS = ("truncated", "no_answer", "repetition", "incorrect")
DEFAULT_FILTERS = ["truncated", "no_answer", "repetition"]

# Repetition thresholds (see `repetition_reason`). Chosen so that ordinary long chain-of-thought passes
# (a phrase such as "Wait, let me check." may come back twice) and the loops of a degenerate generation,
# which usually run to the length limit, are caught early.
LINE_MIN_CHARS = 20  # a line shorter than this (after stripping) is "trivial": "\\]", "Step 2:", "$$"
LINE_MIN_WORDS = 3  # ... and so is one with fewer words ("\\begin{aligned}", "=========")
LINE_MAX_REPEATS = 3  # a non-trivial line seen this many times is a loop
NGRAM_WORDS = 10  # word n-gram window
NGRAM_MAX_REPEATS = 5  # any 10-word window seen this many times is a loop
TAIL_MAX_PERIOD = 256  # character loops at the end of the text with a period up to this many characters
TAIL_MIN_REPEATS = 4  # ... repeated back to back at least this often
TAIL_MIN_SPAN = 200  # ... covering at least this many characters ("aaaa..." or "1, 1, 1, ..." with no spaces)

META_VERSION = 1


class GenerateConfig(BaseModel):
    """Every `opd generate` option (each also a --field CLI option; YAML with --config)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field("", description="teacher: local dir, .gguf file, or hub id")
    dtype: Dtype = Field("float32", description="bfloat16 halves memory and time on a GPU")
    device: str = Field(
        "auto", description="where the teacher runs: auto (this process's GPU when CUDA is available, else "
        "cpu) | cpu | cuda | cuda:N; not part of the resume identity",
    )  # fmt: skip
    trust_remote_code: TrustRemoteCode = False
    prompts: str = Field(
        "", description="JSONL, Parquet or CSV with `prompt` or `messages`, optional `answer`"
    )
    prompt_field: PromptColumn = "prompt"
    messages_field: MessagesColumn = "messages"
    answer_field: AnswerColumn = "answer"
    max_prompts: int | None = Field(None, ge=1, description="use only the first N prompts of the file")
    out: str = Field(
        "", description="output JSONL; sidecars OUT.rejected.jsonl, OUT.summary.json, OUT.meta.json"
    )
    samples: int = Field(1, ge=1, description="responses per prompt (the paper's cold start: 1)")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling, 0 < p <= 1; 1 = off")
    top_k: int = Field(0, ge=0, description="0 = off")
    max_new_tokens: int = Field(7168, ge=1, description="response budget (paper: 7168)")
    template: str = Field(
        "chat", description="raw | chat | dapo | boxed | chat:<named or format string> | a format string"
    )
    chat_template_kwargs: ChatTemplateKwargs
    system_prompt: SystemPrompt = None
    max_prompt_tokens: int = Field(1024, ge=1, description="the most tokens a rendered prompt may have")
    batch_size: int = Field(
        8, ge=1, description="prompts per generate call (fixed: part of the resume identity)"
    )
    filters: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FILTERS),
        description="comma list of truncated,no_answer,repetition,incorrect; 'none' keeps everything",
    )
    verifier: str = Field("math", description="for the `incorrect` filter: " + VERIFIER_HELP)
    seed: int = Field(0, description="sampling seed (the same seed, the same samples)")

    @field_validator("filters", mode="before")
    @classmethod
    def _split_filters(cls, value: Any) -> Any:
        """Accept the CLI spelling `truncated,no_answer` as well as a YAML list; 'none'/'off' = no filter."""
        if value is None:
            return []
        if isinstance(value, str):
            value = [] if value.strip().lower() in ("", "none", "off", "false") else value.split(",")
        if isinstance(value, (list, tuple)):
            names = [str(v).strip() for v in value if str(v).strip()]
            bad = [n for n in names if n not in FILTERS]
            if bad:
                raise ValueError(f"unknown filter(s) {bad}; choose from {', '.join(FILTERS)} (or none)")
            return list(dict.fromkeys(names))
        return value

    def require_paths(self) -> None:
        missing = [name for name in ("model", "prompts", "out") if not getattr(self, name)]
        if missing:
            raise ConfigError(
                f"opd generate: missing required setting(s): {', '.join(missing)}; e.g. --{missing[0]} VALUE"
            )


GENERATE_ALIASES: dict[str, str] = {"teacher": "model"}
# How `opd generate` spells the prompt settings that prompt-file and template errors name: every field is a
# `--field VALUE` option. `opd cold-start` passes its own (`--generate.template`, `--sft_prompts`).
GENERATE_OPTIONS = option_names("--")


# ----------------------------------------------------------------------------------------------------
# Filters: pure functions of one response, each returning a short reason or None (passes).


def truncated_reason(truncated: bool, max_new_tokens: int) -> str | None:
    """A response cut by the budget teaches the student to stop mid-thought; it has no real ending."""
    return f"no stop token within max_new_tokens={max_new_tokens}" if truncated else None


def no_answer_reason(text: str) -> str | None:
    """No \\boxed{}/"Answer:" final answer: the response never commits, so it cannot be verified either."""
    from opd.evaluation.verify import extract_final_answer

    return (
        None if extract_final_answer(text) is not None else "no final answer (no \\boxed{} or Answer: line)"
    )


def _short(s: str, limit: int = 60) -> str:
    s = s.strip()
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _tail_loop(text: str) -> tuple[int, int] | None:
    """(period, repeats) of a back-to-back character loop at the end of `text`, if one is long enough."""
    n = len(text)
    best = None
    for period in range(1, min(TAIL_MAX_PERIOD, n // TAIL_MIN_REPEATS) + 1):
        unit = text[n - period :]
        reps = 1
        pos = n - period
        while pos - period >= 0 and text[pos - period : pos] == unit:
            reps += 1
            pos -= period
        if reps >= TAIL_MIN_REPEATS and reps * period >= TAIL_MIN_SPAN:
            best = (period, reps)
            break  # the shortest period is the most telling one
    return best


def repetition_reason(text: str) -> str | None:
    """Degenerate repetition, the failure mode SFT must not copy into the student.

    Three checks, any one rejects:

    - a non-trivial line (>= `LINE_MIN_CHARS` characters and >= `LINE_MIN_WORDS` words after stripping)
      appears `LINE_MAX_REPEATS` (3) or more times;
    - a window of `NGRAM_WORDS` (10) whitespace-separated words appears `NGRAM_MAX_REPEATS` (5) or more
      times anywhere (loops inside one long line);
    - the text ends in a character loop: a unit of up to `TAIL_MAX_PERIOD` characters repeated back to
      back >= `TAIL_MIN_REPEATS` times over >= `TAIL_MIN_SPAN` characters (loops without spaces or lines).
    """
    lines = Counter(
        ln.strip()
        for ln in text.splitlines()
        if len(ln.strip()) >= LINE_MIN_CHARS and len(ln.split()) >= LINE_MIN_WORDS
    )
    if lines:
        line, count = lines.most_common(1)[0]
        if count >= LINE_MAX_REPEATS:
            return f"line repeated {count}x: {_short(line)!r}"
    words = text.split()
    if len(words) >= NGRAM_WORDS * NGRAM_MAX_REPEATS:
        grams = Counter(tuple(words[i : i + NGRAM_WORDS]) for i in range(len(words) - NGRAM_WORDS + 1))
        gram, count = grams.most_common(1)[0]
        if count >= NGRAM_MAX_REPEATS:
            return f"{NGRAM_WORDS}-word window repeated {count}x: {_short(' '.join(gram))!r}"
    loop = _tail_loop(text)
    if loop is not None:
        period, reps = loop
        return f"ends in a {period}-character loop repeated {reps}x: {_short(text[-period:])!r}"
    return None


def incorrect_reason(text: str, answer: str | None, verifier: Any) -> str | None:
    """The verifier's verdict; only used when `incorrect` is switched on (the paper's code does not)."""
    from opd.evaluation.verify import safe_verify

    if answer is None:
        return "no reference answer to check against"
    verdict = safe_verify(verifier, text, answer)
    if verdict.correct:
        return None
    return f"incorrect ({verdict.reason or 'mismatch'}; extracted {verdict.extracted!r}, expected {answer!r})"


def filter_reasons(
    text: str,
    *,
    truncated: bool,
    answer: str | None,
    filters: list[str],
    max_new_tokens: int,
    verifier: Any = None,
) -> dict[str, str]:
    """All failing filters of one response (filter name -> detail); empty means keep it."""
    out: dict[str, str] = {}
    checks: dict[str, Callable[[], str | None]] = {
        "truncated": lambda: truncated_reason(truncated, max_new_tokens),
        "no_answer": lambda: no_answer_reason(text),
        "repetition": lambda: repetition_reason(text),
        "incorrect": lambda: incorrect_reason(text, answer, verifier),
    }
    for name in filters:
        reason = checks[name]()
        if reason is not None:
            out[name] = reason
    return out


# ----------------------------------------------------------------------------------------------------
# Output files


@dataclass(frozen=True)
class OutputPaths:
    out: Path
    rejected: Path
    summary: Path
    meta: Path

    @classmethod
    def for_out(cls, out: str | Path) -> OutputPaths:
        p = Path(out)
        base = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.name
        side = p.parent / base
        return cls(
            p,
            Path(f"{side}.rejected.jsonl"),
            Path(f"{side}.summary.json"),
            Path(f"{side}.meta.json"),
        )


def read_complete_lines(path: Path, *, repair: bool = True) -> list[dict[str, Any]]:
    """The complete JSON lines of an append-only file; a torn last line (a kill mid-write) is cut off.

    Each batch is written with one write call after the previous one was fsynced, so only the last line
    can be torn; a bad line anywhere else is real corruption and an error, not something to skip.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    good_end = data.rfind(b"\n") + 1  # bytes after the last newline belong to a torn line
    rows = []
    lines = data[:good_end].split(b"\n")[:-1]
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{i}: not valid JSON ({e.msg}); the file was edited or corrupted. Remove the line "
                "(its sample is then regenerated) or start over with another --out."
            ) from e
    if good_end < len(data) and repair:
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return rows


def _append_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(json_safe(r), ensure_ascii=False, allow_nan=False) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())


def settings_of(cfg: GenerateConfig) -> dict[str, Any]:
    """What decides the output lines: every option except `out` and `device`, plus the prompt file's
    content hash. The device says where to compute, not what: a job started on a GPU may be finished on
    another machine (its lines already written stay as they are)."""
    settings = cfg.model_dump(mode="json", exclude={"out", "device"})
    settings["prompts_sha256"] = file_sha256(cfg.prompts)
    settings["meta_version"] = META_VERSION
    return settings


def _check_or_write_meta(paths: OutputPaths, settings: dict[str, Any]) -> bool:
    """Write OUT.meta.json for a fresh job; for an existing one, refuse when the settings differ.

    Returns whether this is a resume. Output files without a meta file were not written by this
    command (or by an older version); refusing protects them from being appended to.
    """
    existing = [p for p in (paths.out, paths.rejected) if p.exists() and p.stat().st_size > 0]
    if paths.meta.exists():
        old = json.loads(paths.meta.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff[:6])
            raise ConfigError(
                f"cannot resume {paths.out}: it was generated with different settings ({shown}). "
                "Rerun with the original settings to finish it, or write to another --out (or delete "
                f"{paths.out} and its .meta/.rejected/.summary files to start over)."
            )
        return True
    if existing:
        raise ConfigError(
            f"{existing[0]} exists but {paths.meta} does not, so its settings are unknown and it cannot be "
            "resumed safely; choose another --out or delete the existing file."
        )
    paths.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        paths.meta, json.dumps(json_safe(settings), indent=1, sort_keys=True, allow_nan=False) + "\n"
    )
    return False


def summarize(paths: OutputPaths, settings: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """Counts over everything in the files (not just this run), so a resumed job reports the whole set."""
    kept = read_complete_lines(paths.out, repair=False)
    rejected = read_complete_lines(paths.rejected, repair=False)
    per_filter: Counter[str] = Counter()
    for row in rejected:
        per_filter.update(row.get("reasons", {}).keys())
    total = len(kept) + len(rejected)
    return {
        "kept": len(kept),
        "rejected": len(rejected),
        "total": total,
        "kept_fraction": len(kept) / total if total else 0.0,
        "rejected_by_filter": {name: per_filter.get(name, 0) for name in settings["filters"]},
        "mean_kept_tokens": sum(r.get("n_tokens", 0) for r in kept) / len(kept) if kept else 0.0,
        "last_run": run,
        "settings": settings,
    }


# ----------------------------------------------------------------------------------------------------
# The job


@dataclass
class GenerateResult:
    paths: OutputPaths
    summary: dict[str, Any]
    generated: int  # samples drawn by this run
    written: int  # lines appended by this run
    already_done: int  # (prompt, sample) pairs found in the files at start


def _prompt_messages(record: Any, cfg: GenerateConfig) -> list[dict[str, Any]]:
    """The prompt as chat messages, the way the teacher was shown it (format template already filled):
    for a chat template the very messages `render_prompt` gave the chat template, for a non-chat one the
    rendered text as one user message."""
    from opd.data import fill_template, prompt_messages, uses_chat

    if uses_chat(cfg.template):
        return prompt_messages(record, template=cfg.template, system_prompt=cfg.system_prompt)
    return [{"role": "user", "content": fill_template(cfg.template, record.text or "")}]


_AGAIN = "continue with the same `opd generate` command (it skips what is written)"


@dataclass
class _Plan:
    """What is left to do, found from the files before any model is loaded, so a finished job loads
    nothing. `done` grows as batches are written: the interruption message counts from it."""

    paths: OutputPaths
    settings: dict[str, Any]
    records: list[PromptRecord]
    done: set[tuple[int, int]]  # (prompt_index, sample_index) pairs in either file
    todo: list[list[int]]  # the fixed prompt batches that still miss a pair
    total: int  # samples of the whole job
    already: int  # pairs found in the files at start


@dataclass
class _Job:
    """The loaded model and what every batch needs, prepared once for the whole prompt list."""

    model: Any
    tokenizer: Any
    prompt_ids: list[list[int]]
    messages: list[list[dict[str, Any]]]  # each prompt as the teacher was shown it
    verifier: Any  # None unless the `incorrect` filter is on
    params: SamplingParams


def run_generate(
    cfg: GenerateConfig,
    *,
    log: Callable[[str], None] = print,
    on_batch: Callable[[int, int], None] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    options: Mapping[str, str] = GENERATE_OPTIONS,
) -> GenerateResult:
    """Generate (or finish generating) `cfg.out`; see the module docstring for files and resume.

    `on_batch(done, total)` reports progress in samples; `model`/`tokenizer` may be passed in to reuse
    loaded ones (tests), already placed where they should run; a model loaded here goes to `cfg.device`.
    `options`: how the calling command spells the prompt settings the errors name (`opd.data.option_names`).
    """
    from opd.device import resolve_device
    from opd.models.loading import apply_model_defaults

    cfg.require_paths()
    # a lab:NAME teacher renders with the lab's template (and grades with its verifier) unless told otherwise
    cfg = apply_model_defaults(cfg, [cfg.model], {"verifier": "verifier", "template": "template"}, log)
    device = resolve_device(cfg.device)  # before anything is read or written: `cuda` without CUDA fails here
    plan = _plan(cfg, log, options)
    t0 = time.perf_counter()
    generated = written = 0
    interrupted = False
    if plan.todo:
        job = _load_job(cfg, plan.records, device, model, tokenizer, options)
        generated, written, interrupted = _sample_batches(cfg, plan, job, log, on_batch)
    else:
        log(f"nothing to generate: all {plan.total} samples of {plan.paths.out} are written")
    run = {
        "already_done": plan.already,
        "generated": generated,
        "written": written,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return _finish(plan, run, interrupted)


def _load_records(cfg: GenerateConfig, options: Mapping[str, str]) -> list[PromptRecord]:
    """The prompts of the job; the `incorrect` filter needs every answer, so a missing one fails here,
    before anything is written, rather than as a rejection of every response to that prompt."""
    from opd.data import load_prompts, prompt_columns

    records = load_prompts(cfg.prompts, **prompt_columns(cfg), options=options)
    if cfg.max_prompts is not None:
        records = records[: cfg.max_prompts]
    if "incorrect" in cfg.filters:
        missing = [r.source for r in records if r.answer is None]
        if missing:
            raise ConfigError(
                f"the incorrect filter needs an `answer` on every prompt; {len(missing)} have none "
                f"(first: {missing[0]}). Set answer_field, or drop `incorrect` from --filters."
            )
    return records


def _plan(cfg: GenerateConfig, log: Callable[[str], None], options: Mapping[str, str]) -> _Plan:
    """Check the settings against an earlier run's (refusing a mismatch), then find which of the fixed
    prompt batches still miss a sample: a resume regenerates only those."""
    records = _load_records(cfg, options)
    paths = OutputPaths.for_out(cfg.out)
    settings = settings_of(cfg)
    resumed = _check_or_write_meta(paths, settings)

    done: set[tuple[int, int]] = set()
    for path in (paths.out, paths.rejected):
        for row in read_complete_lines(path):
            done.add((int(row["prompt_index"]), int(row["sample_index"])))
    n = cfg.samples
    total = len(records) * n
    batches = [
        list(range(s, min(s + cfg.batch_size, len(records)))) for s in range(0, len(records), cfg.batch_size)
    ]
    todo = [b for b in batches if any((i, j) not in done for i in b for j in range(n))]
    already = len(done)
    if resumed:
        log(
            f"resuming {paths.out}: {already}/{total} samples already written; "
            f"{sum(len(b) for b in todo) * n} to generate in {len(todo)} batch(es)"
        )
    return _Plan(paths, settings, records, done, todo, total, already)


def _load_job(
    cfg: GenerateConfig, records: list[PromptRecord], device: Any, model: Any, tokenizer: Any,
    options: Mapping[str, str],
) -> _Job:  # fmt: skip
    """Load the model (unless passed in) and render every prompt once; only reached when something is
    left to generate, so rerunning a finished job costs no model load."""
    from opd.data import prepare_prompts
    from opd.generation.rollout import SamplingParams
    from opd.models.loading import load_model, load_tokenizer, prepare_tokenizer

    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        prepare_tokenizer(tokenizer)
    if model is None:
        model = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, device=device)
    _, prompt_ids = prepare_prompts(
        records, tokenizer, template=cfg.template, chat_template_kwargs=cfg.chat_template_kwargs,
        system_prompt=cfg.system_prompt, max_prompt_tokens=cfg.max_prompt_tokens, options=options,
    )  # fmt: skip
    # after prepare_prompts, which refuses what a template cannot render (messages under a non-chat one)
    messages = [_prompt_messages(r, cfg) for r in records]
    verifier = None
    if "incorrect" in cfg.filters:
        from opd.evaluation.verify import get_verifier

        verifier = get_verifier(cfg.verifier)
    params = SamplingParams(
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens
    )
    return _Job(model, tokenizer, prompt_ids, messages, verifier, params)


def _sample_batches(
    cfg: GenerateConfig, plan: _Plan, job: _Job, log: Callable[[str], None],
    on_batch: Callable[[int, int], None] | None,
) -> tuple[int, int, bool]:  # fmt: skip
    """(generated, written, interrupted). Each batch is written before the next is sampled, and
    Ctrl-C/SIGTERM lets the current batch finish and be written, so the files always stay resumable."""
    from opd.generation.sampling import sample_responses
    from opd.progress import StopRequests

    generated = written = 0
    progress = plan.already
    stop = StopRequests(
        log, lambda: f"finished batches are in {plan.paths.out}; {_AGAIN}", "the current batch"
    )
    with stop:
        for batch in plan.todo:
            if stop.requested is not None:
                return generated, written, True
            samples = sample_responses(
                job.model, job.tokenizer, [job.prompt_ids[i] for i in batch], n=cfg.samples, params=job.params,
                batch_size=len(batch), seed=cfg.seed, indices=batch,
            )  # fmt: skip
            generated += len(samples)
            appended = _write_batch(cfg, plan, job, samples)
            written += appended
            progress += appended
            if on_batch is not None:
                on_batch(progress, plan.total)
    return generated, written, False


def _write_batch(cfg: GenerateConfig, plan: _Plan, job: _Job, samples: list[Sample]) -> int:
    """Filter one batch into kept and rejected lines and append both; returns the lines appended.
    Pairs already in the files are skipped: a resumed batch regenerates them identically."""
    kept_rows, rejected_rows = [], []
    for s in samples:
        key = (s.prompt_index, s.sample_index)
        if key in plan.done:
            continue  # written before the interruption: the regenerated copy is identical
        rec = plan.records[s.prompt_index]
        row = {
            "messages": [*job.messages[s.prompt_index], {"role": "assistant", "content": s.text}],
            "prompt": rec.text,
            "response": s.text,
            "answer": rec.answer,
            "source": rec.source,
            "prompt_index": s.prompt_index,
            "sample_index": s.sample_index,
            "n_tokens": s.n_tokens,
            "truncated": s.truncated,
            "template": cfg.template,
        }
        reasons = filter_reasons(
            s.text, truncated=s.truncated, answer=rec.answer, filters=cfg.filters,
            max_new_tokens=cfg.max_new_tokens, verifier=job.verifier,
        )  # fmt: skip
        if reasons:
            rejected_rows.append({**row, "reasons": reasons})
        else:
            kept_rows.append(row)
        plan.done.add(key)
    _append_lines(plan.paths.out, kept_rows)
    _append_lines(plan.paths.rejected, rejected_rows)
    return len(kept_rows) + len(rejected_rows)


def _finish(plan: _Plan, run: dict[str, Any], interrupted: bool) -> GenerateResult:
    """Write the summary over the whole files (also after an interruption, so it shows what is there),
    then report the interruption as an error that says how to continue."""
    summary = summarize(plan.paths, plan.settings, run)
    atomic_write_text(plan.paths.summary, json.dumps(json_safe(summary), indent=1, allow_nan=False) + "\n")
    if interrupted:
        from opd.errors import InterruptedRun

        raise InterruptedRun(
            f"interrupted after {len(plan.done)}/{plan.total} samples, all written to {plan.paths.out} "
            f"(summary so far in {plan.paths.summary}); {_AGAIN}"
        )
    return GenerateResult(plan.paths, summary, run["generated"], run["written"], plan.already)


def generate_with_progress(
    cfg: Any, log: Callable[[str], Any] | None = None, options: Mapping[str, str] = GENERATE_OPTIONS
) -> Any:
    """`opd.recipes.generate.run_generate` with a progress bar (in samples) and a one-line summary;
    `options` as there."""
    log = log or print
    progress = bar("opd generate")
    task = None

    def on_batch(done: int, total: int) -> None:
        nonlocal task
        if task is None:  # started at the first batch, so a refused resume prints no empty bar
            progress.start()
            task = progress.add_task("", total=total)
        progress.update(task, completed=done, total=total)

    try:
        result = run_generate(cfg, log=log, on_batch=on_batch, options=options)
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
