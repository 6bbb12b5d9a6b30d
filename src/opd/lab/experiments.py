"""The lab's experiments as data: which OPD runs test which of the paper's claims, and how to judge them.

Every experiment is a set of ordinary OPD runs (`opd.train.trainer.OPDTrainer`, see `opd.lab.runner`) over
arms x seeds, and a verdict function that turns the measured numbers into "reproduced / partly / not
reproduced" per claim. Verdicts are computed from result files only (`aggregate` over `run_metrics` of
each ``result.json``), never typed in, so a rerun with other numbers can flip them; that is the point.

Design decisions, and why:

* Specs are plain frozen dataclasses with no model code, so the registry can be listed, tested and
  rendered without torch work, and the runner is the only place that touches models.
* Thresholds are module constants (`MIN_GAIN`, `MIN_RISE`, ...) with the reason next to them: a
  verdict is only as honest as its thresholds, so they must be visible and uniform across experiments.
* A claim whose arms have no results yet is "not run", never silently "not reproduced".
* "Significant" means the mean over seeds clears the threshold AND the mean minus one standard deviation
  stays on the same side of zero (with one seed only the threshold applies): three seeds are too few for
  tests, but a gain that one seed's noise cancels is not a gain.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "EXPERIMENTS",
    "MIN_GAIN",
    "MIN_RISE",
    "STATUSES",
    "ArmSpec",
    "Claim",
    "ExperimentData",
    "ExperimentSpec",
    "PromptsSpec",
    "Stat",
    "Verdict",
    "aggregate",
    "get_experiment",
    "run_metrics",
    "stat",
]

Status = Literal["reproduced", "partly", "not reproduced", "not run"]
STATUSES: tuple[str, ...] = ("reproduced", "partly", "not reproduced", "not run")

MIN_GAIN = 0.03
"""Smallest accuracy change (absolute, 0..1) counted as a real change: about one binomial standard error
of a 200-problem greedy evaluation at 30% accuracy (sqrt(.3*.7/200) = 0.032)."""
MIN_RISE = 0.02
"""Smallest change of a token-level diagnostic (overlap ratio, mass; 0..1) counted as a real change.
Token means over a whole run's rollouts (tens of thousands of tokens) are far less noisy than accuracy."""
MASS_HIGH = 0.90
"""Overlap mass counted as "carries nearly all the probability" (the paper: 97-99% at k=16 of ~150k)."""
MASS_PARTLY = 0.75
SCALE_MARGIN = 0.20
"""Gap-recovery difference (novel minus big) counted as "much larger" (paper: 58.6% vs 15.6%)."""


# ----------------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class PromptsSpec:
    """The problems an OPD run trains on (written to the run directory as a JSONL prompt file).

    kind ``levels``: `n` fresh problems drawn by level with weights `mix`, never a held-out one.
    kind ``aligned``: Recipe B. A pool of `n_pool` candidates (weights `mix`) is scored on student
    rollouts with `opd.recipes.prompts.score_records`; `opd.recipes.prompts.select_prompts` then takes `n` prompts:
    the teacher's own post-training problems first (weights `teacher_mix`, when given), else the pool's
    best by `score_key`, plus a share `mix_fraction` of random pool prompts.
    Recipe B's control is kind ``levels`` with the pool's `mix`: random prompts of the same distribution.
    """

    kind: Literal["levels", "aligned"] = "levels"
    mix: dict[int, float] = field(default_factory=lambda: {2: 0.15, 3: 0.15, 4: 0.7})
    n: int = 2048
    n_pool: int = 512
    teacher_mix: dict[int, float] | None = None
    mix_fraction: float = 0.25
    score_key: str = "overlap_ratio"


@dataclass(frozen=True)
class ArmSpec:
    """One arm: a student/teacher pair, loss and config overrides, prompts, optional preparation.

    `student`/`teacher` are model specs (``lab:NAME`` resolves through the zoo, anything else is a path).
    `loss` overrides `opd.config.LossConfig` fields; `overrides` is a nested dict over `TrainConfig`
    (e.g. ``{"rollout": {"max_new_tokens": 64}}``). `prepare` names a step the runner performs on the
    student before OPD: ``cold_start`` = the teacher answers `prepare_args["n_prompts"]` problems, the
    student is fine-tuned on the filtered answers (Recipe A), and OPD starts from that model.
    """

    name: str
    student: str
    teacher: str
    label: str = ""
    loss: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    prompts: PromptsSpec = field(default_factory=PromptsSpec)
    prepare: str | None = None
    prepare_args: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Claim:
    """A statement from the paper (brief §3) this experiment tests, with its finding number."""

    id: str
    finding: str
    text: str


@dataclass
class Verdict:
    """The outcome for one claim: the lab's numbers in words and a status from `STATUSES`."""

    claim: Claim
    status: str
    result: str

    def to_json(self) -> dict[str, Any]:
        return {"claim_id": self.claim.id, "finding": self.claim.finding, "claim": self.claim.text,
                "status": self.status, "result": self.result}  # fmt: skip


@dataclass
class Stat:
    """Mean and spread over seeds of one metric (NaN-free values only)."""

    mean: float
    std: float
    n: int
    values: list[float]

    @property
    def lo(self) -> float:
        return self.mean - self.std

    @property
    def hi(self) -> float:
        return self.mean + self.std

    def fmt(self, pct: bool = False, digits: int = 3) -> str:
        """``mean ± std`` (x100 with `pct`, for accuracies in % or points); the seed count is shown once
        per experiment by the report, not in every number."""
        if self.n == 0:
            return "n/a"
        scale = 100.0 if pct else 1.0
        d = 1 if pct else digits
        spread = f" ± {scale * self.std:.{d}f}" if self.n > 1 else ""
        return f"{scale * self.mean:.{d}f}{spread}"

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": self.values,
                "min": min(self.values) if self.values else None,
                "max": max(self.values) if self.values else None}  # fmt: skip


def stat(values: Sequence[float | None]) -> Stat:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of the finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return Stat(float("nan"), float("nan"), 0, [])
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return Stat(statistics.fmean(vals), std, len(vals), vals)


@dataclass
class ExperimentData:
    """What a verdict function sees: per-arm aggregates, the raw per-run metrics, probe results."""

    spec: ExperimentSpec
    arms: dict[str, dict[str, Stat]]
    runs: dict[str, list[dict[str, float]]]
    probe: dict[str, Any] | None = None
    gap_level: int = 4

    def has(self, *arms: str) -> bool:
        return all(self.arms.get(a) and self.runs.get(a) for a in arms)

    def get(self, arm: str, metric: str) -> Stat:
        return self.arms.get(arm, {}).get(metric) or stat([])


VerdictFn = Callable[[ExperimentData], list[Verdict]]


@dataclass(frozen=True)
class ExperimentSpec:
    """One experiment: arms x seeds of OPD runs, the claims they test, and the verdict function.

    `common` is a nested override dict applied to every arm's `TrainConfig` before the arm's own
    (steps, learning rate, batch shape). `probe` names an extra measurement the runner makes once per
    experiment (``teacher_pair``: how distinguishable two teachers are at the student's states).
    `headline` lists the metrics of `run_metrics` shown in tables, first the ones the claims use.
    """

    name: str
    title: str
    description: str
    arms: tuple[ArmSpec, ...]
    claims: tuple[Claim, ...]
    verdict: VerdictFn
    steps: int = 80
    seeds: tuple[int, ...] = (0, 1, 2)
    common: dict[str, Any] = field(default_factory=dict)
    probe: str | None = None
    probe_args: dict[str, Any] = field(default_factory=dict)
    headline: tuple[str, ...] = (
        "gap_before", "gap_after", "gap_delta", "gap_recovery", "easy_delta",
        "overlap_ratio_initial", "overlap_ratio_final", "overlap_mass_student_final", "entropy_gap_final",
    )  # fmt: skip
    notes: str = ""

    def arm(self, name: str) -> ArmSpec:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"experiment {self.name} has no arm {name!r}; arms: {[a.name for a in self.arms]}")


# ----------------------------------------------------------------------------------------------------
# Per-run metrics (from one result.json) and aggregation over seeds

TRAJECTORY_METRICS: tuple[str, ...] = (
    "overlap_ratio", "overlap_mass_student", "overlap_mass_teacher", "overlap_token_advantage",
    "entropy_student", "entropy_teacher", "entropy_gap", "reverse_kl", "loss", "grad_norm",
)  # fmt: skip


def _window_mean(rows: list[dict[str, Any]], key: str, which: str) -> float:
    """Mean of `key` over the first (``initial``) or last (``final``) window of training steps.

    Windows: the first max(1, min(5, steps // 20)) steps (the untrained pair, before updates move it
    much) and the last max(1, steps // 10) steps (a smoothed end point).
    """
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not vals:
        return float("nan")
    n = len(vals)
    w = max(1, min(5, n // 20)) if which == "initial" else max(1, n // 10)
    part = vals[:w] if which == "initial" else vals[-w:]
    return statistics.fmean(part)


def _acc(acc: dict[str, Any] | None, level: int) -> float:
    if not acc:
        return float("nan")
    entry = acc.get(str(level), acc.get(level))  # type: ignore[call-overload]
    if isinstance(entry, dict):
        entry = entry.get("acc")
    return float(entry) if isinstance(entry, (int, float)) else float("nan")


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return statistics.fmean(xs) if xs else float("nan")


def run_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Every number the verdicts and tables use, computed from one run's result.json content.

    Accuracy keys (0..1, greedy on the zoo's held-out files): ``gap_before``/``gap_after``/
    ``gap_delta`` at the gap level; ``gap_recovery`` = (after − origin)/(teacher − origin) at the gap
    level, where origin is the student before any preparation (NaN when the teacher is not above it);
    ``easy_delta`` = mean change over levels below the gap level (destruction shows here);
    ``novel_delta`` = mean change over the gap level and above (what reverse distillation removes);
    ``acc_after/L{n}`` etc. per level. Trajectory keys: ``<metric>_initial`` / ``<metric>_final`` for
    `TRAJECTORY_METRICS` and their position bins (``overlap_ratio/bin3_final``), plus ``<metric>_mean``
    over all steps (what Recipe B's entropy cost is about).
    """
    acc = result.get("accuracy", {})
    before, after = acc.get("before"), acc.get("after")
    origin = acc.get("origin") or before
    teacher = acc.get("teacher")
    gap = int(result.get("gap_level", 4))
    levels = sorted(int(lv) for lv in (after or before or {}))
    out: dict[str, float] = {}
    for lv in levels:
        out[f"acc_before/L{lv}"] = _acc(before, lv)
        out[f"acc_after/L{lv}"] = _acc(after, lv)
        out[f"acc_teacher/L{lv}"] = _acc(teacher, lv)
        out[f"acc_origin/L{lv}"] = _acc(origin, lv)
    gb, ga, go, gt = _acc(before, gap), _acc(after, gap), _acc(origin, gap), _acc(teacher, gap)
    out["gap_before"], out["gap_after"], out["gap_teacher"], out["gap_origin"] = gb, ga, gt, go
    out["gap_delta"] = ga - gb
    out["gap_gain_from_origin"] = ga - go
    out["gap_recovery"] = (ga - go) / (gt - go) if math.isfinite(gt - go) and gt - go > 1e-9 else float("nan")
    out["easy_delta"] = _mean([_acc(after, lv) - _acc(origin, lv) for lv in levels if lv < gap])
    out["novel_delta"] = _mean([_acc(after, lv) - _acc(origin, lv) for lv in levels if lv >= gap])
    out["easy_after"] = _mean([_acc(after, lv) for lv in levels if lv < gap])
    rows = [r for r in result.get("metrics", []) if r.get("kind", "train") == "train"]
    keys = set(TRAJECTORY_METRICS)
    for r in rows:
        keys.update(k for k in r if "/bin" in k)
    for key in sorted(keys):
        out[f"{key}_initial"] = _window_mean(rows, key, "initial")
        out[f"{key}_final"] = _window_mean(rows, key, "final")
        vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        out[f"{key}_mean"] = statistics.fmean(vals) if vals else float("nan")
    for key in ("overlap_ratio", "overlap_mass_student", "overlap_mass_teacher", "overlap_token_advantage"):
        out[f"{key}_rise"] = out[f"{key}_final"] - out[f"{key}_initial"]
    out["entropy_gap_change"] = out["entropy_gap_final"] - out["entropy_gap_initial"]
    gn = [float(r["grad_norm"]) for r in rows if isinstance(r.get("grad_norm"), (int, float))]
    out["grad_norm_max"] = max(gn) if gn else float("nan")
    out["wall_time_s"] = float(result.get("wall_time_s", float("nan")))
    return out


def aggregate(results: Sequence[dict[str, Any]]) -> tuple[dict[str, dict[str, Stat]], dict[str, list]]:
    """Per arm: {metric: Stat over seeds}, and the raw per-run metric dicts (seed order)."""
    runs: dict[str, list[dict[str, float]]] = {}
    for res in sorted(results, key=lambda r: (str(r.get("arm")), int(r.get("seed", 0)))):
        runs.setdefault(str(res.get("arm")), []).append(run_metrics(res))
    arms: dict[str, dict[str, Stat]] = {}
    for arm, rows in runs.items():
        keys = sorted({k for r in rows for k in r})
        arms[arm] = {k: stat([r.get(k) for r in rows]) for k in keys}
    return arms, runs


# ----------------------------------------------------------------------------------------------------
# Verdict helpers


def gain(s: Stat, thr: float) -> bool:
    """Significantly positive: mean > thr and (one seed, or mean − std > 0)."""
    return s.n > 0 and s.mean > thr and (s.n == 1 or s.lo > 0)


def loss_(s: Stat, thr: float) -> bool:
    """Significantly negative (mirror of `gain`)."""
    return s.n > 0 and s.mean < -thr and (s.n == 1 or s.hi < 0)


def above(a: Stat, b: Stat, thr: float) -> bool:
    """a's mean exceeds b's by more than thr, and their one-std bands do not overlap (when n > 1)."""
    if a.n == 0 or b.n == 0:
        return False
    bands_apart = a.n == 1 or b.n == 1 or a.lo > b.hi
    return a.mean - b.mean > thr and bands_apart


def _status(passed: int, total: int) -> str:
    if passed == total:
        return "reproduced"
    return "partly" if passed > 0 else "not reproduced"


def _not_run(claim: Claim, *arms: str) -> Verdict:
    return Verdict(claim, "not run", f"no results for arm(s) {', '.join(arms)}")


def _pct(s: Stat) -> str:
    return s.fmt(pct=True)


# ----------------------------------------------------------------------------------------------------
# The experiments

LAB_STUDENT = "lab:student"
NOVEL, BIG, INCOMPAT = "lab:teacher_novel", "lab:teacher_big", "lab:teacher_incompatible"

C1A = Claim("1a", "finding 1, 3", "With a compatible teacher that brings a new capability, OPD raises accuracy on "
            "the capability-gap level and the overlap ratio rises during training.")  # fmt: skip
C1B = Claim("1b", "finding 1, 3", "With a teacher of another thinking pattern, OPD is flat or destructive at the "
            "same budget.")  # fmt: skip
C1C = Claim("1c", "finding 1", "Compatibility is visible before training: the incompatible pair starts with a lower "
            "overlap ratio and a larger entropy gap.")  # fmt: skip


def verdict_thinking_patterns(d: ExperimentData) -> list[Verdict]:
    out: list[Verdict] = []
    c, i = "compatible", "incompatible"
    if d.has(c):
        g, rise = d.get(c, "gap_delta"), d.get(c, "overlap_ratio_rise")
        ok = [gain(g, MIN_GAIN), gain(rise, MIN_RISE)]
        out.append(Verdict(C1A, _status(sum(ok), 2),
            f"gap-level accuracy {_pct(d.get(c, 'gap_before'))}% -> {_pct(d.get(c, 'gap_after'))}% "
            f"(change {_pct(g)} pts); overlap ratio {d.get(c, 'overlap_ratio_initial').fmt()} -> "
            f"{d.get(c, 'overlap_ratio_final').fmt()}"))  # fmt: skip
    else:
        out.append(_not_run(C1A, c))
    if d.has(i):
        g, easy = d.get(i, "gap_delta"), d.get(i, "easy_delta")
        flat_or_worse = not gain(g, MIN_GAIN) or loss_(easy, MIN_GAIN)
        ok = [flat_or_worse]
        extra = ""
        if d.has(c):
            ok.append(above(d.get(c, "gap_delta"), g, MIN_GAIN))
            extra = f"; compatible arm gained {_pct(d.get(c, 'gap_delta'))} pts"
        out.append(Verdict(C1B, _status(sum(ok), len(ok)),
            f"gap-level change {_pct(g)} pts, easy levels change {_pct(easy)} pts{extra}"))  # fmt: skip
    else:
        out.append(_not_run(C1B, i))
    if d.has(c, i):
        oc, oi = d.get(c, "overlap_ratio_initial"), d.get(i, "overlap_ratio_initial")
        ec, ei = d.get(c, "entropy_gap_initial"), d.get(i, "entropy_gap_initial")
        ok = [above(oc, oi, MIN_RISE), ei.n > 0 and ec.n > 0 and ei.mean > ec.mean]
        out.append(Verdict(C1C, _status(sum(ok), 2),
            f"initial overlap ratio (k=4) compatible {oc.fmt()} vs incompatible {oi.fmt()}; initial entropy gap "
            f"{ec.fmt()} vs {ei.fmt()}"))  # fmt: skip
    else:
        out.append(_not_run(C1C, c, i))
    return out


C2A = Claim("2a", "finding 1", "A teacher with capabilities the student has not seen recovers far more of the "
            "gap than a same-pipeline bigger teacher (paper: 58.6% vs 15.6% gap recovery).")  # fmt: skip
C2B = Claim("2b", "finding 1", "The failing same-pipeline teacher has the HIGHER initial overlap: overlap alone "
            "does not predict success.")  # fmt: skip


def verdict_novelty_vs_scale(d: ExperimentData) -> list[Verdict]:
    n, b = "novel", "big"
    if not d.has(n, b):
        return [_not_run(C2A, n, b), _not_run(C2B, n, b)]
    rn, rb = d.get(n, "gap_recovery"), d.get(b, "gap_recovery")
    gn, gb = d.get(n, "gap_delta"), d.get(b, "gap_delta")
    tb, tn = d.get(b, "gap_teacher"), d.get(n, "gap_teacher")
    if rb.n == 0:
        # The big teacher is not above the student on the gap level, so the paper's premise (a teacher with
        # higher scores but no new capability) does not hold in this zoo and gap recovery is undefined: at
        # most "partly", even when the novel teacher's absolute gain is far larger.
        ok = above(gn, gb, MIN_GAIN) and gain(gn, MIN_GAIN)
        res = (f"big teacher scores {_pct(tb)}% on the gap level, not above the student ({_pct(d.get(b, 'gap_before'))}%): "
               f"gap recovery undefined; absolute gap-level change novel {_pct(gn)} vs big {_pct(gb)} pts")  # fmt: skip
        v1 = Verdict(C2A, "partly" if ok else "not reproduced", res)
    else:
        much = above(rn, rb, SCALE_MARGIN)
        res = (f"gap recovery novel {_pct(rn)}% vs big {_pct(rb)}% (teachers at {_pct(tn)} / {_pct(tb)}% on the "
               f"gap level; absolute change {_pct(gn)} vs {_pct(gb)} pts)")  # fmt: skip
        v1 = Verdict(
            C2A, "reproduced" if much else ("partly" if rn.mean > rb.mean else "not reproduced"), res
        )
    on, ob = d.get(n, "overlap_ratio_initial"), d.get(b, "overlap_ratio_initial")
    mn, mb = d.get(n, "overlap_mass_student_initial"), d.get(b, "overlap_mass_student_initial")
    ok2 = [ob.mean >= on.mean, mb.mean >= mn.mean]
    v2 = Verdict(C2B, _status(sum(ok2), 2),
        f"initial overlap ratio big {ob.fmt()} vs novel {on.fmt()}; initial overlap mass (student) big "
        f"{mb.fmt()} vs novel {mn.fmt()}")  # fmt: skip
    return [v1, v2]


C3A = Claim("3a", "finding 2", "Weak-to-strong reverse distillation: a post-trained model distilled toward its "
            "own pre-training checkpoint loses its gains.")  # fmt: skip
C3B = Claim("3b", "finding 2", "Toward a same-pipeline bigger teacher the trajectory is nearly identical: the two "
            "teachers are indistinguishable at the student's states.")  # fmt: skip


def verdict_reverse(d: ExperimentData) -> list[Verdict]:
    p, b = "toward_pre_rl", "toward_big"
    out = []
    if d.has(p):
        nd = d.get(p, "novel_delta")
        out.append(Verdict(C3A, "reproduced" if loss_(nd, MIN_GAIN) else "not reproduced",
            f"accuracy on the new levels (gap level and above) changed by {_pct(nd)} pts; gap level "
            f"{_pct(d.get(p, 'gap_before'))}% -> {_pct(d.get(p, 'gap_after'))}%"))  # fmt: skip
    else:
        out.append(_not_run(C3A, p))
    if d.has(p, b):
        dp, db = d.get(p, "novel_delta"), d.get(b, "novel_delta")
        close = abs(dp.mean - db.mean) <= max(MIN_GAIN, 0.25 * abs(dp.mean))
        ok = [close]
        res = f"new-level change toward pre-RL {_pct(dp)} vs toward big {_pct(db)} pts"
        probe = d.probe or {}
        if "kl_between_teachers" in probe and "kl_student_to_pre_rl" in probe:
            kb, ks = probe["kl_between_teachers"], probe["kl_student_to_pre_rl"]
            ok.append(kb < 0.5 * ks)
            res += (
                f"; at the novel model's rollouts KL(pre-RL || big) = {kb:.3f} vs KL(novel || pre-RL) = "
                f"{ks:.3f}, top-4 overlap ratio between the teachers {probe.get('overlap_ratio_teachers', 0):.3f}"
            )
        out.append(Verdict(C3B, _status(sum(ok), len(ok)), res))
    else:
        out.append(_not_run(C3B, p, b))
    return out


C4A = Claim("4a", "finding 3", "Success is progressive alignment: overlap ratio rises, overlap-token advantage "
            "moves toward 0, entropy gap shrinks.")  # fmt: skip
C4B = Claim("4b", "finding 3", "The shared top-k set carries nearly all of both models' probability mass "
            "(paper: 97-99% at k=16).")  # fmt: skip
C4C = Claim("4c", "finding 3", "Training only on the overlap support matches student top-k; training only on "
            "non-overlap tokens is clearly worse.")  # fmt: skip


def verdict_mechanism(d: ExperimentData) -> list[Verdict]:
    s, o, no = "student_topk", "overlap", "non_overlap"
    out = []
    if d.has(s):
        rise, adv = d.get(s, "overlap_ratio_rise"), d.get(s, "overlap_token_advantage_rise")
        eg = d.get(s, "entropy_gap_change")
        ok = [gain(rise, MIN_RISE), adv.n > 0 and adv.mean > 0, eg.n > 0 and eg.mean < 0]
        out.append(Verdict(C4A, _status(sum(ok), 3),
            f"overlap ratio change {rise.fmt()}, overlap-token advantage change {adv.fmt()} (toward 0 if > 0), "
            f"entropy gap change {eg.fmt()}"))  # fmt: skip
        ms, mt = d.get(s, "overlap_mass_student_final"), d.get(s, "overlap_mass_teacher_final")
        lo = min(ms.mean, mt.mean) if ms.n and mt.n else float("nan")
        st = "reproduced" if lo >= MASS_HIGH else ("partly" if lo >= MASS_PARTLY else "not reproduced")
        out.append(Verdict(C4B, st, f"final top-4 overlap mass student {_pct(ms)}%, teacher {_pct(mt)}%"))
    else:
        out += [_not_run(C4A, s), _not_run(C4B, s)]
    if d.has(s, o, no):
        gs, go, gno = d.get(s, "gap_delta"), d.get(o, "gap_delta"), d.get(no, "gap_delta")
        ok = [go.mean >= gs.mean - MIN_GAIN, above(gs, gno, MIN_GAIN)]
        out.append(
            Verdict(
                C4C,
                _status(sum(ok), 2),
                f"gap-level change: student top-k {_pct(gs)}, overlap-only {_pct(go)}, non-overlap-only {_pct(gno)} pts",
            )
        )
    else:
        out.append(_not_run(C4C, s, o, no))
    return out


C5A = Claim("5a", "finding 4", "Sampled-token OPD performs like top-k OPD for k >= 4.")
C5B = Claim("5b", "finding 4", "Top-1 OPD is unstable.")


def verdict_k_sweep(d: ExperimentData) -> list[Verdict]:
    big_k = [a for a in ("k4", "k16", "k64") if d.has(a)]
    out = []
    if d.has("sampled") and big_k:
        gs = d.get("sampled", "gap_delta")
        ref = [d.get(a, "gap_delta").mean for a in big_k]
        # "performs like top-k": within the range the top-k arms themselves span (they differ by a few
        # points among each other), widened by MIN_GAIN and by the sampled arm's own seed spread
        slack = max(MIN_GAIN, gs.std)
        close = min(ref) - slack <= gs.mean <= max(ref) + slack
        parts = ", ".join(f"{a} {_pct(d.get(a, 'gap_delta'))}" for a in big_k)
        out.append(
            Verdict(
                C5A,
                "reproduced" if close else "not reproduced",
                f"gap-level change sampled {_pct(gs)} pts vs top-k {parts} pts",
            )
        )
    else:
        out.append(_not_run(C5A, "sampled", "k4/k16/k64"))
    if d.has("k1", "k4"):
        g1, g4 = d.get("k1", "gap_delta"), d.get("k4", "gap_delta")
        e1 = d.get("k1", "easy_delta")
        n1, n4 = d.get("k1", "grad_norm_max"), d.get("k4", "grad_norm_max")
        unstable = [above(g4, g1, MIN_GAIN), loss_(e1, MIN_GAIN), g1.std > 2 * max(g4.std, 0.01)]
        out.append(Verdict(C5B, "reproduced" if any(unstable) else "not reproduced",
            f"gap-level change k=1 {_pct(g1)} vs k=4 {_pct(g4)} pts; easy-level change k=1 {_pct(e1)} pts; "
            f"max grad norm k=1 {n1.fmt()} vs k=4 {n4.fmt()}"))  # fmt: skip
    else:
        out.append(_not_run(C5B, "k1", "k4"))
    return out


C6A = Claim("6a", "finding 5", "Recipe A (SFT on teacher rollouts, then OPD) raises the initial overlap of an "
            "incompatible pair.")  # fmt: skip
C6B = Claim("6b", "finding 5", "... and the final ceiling: cold start then OPD ends above OPD alone.")


def verdict_cold_start(d: ExperimentData) -> list[Verdict]:
    a, c = "opd_only", "cold_start"
    if not d.has(a, c):
        return [_not_run(C6A, a, c), _not_run(C6B, a, c)]
    oa, oc = d.get(a, "overlap_ratio_initial"), d.get(c, "overlap_ratio_initial")
    ga, gc = d.get(a, "gap_after"), d.get(c, "gap_after")
    ea, ec = d.get(a, "easy_after"), d.get(c, "easy_after")
    v1 = Verdict(
        C6A,
        "reproduced" if above(oc, oa, MIN_RISE) else "not reproduced",
        f"initial overlap ratio cold start {oc.fmt()} vs OPD only {oa.fmt()}",
    )
    ok = [above(gc, ga, MIN_GAIN), ec.mean >= ea.mean - MIN_GAIN]
    v2 = Verdict(C6B, _status(sum(ok), 2),
        f"final gap-level accuracy cold start {_pct(gc)}% vs OPD only {_pct(ga)}%; easy levels {_pct(ec)}% vs "
        f"{_pct(ea)}%; the cold-started student had {_pct(d.get(c, 'gap_before'))}% after SFT, so its OPD "
        f"stage changed it by {_pct(d.get(c, 'gap_delta'))} pts")  # fmt: skip
    return [v1, v2]


C7A = Claim("7a", "finding 6", "The teacher's own post-training prompts give better accuracy than non-aligned "
            "prompts.")  # fmt: skip
C7B = Claim("7b", "finding 6", "... at the cost of a lower overlap ratio, higher overlap mass and lower student "
            "entropy.")  # fmt: skip


def verdict_aligned(d: ExperimentData) -> list[Verdict]:
    t, r = "teacher_prompts", "random"
    if not d.has(t, r):
        return [_not_run(C7A, t, r), _not_run(C7B, t, r)]
    gt, gr = d.get(t, "gap_after"), d.get(r, "gap_after")
    extra = ""
    if d.has("top_scored"):
        extra = f"; top-scored selection {_pct(d.get('top_scored', 'gap_after'))}%"
    v1 = Verdict(
        C7A,
        "reproduced" if above(gt, gr, MIN_GAIN) else ("partly" if gt.mean > gr.mean else "not reproduced"),
        f"final gap-level accuracy teacher prompts {_pct(gt)}% vs random {_pct(gr)}%{extra}",
    )
    ot, orr = d.get(t, "overlap_ratio_mean"), d.get(r, "overlap_ratio_mean")
    mt, mr = d.get(t, "overlap_mass_student_mean"), d.get(r, "overlap_mass_student_mean")
    ht, hr = d.get(t, "entropy_student_mean"), d.get(r, "entropy_student_mean")
    ok = [ot.mean < orr.mean, mt.mean > mr.mean, ht.mean < hr.mean]
    v2 = Verdict(C7B, _status(sum(ok), 3),
        f"over training, teacher prompts vs random: overlap ratio {ot.fmt()} vs {orr.fmt()}, overlap mass "
        f"{mt.fmt()} vs {mr.fmt()}, student entropy {ht.fmt()} vs {hr.fmt()}")  # fmt: skip
    return [v1, v2]


C8A = Claim("8a", "finding 7", "Over long responses the signal degrades at the end first: late positions show "
            "lower overlap and higher entropy than early ones.")  # fmt: skip
C8B = Claim("8b", "finding 7", "Longer chains leave the student less aligned with the teacher (lower overlap, "
            "higher entropy gap) than short ones.")  # fmt: skip


def _last_bin(d: ExperimentData, arm: str, metric: str) -> tuple[Stat, Stat, int]:
    bins = sorted({int(k.split("/bin")[1].split("_")[0]) for k in d.arms.get(arm, {})
                   if k.startswith(f"{metric}/bin") and k.endswith("_final") and d.arms[arm][k].n > 0})  # fmt: skip
    if not bins:
        return stat([]), stat([]), -1
    return d.get(arm, f"{metric}/bin{bins[0]}_final"), d.get(arm, f"{metric}/bin{bins[-1]}_final"), bins[-1]


def verdict_long_horizon(d: ExperimentData) -> list[Verdict]:
    lg, sh = "long_chains", "short_chains"
    out = []
    if d.has(lg):
        o0, ol, last = _last_bin(d, lg, "overlap_ratio")
        h0, hl, _ = _last_bin(d, lg, "entropy_gap")
        if last <= 0:
            out.append(Verdict(C8A, "not reproduced", "responses never reach a second position bin"))
        else:
            ok = [ol.mean < o0.mean - MIN_RISE, hl.mean > h0.mean]
            out.append(Verdict(C8A, _status(sum(ok), 2),
                f"long chains, end of training: overlap ratio first bin {o0.fmt()} vs last occupied bin ({last}) "
                f"{ol.fmt()}; entropy gap {h0.fmt()} vs {hl.fmt()}"))  # fmt: skip
    else:
        out.append(_not_run(C8A, lg))
    if d.has(lg, sh):
        ol, os_ = d.get(lg, "overlap_ratio_final"), d.get(sh, "overlap_ratio_final")
        el, es = d.get(lg, "entropy_gap_final"), d.get(sh, "entropy_gap_final")
        ok = [ol.mean < os_.mean - MIN_RISE, el.mean > es.mean]
        out.append(
            Verdict(
                C8B,
                _status(sum(ok), 2),
                f"final overlap ratio long {ol.fmt()} vs short {os_.fmt()}; entropy gap {el.fmt()} vs {es.fmt()}",
            )
        )
    else:
        out.append(_not_run(C8B, lg, sh))
    return out


C9A = Claim("9a", "findings 1-2 (opd doctor)", "Whether OPD will work is visible before training: `opd doctor`'s "
            "verdict for each teacher, from forward passes and sampling only, matches what OPD then did.")  # fmt: skip

DOCTOR_WORKED_RECOVERY = 0.30
"""Gap recovery at or above which an OPD run counts as "worked" when judging the doctor (the paper's working
teachers recovered 58.6% and its failing same-pipeline teacher 15.6%)."""


def opd_worked(d: ExperimentData, arm: str) -> bool:
    """Did OPD with this arm's teacher work: a real gap-level gain and at least 30% gap recovery."""
    g, r = d.get(arm, "gap_delta"), d.get(arm, "gap_recovery")
    return gain(g, MIN_GAIN) and r.n > 0 and r.mean >= DOCTOR_WORKED_RECOVERY


def verdict_doctor(d: ExperimentData) -> list[Verdict]:
    arms = [a.name for a in d.spec.arms if d.has(a.name)]
    probe = (d.probe or {}).get("teachers", {})
    if not arms or not probe:
        return [_not_run(C9A, *[a.name for a in d.spec.arms])]
    parts, hits = [], 0
    for arm in arms:
        teacher = d.spec.arm(arm).teacher.split(":", 1)[-1]
        code = probe.get(teacher, {}).get("verdict", {}).get("code", "missing")
        worked = opd_worked(d, arm)
        match = (code == "go") == worked
        hits += match
        parts.append(f"{teacher}: doctor '{code}', OPD {'worked' if worked else 'did not work'} (gap recovery "
                     f"{_pct(d.get(arm, 'gap_recovery'))}%, change {_pct(d.get(arm, 'gap_delta'))} pts) "
                     f"{'match' if match else 'MISMATCH'}")  # fmt: skip
    status = "reproduced" if hits == len(arms) else ("partly" if hits else "not reproduced")
    return [Verdict(C9A, status, "; ".join(parts))]


GAP_MIX = {2: 0.15, 3: 0.15, 4: 0.7}
"""OPD prompts of the forward experiments: mostly the gap level, plus easy levels so destruction shows."""
NOVEL_MIX = {2: 0.1, 3: 0.1, 4: 0.4, 5: 0.4}
"""Reverse distillation prompts: where the novel model's post-training gains are (levels 4-5)."""

EXPERIMENTS: dict[str, ExperimentSpec] = {
    e.name: e
    for e in (
        ExperimentSpec(
            name="thinking_patterns",
            title="1. Thinking patterns: compatible vs incompatible teacher",
            description="lab:student distilled toward teacher_novel (same pattern A, new capability) and toward "
            "teacher_incompatible (pattern B), same budget and prompts.",
            arms=(
                ArmSpec("compatible", LAB_STUDENT, NOVEL, "compatible (teacher_novel)"),
                ArmSpec("incompatible", LAB_STUDENT, INCOMPAT, "incompatible (teacher_incompatible)"),
            ),
            claims=(C1A, C1B, C1C),
            verdict=verdict_thinking_patterns,
        ),
        ExperimentSpec(
            name="novelty_vs_scale",
            title="2. New capability vs scale: novel vs same-pipeline bigger teacher",
            description="lab:student toward teacher_novel (its own checkpoint trained further on hard levels) and "
            "toward teacher_big (bigger, same data): gap recovery on the gap level.",
            arms=(
                ArmSpec("novel", LAB_STUDENT, NOVEL, "novel (teacher_novel)"),
                ArmSpec("big", LAB_STUDENT, BIG, "same-pipeline big (teacher_big)"),
            ),
            claims=(C2A, C2B),
            verdict=verdict_novelty_vs_scale,
            headline=(
                "gap_before",
                "gap_after",
                "gap_teacher",
                "gap_recovery",
                "gap_delta",
                "easy_delta",
                "overlap_ratio_initial",
                "overlap_ratio_final",
                "overlap_mass_student_initial",
            ),
        ),  # fmt: skip
        ExperimentSpec(
            name="reverse_distillation",
            title="3. Reverse distillation: the novel model toward its pre-RL checkpoint and toward big",
            description="lab:teacher_novel as the student, distilled toward lab:student (its checkpoint before the "
            "extra training) and toward lab:teacher_big; plus how distinguishable the two teachers are "
            "at the novel model's rollouts.",
            arms=(
                ArmSpec(
                    "toward_pre_rl",
                    NOVEL,
                    LAB_STUDENT,
                    "toward pre-RL (lab:student)",
                    prompts=PromptsSpec(mix=NOVEL_MIX),
                ),
                ArmSpec(
                    "toward_big",
                    NOVEL,
                    BIG,
                    "toward big (lab:teacher_big)",
                    prompts=PromptsSpec(mix=NOVEL_MIX),
                ),
            ),  # fmt: skip
            claims=(C3A, C3B),
            verdict=verdict_reverse,
            probe="teacher_pair",
            probe_args={"student": NOVEL, "teacher_a": LAB_STUDENT, "teacher_b": BIG, "levels": (4, 5)},
            headline=(
                "novel_delta",
                "gap_before",
                "gap_after",
                "easy_delta",
                "overlap_ratio_initial",
                "overlap_ratio_final",
                "reverse_kl_initial",
                "reverse_kl_final",
            ),
        ),  # fmt: skip
        ExperimentSpec(
            name="mechanism",
            title="4. Mechanism: overlap mass through training and the support ablation",
            description="lab:student toward teacher_novel with the top-k signal on three supports: the student's "
            "top-k (default), the overlap of both top-k sets, and the non-overlap (symmetric difference).",
            arms=(
                ArmSpec("student_topk", LAB_STUDENT, NOVEL, "student top-k", loss={"support": "student"}),
                ArmSpec("overlap", LAB_STUDENT, NOVEL, "overlap only", loss={"support": "overlap"}),
                ArmSpec(
                    "non_overlap", LAB_STUDENT, NOVEL, "non-overlap only", loss={"support": "non_overlap"}
                ),
            ),
            claims=(C4A, C4B, C4C),
            verdict=verdict_mechanism,
            headline=(
                "gap_delta",
                "overlap_ratio_initial",
                "overlap_ratio_final",
                "overlap_mass_student_final",
                "overlap_mass_teacher_final",
                "overlap_token_advantage_initial",
                "overlap_token_advantage_final",
                "entropy_gap_initial",
                "entropy_gap_final",
            ),
        ),  # fmt: skip
        ExperimentSpec(
            name="k_sweep",
            title="5. k sweep: top-k with k in {1, 4, 16, 64 (capped at the vocabulary)} vs sampled-token",
            description="lab:student toward teacher_novel; top-k with the released code's weighting (so k=1 is "
            "not identically zero) and the sampled-token policy gradient. With the lab's ~23-symbol "
            "vocabulary k=64 is capped to the vocabulary, i.e. the full-vocabulary gradient.",
            arms=(
                ArmSpec("k1", LAB_STUDENT, NOVEL, "top-1", loss={"k": 1, "renorm": "weights"}),
                ArmSpec("k4", LAB_STUDENT, NOVEL, "top-4", loss={"k": 4, "renorm": "weights"}),
                ArmSpec("k16", LAB_STUDENT, NOVEL, "top-16", loss={"k": 16, "renorm": "weights"}),
                ArmSpec(
                    "k64", LAB_STUDENT, NOVEL, "top-64 (= vocabulary)", loss={"k": 64, "renorm": "weights"}
                ),
                ArmSpec(
                    "sampled",
                    LAB_STUDENT,
                    NOVEL,
                    "sampled token",
                    loss={"signal": "sampled", "renorm": "both"},
                ),
            ),
            claims=(C5A, C5B),
            verdict=verdict_k_sweep,
            headline=("gap_delta", "easy_delta", "gap_after", "grad_norm_max", "overlap_ratio_final"),
        ),
        ExperimentSpec(
            name="cold_start",
            title="6. Recipe A: cold start rescues the incompatible pair",
            description="lab:student toward teacher_incompatible: OPD alone vs SFT on the teacher's own (filtered) "
            "responses to other problems, then OPD on the held-out training prompts.",
            arms=(
                ArmSpec("opd_only", LAB_STUDENT, INCOMPAT, "OPD only"),
                ArmSpec(
                    "cold_start",
                    LAB_STUDENT,
                    INCOMPAT,
                    "SFT on teacher rollouts, then OPD",
                    prepare="cold_start",
                    # SFT must converge for the recipe to mean anything: 120 steps at 1e-3 on 768
                    # responses left the loss at 0.24 and the student in neither pattern (L2 5%);
                    # 400 steps at 2e-3 on 2048 responses reach 0.02 and a pattern-B student.
                    prepare_args={
                        "n_prompts": 2048,
                        "mix": {2: 0.3, 3: 0.3, 4: 0.4},
                        "steps": 400,
                        "lr": 2e-3,
                        "batch_size": 64,
                    },
                ),
            ),  # fmt: skip
            claims=(C6A, C6B),
            verdict=verdict_cold_start,
            headline=(
                "gap_origin",
                "gap_before",
                "gap_after",
                "easy_after",
                "overlap_ratio_initial",
                "overlap_ratio_final",
                "entropy_gap_initial",
            ),
        ),  # fmt: skip
        ExperimentSpec(
            name="aligned_prompts",
            title="7. Recipe B: teacher-aligned prompts vs non-aligned",
            description="lab:student toward teacher_novel on (a) the teacher's own post-training problems (levels "
            "4-5 in its training mix) with 25% random pool prompts, (b) the pool's prompts ranked by "
            "overlap ratio on student rollouts (opd.recipes.prompts.score_records/select_prompts) with 25% "
            "random, (c) random pool prompts. The lab's prompts have one template (raw), so the "
            "template half of finding 6 is not tested here.",
            arms=(
                ArmSpec(
                    "teacher_prompts",
                    LAB_STUDENT,
                    NOVEL,
                    "teacher's own prompts + 25% mix",
                    prompts=PromptsSpec(
                        kind="aligned",
                        mix={2: 0.25, 3: 0.25, 4: 0.25, 5: 0.25},
                        n=1024,
                        teacher_mix={4: 0.45, 5: 0.35, 2: 0.1, 3: 0.1},
                    ),
                ),
                ArmSpec(
                    "top_scored",
                    LAB_STUDENT,
                    NOVEL,
                    "top by overlap ratio + 25% mix",
                    prompts=PromptsSpec(
                        kind="aligned", mix={2: 0.25, 3: 0.25, 4: 0.25, 5: 0.25}, n=256, n_pool=768
                    ),
                ),
                ArmSpec(
                    "random",
                    LAB_STUDENT,
                    NOVEL,
                    "random pool prompts",
                    prompts=PromptsSpec(mix={2: 0.25, 3: 0.25, 4: 0.25, 5: 0.25}, n=1024),
                ),
            ),  # fmt: skip
            claims=(C7A, C7B),
            verdict=verdict_aligned,
            headline=(
                "gap_after",
                "gap_delta",
                "overlap_ratio_mean",
                "overlap_mass_student_mean",
                "entropy_student_mean",
            ),
        ),  # fmt: skip
        ExperimentSpec(
            name="long_horizon",
            title="8. Long horizon: chain length and position-resolved agreement",
            description="lab:student toward teacher_novel on short chains (levels 2-3) vs long chains (levels 4-5), "
            "response budget 64 tokens in 4 position bins of 16 tokens; where along the response "
            "does the signal degrade? (The lab's chains are at most ~46 tokens: an analog of the "
            "paper's 10K-token budgets, not a reproduction of their scale.)",
            arms=(
                ArmSpec(
                    "short_chains",
                    LAB_STUDENT,
                    NOVEL,
                    "levels 2-3",
                    prompts=PromptsSpec(mix={2: 0.5, 3: 0.5}),
                ),
                ArmSpec(
                    "long_chains", LAB_STUDENT, NOVEL, "levels 4-5", prompts=PromptsSpec(mix={4: 0.5, 5: 0.5})
                ),
            ),  # fmt: skip
            claims=(C8A, C8B),
            verdict=verdict_long_horizon,
            common={"rollout": {"max_new_tokens": 64}, "diagnostics": {"position_bins": 4}},
            headline=(
                "gap_delta",
                "overlap_ratio_final",
                "entropy_gap_final",
                "overlap_ratio/bin0_final",
                "overlap_ratio/bin1_final",
                "overlap_ratio/bin2_final",
                "entropy_student/bin0_final",
                "entropy_student/bin2_final",
            ),
        ),  # fmt: skip
        ExperimentSpec(
            name="doctor",
            title="9. opd doctor before training vs what OPD did",
            description="`opd doctor` on lab:student with the three teachers (gap-level held-out problems, top-4, "
            "forward passes and sampling only), against the OPD runs of experiments 1-2 (reused, not "
            "trained again): does the verdict predict the outcome?",
            arms=(
                ArmSpec("novel", LAB_STUDENT, NOVEL, "novel (teacher_novel)"),
                ArmSpec("big", LAB_STUDENT, BIG, "same-pipeline big (teacher_big)"),
                ArmSpec("incompatible", LAB_STUDENT, INCOMPAT, "incompatible (teacher_incompatible)"),
            ),
            claims=(C9A,),
            verdict=verdict_doctor,
            probe="doctor",
            probe_args={"student": LAB_STUDENT, "teachers": (NOVEL, BIG, INCOMPAT), "n_prompts": 64},
            headline=(
                "gap_before",
                "gap_after",
                "gap_teacher",
                "gap_recovery",
                "gap_delta",
                "overlap_ratio_initial",
            ),
        ),  # fmt: skip
    )
}


def get_experiment(name: str) -> ExperimentSpec:
    """The registered experiment `name` (KeyError naming the known ones)."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown lab experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]
