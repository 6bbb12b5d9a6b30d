"""Numbers out of result files: per-run metrics and their mean and spread over seeds.

Kept apart from the verdict rules so that tables, plots and verdicts all read the same numbers, computed
in one place from each ``result.json`` alone: a verdict can then never see a number the report does not
show. Nothing here knows about claims or thresholds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TRAJECTORY_METRICS", "Stat", "aggregate", "run_metrics", "stat"]


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
