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
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from opd.config import (
    VERIFIER_HELP,
    AnswerColumn,
    ChatTemplateKwargs,
    MessagesColumn,
    PromptColumn,
    SystemPrompt,
    TrustRemoteCode,
)
from opd.data import option_names, prepare_prompts, prompt_columns
from opd.errors import ConfigError, TokenizerMismatchError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from opd.data import PromptRecord
    from opd.evaluation.verify import Verifier
    from opd.generation.rollout import HFGenerator, Rollout, SamplingParams
    from opd.generation.row_scoring import ScoringHead
    from opd.models.loading import PairTokenizers

__all__ = [
    "DOCTOR_OPTIONS",
    "DoctorConfig",
    "DoctorThresholds",
    "TeacherReport",
    "DoctorVerdict",
    "UNREADABLE",
    "answer_readability",
    "continuation_prefixes",
    "novelty_stats",
    "run_doctor",
    "sample_size_caution",
    "verdict",
]

# How `opd doctor` spells the prompt settings that prompt-file and template errors name: every DoctorConfig
# field is a `--field VALUE` option (its --help writes them with underscores: --system_prompt).
DOCTOR_OPTIONS = option_names("--")


class DoctorThresholds(BaseModel):
    """Where the verdict rules draw their lines (see `verdict`); set on the lab world, documented in
    docs/guide.md (the doctor section) and printed in every report."""

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
    min_prompts: int = Field(
        10, ge=1, description="prompts below which a verdict is marked noisy (not withheld): with fewer than "
        "1 / min_novel_share problems, one problem moves the teacher-only share across its line",
    )  # fmt: skip


class DoctorConfig(BaseModel):
    """Everything `opd doctor` takes; a YAML file (`--config`) and the options set the same fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    student: str = Field("", description="student model: dir, .gguf, hub id or lab:NAME")
    teachers: list[str] = Field(default_factory=list, description="one or more teachers (same forms)")
    prompts: str = Field("", description="problems (JSONL/Parquet/CSV); an `answer` field enables accuracy")
    prompt_field: PromptColumn = "prompt"
    messages_field: MessagesColumn = "messages"
    answer_field: AnswerColumn = "answer"
    n_prompts: int = Field(16, ge=1, description="how many prompts (the first N of the file)")
    samples: int = Field(4, ge=1, description="student rollouts per prompt")
    teacher_samples: int = Field(2, ge=0, description="teacher samples per prompt for its accuracy (0: skip)")
    templates: list[str] = Field(
        default_factory=lambda: ["chat"], description="prompt templates to compare; the first is the default"
    )
    system_prompt: SystemPrompt = None
    chat_template_kwargs: ChatTemplateKwargs
    max_prompt_tokens: int = Field(4096, ge=1, description="the most tokens a rendered prompt may have")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of all rollouts")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling, 0 < p <= 1; 1 = off")
    max_new_tokens: int = Field(256, ge=1, description="response budget of every rollout, in tokens")
    k: int = Field(16, ge=1, description="top-k of the overlap metrics (the paper's 16; lab worlds: 4)")
    position_bins: int = Field(4, ge=0, description="response-position bins of the metrics")
    depths: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        description="continuation depths, as fractions of each student rollout's length",
    )
    continuation_rollouts: int = Field(16, ge=0, description="student rollouts continued per depth (0: skip)")
    verifier: str = Field("math", description=VERIFIER_HELP)
    batch_size: int = Field(8, ge=1, description="prompts per generate call")
    score_batch: int = Field(
        4, ge=1, description="rollouts per scoring forward (bounds its activations and B x T x H hidden "
        "states; logits are projected a bounded chunk of rows at a time)",
    )  # fmt: skip
    student_dtype: str = Field(
        "float32", description="the student's dtype: float32 | bfloat16 | float16 | auto"
    )
    teacher_dtype: str = Field(
        "float32", description="the teachers' dtype: float32 | bfloat16 | float16 | auto; bfloat16 halves a big teacher's memory",
    )  # fmt: skip
    device: str = Field(
        "auto", description="where the student and teachers run: auto (this process's GPU when CUDA is "
        "available, else cpu) | cpu | cuda | cuda:N",
    )  # fmt: skip
    trust_remote_code: TrustRemoteCode = False
    seed: int = Field(0, description="sampling seed of the rollouts")
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

    code: str  # identical | incompatible | no_gain | weak_teacher | go | compatible_unknown_novelty | unreadable_answers
    headline: str
    reasons: list[str]
    recipe: str
    withheld: bool = False  # the novelty/accuracy verdict was withheld: most answers could not be read

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "headline": self.headline, "reasons": self.reasons, "recipe": self.recipe,
                "withheld": self.withheld}  # fmt: skip


UNREADABLE = "unreadable_answers"


def verdict(
    m: dict[str, float],
    th: DoctorThresholds,
    *,
    unreadable: str | None = None,
    use_verifier: str = "math-flexible",
) -> DoctorVerdict:
    """Ordered rules on one teacher's metrics (at the chosen template).

    1. identical: reverse KL ~ 0, OPD's signal is empty.
    2. incompatible thinking pattern: the shared top-k set carries too little of the teacher's mass, or
       the overlap-token advantage is very negative (the paper's failing pairs; the lab's pattern-B
       teacher). Cold start (recipe A) first, or another teacher.
    3. without answers, novelty is unknown.
       With answers the verifier mostly cannot read (`unreadable` says whose; see `answer_readability`),
       every accuracy is ~0 whatever the models do: the novelty verdict is withheld, and the recipe
       names the verifier to rerun with (`use_verifier`).
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
    if unreadable:
        return DoctorVerdict(UNREADABLE, "compatible; no novelty verdict: most answers cannot be read by the verifier",
                             [*reasons, unreadable], f"rerun with --verifier {use_verifier} (or a template whose "
                             "answers the verifier reads), then follow that verdict", withheld=True)  # fmt: skip
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


_ACCURACY_VERDICTS = ("weak_teacher", "no_gain", "go")  # the verdicts decided on the accuracy gap


def sample_size_caution(
    m: dict[str, float], th: DoctorThresholds, *, code: str, prompts: int, rollouts: int, file_prompts: int
) -> str | None:
    """Why one teacher's verdict rests on too small a sample to be trusted, naming the option that
    raises it, or None. The verdict stands (it is still the best reading of what was measured).

    Two tests on numbers the doctor has. Fewer prompts than `th.min_prompts`: each problem is then a
    large share of every number, the teacher-only share moves by 1/N per problem, and the compatibility
    means describe those few problems more than the prompt set. For the verdicts decided on the accuracy
    gap, its standard error (`novelty_stats`) above `th.min_accuracy_gap`, the line the verdict draws:
    noise alone can then move the gap across it. Not for ``identical``: a reverse KL of ~0 is no sampling
    accident. `file_prompts`: how many prompts the file has, so the advice can say to add problems when
    --n-prompts is already past them.
    """
    if code == "identical":
        return None
    why = []
    need = th.min_prompts if prompts < th.min_prompts else prompts
    if prompts < th.min_prompts:
        why.append(f"fewer than the {th.min_prompts} prompts a stable verdict needs (--thresholds.min_prompts)")  # fmt: skip
    se = m.get("accuracy_gap_se", math.nan)
    if code in _ACCURACY_VERDICTS and math.isfinite(se) and se > th.min_accuracy_gap:
        why.append(f"the accuracy gap's standard error {se:.3f} is above the {th.min_accuracy_gap:g} gap the verdict "
                   "draws its line at")  # fmt: skip
        need = max(need, math.ceil(prompts * (se / th.min_accuracy_gap) ** 2))  # the s.e. falls as 1/sqrt(N)
    if not why:
        return None
    tokens = int(m.get("n_tokens", 0))
    fix = (f"rerun with --n-prompts {need} or more" if file_prompts >= need else
           f"add problems to the prompt file (it has {file_prompts}; about {need} are needed), then rerun with "
           f"--n-prompts {need}")  # fmt: skip
    return (f"small sample: this verdict rests on {prompts} prompt{'s' if prompts != 1 else ''} ({rollouts} student "
            f"rollouts, {tokens} response tokens) and is noisy: {'; '.join(why)}; {fix}")  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The run: `run_doctor` calls the phases below in order; each takes the shared `_Run` state.


@dataclass
class TeacherReport:
    """One teacher's metrics per template and its verdict, filled in phase by phase."""

    name: str
    path: str
    by_template: dict[str, dict[str, float]] = field(default_factory=dict)
    verdict: DoctorVerdict | None = None


@dataclass
class _Inputs:
    """The prompts and how to grade them, together because accuracy, novelty, continuation and AUROC
    are all measured only when every prompt has an answer (then `verifier` is set)."""

    records: list[PromptRecord]
    has_answers: bool
    verifier: Verifier | None
    bad_references: list[PromptRecord] = field(default_factory=list)  # answers the verifier cannot read
    file_prompts: int = 0  # records in the whole file (`records` is its first n_prompts)


@dataclass
class _Models:
    """The student and teachers with what is derived from them once (heads probed, shared vocabulary,
    stop ids), so the sampling and scoring phases never reload or re-check a model."""

    tok: Any
    student: PreTrainedModel
    teachers: dict[str, PreTrainedModel]  # by display name, in the order of `cfg.teachers`
    paths: dict[str, str]  # display name -> the spec it was loaded from
    heads: list[ScoringHead]  # heads[0] is the student, heads[1 + i] the i-th teacher
    vocab: int
    stops: list[int]
    params: SamplingParams


class _Progress:
    """Work units done over the total, so the bar's fraction tracks time roughly: a generated row counts
    1, a scored row 0.3 per model scoring it."""

    def __init__(self, tick: Callable[[str, float], None], total: float) -> None:
        self.tick = tick
        self.total = total
        self.done = 0.0

    def advance(self, units: float, label: str) -> None:
        self.done += units
        self.tick(label, min(1.0, self.done / max(self.total, 1.0)))


@dataclass
class _Run:
    """What every phase reads, passed as one value so the phases keep short signatures."""

    cfg: DoctorConfig
    inputs: _Inputs
    models: _Models
    bar: _Progress


@dataclass
class _StudentRollouts:
    """The student's rollouts at one template with their grades; the first template's are kept for the
    continuation phase, which asks about the student's own states."""

    rolls: list[Rollout]
    correct: list[bool]  # one per rollout row, in row order
    by_problem: list[list[bool]]  # per prompt, the grades of its samples
    lengths: list[int]
    unparsed: int = 0  # rows with no final answer the verifier can read


@dataclass
class _Scores:
    """One template's merged diagnostic sums and per-row rewards, finalized per teacher and per pair."""

    sums: dict[str, dict[str, torch.Tensor]]
    pair_sums: dict[tuple[str, str], dict[str, torch.Tensor]]
    rewards: dict[str, list[float]]


@dataclass
class _TemplateResult:
    """Everything one template measured, for `run_doctor` to file under that template."""

    student: _StudentRollouts
    stats: dict[str, Any]  # result["templates"][template]
    teachers: dict[str, dict[str, float]]  # each teacher's metrics at this template
    pairs: dict[str, dict[str, float]]  # "a|b" -> teacher-vs-teacher metrics


@dataclass
class _Prefix:
    """A student rollout cut at a depth: what the teacher continues, and what grading needs back."""

    prompt: list[int]  # prompt ids then the prefix
    prefix: list[int]
    prompt_index: int
    budget: int  # new tokens left after the prefix
    row: int  # index into the first template's rollout rows


_PAIR_KEYS = ("overlap_ratio", "reverse_kl", "forward_kl", "overlap_mass_student", "overlap_mass_teacher",
              "entropy_gap")  # fmt: skip


def _name_of(path: str, taken: set[str]) -> str:
    """A short display name per teacher (report columns, pair keys), unique even for equal basenames."""
    p = Path(path)
    base = path.split(":", 1)[1] if path.startswith("lab:") else (p.stem if p.suffix == ".gguf" else p.name)
    base = base or path.replace("/", "_")
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def _rollouts(
    model: PreTrainedModel, tok: Any, prompt_ids: Sequence[Sequence[int]], *, n: int, params: SamplingParams,
    batch_size: int, seed: int, stop_ids: list[int], step: int = 0, on_batch: Callable[[int], None] | None = None,
) -> list[Rollout]:  # fmt: skip
    """n samples per prompt in batches, seeded by `chunk_seed(seed, step, first prompt)` like training;
    `on_batch(prompts_done)` after each batch, for the progress bar."""
    from opd.generation.rollout import HFGenerator, chunk_seed, tokenizer_vocab_size

    gen = HFGenerator(model, pad_id=tok.pad_token_id, stop_ids=stop_ids, vocab_size=tokenizer_vocab_size(tok))
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompt_ids))))
        out.append(
            gen.generate([list(prompt_ids[i]) for i in idx], params, n, chunk_seed(seed, step, idx[0]), idx)
        )
        if on_batch is not None:
            on_batch(len(idx))
    return out


def _texts(roll: Rollout, tok: Any, stop_ids: list[int]) -> list[str]:
    """Each row's response as the verifier must see it: padding and stop tokens removed."""
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
    from opd.device import resolve_device
    from opd.models.loading import apply_model_defaults

    say = log or (lambda s: None)
    tick = progress or (lambda label, frac: None)
    _check_config(cfg)
    # lab:NAME models grade with the lab's verifier and render with its template unless told otherwise
    cfg = apply_model_defaults(cfg, [cfg.student, *cfg.teachers], {"verifier": "verifier", "template": "templates"},
                               say)  # fmt: skip
    _check_config(cfg)
    device = resolve_device(cfg.device)  # before any loading: `cuda` on a CPU machine fails here
    t0 = time.perf_counter()
    inputs = _load_inputs(cfg, say)
    models = _load_models(cfg, device)
    say(f"models loaded on {device} in {time.perf_counter() - t0:.1f}s (shared vocabulary {models.vocab})")
    total = _work_units(cfg, len(inputs.records), len(models.teachers), inputs.has_answers)
    run = _Run(cfg, inputs, models, _Progress(tick, total))

    result: dict[str, Any] = {"templates": {}, "teachers": {}, "pairs": {}}
    reports = {name: TeacherReport(name, path) for name, path in models.paths.items()}
    first: _StudentRollouts | None = None
    for ti, template in enumerate(cfg.templates):
        measured = _measure_template(run, ti, template)
        for name, metrics in measured.teachers.items():
            reports[name].by_template[template] = metrics
        if measured.pairs:
            result["pairs"][template] = measured.pairs
        result["templates"][template] = measured.stats
        if ti == 0:
            first = measured.student
    best = _recommend_template(cfg, reports)
    result["recommended_template"] = best
    if inputs.has_answers and cfg.continuation_rollouts > 0 and first is not None:
        _continuation_advantage(run, first, reports, best)

    result["answers"] = answer_readability(run, result, reports, best, say)
    result["teachers"].update(_verdicts(cfg, reports, best, result["answers"]))
    result["flags"] = _flags(run, reports, result, best)
    _mark_reliability(result, best)
    result["sample"] = _mark_sample_size(run, result, best)
    result["config"] = cfg.model_dump()
    result["device"] = str(device)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["k"] = cfg.k
    result["n_prompts"] = len(inputs.records)
    tick("done", 1.0)
    return result


# Loading


def _check_config(cfg: DoctorConfig) -> None:
    """Missing inputs and unknown templates fail before anything is loaded, each naming its option."""
    from opd.data import validate_template

    if not cfg.student:
        raise ConfigError("doctor: no student; pass --student PATH")
    if not cfg.teachers:
        raise ConfigError("doctor: no teacher; pass --teacher PATH (repeatable)")
    if not cfg.prompts:
        raise ConfigError("doctor: no prompts; pass --prompts FILE (JSONL/Parquet/CSV)")
    for t in cfg.templates:
        validate_template(t)


def _load_inputs(cfg: DoctorConfig, say: Callable[[str], None]) -> _Inputs:
    """The first `n_prompts` problems. One prompt without an answer turns every accuracy-based number
    off (with a note), since accuracies over a subset would not compare across teachers and templates."""
    from opd.data import load_prompts
    from opd.evaluation.verify import (
        get_verifier,
        mostly_unparsed,
        reference_parses,
        unparsed_references_message,
    )

    every = load_prompts(cfg.prompts, **prompt_columns(cfg), options=DOCTOR_OPTIONS)
    records = every[: cfg.n_prompts]
    has_answers = all(r.answer is not None and str(r.answer).strip() for r in records)
    if not has_answers:
        say("some prompts have no answer: accuracy, novelty, continuation and AUROC are skipped")
        return _Inputs(records, has_answers, None, file_prompts=len(every))
    verifier = get_verifier(cfg.verifier)
    bad = [r for r in records if reference_parses(verifier, str(r.answer)) is False]
    if mostly_unparsed(len(bad), len(records)):  # before any model is loaded
        say(
            "warning: "
            + unparsed_references_message(len(bad), len(records), verifier, bad[0].source, str(bad[0].answer))
        )
    return _Inputs(records, has_answers, verifier, bad, file_prompts=len(every))


def _load_tokenizers(cfg: DoctorConfig) -> PairTokenizers:
    """Every teacher's tokenizer checked against the student's before any weights are read, so a
    mismatch fails in seconds; the student's is loaded once. With several teachers a bare mismatch
    would not say which one, so the error names both."""
    from opd.models.loading import check_tokenizers, load_pair_tokenizers, load_tokenizer, prepare_tokenizer

    first: PairTokenizers | None = None
    for path in cfg.teachers:
        try:
            if first is None:
                first = load_pair_tokenizers(cfg.student, path, student_trust_remote_code=cfg.trust_remote_code,
                                             teacher_trust_remote_code=cfg.trust_remote_code)  # fmt: skip
            else:  # the other teachers against the same student tokenizer
                t_tok = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
                prepare_tokenizer(t_tok)
                check_tokenizers(first.student, t_tok)
        except TokenizerMismatchError as exc:
            raise type(exc)(f"teacher {path} vs student {cfg.student}: {exc}") from None
    assert first is not None  # `_check_config` refused an empty teacher list
    return first


def _load_models(cfg: DoctorConfig, device: torch.device) -> _Models:
    """Tokenizers first (seconds), then the student once however many teachers there are, then every
    head probed before any sampling, so a model the scorer cannot project fails before minutes of
    generation rather than after."""
    from opd.generation.rollout import SamplingParams
    from opd.generation.row_scoring import scoring_head
    from opd.generation.sampling import stop_ids_for
    from opd.models.loading import freeze_teacher, load_model, load_pair, shared_vocab_size

    taken: set[str] = set()
    paths = {_name_of(p, taken): p for p in cfg.teachers}
    toks = _load_tokenizers(cfg)
    pair = load_pair(
        cfg.student, cfg.teachers[0], student_dtype=cfg.student_dtype, teacher_dtype=cfg.teacher_dtype,
        student_trust_remote_code=cfg.trust_remote_code, teacher_trust_remote_code=cfg.trust_remote_code,
        device=device, tokenizers=toks,
    )  # fmt: skip
    assert pair.teacher is not None  # load_pair loads the teacher's weights unless told not to
    rest = [
        freeze_teacher(load_model(p, dtype=cfg.teacher_dtype, trust_remote_code=cfg.trust_remote_code, device=device))
        for p in cfg.teachers[1:]
    ]  # fmt: skip
    teachers = dict(zip(paths, [pair.teacher, *rest], strict=True))
    # Checked before any sampling, so a model whose head cannot be projected by hand fails in seconds.
    heads = [scoring_head(pair.student, f"student {cfg.student}")] + [
        scoring_head(teachers[name], f"teacher {path}") for name, path in paths.items()
    ]
    tok = toks.student
    vocab = min([pair.vocab_size] + [shared_vocab_size(pair.student, t, tok) for t in rest])
    params = SamplingParams(
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens
    )
    return _Models(tok, pair.student, teachers, paths, heads, vocab, stop_ids_for(tok, pair.student), params)


def _work_units(cfg: DoctorConfig, n_records: int, n_teachers: int, has_answers: bool) -> float:
    """The total the progress fraction divides by, counted in the units `_Progress` documents."""
    n_rows = n_records * cfg.samples
    cont_rows = min(cfg.continuation_rollouts, n_rows) * len(cfg.depths) * n_teachers if has_answers else 0
    teacher_rows = n_records * cfg.teacher_samples * n_teachers if has_answers else 0
    per_template = n_rows * (1 + 0.3 * (1 + n_teachers)) + teacher_rows
    return per_template * len(cfg.templates) + cont_rows


# One template: sample, score, measure


def _measure_template(run: _Run, ti: int, template: str) -> _TemplateResult:
    """Everything that depends on how the prompt is rendered, so templates compare on equal terms:
    the student's rollouts, their scores by every model, and each teacher's metrics and accuracy."""
    cfg = run.cfg
    _, prompt_ids = prepare_prompts(
        run.inputs.records, run.models.tok, template=template, chat_template_kwargs=cfg.chat_template_kwargs,
        system_prompt=cfg.system_prompt, max_prompt_tokens=cfg.max_prompt_tokens, options=DOCTOR_OPTIONS,
    )  # fmt: skip
    student = _sample_student(run, prompt_ids, ti, template)
    scores = _score(run, student.rolls, template)
    stats = _template_stats(run.inputs, student)
    teachers = {
        name: _teacher_metrics(run, name, scores, student, stats, prompt_ids, ti, template)
        for name in run.models.teachers
    }
    return _TemplateResult(student, stats, teachers, _pair_metrics(scores))


def _grade(run: _Run, roll: Rollout) -> list[tuple[int, bool, bool]]:
    """(prompt index, correct, unreadable) per row; without a verifier every row counts as wrong (and
    readable), so the student's row count stays right when answers are missing. Unreadable: no final
    answer the verifier can read (`opd.evaluation.verify.prediction_unparsed`)."""
    from opd.evaluation.verify import prediction_unparsed, safe_verify

    records, verifier = run.inputs.records, run.inputs.verifier
    out: list[tuple[int, bool, bool]] = []
    for row, text in enumerate(_texts(roll, run.models.tok, run.models.stops)):
        pi = roll.prompt_index[row]
        if verifier is None:
            out.append((pi, False, False))
            continue
        v = safe_verify(verifier, text, str(records[pi].answer))
        out.append((pi, bool(v.correct), prediction_unparsed(v.extracted, v.reason)))
    return out


def _sample_student(run: _Run, prompt_ids: list[list[int]], ti: int, template: str) -> _StudentRollouts:
    """The student's own rollouts are the states OPD trains on, so every number is measured on them;
    seeded by template index like training steps, so a rerun samples the same rollouts."""
    cfg = run.cfg
    rolls = _rollouts(
        run.models.student, run.models.tok, prompt_ids, n=cfg.samples, params=run.models.params,
        batch_size=cfg.batch_size, seed=cfg.seed, stop_ids=run.models.stops, step=ti,
        on_batch=lambda done: run.bar.advance(done * cfg.samples, f"{template}: student rollouts"),
    )  # fmt: skip
    out = _StudentRollouts(rolls, [], [[] for _ in run.inputs.records], [])
    for roll in rolls:
        for pi, ok, unread in _grade(run, roll):
            out.correct.append(ok)
            out.by_problem[pi].append(ok)
            out.unparsed += unread
        out.lengths += roll.lengths.tolist()  # one host copy per batch, not one sync per row
    return out


def _score(run: _Run, rolls: list[Rollout], template: str) -> _Scores:
    """The student against every teacher (with position bins and the reward AUROC needs), then every
    teacher pair (two teachers the student cannot tell apart give the same signal), a bounded batch of
    rows per forward so memory stays flat."""
    from opd.device import host
    from opd.diagnostics import merge_sums
    from opd.generation.row_scoring import Comparison, score_rollout

    cfg, names = run.cfg, list(run.models.teachers)
    pair_idx = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    pair_names = [(names[i], names[j]) for i, j in pair_idx]
    comparisons = [  # heads[0] is the student, heads[1 + i] teacher names[i]
        Comparison(0, 1 + i, position_bins=cfg.position_bins, reward=True) for i in range(len(names))
    ] + [Comparison(1 + i, 1 + j) for i, j in pair_idx]
    scores = _Scores({n: {} for n in names}, {p: {} for p in pair_names}, {n: [] for n in names})
    for roll in rolls:
        for s in range(0, len(roll), cfg.score_batch):
            mb = roll.select(slice(s, s + cfg.score_batch))
            found = score_rollout(
                run.models.heads, mb, comparisons, k=cfg.k, vocab_size=run.models.vocab, bin_len=cfg.max_new_tokens
            )  # fmt: skip
            for name, sc in zip(names, found[: len(names)], strict=True):
                scores.sums[name] = merge_sums(scores.sums[name], sc.sums)
                assert sc.reward is not None
                scores.rewards[name] += host(sc.reward).tolist()
            for pair, sc in zip(pair_names, found[len(names) :], strict=True):
                scores.pair_sums[pair] = merge_sums(scores.pair_sums[pair], sc.sums)
            run.bar.advance(len(mb) * 0.3 * (1 + len(names)), f"{template}: scoring")
    return scores


def _template_stats(inputs: _Inputs, student: _StudentRollouts) -> dict[str, Any]:
    """How the student behaves under this template (length, truncation, accuracy): the report's
    template table, and the truncation rate decides whether accuracies there can be trusted."""
    n = max(len(student.correct), 1)
    stats: dict[str, Any] = {
        "student_rollouts": len(student.correct),
        "mean_length": sum(student.lengths) / max(len(student.lengths), 1),
        "truncation_rate": sum(float(r.truncated.float().sum()) for r in student.rolls) / n,
    }
    if inputs.has_answers:
        stats["student_acc"] = sum(student.correct) / n
        stats["student_unparsed"] = student.unparsed
    return stats


def _teacher_metrics(
    run: _Run, name: str, scores: _Scores, student: _StudentRollouts, stats: dict[str, Any],
    prompt_ids: list[list[int]], ti: int, template: str,
) -> dict[str, float]:  # fmt: skip
    """One teacher at one template: compatibility from the scores, reward informativeness (AUROC of its
    reward for correct vs incorrect student rollouts), and novelty when answers can be checked."""
    from opd.diagnostics import finalize
    from opd.evaluation.eval import auroc

    m = finalize(scores.sums[name])
    m["reward_auroc"] = auroc(scores.rewards[name], student.correct) if run.inputs.has_answers else math.nan
    if run.inputs.has_answers and run.cfg.teacher_samples > 0:
        m.update(_teacher_accuracy(run, name, student, prompt_ids, ti, template))
    elif run.inputs.has_answers:
        m["student_acc"] = stats["student_acc"]
    return m


def _teacher_accuracy(
    run: _Run, name: str, student: _StudentRollouts, prompt_ids: list[list[int]], ti: int, template: str
) -> dict[str, float]:
    """Novelty needs the teacher's own accuracy on the same prompts (what it solves that the student
    does not is what OPD can transfer); its truncation rate says whether those accuracies hold."""
    cfg = run.cfg
    rolls = _rollouts(run.models.teachers[name], run.models.tok, prompt_ids, n=cfg.teacher_samples,
                      params=run.models.params, batch_size=cfg.batch_size, seed=cfg.seed + 1000 + ti,
                      stop_ids=run.models.stops)  # fmt: skip
    by_problem: list[list[bool]] = [[] for _ in run.inputs.records]
    unparsed = 0
    for roll in rolls:
        for pi, ok, unread in _grade(run, roll):
            by_problem[pi].append(ok)
            unparsed += unread
    run.bar.advance(len(run.inputs.records) * cfg.teacher_samples, f"{template}: teacher {name} samples")
    out = novelty_stats(student.by_problem, by_problem)
    n_rows = sum(len(r) for r in rolls)
    out["teacher_truncation_rate"] = sum(float(r.truncated.float().sum()) for r in rolls) / max(n_rows, 1)
    out["teacher_samples_graded"] = float(n_rows)
    out["teacher_unparsed"] = float(unparsed)
    return out


def _pair_metrics(scores: _Scores) -> dict[str, dict[str, float]]:
    """Teacher-vs-teacher numbers, keyed "a|b"; only the distribution-level ones, since the advantage
    and reward are about the student."""
    from opd.diagnostics import finalize

    out: dict[str, dict[str, float]] = {}
    for (a, b), sums in scores.pair_sums.items():
        d = finalize(sums)
        out[f"{a}|{b}"] = {key: d[key] for key in _PAIR_KEYS if key in d}
    return out


# Across templates: the recommendation, continuation advantage, verdicts


def _recommend_template(cfg: DoctorConfig, reports: dict[str, TeacherReport]) -> str:
    """The template with the highest mean overlap ratio over teachers (the paper's recipe B: the
    teacher-aligned template raises overlap); ties keep the listed order."""

    def mean_overlap(t: str) -> float:
        return sum(r.by_template[t].get("overlap_ratio", 0.0) for r in reports.values()) / len(reports)

    return max(cfg.templates, key=mean_overlap)


def _continuation_advantage(
    run: _Run, first: _StudentRollouts, reports: dict[str, TeacherReport], best: str
) -> None:
    """Truncate the longest student rollouts at each depth and let each teacher continue: accuracy of
    that minus the student's own says whether the teacher can take over from the student's states.
    Measured on the first template's rollouts, and shown with the recommended template too."""
    from opd.generation.rollout import HFGenerator, tokenizer_vocab_size

    cfg, models = run.cfg, run.models
    rows = [(roll, r) for roll in first.rolls for r in range(len(roll))]
    row_len = [n for roll in first.rolls for n in roll.lengths.tolist()]  # on the host, once
    order = sorted(range(len(rows)), key=lambda i: -row_len[i])  # longest first
    chosen = sorted(order[: cfg.continuation_rollouts])
    for name, teacher in models.teachers.items():
        vocab = tokenizer_vocab_size(models.tok)  # a padded teacher head's rows are never sampled
        gen = HFGenerator(teacher, pad_id=models.tok.pad_token_id, stop_ids=models.stops, vocab_size=vocab)
        m = reports[name].by_template[cfg.templates[0]]
        for depth in cfg.depths:
            prefixes = _prefixes(cfg, rows, row_len, chosen, depth)
            ok_t = _continue(run, gen, prefixes)
            acc_s = sum(first.correct[p.row] for p in prefixes) / len(prefixes) if prefixes else math.nan
            acc_t = sum(ok_t) / len(ok_t) if ok_t else math.nan
            key = f"{depth:g}"
            m[f"continuation_teacher_acc@{key}"] = acc_t
            m[f"continuation_student_acc@{key}"] = acc_s
            m[f"continuation_advantage@{key}"] = acc_t - acc_s if prefixes else math.nan
            m[f"continuation_n@{key}"] = float(len(prefixes))
            run.bar.advance(len(chosen), f"continuation @ {key}: {name}")
    if cfg.templates[0] != best:
        # the continuation numbers belong to the first template; show them with the best one too
        for report in reports.values():
            src = report.by_template[cfg.templates[0]]
            report.by_template[best].update({k: v for k, v in src.items() if k.startswith("continuation_")})


def _prefixes(
    cfg: DoctorConfig, rows: list[tuple[Rollout, int]], row_len: list[int], chosen: list[int], depth: float
) -> list[_Prefix]:
    """The chosen rows cut at `depth`, skipping those with nothing left to continue; each keeps the
    token budget the student had left, so the teacher gets no more room than the student did."""
    out: list[_Prefix] = []
    for i in chosen:
        roll, r = rows[i]
        (cut,) = continuation_prefixes([row_len[i]], depth)
        if cut is None:
            continue
        prefix = roll.response_ids[r][:cut].tolist()
        prompt = roll.prompt_ids[r][roll.prompt_mask[r]].tolist() + prefix
        out.append(_Prefix(prompt, prefix, roll.prompt_index[r], max(1, cfg.max_new_tokens - cut), i))
    return out


def _continue(run: _Run, gen: HFGenerator, prefixes: list[_Prefix]) -> list[bool]:
    """The teacher's continuation of each prefix, graded on prefix + continuation (the whole answer the
    student started); each batch generates up to its largest budget, each row is cut to its own."""
    from opd.evaluation.verify import safe_verify
    from opd.generation.rollout import SamplingParams

    cfg, tok, stops = run.cfg, run.models.tok, run.models.stops
    ok: list[bool] = []
    for start in range(0, len(prefixes), cfg.batch_size):
        chunk = list(range(start, min(start + cfg.batch_size, len(prefixes))))
        budget = max(prefixes[j].budget for j in chunk)
        roll = gen.generate([prefixes[j].prompt for j in chunk], SamplingParams(cfg.temperature, cfg.top_p, 0, budget),
                            1, cfg.seed + 7 + start, chunk)  # fmt: skip
        for row, j in enumerate(chunk):
            p = prefixes[j]
            cont = roll.response_ids[row][roll.response_mask[row]].tolist()[: p.budget]
            text = tok.decode([t for t in p.prefix + cont if t not in stops], skip_special_tokens=True)
            answer = str(run.inputs.records[p.prompt_index].answer)
            ok.append(bool(safe_verify(run.inputs.verifier, text, answer).correct))
    return ok


def answer_readability(
    run: _Run,
    result: dict[str, Any],
    reports: dict[str, TeacherReport],
    best: str,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """How many answers the verifier could read, at the recommended template (where the verdicts are
    decided): references, the student's rollouts, each teacher's samples. When half or more of the
    references, the student's or a teacher's answers are unreadable, its accuracies are ~0 whatever the
    model does, so that teacher's novelty verdict is withheld (`verdict`'s `unreadable`) and a warning
    worded as `opd eval`'s names the verifier to use: the models' own default (`lab:` models: the
    lab's) when they bring one, else ``math-flexible``. doctor.json keeps all of it under ``answers``."""
    from opd.evaluation.verify import mostly_unparsed, unparsed_responses_message, verifier_name
    from opd.models.loading import shared_model_defaults

    cfg, inputs = run.cfg, run.inputs
    if inputs.verifier is None:
        return {"checked": False, "withheld": []}
    name = verifier_name(inputs.verifier)
    own = shared_model_defaults([cfg.student, *cfg.teachers])[0].get("verifier")
    use = (
        own
        if own and own != name
        else "math-flexible"
        if name != "math-flexible"
        else "package.module:callable"
    )
    refs = {"unparsed": len(inputs.bad_references), "total": len(inputs.records)}
    student = {"unparsed": int(result["templates"][best].get("student_unparsed", 0)),
               "total": int(result["templates"][best]["student_rollouts"])}  # fmt: skip
    teachers = {
        t: {"unparsed": int(r.by_template[best].get("teacher_unparsed", 0)),
            "total": int(r.by_template[best].get("teacher_samples_graded", 0))}
        for t, r in reports.items()
    }  # fmt: skip
    why_all = []
    if mostly_unparsed(refs["unparsed"], refs["total"]):
        why_all.append(
            f"{refs['unparsed']} of {refs['total']} reference answers cannot be read by the {name} verifier"
        )
    if mostly_unparsed(student["unparsed"], student["total"]):
        why_all.append(f"{student['unparsed']} of {student['total']} student answers have no final answer the {name} "
                       "verifier can read")  # fmt: skip
        say("warning: " + unparsed_responses_message(student["unparsed"], student["total"], inputs.verifier,
                                                     whose=f"the student {cfg.student}", suggest=use))  # fmt: skip
    why: dict[str, str] = {}
    for t, c in teachers.items():
        mine = list(why_all)
        if mostly_unparsed(c["unparsed"], c["total"]):
            mine.append(f"{c['unparsed']} of {c['total']} teacher answers have no final answer the {name} verifier "
                        "can read")  # fmt: skip
            say("warning: " + unparsed_responses_message(c["unparsed"], c["total"], inputs.verifier,
                                                         whose=f"teacher {reports[t].path}", suggest=use))  # fmt: skip
        if mine:
            why[t] = ("verdict withheld: " + "; ".join(mine) + f" (template {best}), so the accuracies say nothing "
                      f"about the models; use --verifier {use}")  # fmt: skip
    return {"checked": True, "verifier": name, "template": best, "references": refs, "student": student,
            "teachers": teachers, "use_verifier": use, "withheld": sorted(why), "why": why}  # fmt: skip


def _verdicts(
    cfg: DoctorConfig, reports: dict[str, TeacherReport], best: str, answers: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Each teacher's verdict, decided at the recommended template: that is the one to train with."""
    out: dict[str, dict[str, Any]] = {}
    why = answers.get("why", {})
    for name, report in reports.items():
        report.verdict = verdict(report.by_template[best], cfg.thresholds, unreadable=why.get(name),
                                 use_verifier=answers.get("use_verifier", "math-flexible"))  # fmt: skip
        out[name] = {
            "path": report.path,
            "by_template": report.by_template,
            "verdict": report.verdict.to_json(),
        }
    # only the verdicts that got as far as novelty were withheld (identical / incompatible need no answers)
    answers["withheld"] = [n for n, r in reports.items() if r.verdict is not None and r.verdict.withheld]
    return out


def _flags(run: _Run, reports: dict[str, TeacherReport], result: dict[str, Any], best: str) -> list[str]:
    """Warnings the verdict rules do not cover: templates whose rollouts hit the token budget too often
    for accuracies to mean much, and teacher pairs that give the student nearly the same signal."""
    cfg, th = run.cfg, run.cfg.thresholds
    flags = []
    for template, info in result["templates"].items():
        worst = max([info["truncation_rate"]] + [r.by_template[template].get("teacher_truncation_rate", 0.0)
                                                  for r in reports.values()])  # fmt: skip
        if run.inputs.has_answers and worst > th.max_truncation:
            flags.append(f"template {template}: {worst:.0%} of the rollouts hit the {cfg.max_new_tokens}-token budget "
                         "(no stop token), so accuracies, novelty and continuation advantage there are unreliable; "
                         "raise --max-new-tokens or ask for shorter answers")  # fmt: skip
    for key, d in result["pairs"].get(best, {}).items():
        a, b = key.split("|")
        kl = max(d.get("reverse_kl", math.inf), d.get("forward_kl", math.inf))
        if d.get("overlap_ratio", 0.0) >= th.indistinguishable_overlap and kl <= th.indistinguishable_kl:
            flags.append(f"{a} and {b} are indistinguishable at the student's states (overlap ratio "
                         f"{d['overlap_ratio']:.3f}, KL {kl:.4f}): they give the student nearly the same signal")  # fmt: skip
    return flags


def _mark_reliability(result: dict[str, Any], best: str) -> None:
    """A verdict at a template flagged for truncation rests on unreliable accuracies: say so in it."""
    notes = [f for f in result["flags"] if f.startswith(f"template {best}:")]
    for teacher in result["teachers"].values():
        teacher["verdict"]["reliable"] = not notes
        if notes:
            teacher["verdict"]["reasons"].append("caution: " + notes[0])


def _mark_sample_size(run: _Run, result: dict[str, Any], best: str) -> dict[str, Any]:
    """Each verdict resting on too small a sample (`sample_size_caution`) says so in its reasons and as
    ``noisy`` in doctor.json; returns doctor.json's ``sample``: the counts behind the verdicts and each
    noisy teacher's caution, which the command prints as a warning and the report as a note."""
    info = result["templates"][best]
    prompts, rollouts = len(run.inputs.records), int(info["student_rollouts"])
    noisy: dict[str, str] = {}
    for name, teacher in result["teachers"].items():
        v = teacher["verdict"]
        caution = sample_size_caution(teacher["by_template"][best], run.cfg.thresholds, code=v["code"],
                                      prompts=prompts, rollouts=rollouts, file_prompts=run.inputs.file_prompts)  # fmt: skip
        v["noisy"] = caution is not None
        if caution is not None:
            v["reasons"].append("caution: " + caution)
            noisy[name] = caution
    tokens = int(next(iter(result["teachers"].values()))["by_template"][best].get("n_tokens", 0))
    return {"prompts": prompts, "student_rollouts": rollouts, "response_tokens": tokens, "noisy": noisy}
