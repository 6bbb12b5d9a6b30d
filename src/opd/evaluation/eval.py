"""Outcome evaluation: avg@k, pass@k, gap recovery, and the sequence-reward AUROC (paper brief §2).

`evaluate` samples k responses per problem with the same `HFGenerator` that makes training rollouts (so
"the policy that was evaluated" is the one that was trained), grades each with a verifier (`opd.evaluation.verify`)
and returns per-problem rows plus a summary. Decisions:

* Truncated responses (no stop token within ``max_new_tokens``) are graded like any other, not counted
  wrong outright: a long chain that already boxed its answer is right, and a cut-off one usually has no
  final answer and fails anyway. The truncation rate is reported beside the accuracy so a budget that is
  too small is visible rather than folded silently into the score.
* ``pass@k'`` for every k' <= k uses the unbiased estimator of Chen et al. (2021) from the same k samples;
  ``avg@k`` is the mean correctness over all samples (equal to the mean of pass@1).
* A verifier exception grades that one sample wrong and is counted (``verifier_errors``); ``strict=True``
  re-raises instead. An eval of an hour should not die on one odd answer, but the count must be seen.
* Results are written with temp-file + ``os.replace`` (samples first, summary last), so a crash never
  leaves a half-written file and a summary file exists only for a finished evaluation.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from opd.config import (
    VERIFIER_HELP,
    AnswerColumn,
    ChatTemplateKwargs,
    DataConfig,
    EvalConfig,
    MessagesColumn,
    PromptColumn,
    SystemPrompt,
    TrustRemoteCode,
)
from opd.data import (  # prepare_prompts: also imported from here, where it was first written
    TRAIN_OPTIONS,
    PromptRecord,
    load_prompts,
    option_names,
    prepare_prompts,
    prompt_columns,
)
from opd.errors import ConfigError, DataError
from opd.evaluation.verify import (
    VERIFIER_ERROR,
    Verdict,
    Verifier,
    get_verifier,
    mostly_unparsed,
    prediction_unparsed,
    reference_parses,
    safe_verify,
    unparsed_references_message,
    unparsed_responses_message,
)
from opd.files import atomic_write_text, json_safe

log = logging.getLogger(__name__)

__all__ = [
    "EVAL_OPTIONS",
    "EvalCommandConfig",
    "EvalResult",
    "InLoopEvaluator",
    "ProblemResult",
    "SampleResult",
    "auroc",
    "avg_at_k",
    "check_answers",
    "evaluate",
    "gap_recovery",
    "pass_at_k",
    "portable_name",
    "portable_names",
    "rollout_reward_auroc",
    "summarize",
    "write_results",
]


# ----------------------------------------------------------------------------------------------------
# Estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k)/C(n, k).

    Computed as 1 − Π_{i=n−c+1..n} (1 − k/i), which never forms the huge binomials (n = 1000 overflows
    floats) and is exact to rounding.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(correct: Sequence[bool] | Sequence[Sequence[bool]]) -> float:
    """Mean correctness over all samples (flat list, or one list per problem); NaN when empty."""
    flat = [bool(x) for row in correct for x in (row if isinstance(row, (list, tuple)) else [row])]
    return sum(flat) / len(flat) if flat else float("nan")


def gap_recovery(before: float, after: float, teacher: float) -> float:
    """(after − before) / (teacher − before): the share of the student–teacher gap closed by training.

    Undefined when the teacher scores the same as the student before training; returns NaN with a
    warning then (not an exception: it is a report, and the other numbers are still worth printing).
    """
    gap = teacher - before
    if gap == 0 or not math.isfinite(gap):
        warnings.warn(
            f"gap recovery undefined: teacher accuracy {teacher} equals the student's before training "
            f"({before}); there is no gap to recover",
            RuntimeWarning,
            stacklevel=2,
        )
        return float("nan")
    return (after - before) / gap


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` for positive `labels` (Mann–Whitney U; ties count 1/2).

    NaN when either class is empty (AUROC is undefined, and 0.5 would pretend to be a measurement).
    """
    s = [float(x) for x in scores]
    y = [bool(v) for v in labels]
    if len(s) != len(y):
        raise ValueError(f"auroc: {len(s)} scores but {len(y)} labels")
    if any(math.isnan(x) for x in s):
        raise ValueError("auroc: scores contain NaN")
    n_pos = sum(y)
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = sorted(range(len(s)), key=lambda i: s[i])
    ranks = [0.0] * len(s)
    i = 0
    while i < len(order):  # average ranks over tie groups
        j = i
        while j + 1 < len(order) and s[order[j + 1]] == s[order[i]]:
            j += 1
        mid = (i + j) / 2 + 1
        for m in range(i, j + 1):
            ranks[order[m]] = mid
        i = j + 1
    rank_sum = sum(r for r, lab in zip(ranks, y, strict=True) if lab)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def rollout_reward_auroc(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    rollout: Any,
    correct: Sequence[bool],
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Sequence-mean reward r̄(y) = mean_t [log q_t(y_t) − log p_t(y_t)] per rollout row, and its AUROC
    for separating correct from incorrect rollouts (paper §2: does the teacher's token signal know which
    answers are right?). `correct[i]` grades row i of `rollout`.

    Returns ``{"auroc", "rewards", "mean_reward_correct", "mean_reward_incorrect", "n_correct",
    "n_incorrect"}``. Pass `vocab_size` (`opd.models.loading.shared_vocab_size`) for padded-vocabulary pairs.
    """
    from opd.device import host
    from opd.diagnostics import sequence_mean_reward
    from opd.teachers.hf import score_frozen

    if len(correct) != len(rollout):
        raise ValueError(f"rollout_reward_auroc: {len(correct)} labels for {len(rollout)} rollouts")
    s_logits = score_frozen(student, rollout)
    t_logits = score_frozen(teacher, rollout)
    mask = rollout.response_mask.to(s_logits.device)
    rewards = sequence_mean_reward(
        s_logits, t_logits.to(s_logits.device), rollout.response_ids.to(s_logits.device), mask, vocab_size
    )
    r = host(rewards).tolist()
    good = [x for x, ok in zip(r, correct, strict=True) if ok]
    bad = [x for x, ok in zip(r, correct, strict=True) if not ok]
    return {
        "auroc": auroc(r, correct),
        "rewards": r,
        "mean_reward_correct": sum(good) / len(good) if good else float("nan"),
        "mean_reward_incorrect": sum(bad) / len(bad) if bad else float("nan"),
        "n_correct": len(good),
        "n_incorrect": len(bad),
    }


# ----------------------------------------------------------------------------------------------------
# Results


@dataclass
class SampleResult:
    correct: bool
    extracted: str | None
    length: int  # response tokens, including the stop token
    truncated: bool
    reason: str = ""
    text: str | None = None  # None when texts are not kept (in-loop eval)


@dataclass
class ProblemResult:
    index: int  # position in the prompt file
    source: str  # file:line
    prompt: Any  # the record's text, or its messages
    answer: str
    samples: list[SampleResult] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def correct(self) -> int:
        return sum(s.correct for s in self.samples)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "source": self.source,
            "prompt": self.prompt,
            "answer": self.answer,
            "n": self.n,
            "correct": self.correct,
            "samples": [
                {k: v for k, v in asdict(s).items() if k != "text" or v is not None} for s in self.samples
            ],
        }


@dataclass
class EvalResult:
    problems: list[ProblemResult]
    summary: dict[str, Any]


def summarize(problems: Sequence[ProblemResult], samples: int) -> dict[str, Any]:
    """The summary numbers of an evaluation (see module docstring for their conventions)."""
    all_s = [s for p in problems for s in p.samples]
    n_s = len(all_s)
    out: dict[str, Any] = {f"avg@{samples}": avg_at_k([s.correct for s in all_s])}
    for k in range(1, samples + 1):
        vals = [pass_at_k(p.n, p.correct, k) for p in problems if p.n >= k]
        out[f"pass@{k}"] = sum(vals) / len(vals) if vals else float("nan")
    nan = float("nan")
    out.update(
        {
            "mean_length": sum(s.length for s in all_s) / n_s if n_s else nan,
            "truncation_rate": sum(s.truncated for s in all_s) / n_s if n_s else nan,
            "no_answer_rate": sum(s.extracted is None for s in all_s) / n_s if n_s else nan,
            "verifier_errors": sum(s.reason.startswith(VERIFIER_ERROR) for s in all_s),
            "unparsed_predictions": sum(prediction_unparsed(s.extracted, s.reason) for s in all_s),
            "n_problems": len(problems),
            "samples": samples,
        }
    )
    return out


# ----------------------------------------------------------------------------------------------------
# Evaluation


def unparsed_references(problems: Sequence[ProblemResult], verifier: Verifier) -> list[ProblemResult]:
    """The problems whose reference answer `verifier` cannot read, warned about when they are many.

    Checked before any generation: with unreadable references (a whole sentence, an answer the math
    grammar rejects) every sample is graded wrong, and 0% accuracy would look like a bad model.
    """
    bad = [p for p in problems if reference_parses(verifier, p.answer) is False]
    if mostly_unparsed(len(bad), len(problems)):
        log.warning(
            unparsed_references_message(len(bad), len(problems), verifier, bad[0].source, bad[0].answer)
        )
    return bad


def _warn_unparsed_predictions(
    summary: dict[str, Any], verifier: Verifier, suggest: str | None = None
) -> None:
    n = summary["n_problems"] * summary["samples"]
    bad = summary["unparsed_predictions"]
    if mostly_unparsed(bad, n):
        log.warning(unparsed_responses_message(bad, n, verifier, suggest=suggest))


def check_answers(records: Sequence[PromptRecord]) -> None:
    """Refuse, before any generation, a problem set in which some record has no reference answer."""
    missing = [r.source for r in records if r.answer is None or not str(r.answer).strip()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(
            f"{missing[0]}: record has no answer{more}; evaluation needs an `answer` field on every "
            "problem (set the answer field name if the column is called differently)."
        )


def _progress_bar(total: int, label: str) -> tuple[Any, Callable[[int], None]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from opd.progress import Progress  # plain periodic lines instead of a bar when stderr is not a terminal

    bar = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=Console(stderr=True),
        transient=False,
    )
    task = bar.add_task("problems", total=total)
    return bar, lambda n: bar.advance(task, n)


def evaluate_prepared(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[PromptRecord],
    prompt_ids: Sequence[Sequence[int]],
    *,
    samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    verifier: Verifier,
    seed: int = 0,
    strict: bool = False,
    keep_texts: bool = True,
    progress: bool = True,
    label: str = "opd eval",
    suggest_verifier: str | None = None,
) -> EvalResult:
    """`evaluate` on already tokenised prompts (the in-loop evaluator tokenises once and reuses them)."""
    from opd.generation.rollout import SamplingParams
    from opd.generation.sampling import sample_responses

    check_answers(records)
    problems = [
        ProblemResult(
            index=i,
            source=r.source,
            prompt=r.text if r.text is not None else r.messages,
            answer=str(r.answer),
        )
        for i, r in enumerate(records)
    ]
    bad_refs = unparsed_references(problems, verifier)  # warns before an hour of generation
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens)
    bar, advance = _progress_bar(len(records), label) if progress else (None, lambda n: None)

    def on_batch(batch: list[Any], _roll: Any) -> None:
        done = set()
        for s in batch:  # grade as we go, so the bar shows real progress and errors surface early
            prob = problems[s.prompt_index]
            v: Verdict = safe_verify(verifier, s.text, prob.answer, strict=strict)
            prob.samples.append(
                SampleResult(
                    correct=bool(v.correct),
                    extracted=v.extracted,
                    length=s.n_tokens,
                    truncated=s.truncated,
                    reason=v.reason,
                    text=s.text if keep_texts else None,
                )
            )
            done.add(s.prompt_index)
        advance(len(done))

    try:
        if bar is not None:
            bar.start()
        sample_responses(
            model,
            tokenizer,
            prompt_ids,
            n=samples,
            params=params,
            batch_size=batch_size,
            seed=seed,
            on_batch=on_batch,
        )
    finally:
        if bar is not None:
            bar.stop()
    summary = summarize(problems, samples)
    summary["unparsed_references"] = len(bad_refs)
    _warn_unparsed_predictions(summary, verifier, suggest_verifier)
    summary.update({"verifier": getattr(verifier, "name", type(verifier).__name__), "temperature": temperature,
                    "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed})  # fmt: skip
    return EvalResult(problems=problems, summary=summary)


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    records: list[PromptRecord],
    *,
    samples: int = 16,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
    verifier: Verifier | str = "math",
    template: str = "chat",
    chat_template_kwargs: dict[str, Any] | None = None,
    system_prompt: str | None = None,
    max_prompt_tokens: int = 4096,
    seed: int = 0,
    progress: bool = True,
    strict: bool = False,
    keep_texts: bool = True,
    label: str = "opd eval",
    suggest_verifier: str | None = None,
    options: Mapping[str, str] = TRAIN_OPTIONS,
) -> EvalResult:
    """Sample `samples` responses per problem, grade them, and summarise (avg@k, pass@1..k, lengths).

    `suggest_verifier` is the verifier the warning about unreadable responses names (the model's own
    default, `opd.models.loading.model_defaults`); ``math-flexible`` when None. `options`: how the
    calling command spells the prompt settings the errors name (`opd.data.option_names`).

    `model` must be a plain (unwrapped) HF model, since generation calls `model.generate`. Records
    without an answer are refused before anything is generated. Sampling seeds are keyed by problem index
    (`opd.generation.sampling`), so the same problem gets the same samples whatever the batch size or subset.
    """
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    check_answers(records)
    if isinstance(verifier, str):
        verifier = get_verifier(verifier)
    _, ids = prepare_prompts(
        records,
        tokenizer,
        template=template,
        chat_template_kwargs=chat_template_kwargs,
        system_prompt=system_prompt,
        max_prompt_tokens=max_prompt_tokens,
        options=options,
    )
    return evaluate_prepared(
        model, tokenizer, records, ids, samples=samples, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, batch_size=batch_size, verifier=verifier, seed=seed, strict=strict,
        keep_texts=keep_texts, progress=progress, label=label, suggest_verifier=suggest_verifier,
    )  # fmt: skip


def _json_default(x: Any) -> Any:
    return str(x)


# Not allowed in file names on Windows (and ':' is the path separator of macOS's Finder), plus controls.
_UNPORTABLE = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
_RESERVED = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"COM{i}" for i in range(1, 10)),
    *(f"LPT{i}" for i in range(1, 10)),
}


def portable_name(name: str) -> str:
    """`name` as a file name every OS accepts: ``<>:"/\\|?*`` and control characters become ``_``
    (``lab:student`` -> ``lab_student``), no trailing dot or space, no reserved Windows device name."""
    out = _UNPORTABLE.sub("_", name).rstrip(". ") or "_"
    return f"_{out}" if out.split(".")[0].upper() in _RESERVED else out


def portable_names(names: Sequence[str]) -> dict[str, str]:
    """{name: file name} for `names`, each `portable_name`, kept unique with ``-2``, ``-3`` suffixes
    (``a:b`` and ``a_b`` would otherwise write the same files; case-insensitive file systems too)."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        base = portable_name(name)
        stem, i = base, 2
        while stem.lower() in taken:
            stem, i = f"{base}-{i}", i + 1
        taken.add(stem.lower())
        out[name] = stem
    return out


def write_results(result: EvalResult, out_dir: str | Path, name: str) -> dict[str, Path]:
    """Write ``OUT/NAME.samples.jsonl`` (one line per problem) and ``OUT/NAME.summary.json``, atomically,
    NAME made `portable_name` (pass names from `portable_names` to keep several models' files apart).

    The summary is written last, so its presence means the samples file beside it is complete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = portable_name(name)
    samples_path = out / f"{name}.samples.jsonl"
    summary_path = out / f"{name}.summary.json"
    lines = [json.dumps(json_safe(p.to_json()), default=_json_default) + "\n" for p in result.problems]
    atomic_write_text(samples_path, "".join(lines))
    atomic_write_text(
        summary_path, json.dumps(json_safe(result.summary), indent=2, default=_json_default) + "\n"
    )
    return {"samples": samples_path, "summary": summary_path}


# ----------------------------------------------------------------------------------------------------
# In-loop evaluation


class InLoopEvaluator:
    """Held-out evaluation during training (the paper tracks avg@16 along the run).

    Prompts are loaded, validated and tokenised once at construction with the run's data settings, so a
    bad eval file fails at start-up rather than at the first eval step, and every eval sees identical
    prompt ids and sampling seeds (differences between evals are the model's, not the sampler's).
    """

    def __init__(self, cfg: EvalConfig, data_cfg: DataConfig, tokenizer: Any) -> None:
        if not cfg.prompts:
            raise ConfigError("eval.prompts is empty: in-loop evaluation needs a problem file with answers")
        self.cfg = cfg
        self.tokenizer = tokenizer
        # the run's data settings, except the file: that is eval.prompts
        options = {**TRAIN_OPTIONS, "prompts": "eval.prompts"}
        records = load_prompts(cfg.prompts, **prompt_columns(data_cfg), options=options)
        if cfg.max_problems is not None:
            records = records[: cfg.max_problems]
        check_answers(records)
        self.records = records
        self.verifier = get_verifier(cfg.verifier)
        self.prompt_texts, self.prompt_ids = prepare_prompts(
            records,
            tokenizer,
            template=data_cfg.template,
            chat_template_kwargs=data_cfg.chat_template_kwargs,
            system_prompt=data_cfg.system_prompt,
            max_prompt_tokens=data_cfg.max_prompt_tokens,
            options=options,
        )
        self.last_result: EvalResult | None = None

    def run(self, model: torch.nn.Module, *, progress: bool = False) -> dict[str, float]:
        """Metrics prefixed ``eval/`` (``eval/avg@16``, ``eval/pass@1``, ``eval/pass@16``, lengths, ...).

        `model` must be unwrapped (no DDP wrapper). Only pass@1 and pass@k are returned, to keep the
        metrics stream small; the full result is kept on `last_result`.
        """
        c = self.cfg
        res = evaluate_prepared(
            model, self.tokenizer, self.records, self.prompt_ids, samples=c.samples, temperature=c.temperature,
            top_p=c.top_p, max_new_tokens=c.max_new_tokens, batch_size=c.batch_size, verifier=self.verifier,
            seed=c.seed, keep_texts=False, progress=progress, label="eval",
        )  # fmt: skip
        self.last_result = res
        s = res.summary
        keep = [f"avg@{c.samples}", "pass@1", f"pass@{c.samples}", "mean_length", "truncation_rate",
                "no_answer_rate", "verifier_errors"]  # fmt: skip
        return {f"eval/{k}": float(s[k]) for k in dict.fromkeys(keep)}


# ----------------------------------------------------------------------------------------------------
# `opd eval` configuration


class EvalCommandConfig(BaseModel):
    """Everything `opd eval` takes; a YAML file (`--config`) and the command-line options set the same
    fields, the options winning."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    models: list[str] = Field(default_factory=list, description="model paths (dir, .gguf, hub id), in order")
    named: dict[str, str] = Field(default_factory=dict, description="NAME -> model path, shown as NAME")
    before: str | None = Field(
        None, description="student before training: a name, a listed path, or a new path"
    )
    after: str | None = Field(None, description="student after training (name or path)")
    teacher: str | None = Field(None, description="teacher (name or path)")
    prompts: str = Field("", description="problems with an `answer` field (JSONL/Parquet/CSV)")
    prompt_field: PromptColumn = "prompt"
    messages_field: MessagesColumn = "messages"
    answer_field: AnswerColumn = "answer"
    max_problems: int | None = Field(None, ge=1, description="evaluate only the first N problems; null: all")
    samples: int = Field(16, ge=1, description="k samples per problem")
    temperature: float = Field(0.7, ge=0.0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling, 0 < p <= 1; 1 = off")
    max_new_tokens: int = Field(1024, ge=1, description="response budget in tokens")
    batch_size: int = Field(8, ge=1, description="problems per generate call")
    template: str = Field(
        "chat", description="raw | chat | dapo | boxed | chat:<named or format string> | a format string with {prompt}",
    )  # fmt: skip
    chat_template_kwargs: ChatTemplateKwargs
    system_prompt: SystemPrompt = None
    max_prompt_tokens: int = Field(4096, ge=1, description="the most tokens a rendered prompt may have")
    verifier: str = Field("math", description=VERIFIER_HELP)
    strict: bool = Field(False, description="stop on a verifier exception instead of grading it wrong")
    seed: int = Field(0, description="sampling seed (the same seed, the same samples)")
    dtype: str = Field("float32", description="float32 | bfloat16 | float16 | auto")
    device: str = Field(
        "auto", description="where the models run: auto (this process's GPU when CUDA is available, else "
        "cpu) | cpu | cuda | cuda:N",
    )  # fmt: skip
    trust_remote_code: TrustRemoteCode = False
    out: str = Field("eval", description="output directory")
    keep_texts: bool = Field(True, description="write response texts into the samples file")


# How `opd eval` spells the prompt settings that prompt-file and template errors name (its options).
EVAL_OPTIONS = option_names("--", dashes=True)


def model_entries(cfg: EvalCommandConfig) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """[(name, path)] in evaluation order and {role: name} for before/after/teacher.

    Plain paths are named after their directory (or .gguf stem), de-duplicated with a suffix; a role
    that names neither a listed model nor a listed path is a new path, added under the role's name.
    """
    entries: list[tuple[str, str]] = []
    taken: set[str] = set()

    def add(name: str, path: str) -> str:
        base, i = name, 2
        while name in taken:
            name, i = f"{base}-{i}", i + 1
        taken.add(name)
        entries.append((name, path))
        return name

    for path in cfg.models:
        p = Path(path)
        add((p.stem if p.suffix == ".gguf" else p.name) or path.replace("/", "_"), path)
    for name, path in cfg.named.items():
        if name in taken:
            raise ConfigError(f"--name-as {name}={path}: the name {name!r} is already used; pick another")
        add(name, path)
    roles: dict[str, str] = {}
    for role in ("before", "after", "teacher"):
        ref = getattr(cfg, role)
        if ref is None:
            continue
        by_name = [n for n, _ in entries if n == ref]
        by_path = [n for n, p in entries if p == ref]
        roles[role] = (by_name or by_path or [None])[0] or add(role, ref)
    if not entries:
        raise ConfigError("no model to evaluate: pass --model PATH (repeatable) or --name-as NAME=PATH")
    return entries, roles


def release_memory(device: torch.device | str | None = None) -> None:
    """Return freed model memory (after the caller dropped its references) before loading the next model:
    garbage-collect, and hand `device`'s cached blocks back to CUDA when the models ran on a GPU."""
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
