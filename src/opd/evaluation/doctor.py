"""`opd doctor`: will OPD work for this student/teacher pair? Forward passes and sampling only.

The paper's central finding (brief §3.1) is that OPD needs two things: compatible thinking patterns
(high overlap at the student's states, the shared top-k set carrying almost all the probability mass)
AND a teacher that brings capability the student lacks. Both are measurable before training:

* compatibility: `opd.diagnostics` on the student's own rollouts, scored by student and teacher (the
  exact states OPD will train on), also by response-position bin;
* novelty: student vs teacher accuracy on the prompts, the share of problems the teacher solves and the
  student does not, and the teacher continuation advantage (truncate student rollouts at depth d, let
  the teacher continue, accuracy of that minus the student's own);
* reward informativeness: AUROC of the sequence-mean reward for correct vs incorrect student rollouts;
* several templates (pick the teacher-aligned one) and several teachers (teacher-vs-teacher agreement at
  the student's states: two teachers the student cannot tell apart give the same OPD signal).

The verdict rules (`verdict`) are ordered checks on these numbers with thresholds in `DoctorThresholds`;
they were set on the lab world, where what OPD actually does with each teacher is measured
(`opd lab run thinking_patterns novelty_vs_scale`), and the defaults are documented there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from opd.errors import ConfigError, OpdError

__all__ = [
    "DoctorConfig",
    "DoctorThresholds",
    "TeacherReport",
    "DoctorVerdict",
    "continuation_prefixes",
    "novelty_stats",
    "run_doctor",
    "verdict",
]


class DoctorThresholds(BaseModel):
    """Where the verdict rules draw their lines (see `verdict`); set on the lab world, documented in
    the README's doctor section and printed in every report."""

    model_config = ConfigDict(extra="forbid")

    identical_kl: float = Field(
        1e-4, ge=0.0, description="reverse KL (nats/token) below which the teacher counts as the student"
    )
    min_overlap_mass: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="teacher probability mass on the shared top-k set below which the patterns differ "
        "(lab: compatible teachers 0.98-1.0, the other-pattern teacher 0.46 at k=4; paper 0.97-0.99)",
    )
    min_overlap_advantage: float = Field(
        -0.25,
        le=0.0,
        description="overlap-token advantage below which the patterns differ (lab: compatible -0.07, "
        "incompatible -0.43 at k=4)",
    )
    min_accuracy_gap: float = Field(
        0.1, ge=0.0, le=1.0, description="teacher minus student accuracy needed to call it new capability"
    )
    min_novel_share: float = Field(
        0.1, ge=0.0, le=1.0, description="share of problems the teacher solves and the student does not"
    )
    max_truncation: float = Field(
        0.2, ge=0.0, le=1.0, description="truncated share of rollouts above which accuracy-based numbers are "
        "flagged unreliable",
    )  # fmt: skip
    indistinguishable_overlap: float = Field(
        0.9, ge=0.0, le=1.0, description="teacher-vs-teacher overlap ratio above which (with low KL) two "
        "teachers look the same from the student's states",
    )  # fmt: skip
    indistinguishable_kl: float = Field(
        0.05, ge=0.0, description="teacher-vs-teacher KL (nats/token) below which two teachers look the same"
    )


class DoctorConfig(BaseModel):
    """Everything `opd doctor` takes; a YAML file (`--config`) and the options set the same fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    student: str = Field("", description="student model: dir, .gguf, hub id or lab:NAME")
    teachers: list[str] = Field(default_factory=list, description="one or more teachers (same forms)")
    prompts: str = Field("", description="problems (JSONL/Parquet/CSV); an `answer` field enables accuracy")
    prompt_field: str | None = "prompt"
    messages_field: str | None = "messages"
    answer_field: str | None = "answer"
    n_prompts: int = Field(16, ge=1, description="how many prompts (the first N of the file)")
    samples: int = Field(4, ge=1, description="student rollouts per prompt")
    teacher_samples: int = Field(2, ge=0, description="teacher samples per prompt for its accuracy (0: skip)")
    templates: list[str] = Field(
        default_factory=lambda: ["chat"], description="prompt templates to compare; the first is the default"
    )
    system_prompt: str | None = None
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of all rollouts")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    k: int = Field(16, ge=1, description="top-k of the overlap metrics (the paper's 16; lab worlds: 4)")
    position_bins: int = Field(4, ge=0, description="response-position bins of the metrics")
    depths: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        description="continuation depths, as fractions of each student rollout's length",
    )
    continuation_rollouts: int = Field(16, ge=0, description="student rollouts continued per depth (0: skip)")
    verifier: str = Field("math", description="answer checker, as in `opd eval`")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")
    score_batch: int = Field(
        4, ge=1, description="rollouts per scoring forward (bounds its activations and B x T x H hidden "
        "states; logits are projected a bounded chunk of rows at a time)",
    )  # fmt: skip
    student_dtype: str = "float32"
    teacher_dtype: str = "float32"
    device: str = Field(
        "auto", description="where the student and teachers run: auto (this process's GPU when CUDA is "
        "available, else cpu) | cpu | cuda | cuda:N",
    )  # fmt: skip
    trust_remote_code: bool = False
    seed: int = 0
    out: str = Field("doctor", description="output directory (doctor.json, report.md/.html, plots)")
    thresholds: DoctorThresholds = Field(default_factory=DoctorThresholds)

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        bad = [d for d in v if not 0.0 <= d < 1.0]
        if bad:
            raise ValueError(f"depths must be fractions in [0, 1), got {bad}")
        return sorted(set(v))


# ----------------------------------------------------------------------------------------------------
# Pure pieces (tested on their own)


def novelty_stats(
    student_correct: Sequence[Sequence[bool]], teacher_correct: Sequence[Sequence[bool]]
) -> dict:
    """Accuracies and the share of problems the teacher solves and the student does not.

    "Solves" means a majority of the samples are correct (ties count as not solved), so one lucky sample
    does not make a problem "new capability". Problems where either side has no sample are skipped.
    """
    pairs = [(s, t) for s, t in zip(student_correct, teacher_correct, strict=True) if s and t]
    if not pairs:
        return {"student_acc": math.nan, "teacher_acc": math.nan, "accuracy_gap": math.nan,
                "teacher_only_share": math.nan, "student_only_share": math.nan, "problems": 0}  # fmt: skip

    def acc(rows: Sequence[Sequence[bool]]) -> float:
        return sum(sum(r) / len(r) for r in rows) / len(rows)

    def solved(r: Sequence[bool]) -> bool:
        return sum(r) * 2 > len(r)

    s_acc, t_acc = acc([s for s, _ in pairs]), acc([t for _, t in pairs])
    n_s, n_t = sum(len(s) for s, _ in pairs), sum(len(t) for _, t in pairs)
    # Binomial standard error of the difference of the two sample means: a guide to how much of the
    # gap a small doctor run can resolve (problems are not independent of samples; this ignores that).
    se = math.sqrt(s_acc * (1 - s_acc) / n_s + t_acc * (1 - t_acc) / n_t)
    return {
        "accuracy_gap_se": se,
        "student_acc": s_acc,
        "teacher_acc": t_acc,
        "accuracy_gap": t_acc - s_acc,
        "teacher_only_share": sum(solved(t) and not solved(s) for s, t in pairs) / len(pairs),
        "student_only_share": sum(solved(s) and not solved(t) for s, t in pairs) / len(pairs),
        "problems": len(pairs),
    }


def continuation_prefixes(lengths: Sequence[int], depth: float, *, min_left: int = 1) -> list[int | None]:
    """Prefix length (tokens) at `depth` of each rollout, or None when nothing would be left to continue.

    The stop token is never part of a prefix (a prefix ending in EOS has nothing to continue), so a
    rollout of n tokens (EOS included) offers at most n - 1 prefix tokens.
    """
    out: list[int | None] = []
    for n in lengths:
        cut = int(depth * n)
        out.append(cut if n - cut > min_left else None)
    return out


@dataclass
class DoctorVerdict:
    """A plain-words call on one teacher, with the numbers that decided it and what to do."""

    code: str  # identical | incompatible | no_gain | weak_teacher | go | compatible_unknown_novelty
    headline: str
    reasons: list[str]
    recipe: str

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "headline": self.headline, "reasons": self.reasons, "recipe": self.recipe}


def verdict(m: dict[str, float], th: DoctorThresholds) -> DoctorVerdict:
    """Ordered rules on one teacher's metrics (at the chosen template).

    1. identical: reverse KL ~ 0, OPD's signal is empty.
    2. incompatible thinking pattern: the shared top-k set carries too little of the teacher's mass, or
       the overlap-token advantage is very negative (the paper's failing pairs; the lab's pattern-B
       teacher). Cold start (recipe A) first, or another teacher.
    3. without answers, novelty is unknown.
    4. teacher not more accurate than the student on average: weak teacher, whatever the share of
       problems only it solves (those are then balanced by problems only the student solves).
    5. accuracy gap below the threshold and few teacher-only problems: compatible but nothing to learn,
       expect little gain.
    6. otherwise: compatible, brings capability the student lacks: go.
    """
    rkl = m.get("reverse_kl", math.nan)
    mass_t = m.get("overlap_mass_teacher", math.nan)
    adv = m.get("overlap_token_advantage", math.nan)
    compat = (f"overlap ratio {m.get('overlap_ratio', math.nan):.3f}, overlap mass student "
              f"{m.get('overlap_mass_student', math.nan):.3f} / teacher {mass_t:.3f}, overlap-token advantage "
              f"{adv:.3f}, entropy gap {m.get('entropy_gap', math.nan):.3f}, reverse KL {rkl:.4f}")  # fmt: skip
    if math.isfinite(rkl) and rkl <= th.identical_kl:
        return DoctorVerdict("identical", "identical to the student: OPD has no signal",
                       [f"reverse KL {rkl:.2e} <= {th.identical_kl:g}", compat],
                       "pick a different (stronger or post-trained) teacher")  # fmt: skip
    reasons = [compat]
    if mass_t < th.min_overlap_mass or adv < th.min_overlap_advantage:
        why = []
        if mass_t < th.min_overlap_mass:
            why.append(f"teacher overlap mass {mass_t:.3f} < {th.min_overlap_mass:g}")
        if adv < th.min_overlap_advantage:
            why.append(f"overlap-token advantage {adv:.3f} < {th.min_overlap_advantage:g}")
        return DoctorVerdict("incompatible", "incompatible thinking pattern: cold start first, or pick another teacher",
                       why + reasons,
                       "`opd cold-start` (teacher rollouts -> SFT -> OPD), or a teacher whose outputs the "
                       "student already resembles; try the teacher's own template (`--template`)")  # fmt: skip
    gap = m.get("accuracy_gap", math.nan)
    share = m.get("teacher_only_share", math.nan)
    if not math.isfinite(gap):
        return DoctorVerdict("compatible_unknown_novelty", "compatible; novelty not measured (no answers to check)",
                       reasons, "add an `answer` field to the prompts to measure whether the teacher brings "
                       "new capability, then train if it does")  # fmt: skip
    se = m.get("accuracy_gap_se", math.nan)
    nov = (f"accuracy student {m['student_acc']:.3f} vs teacher {m['teacher_acc']:.3f} (gap {gap:+.3f} ± {se:.3f} "
           "s.e.); "
           f"teacher-only problems {share:.3f}")  # fmt: skip
    cont = [
        v for key, v in sorted(m.items()) if key.startswith("continuation_advantage@") and math.isfinite(v)
    ]
    if cont:
        nov += f"; continuation advantage {', '.join(f'{v:+.3f}' for v in cont)} (shallow to deep)"
    reasons.append(nov)
    if gap <= 0:
        return DoctorVerdict("weak_teacher", "compatible, but the teacher is not better than the student here",
                       reasons, "pick a stronger teacher, or prompts where the teacher is ahead")  # fmt: skip
    if gap < th.min_accuracy_gap and share < th.min_novel_share:
        return DoctorVerdict("no_gain", "compatible, no new capability: expect little gain",
                       [f"gap {gap:+.3f} < {th.min_accuracy_gap:g} and teacher-only share {share:.3f} < "
                        f"{th.min_novel_share:g}", *reasons],
                       "a teacher post-trained beyond the student's pipeline (e.g. RL), or harder prompts")  # fmt: skip
    return DoctorVerdict("go", "compatible, brings new capability: go", reasons,
                   "`opd train` with this teacher and template; watch overlap ratio rise and entropy gap shrink")  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The run


@dataclass
class TeacherReport:
    name: str
    path: str
    by_template: dict[str, dict[str, float]] = field(default_factory=dict)
    verdict: DoctorVerdict | None = None


def _name_of(path: str, taken: set[str]) -> str:
    p = Path(path)
    base = path.split(":", 1)[1] if path.startswith("lab:") else (p.stem if p.suffix == ".gguf" else p.name)
    base = base or path.replace("/", "_")
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def _rollouts(
    model, tok, prompt_ids, *, n, params, batch_size, seed, stop_ids, step: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[Any]:  # fmt: skip
    """n samples per prompt in batches, seeded by `chunk_seed(seed, step, first prompt)` like training;
    `on_batch(prompts_done)` after each batch, for the progress bar."""
    from opd.generation.rollout import HFGenerator, chunk_seed

    gen = HFGenerator(model, pad_id=tok.pad_token_id, stop_ids=stop_ids)
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompt_ids))))
        out.append(
            gen.generate([list(prompt_ids[i]) for i in idx], params, n, chunk_seed(seed, step, idx[0]), idx)
        )
        if on_batch is not None:
            on_batch(len(idx))
    return out


def _texts(roll, tok, stop_ids) -> list[str]:
    out = []
    for row in range(len(roll)):
        ids = [t for t in roll.response_ids[row][roll.response_mask[row]].tolist() if t not in stop_ids]
        out.append(tok.decode(ids, skip_special_tokens=True))
    return out


def run_doctor(
    cfg: DoctorConfig,
    *,
    progress: Callable[[str, float], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure everything, decide a verdict per teacher, and return the JSON-ready result.

    `progress(label, fraction_done)` is called as work completes (the CLI turns it into a bar with a
    time estimate); `log` gets one-line notes. Nothing is written here; `write_doctor_report` does that.
    """
    from opd.data import load_prompts, validate_template
    from opd.device import host, resolve_device
    from opd.diagnostics import finalize, merge_sums
    from opd.evaluation.eval import auroc, prepare_prompts
    from opd.evaluation.verify import get_verifier, safe_verify
    from opd.generation.rollout import HFGenerator, SamplingParams
    from opd.generation.row_scoring import Comparison, score_rollout, scoring_head
    from opd.generation.sampling import stop_ids_for
    from opd.models.loading import (
        check_tokenizers,
        freeze_teacher,
        load_model,
        load_tokenizer,
        prepare_tokenizer,
        shared_vocab_size,
    )

    say = log or (lambda s: None)
    tick = progress or (lambda label, frac: None)
    if not cfg.student:
        raise ConfigError("doctor: no student; pass --student PATH")
    if not cfg.teachers:
        raise ConfigError("doctor: no teacher; pass --teacher PATH (repeatable)")
    if not cfg.prompts:
        raise ConfigError("doctor: no prompts; pass --prompts FILE (JSONL/Parquet/CSV)")
    for t in cfg.templates:
        validate_template(t)
    device = resolve_device(cfg.device)  # before any loading: `cuda` on a CPU machine fails here
    t0 = time.perf_counter()
    records = load_prompts(
        cfg.prompts,
        prompt_field=cfg.prompt_field,
        messages_field=cfg.messages_field,
        answer_field=cfg.answer_field,
    )[: cfg.n_prompts]
    has_answers = all(r.answer is not None and str(r.answer).strip() for r in records)
    if not has_answers:
        say("some prompts have no answer: accuracy, novelty, continuation and AUROC are skipped")
    verifier = get_verifier(cfg.verifier) if has_answers else None

    tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    prepare_tokenizer(tok)
    taken: set[str] = set()
    names = [_name_of(p, taken) for p in cfg.teachers]
    for path in cfg.teachers:
        t_tok = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
        prepare_tokenizer(t_tok)
        try:
            check_tokenizers(tok, t_tok)
        except OpdError as exc:
            raise type(exc)(f"teacher {path} vs student {cfg.student}: {exc}") from None
    student = load_model(
        cfg.student, dtype=cfg.student_dtype, trust_remote_code=cfg.trust_remote_code, device=device
    )
    teachers = {
        name: freeze_teacher(
            load_model(path, dtype=cfg.teacher_dtype, trust_remote_code=cfg.trust_remote_code, device=device)
        )
        for name, path in zip(names, cfg.teachers, strict=True)
    }
    # Checked before any sampling, so a model whose head cannot be projected by hand fails in seconds.
    heads = [scoring_head(student, f"student {cfg.student}")] + [
        scoring_head(teachers[name], f"teacher {path}")
        for name, path in zip(names, cfg.teachers, strict=True)
    ]
    pair_idx = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    pair_names = [(names[i], names[j]) for i, j in pair_idx]
    comparisons = [  # heads[0] is the student, heads[1 + i] teacher names[i]
        Comparison(0, 1 + i, position_bins=cfg.position_bins, reward=True) for i in range(len(names))
    ] + [Comparison(1 + i, 1 + j) for i, j in pair_idx]
    vocab = min(shared_vocab_size(student, t, tok) for t in teachers.values())
    stops = stop_ids_for(tok, student)
    params = SamplingParams(
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens
    )
    say(f"models loaded on {device} in {time.perf_counter() - t0:.1f}s (shared vocabulary {vocab})")

    # Work units, for a progress fraction that tracks time roughly: generated rows and scored rows.
    n_rows = len(records) * cfg.samples
    n_t = len(teachers)
    cont_rows = min(cfg.continuation_rollouts, n_rows) * len(cfg.depths) * n_t if has_answers else 0
    teacher_rows = len(records) * cfg.teacher_samples * n_t if has_answers else 0
    per_template = n_rows * (1 + 0.3 * (1 + n_t)) + teacher_rows
    total_units = per_template * len(cfg.templates) + cont_rows
    done = 0.0

    def advance(units: float, label: str) -> None:
        nonlocal done
        done += units
        tick(label, min(1.0, done / max(total_units, 1.0)))

    result: dict[str, Any] = {"templates": {}, "teachers": {}, "pairs": {}}
    reports = {name: TeacherReport(name, path) for name, path in zip(names, cfg.teachers, strict=True)}
    first_rolls: list[Any] = []
    first_correct: list[bool] = []
    for ti, template in enumerate(cfg.templates):
        _, prompt_ids = prepare_prompts(records, tok, template=template, system_prompt=cfg.system_prompt)
        rolls = _rollouts(
            student, tok, prompt_ids, n=cfg.samples, params=params, batch_size=cfg.batch_size, seed=cfg.seed,
            stop_ids=stops, step=ti,
            on_batch=lambda done, t=template: advance(done * cfg.samples, f"{t}: student rollouts"),
        )  # fmt: skip
        # grade
        correct: list[bool] = []
        by_problem_s: list[list[bool]] = [[] for _ in records]
        lengths: list[int] = []
        for roll in rolls:
            for row, text in enumerate(_texts(roll, tok, stops)):
                pi = roll.prompt_index[row]
                ok = bool(safe_verify(verifier, text, str(records[pi].answer)).correct) if verifier else False
                correct.append(ok)
                by_problem_s[pi].append(ok)
            lengths += roll.lengths.tolist()  # one host copy per batch, not one sync per row
        # score: the student vs every teacher, with position bins and rewards, then every teacher pair
        sums: dict[str, dict[str, torch.Tensor]] = {n: {} for n in teachers}
        pair_sums: dict[tuple[str, str], dict[str, torch.Tensor]] = {p: {} for p in pair_names}
        rewards: dict[str, list[float]] = {n: [] for n in teachers}
        for roll in rolls:
            for s in range(0, len(roll), cfg.score_batch):
                mb = roll.select(slice(s, s + cfg.score_batch))
                scores = score_rollout(
                    heads, mb, comparisons, k=cfg.k, vocab_size=vocab, bin_len=cfg.max_new_tokens
                )
                for name, sc in zip(names, scores[: len(names)], strict=True):
                    sums[name] = merge_sums(sums[name], sc.sums)
                    assert sc.reward is not None
                    rewards[name] += host(sc.reward).tolist()
                for pair, sc in zip(pair_names, scores[len(names) :], strict=True):
                    pair_sums[pair] = merge_sums(pair_sums[pair], sc.sums)
                advance(len(mb) * 0.3 * (1 + n_t), f"{template}: scoring")
        tmpl: dict[str, Any] = {
            "student_rollouts": len(correct),
            "mean_length": sum(lengths) / max(len(lengths), 1),
            "truncation_rate": sum(float(r.truncated.float().sum()) for r in rolls) / max(len(correct), 1),
        }
        if has_answers:
            tmpl["student_acc"] = sum(correct) / max(len(correct), 1)
        for name, teacher in teachers.items():
            m = finalize(sums[name])
            m["reward_auroc"] = auroc(rewards[name], correct) if has_answers else math.nan
            if has_answers and cfg.teacher_samples > 0:
                t_rolls = _rollouts(teacher, tok, prompt_ids, n=cfg.teacher_samples, params=params,
                                    batch_size=cfg.batch_size, seed=cfg.seed + 1000 + ti, stop_ids=stops)  # fmt: skip
                by_problem_t: list[list[bool]] = [[] for _ in records]
                for roll in t_rolls:
                    for row, text in enumerate(_texts(roll, tok, stops)):
                        pi = roll.prompt_index[row]
                        by_problem_t[pi].append(
                            bool(safe_verify(verifier, text, str(records[pi].answer)).correct)
                        )
                advance(len(records) * cfg.teacher_samples, f"{template}: teacher {name} samples")
                m.update(novelty_stats(by_problem_s, by_problem_t))
                n_t = sum(len(r) for r in t_rolls)
                m["teacher_truncation_rate"] = sum(float(r.truncated.float().sum()) for r in t_rolls) / max(
                    n_t, 1
                )
            elif has_answers:
                m["student_acc"] = tmpl["student_acc"]
            reports[name].by_template[template] = m
        for (a, b), ps in pair_sums.items():
            d = finalize(ps)
            result["pairs"].setdefault(template, {})[f"{a}|{b}"] = {
                key: d[key]
                for key in (
                    "overlap_ratio",
                    "reverse_kl",
                    "forward_kl",
                    "overlap_mass_student",
                    "overlap_mass_teacher",
                    "entropy_gap",
                )
                if key in d  # fmt: skip
            }
        result["templates"][template] = tmpl
        if ti == 0:
            first_rolls, first_correct = rolls, correct

    # Which template: the one with the highest mean overlap ratio over teachers (the paper's recipe B:
    # the teacher-aligned template raises overlap); ties keep the listed order.
    def mean_overlap(t: str) -> float:
        return sum(reports[n].by_template[t].get("overlap_ratio", 0.0) for n in names) / len(names)

    best = max(cfg.templates, key=mean_overlap)
    result["recommended_template"] = best

    # Continuation advantage (on the first template's rollouts: depth is about the student's own states).
    if has_answers and cfg.continuation_rollouts > 0:
        rows = [(roll, r) for roll in first_rolls for r in range(len(roll))]
        row_len = [n for roll in first_rolls for n in roll.lengths.tolist()]  # on the host, once
        flat_correct = first_correct
        order = sorted(range(len(rows)), key=lambda i: -row_len[i])  # longest first
        chosen = sorted(order[: cfg.continuation_rollouts])
        for name, teacher in teachers.items():
            gen = HFGenerator(teacher, pad_id=tok.pad_token_id, stop_ids=stops)
            for depth in cfg.depths:
                prompts, base, idx = [], [], []
                for i in chosen:
                    roll, r = rows[i]
                    n_tok = row_len[i]
                    (cut,) = continuation_prefixes([n_tok], depth)
                    if cut is None:
                        continue
                    p_ids = roll.prompt_ids[r][roll.prompt_mask[r]].tolist()
                    prefix = roll.response_ids[r][:cut].tolist()
                    prompts.append(p_ids + prefix)
                    base.append((prefix, roll.prompt_index[r], max(1, cfg.max_new_tokens - cut)))
                    idx.append(i)
                ok_t: list[bool] = []
                for start in range(0, len(prompts), cfg.batch_size):
                    chunk = list(range(start, min(start + cfg.batch_size, len(prompts))))
                    budget = max(base[j][2] for j in chunk)
                    roll = gen.generate([prompts[j] for j in chunk],
                                        SamplingParams(cfg.temperature, cfg.top_p, 0, budget), 1,
                                        cfg.seed + 7 + start, chunk)  # fmt: skip
                    for row, j in enumerate(chunk):
                        prefix, pi, own_budget = base[j]
                        cont = roll.response_ids[row][roll.response_mask[row]].tolist()[:own_budget]
                        text = tok.decode(
                            [t for t in prefix + cont if t not in stops], skip_special_tokens=True
                        )
                        ok_t.append(bool(safe_verify(verifier, text, str(records[pi].answer)).correct))
                acc_s = sum(flat_correct[i] for i in idx) / len(idx) if idx else math.nan
                acc_t = sum(ok_t) / len(ok_t) if ok_t else math.nan
                key = f"{depth:g}"
                for tmpl_name in cfg.templates[:1]:
                    m = reports[name].by_template[tmpl_name]
                    m[f"continuation_teacher_acc@{key}"] = acc_t
                    m[f"continuation_student_acc@{key}"] = acc_s
                    m[f"continuation_advantage@{key}"] = acc_t - acc_s if idx else math.nan
                    m[f"continuation_n@{key}"] = float(len(idx))
                advance(len(chosen), f"continuation @ {key}: {name}")
        if cfg.templates[0] != best:
            # the continuation numbers belong to the first template; show them with the best one too
            for name in names:
                src = reports[name].by_template[cfg.templates[0]]
                reports[name].by_template[best].update(
                    {k: v for k, v in src.items() if k.startswith("continuation_")}
                )

    th = cfg.thresholds
    for name in names:
        reports[name].verdict = verdict(reports[name].by_template[best], th)
        result["teachers"][name] = {
            "path": reports[name].path,
            "by_template": reports[name].by_template,
            "verdict": reports[name].verdict.to_json(),
        }
    flags = []
    for template, info in result["templates"].items():
        worst = max([info["truncation_rate"]] + [reports[n].by_template[template].get("teacher_truncation_rate", 0.0)
                                                  for n in names])  # fmt: skip
        if has_answers and worst > th.max_truncation:
            flags.append(f"template {template}: {worst:.0%} of the rollouts hit the {cfg.max_new_tokens}-token budget "
                         "(no stop token), so accuracies, novelty and continuation advantage there are unreliable; "
                         "raise --max-new-tokens or ask for shorter answers")  # fmt: skip
    for key, d in result["pairs"].get(best, {}).items():
        a, b = key.split("|")
        kl = max(d.get("reverse_kl", math.inf), d.get("forward_kl", math.inf))
        if d.get("overlap_ratio", 0.0) >= th.indistinguishable_overlap and kl <= th.indistinguishable_kl:
            flags.append(f"{a} and {b} are indistinguishable at the student's states (overlap ratio "
                         f"{d['overlap_ratio']:.3f}, KL {kl:.4f}): they give the student nearly the same signal")  # fmt: skip
    result["flags"] = flags
    for name in names:
        notes = [f for f in flags if f.startswith(f"template {best}:")]
        result["teachers"][name]["verdict"]["reliable"] = not notes
        if notes:
            result["teachers"][name]["verdict"]["reasons"].append("caution: " + notes[0])
    result["config"] = cfg.model_dump()
    result["device"] = str(device)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["k"] = cfg.k
    result["n_prompts"] = len(records)
    tick("done", 1.0)
    return result
