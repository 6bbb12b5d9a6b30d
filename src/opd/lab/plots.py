"""Figures of lab experiments, like the paper's: metrics against training steps, one line per arm.

Each line is the mean over seeds with a band of ± one standard deviation (a single seed draws no band).
Per-step token metrics are smoothed with a centred moving average (`SMOOTH` steps) because one step's
rollouts are a few thousand tokens; the raw values stay in the result files. Rendering uses the Agg
backend, so figures are written without a display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opd.lab.specs import ExperimentSpec
from opd.report.bins import bin_labels

__all__ = ["CAPTIONS", "PANELS", "SMOOTH", "arm_ends", "plot_experiment", "series"]

SMOOTH = 5
PANELS: tuple[tuple[str, str], ...] = (
    ("accuracy", "gap-level accuracy (greedy, in-loop)"),
    ("overlap_ratio", "overlap ratio (top-4)"),
    ("overlap_token_advantage", "overlap-token advantage"),
    ("entropy_gap", "entropy gap |H(q) − H(p)|"),
    ("overlap_mass_student", "overlap mass (student)"),
    ("overlap_mass_teacher", "overlap mass (teacher)"),
)

CAPTIONS: dict[str, str] = {
    "accuracy": "Accuracy on the capability-gap level, measured every few steps during training (greedy, on "
    "held-out problems). Look at which line rises (OPD teaches the student) and which falls (OPD breaks it).",
    "overlap_ratio": "The share of the student's 4 most likely next tokens that are also among the teacher's 4, "
    "at each step of the student's own answers. A rising line means the student is moving toward the teacher's way "
    "of writing; a low line that stays low means the two never align.",
    "overlap_token_advantage": "On the tokens both top-4 sets share: the teacher's log-probability minus the "
    "student's. Moving toward 0 means the student has absorbed what the teacher knows there.",
    "entropy_gap": "How differently sure the two models are: |student entropy − teacher entropy| per token. A "
    "shrinking gap means the student's confidence now matches the teacher's.",
    "overlap_mass_student": "The probability the student puts on the shared top-4 tokens. Near 1 means the tokens "
    "both models favour are nearly all the student would say, so the teacher's signal lands where the student looks.",
    "overlap_mass_teacher": "The probability the teacher puts on the shared top-4 tokens. Low means the teacher "
    "mostly wants tokens the student does not consider: little of its signal can be used.",
    "position_entropy": "Student entropy by position in the response (rows) over training (columns). Look for the "
    "late positions staying bright (uncertain) longer than the early ones.",
}
"""What each figure shows and what to look at, in plain words: the report's caption under each plot."""


def arm_ends(
    spec: ExperimentSpec, results: Sequence[dict[str, Any]], metric: str
) -> dict[str, tuple[float, float]]:
    """{arm title: (first, last)} of the plotted seed-mean line of `metric`: the numbers a caption quotes."""
    labels = {a.name: a.title for a in spec.arms}
    out = {}
    for arm, runs in _by_arm(spec, results).items():
        _, mean, _ = _band([series(r, metric) for r in runs])
        vals = [m for m in mean if math.isfinite(m)]
        if vals:
            out[labels[arm]] = (vals[0], vals[-1])
    return out


def _smooth(values: list[float], w: int) -> list[float]:
    if w <= 1 or len(values) < 3:
        return values
    half = w // 2
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - half) : i + half + 1] if math.isfinite(v)]
        out.append(sum(part) / len(part) if part else float("nan"))
    return out


def series(result: dict[str, Any], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one run: ``accuracy`` from the in-loop eval curve, else a per-step metric."""
    if metric == "accuracy":
        pts = [
            (int(r["step"]), float(r["acc"]))
            for r in result.get("eval_curve", [])
            if r.get("acc") is not None
        ]
        return [p[0] for p in pts], [p[1] for p in pts]
    rows = [r for r in result.get("metrics", []) if isinstance(r.get(metric), (int, float))]
    return [int(r["step"]) for r in rows], _smooth([float(r[metric]) for r in rows], SMOOTH)


def _band(runs: Sequence[tuple[list[int], list[float]]]) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over runs at the steps all runs share."""
    if not runs:
        return [], [], []
    common = sorted(set.intersection(*[set(s) for s, _ in runs]))
    means, stds = [], []
    for step in common:
        vals = [v[s.index(step)] for s, v in runs]
        vals = [x for x in vals if math.isfinite(x)]
        m = sum(vals) / len(vals) if vals else float("nan")
        sd = math.sqrt(sum((x - m) ** 2 for x in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        means.append(m)
        stds.append(sd)
    return common, means, stds


def _by_arm(spec: ExperimentSpec, results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {a.name: [] for a in spec.arms}
    for r in results:
        if r.get("arm") in out:
            out[r["arm"]].append(r)
    return {k: v for k, v in out.items() if v}


def plot_experiment(
    spec: ExperimentSpec, results: Sequence[dict[str, Any]], out_dir: str | Path
) -> list[Path]:
    """Write ``<exp>.png`` (all panels) and one PNG per panel; a position heatmap when bins were logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arms = _by_arm(spec, results)
    labels = {a.name: a.title for a in spec.arms}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written: list[Path] = []

    def draw(ax: Any, metric: str, title: str) -> bool:
        drew = False
        for i, (arm, runs) in enumerate(arms.items()):
            steps, mean, std = _band([series(r, metric) for r in runs])
            if not steps:
                continue
            c = colours[i % len(colours)]
            ax.plot(steps, mean, color=c, label=f"{labels[arm]} (n={len(runs)})", marker="o" if metric == "accuracy" else None,
                    markersize=3)  # fmt: skip
            if len(runs) > 1:
                ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                                [m + s for m, s in zip(mean, std, strict=True)], color=c, alpha=0.2)  # fmt: skip
            drew = True
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        return drew

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (metric, title) in zip(axes.flat, PANELS, strict=True):
        draw(ax, metric, title)
    handles, names = axes.flat[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=9)
    fig.suptitle(spec.title, fontsize=12)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    path = out_dir / f"{spec.name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)

    for metric, title in PANELS:
        fig, ax = plt.subplots(figsize=(6, 4))
        if draw(ax, metric, f"{spec.title.split(':')[0]}: {title}"):
            ax.legend(fontsize=8)
            fig.tight_layout()
            p = out_dir / f"{metric}.png"
            fig.savefig(p, dpi=80)
            written.append(p)
        plt.close(fig)

    heat = _position_heatmap(spec, arms, out_dir, plt)
    if heat is not None:
        written.append(heat)
    return written


def _position_heatmap(
    spec: ExperimentSpec, arms: dict[str, list[dict[str, Any]]], out_dir: Path, plt: Any
) -> Path | None:
    """Student entropy by response-position bin x step (the paper's long-horizon heatmap), seed mean."""
    metric = "entropy_student"
    panels = []
    for arm, runs in arms.items():
        bins = sorted({int(k.split("/bin")[1]) for r in runs for row in r.get("metrics", []) for k in row
                       if k.startswith(f"{metric}/bin")})  # fmt: skip
        steps, _, _ = _band([series(r, metric) for r in runs])
        if not bins or not steps:
            continue
        grid = []
        for b in bins:  # a bin no response reached at some step has no value there: NaN, drawn blank
            bs, mean, _ = _band([series(r, f"{metric}/bin{b}") for r in runs])
            at = dict(zip(bs, mean, strict=True))
            grid.append([at.get(s, float("nan")) for s in steps])
        panels.append((arm, bins, steps, grid))
    if not panels or spec.name != "long_horizon":
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
    for ax, (arm, bins, steps, grid) in zip(axes[0], panels, strict=True):
        im = ax.imshow(grid, aspect="auto", origin="lower", extent=(steps[0], steps[-1], -0.5, len(bins) - 0.5),
                       cmap="viridis")  # fmt: skip
        labels = bin_labels(max(bins) + 1, _budget(arms[arm]))
        ax.set_yticks(range(len(bins)), [labels[b] for b in bins])
        ax.set_ylabel("response tokens" if not labels[0].startswith("bin") else "response-position bin")
        ax.set_xlabel("step")
        ax.set_title(f"student entropy by position: {arm}", fontsize=10)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = out_dir / "position_entropy.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _budget(runs: Sequence[dict[str, Any]]) -> int | None:
    """The arm's response budget in tokens, when every seed used the same one (bins are fractions of it)."""
    found = {((r.get("config") or {}).get("rollout") or {}).get("max_new_tokens") for r in runs}
    budget = found.pop() if len(found) == 1 else None
    return budget if isinstance(budget, int) and budget > 0 else None
