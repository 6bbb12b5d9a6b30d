"""`opd analyze`: what a finished (or killed) training run's own files say about it.

A run directory holds ``metrics.jsonl`` (one JSON object per step, written by ``opd.train.tracking``),
``config.yaml`` and samples/checkpoints. Everything here reads only those files, so a run can be
judged on a laptop long after the GPU job ended, and several runs can be compared side by side.

What is produced, and why (paper brief §2-3):
- curves of every logged metric, runs overlaid, because OPD success and failure show up as trends
  (overlap ratio rising, overlap-token advantage moving toward 0, entropy gap shrinking) rather than
  as any one number;
- a response-position x training-step heatmap of student and teacher entropy, the paper's
  long-horizon figure: late collapse starts at the END of responses and moves forward, which a
  whole-response mean hides;
- the training-time signals of success vs failure (loss level, grad norm, p - q at the
  max-|advantage| token and the alignment metrics) as initial / final / change / slope, with a
  deliberately simple, documented reading rule (the thresholds are the module constants below).

Robustness: a run killed mid-write leaves a truncated last line, and other tools may add lines with
new ``kind`` values (e.g. alarms) or new keys; such lines are skipped or listed as events, never a
crash. A non-finite value is written as null (JSON has no NaN) and read back as NaN; the strings
older runs wrote instead ("nan", "inf") are read back as the floats they spell.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opd.errors import OpdError
from opd.files import jsonl_lines
from opd.report.bins import bin_labels, bin_ranges
from opd.report.render import (
    Block,
    Bullets,
    Figure,
    Figures,
    Heading,
    Paragraph,
    Table,
    code,
    esc,
    write_document,
)

__all__ = [
    "ALIGNMENT_METRICS",
    "DEGRADING_MIN",
    "EDGE_FRACTION",
    "HEATMAP_METRICS",
    "IMPROVING_MIN",
    "KEY_METRICS",
    "MIN_STEPS_FOR_READING",
    "MOVE_ABS",
    "MOVE_REL",
    "SIGNAL_METRICS",
    "SMALL_LEVEL_RATIO",
    "RunData",
    "bin_ranges",
    "compare_runs",
    "default_names",
    "is_binned",
    "load_run",
    "metric_keys",
    "metric_value",
    "plot_curves",
    "plot_position_heatmaps",
    "position_matrix",
    "series",
    "success_signals",
    "write_analysis",
]

# ----------------------------------------------------------------------------------------------------
# The reading rule. Kept to a few explicit numbers so a user can see exactly why a run was called
# "flat" or "improving" and can disagree with it.

# The training-time signals reported for every run (brief §2 "training signals" + §3.3 mechanism).
SIGNAL_METRICS: tuple[str, ...] = (
    "loss",
    "grad_norm",
    "p_minus_q_at_max_adv",
    "overlap_ratio",
    "entropy_gap",
    "overlap_token_advantage",
    "entropy_student",
)
# initial = mean of the first EDGE_FRACTION of a metric's logged steps (at least one step), final =
# mean of the last EDGE_FRACTION: one step's rollouts are a few thousand tokens, so single steps are noisy.
EDGE_FRACTION = 0.10
# A trend is only read from at least this many training steps; fewer give numbers but no verdict.
MIN_STEPS_FOR_READING = 5
EVAL_DROP = 0.05
"""A fall of held-out accuracy (first to last in-loop eval, absolute) that overrides the alignment reading."""
# The three alignment metrics whose direction the paper reads (§3.3), with the good direction:
# "up" = should rise, "to0" = magnitude should shrink toward 0, "down" = should shrink.
ALIGNMENT_METRICS: dict[str, str] = {
    "overlap_ratio": "up",
    "overlap_token_advantage": "to0",
    "entropy_gap": "down",
}
# How far a metric must move (final vs initial) to count as moving. overlap_ratio is a fraction of
# k in [0, 1], so an absolute 0.02 (two percentage points; the paper's good runs move ~0.72 -> 0.91);
# the other two are unbounded, so a relative 10% of the initial magnitude.
MOVE_ABS: dict[str, float] = {"overlap_ratio": 0.02}
MOVE_REL = 0.10
# Verdict: "improving" when at least IMPROVING_MIN alignment metrics move the good way and none the
# bad way; "degrading" when at least DEGRADING_MIN move the bad way (the long-horizon collapse: overlap
# drops, entropy gap grows); "flat" when every available one stays within its threshold (the paper's
# failing runs: flat from the start); otherwise "mixed".
IMPROVING_MIN = 2
DEGRADING_MIN = 2
# Across runs: a run whose initial loss AND grad norm are below this fraction of the largest run's is
# flagged as having the "small loss, small gradient norm" of the paper's failing runs. Loss and grad
# norm have no absolute scale (they depend on the objective and the model), so only a comparison
# between runs can call them small.
SMALL_LEVEL_RATIO = 0.5

# The grid figure's panels (eval/avg@k is added when logged).
KEY_METRICS: tuple[str, ...] = (
    "loss",
    "grad_norm",
    "overlap_ratio",
    "overlap_token_advantage",
    "entropy_gap",
    "overlap_mass_student",
    "entropy_student",
)
HEATMAP_METRICS: tuple[str, ...] = ("entropy_student", "entropy_teacher")
# Per-metric curves draw the raw values faintly plus a centred moving average of SMOOTH steps once a
# run has at least 3 * SMOOTH points; the raw values stay in metrics.jsonl.
SMOOTH = 5

_BIN_RE = re.compile(r"^(?P<metric>.+)/bin(?P<index>\d+)$")
_EVAL_AVG_RE = re.compile(r"^eval/avg@\d+$")


# ----------------------------------------------------------------------------------------------------
# Loading


@dataclass
class RunData:
    """One run directory as read from disk.

    ``train`` holds the per-step training rows (no ``kind``), ``evals`` the ``kind: eval`` rows and
    ``events`` every other ``kind`` (alarms and whatever later tools log), all in file order.
    ``warnings`` lists what was skipped while reading (e.g. a truncated last line).
    """

    name: str
    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def config_get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted path (``rollout.max_new_tokens``), or ``default``."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


# How runs written before null was used spell a non-finite value (the logger wrote ``str(value)``).
_OLD_NON_FINITE = {"nan", "inf", "-inf", "+inf", "infinity", "-infinity"}


def metric_value(value: Any) -> Any:
    """A value of a metrics.jsonl training or eval row as a number where it stands for one.

    opd writes every non-finite float as null (`opd.files.json_safe`), which keeps no sign of whether it
    was NaN or +/-inf, so null is read as NaN: a step whose loss was NaN must not look like a step that
    did not log a loss (absent keys are simply absent). Run directories from before wrote the string
    ``"nan"``/``"inf"``/``"-inf"``; those are read as the float they spell. Anything else is returned as
    it is.
    """
    if value is None:
        return math.nan
    if isinstance(value, str) and value.strip().lower() in _OLD_NON_FINITE:
        return float(value)
    return value


def _number(value: Any) -> float | None:
    """A value of a row read by `load_run` as a float, or None when it is not a number (bools are not
    metrics; a missing key is None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _warn(run_warnings: list[str], message: str) -> None:
    run_warnings.append(message)
    warnings.warn(message, stacklevel=3)


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Read RUN_DIR/metrics.jsonl (and config.yaml when present) into a :class:`RunData`.

    Lines that are not JSON objects with a numeric ``step`` are skipped with a warning (a run killed
    mid-write leaves a cut last line); unknown keys and kinds are kept, never rejected.
    """
    run_dir = Path(path)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise OpdError(f"{run_dir}: no metrics.jsonl; is it a run directory? expected RUN_DIR/metrics.jsonl")
    run = RunData(name=name or run_dir.resolve().name, path=run_dir)
    lines = [line for _, line in jsonl_lines(metrics.read_text(encoding="utf-8", errors="replace"))]
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            where = "last line (truncated: run killed mid-write?)" if i == last else "line"
            _warn(run.warnings, f"{metrics}:{i + 1}: skipped unreadable {where}")
            continue
        if not isinstance(row, dict) or _number(row.get("step")) is None:
            _warn(run.warnings, f"{metrics}:{i + 1}: skipped a line without a numeric 'step'")
            continue
        row["step"] = int(row["step"])
        kind = row.get("kind")
        if kind is None or kind == "eval":
            row = {k: v if k in ("step", "kind") else metric_value(v) for k, v in row.items()}
            (run.train if kind is None else run.evals).append(row)
        else:
            run.events.append(row)  # as written: an alarm's null baseline means "none", not NaN
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        import yaml

        try:
            cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8-sig"))
        except yaml.YAMLError as exc:
            _warn(run.warnings, f"{cfg_path}: not readable YAML ({exc.__class__.__name__}); ignored")
            cfg = None
        run.config = cfg if isinstance(cfg, dict) else None
    return run


def default_names(paths: Sequence[str | Path]) -> list[str]:
    """Short distinct labels for run dirs: the dir name, extended by parents only where names clash.

    Lab runs all end in ``.../seedN/opd``, so plain dir names would all read "opd"; the shortest
    distinguishing path suffix ("seed0/opd", "seed1/opd") keeps legends readable. Identical paths get
    "#2", "#3".
    """
    parts = [Path(p).resolve().parts[1:] or ("/",) for p in paths]  # drop the root: no "//tmp/..."
    depth = [1] * len(parts)

    def label(i: int) -> str:
        return "/".join(parts[i][-depth[i] :])

    while True:
        names = [label(i) for i in range(len(parts))]
        clash = [
            i
            for i in range(len(parts))
            if depth[i] < len(parts[i])
            and any(j != i and names[j] == names[i] and parts[j] != parts[i] for j in range(len(parts)))
        ]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    out: list[str] = []
    for n in names:
        candidate, k = n, 2
        while candidate in out:
            candidate, k = f"{n}#{k}", k + 1
        out.append(candidate)
    return out


# ----------------------------------------------------------------------------------------------------
# Series


def is_binned(key: str) -> bool:
    """True for position-binned keys such as ``entropy_student/bin3``."""
    return _BIN_RE.match(key) is not None


def _rows_for(run: RunData, key: str) -> list[dict[str, Any]]:
    return run.evals if key.startswith("eval/") else run.train


def series(run: RunData, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, sorted by step; ``eval/...`` keys come from the eval rows.

    Steps where the key is absent or not numeric are left out (the trainer omits a mean whose count
    is zero rather than logging 0). A step logged twice keeps its last value, the one a resumed run
    re-did.
    """
    by_step: dict[int, float] = {}
    for row in _rows_for(run, key):
        value = _number(row.get(key))
        if value is not None:
            by_step[row["step"]] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def metric_keys(runs: Sequence[RunData]) -> list[str]:
    """Every numeric, non-binned metric any run logged (training keys, then ``eval/`` keys), sorted."""
    keys: set[str] = set()
    for run in runs:
        for row in (*run.train, *run.evals):
            for k, v in row.items():
                if k in ("step", "kind") or is_binned(k) or _number(v) is None:
                    continue
                keys.add(k)
    return sorted(keys, key=lambda k: (k.startswith("eval/"), k))


def _n_bins(run: RunData, metric: str) -> int:
    found = [
        int(m.group("index"))
        for row in run.train
        for k in row
        if (m := _BIN_RE.match(k)) is not None and m.group("metric") == metric
    ]
    if not found:
        return 0
    configured = run.config_get("diagnostics.position_bins")
    configured = configured if isinstance(configured, int) and configured > 0 else 0
    return max(configured, max(found) + 1)


def position_matrix(run: RunData, metric: str) -> tuple[list[int], np.ndarray]:
    """(steps, matrix of shape [bins, steps]) from the ``metric/binI`` keys; NaN where not logged.

    The bin count is the configured ``diagnostics.position_bins`` (or the highest bin seen, if more):
    bins that no response reached are never logged (no tokens, no mean) and must show as empty rows,
    not vanish. Steps are every training step that logged at least one bin of the metric. With no
    binned keys the result is ``([], empty (0, 0) array)``.
    """
    n = _n_bins(run, metric)
    if n == 0:
        return [], np.empty((0, 0))
    cols: dict[int, np.ndarray] = {}
    for row in run.train:
        col = np.full(n, np.nan)
        seen = False
        for i in range(n):
            value = _number(row.get(f"{metric}/bin{i}"))
            if value is not None:
                col[i] = value
                seen = True
        if seen:
            cols[row["step"]] = col
    steps = sorted(cols)
    if not steps:
        return [], np.empty((0, 0))
    return steps, np.stack([cols[s] for s in steps], axis=1)


# ----------------------------------------------------------------------------------------------------
# Success signals


def _finite(steps: list[int], values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    ok = np.isfinite(y)
    return x[ok], y[ok]


def _edge_stats(steps: list[int], values: list[float]) -> dict[str, float]:
    """initial / final (edge means), change = final - initial, slope = least-squares slope per step."""
    x, y = _finite(steps, values)
    n = len(y)
    nan = float("nan")
    if n == 0:
        return {"initial": nan, "final": nan, "change": nan, "slope": nan, "n": 0}
    w = max(1, int(n * EDGE_FRACTION))
    initial, final = float(y[:w].mean()), float(y[-w:].mean())
    slope = nan
    if n >= 2 and np.ptp(x) > 0:
        xc = x - x.mean()
        slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    return {"initial": initial, "final": final, "change": final - initial, "slope": slope, "n": n}


def _trend(metric: str, stats: dict[str, float]) -> str:
    """'better' / 'worse' / 'flat' for one alignment metric (thresholds: MOVE_ABS, MOVE_REL), or 'n/a'."""
    a, b = stats["initial"], stats["final"]
    if not (math.isfinite(a) and math.isfinite(b)):
        return "n/a"
    direction = ALIGNMENT_METRICS[metric]
    if direction == "to0":
        delta = abs(a) - abs(b)  # > 0: closer to 0
    elif direction == "down":
        delta = a - b
    else:
        delta = b - a
    threshold = MOVE_ABS.get(metric, MOVE_REL * abs(a))
    if threshold == 0:  # a metric starting exactly at 0 has no relative scale: any move counts
        threshold = 1e-12
    if delta >= threshold:
        return "better"
    if -delta >= threshold:
        return "worse"
    return "flat"


def _g(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) and math.isfinite(x) else "n/a"


def success_signals(run: RunData) -> dict[str, Any]:
    """The training-time signals of OPD success vs failure, with a plain-words reading.

    Returns ``{"n_steps", "metrics": {name: {initial, final, change, slope, n}}, "trends": {alignment
    metric: better|worse|flat|n/a}, "outcome": first and last eval/avg@k or None, "verdict":
    improving|flat|degrading|failing|mixed|too short|no data, "reading": str}``. A metric the run never logged has NaN numbers. The rule (brief §3.3): good runs
    show progressive alignment on high-probability tokens (overlap ratio rises, overlap-token
    advantage moves toward 0, entropy gap shrinks); failing runs are flat from the start with small
    loss and gradient norm; late collapse (long budgets) shows overlap falling and the gap growing.
    """
    stats = {m: _edge_stats(*series(run, m)) for m in SIGNAL_METRICS}
    n_steps = len({row["step"] for row in run.train})
    trends = {m: _trend(m, stats[m]) for m in ALIGNMENT_METRICS}
    known = {m: t for m, t in trends.items() if t != "n/a"}
    better = [m for m, t in known.items() if t == "better"]
    worse = [m for m, t in known.items() if t == "worse"]

    def moved(m: str) -> str:
        s = stats[m]
        return f"{m} {_g(s['initial'])} -> {_g(s['final'])}"

    levels = (
        f"loss {_g(stats['loss']['initial'])} -> {_g(stats['loss']['final'])}, "
        f"grad norm {_g(stats['grad_norm']['initial'])} -> {_g(stats['grad_norm']['final'])}"
    )
    outcome: dict[str, Any] | None = None
    eval_key = next((k for k in metric_keys([run]) if _EVAL_AVG_RE.match(k)), None)
    if eval_key is not None:
        e_steps, e_values = series(run, eval_key)
        outcome = {"key": eval_key, "first_step": e_steps[0], "first": e_values[0],
                   "last_step": e_steps[-1], "last": e_values[-1]}  # fmt: skip
        levels += (
            f", {eval_key} {_g(e_values[0])} (step {e_steps[0]}) -> {_g(e_values[-1])} (step {e_steps[-1]})"
        )
    if n_steps == 0:
        verdict, reading = "no data", "No training steps were logged."
    elif not known:
        verdict = "no data"
        reading = f"No alignment diagnostics were logged (overlap ratio, overlap-token advantage, entropy gap); {levels}."
    elif n_steps < MIN_STEPS_FOR_READING:
        verdict = "too short"
        reading = (
            f"Only {n_steps} training step(s): too few to read a trend "
            f"(at least {MIN_STEPS_FOR_READING}); {levels}."
        )
    elif outcome is not None and outcome["last"] - outcome["first"] <= -EVAL_DROP:
        verdict = "failing"
        reading = (
            f"Held-out accuracy fell ({outcome['key']} {_g(outcome['first'])} -> {_g(outcome['last'])}) whatever "
            "the alignment metrics do: the student is being pulled toward tokens that do not solve the task. "
            "Alignment can still look like it improves here, as with a teacher of another thinking pattern "
            "replacing the student's own (the lab's incompatible pair). Check compatibility with `opd doctor`; "
            f"cold start (recipe A) or another teacher. {levels}."
        )
    elif len(better) >= IMPROVING_MIN and not worse:
        verdict = "improving"
        reading = (
            "The student is aligning with the teacher on high-probability tokens, the paper's mechanism "
            f"of successful runs ({'; '.join(moved(m) for m in better)}). Alignment alone does not prove "
            f"the teacher adds capability: check the eval accuracy. {levels}."
        )
    elif len(worse) >= DEGRADING_MIN:
        verdict = "degrading"
        reading = (
            "Alignment is getting worse (" + "; ".join(moved(m) for m in worse) + "). In the paper this is "
            "the late collapse of long response budgets (overlap drops, entropy and gradient-norm spikes, "
            f"starting at the end of responses): check the position heatmap. {levels}."
        )
    elif all(t == "flat" for t in known.values()):
        verdict = "flat"
        reading = (
            "Alignment metrics are flat (" + "; ".join(moved(m) for m in known) + "), like the paper's "
            "failing runs, which are flat from the start with a small loss and a small gradient norm "
            f"({levels}; compare the levels with a run that works). Either the teacher brings nothing "
            "the student has not already seen, or the thinking patterns are incompatible."
        )
    else:
        verdict = "mixed"
        parts = [f"{m} {t}" for m, t in known.items()]
        reading = f"Mixed signals ({', '.join(parts)}): no clear success or failure pattern yet. {levels}."
    return {
        "n_steps": n_steps,
        "metrics": stats,
        "trends": trends,
        "outcome": outcome,
        "verdict": verdict,
        "reading": reading,
    }


def compare_runs(runs: Sequence[RunData], signals: Sequence[dict[str, Any]]) -> list[str]:
    """Cross-run notes: which runs have the relatively small loss and grad norm of failing runs.

    Only meaningful between runs of the same objective; with a single run, returns nothing.
    """
    if len(runs) < 2:
        return []
    notes: list[str] = []
    levels = {m: [s["metrics"][m]["initial"] for s in signals] for m in ("loss", "grad_norm")}
    tops = {m: max((v for v in vals if math.isfinite(v)), default=float("nan")) for m, vals in levels.items()}
    if not all(math.isfinite(t) and t > 0 for t in tops.values()):
        return notes
    for i, run in enumerate(runs):
        ratios = {m: levels[m][i] / tops[m] for m in levels}
        if all(math.isfinite(r) and r < SMALL_LEVEL_RATIO for r in ratios.values()):
            notes.append(
                f"{run.name}: initial loss {ratios['loss']:.2f}x and grad norm {ratios['grad_norm']:.2f}x "
                "the largest of these runs; the paper's failing runs have a small loss and gradient norm "
                "(only meaningful if the runs share the objective)."
            )
    return notes


# ----------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas directly: no display, no pyplot global state)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", name).strip("_") or "metric"


def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path, dpi: int = 80) -> Path:
    """Write a PNG via a temporary name, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi, format="png")
    os.replace(tmp, path)
    return path


def _smooth(values: np.ndarray, w: int) -> np.ndarray:
    half = w // 2
    out = np.empty_like(values)
    for i in range(len(values)):
        part = values[max(0, i - half) : i + half + 1]
        part = part[np.isfinite(part)]
        out[i] = part.mean() if len(part) else np.nan
    return out


def _draw(ax: Any, runs: Sequence[RunData], key: str, colours: list[str]) -> bool:
    drew = False
    for i, run in enumerate(runs):
        steps, values = series(run, key)
        if not steps:
            continue
        c = colours[i % len(colours)]
        x, y = np.asarray(steps, float), np.asarray(values, float)
        if len(y) >= 3 * SMOOTH and not key.startswith("eval/"):
            ax.plot(x, y, color=c, alpha=0.3, linewidth=0.8)
            ax.plot(x, _smooth(y, SMOOTH), color=c, label=run.name, linewidth=1.5)
        else:
            ax.plot(x, y, color=c, label=run.name, marker="o", markersize=3)
        drew = True
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return drew


def _colours() -> list[str]:
    import matplotlib

    return list(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"])


def _key_panels(runs: Sequence[RunData]) -> list[str]:
    keys = metric_keys(runs)
    panels = [k for k in KEY_METRICS if k in keys]
    panels += [k for k in keys if _EVAL_AVG_RE.match(k)][:1]
    return panels


def plot_curves(runs: Sequence[RunData], out_dir: str | Path) -> dict[str, Path]:
    """One PNG per logged metric (OUT/curves/NAME.png), all runs overlaid, plus OUT/key_metrics.png.

    Returns ``{metric: path}`` plus ``"key_metrics"`` for the grid. Event steps (alarms, ...) are
    drawn as dashed vertical lines on the grid so a spike can be matched with what was flagged.
    """
    out = Path(out_dir)
    colours = _colours()
    written: dict[str, Path] = {}
    for key in metric_keys(runs):
        fig = _figure((6, 3.6))
        ax = fig.add_subplot(1, 1, 1)
        if _draw(ax, runs, key, colours):
            if len(runs) > 1:
                ax.legend(fontsize=7)
            fig.tight_layout()
            written[key] = _save(fig, out / "curves" / f"{_safe(key)}.png")
    panels = _key_panels(runs)
    if panels:
        cols = 3
        rows = -(-len(panels) // cols)
        fig = _figure((5 * cols, 3.4 * rows + 0.6))
        handles: dict[str, Any] = {}
        for j, key in enumerate(panels):
            ax = fig.add_subplot(rows, cols, j + 1)
            _draw(ax, runs, key, colours)
            for i, run in enumerate(runs):
                for ev in run.events:
                    ax.axvline(ev["step"], color=colours[i % len(colours)], linestyle="--", alpha=0.5)
            for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, h)
        if handles:
            fig.legend(
                list(handles.values()),
                list(handles),
                loc="lower center",
                ncol=min(len(handles), 5),
                fontsize=9,
            )
        fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
        written["key_metrics"] = _save(fig, out / "key_metrics.png")
    return written


def plot_position_heatmaps(
    run: RunData, out_dir: str | Path, metrics: Sequence[str] = HEATMAP_METRICS
) -> dict[str, Path]:
    """Response-position x training-step heatmaps (OUT/heatmaps/RUN_METRIC.png); {} without binned keys.

    y = position bin labelled with its token range (from ``rollout.max_new_tokens``; bare bin numbers
    without a config), bin 0 (response start) at the bottom; x = step. Each metric has its own colour
    scale so its structure stays visible even when the teacher's entropy is far below the student's.
    Unlogged cells (bins no response reached) are left blank.
    """
    out = Path(out_dir)
    written: dict[str, Path] = {}
    budget = run.config_get("rollout.max_new_tokens")
    for metric in metrics:
        steps, mat = position_matrix(run, metric)
        if not steps or not np.isfinite(mat).any():
            continue
        n_bins = mat.shape[0]
        x = np.asarray(steps, float)
        if len(x) > 1:
            mid = (x[1:] + x[:-1]) / 2
            edges = np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])
        else:
            edges = np.array([x[0] - 0.5, x[0] + 0.5])
        fig = _figure((7, 1.2 + 0.45 * max(n_bins, 3)))
        ax = fig.add_subplot(1, 1, 1)
        mesh = ax.pcolormesh(
            edges, np.arange(n_bins + 1), np.ma.masked_invalid(mat), cmap="viridis", shading="flat"
        )
        fig.colorbar(mesh, ax=ax, label=metric)
        ax.set_yticks(np.arange(n_bins) + 0.5)
        ax.set_yticklabels(bin_labels(n_bins, budget), fontsize=8)
        known = isinstance(budget, int) and budget > 0
        ax.set_ylabel("response tokens" if known else "response-position bin")
        ax.set_xlabel("step")
        ax.set_title(f"{run.name}: {metric} by response position", fontsize=10)
        fig.tight_layout()
        written[metric] = _save(fig, out / "heatmaps" / f"{_safe(run.name)}_{metric}.png")
    return written


# ----------------------------------------------------------------------------------------------------
# The report


def _final_metrics(run: RunData) -> dict[str, float]:
    """The last logged value of every non-binned metric (training and eval)."""
    out: dict[str, float] = {}
    for key in metric_keys([run]):
        _, values = series(run, key)
        if values:
            out[key] = values[-1]
    return out


def _event_text(ev: dict[str, Any]) -> str:
    rest = {k: v for k, v in ev.items() if k not in ("step", "kind")}
    detail = ", ".join(f"{k}={v}" for k, v in rest.items())
    return f"step {ev['step']}: {ev.get('kind')}" + (f" ({detail})" if detail else "")


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _signal_table(
    runs: Sequence[RunData], signals: Sequence[dict[str, Any]]
) -> tuple[list[str], list[list[str]]]:
    header = ["signal", *[r.name for r in runs]]
    rows: list[list[str]] = [["steps", *[str(s["n_steps"]) for s in signals]]]
    for m in SIGNAL_METRICS:
        cells = []
        for s in signals:
            st = s["metrics"][m]
            cells.append(f"{_g(st['initial'])} -> {_g(st['final'])} (slope {_g(st['slope'])})")
        rows.append([m, *cells])
    rows.append(["verdict", *[s["verdict"] for s in signals]])
    return header, rows


def write_analysis(runs: Sequence[RunData], out_dir: str | Path) -> dict[str, Path]:
    """Write analysis.md, analysis.html, analysis.json and the PNGs into ``out_dir``; return the paths.

    Keys: ``markdown``, ``html``, ``json``, ``curve:METRIC``, ``key_metrics``, ``heatmap:RUN:METRIC``.
    The JSON holds per run: success signals, final metrics, eval rows, events and read warnings; NaN
    becomes null so strict parsers accept it.
    """
    from opd.files import atomic_write_text, json_safe

    if not runs:
        raise OpdError("nothing to analyze: no run given")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OpdError(f"{out}: cannot create the output directory ({exc.strerror or exc})") from exc
    written: dict[str, Path] = {}
    for key, path in plot_curves(runs, out).items():
        written["key_metrics" if key == "key_metrics" else f"curve:{key}"] = path
    heatmaps: dict[str, dict[str, Path]] = {}
    for run in runs:
        heatmaps[run.name] = plot_position_heatmaps(run, out)
        for metric, path in heatmaps[run.name].items():
            written[f"heatmap:{run.name}:{metric}"] = path
    signals = [success_signals(r) for r in runs]
    notes = compare_runs(runs, signals)

    thresholds = {
        "edge_fraction": EDGE_FRACTION,
        "min_steps_for_reading": MIN_STEPS_FOR_READING,
        "move_abs": MOVE_ABS,
        "move_rel": MOVE_REL,
        "improving_min": IMPROVING_MIN,
        "degrading_min": DEGRADING_MIN,
        "small_level_ratio": SMALL_LEVEL_RATIO,
    }
    data = {
        "runs": [
            {
                "name": r.name,
                "path": str(r.path),
                "train_steps": len(r.train),
                "last_step": max((row["step"] for row in r.train), default=None),
                "max_new_tokens": r.config_get("rollout.max_new_tokens"),
                "position_bins": r.config_get("diagnostics.position_bins"),
                "success_signals": s,
                "final": _final_metrics(r),
                "evals": r.evals,
                "events": r.events,
                "warnings": r.warnings,
            }
            for r, s in zip(runs, signals, strict=True)
        ],
        "comparison_notes": notes,
        "thresholds": thresholds,
        "files": {k: _rel(p, out) for k, p in written.items()},
    }
    json_path = out / "analysis.json"
    atomic_write_text(json_path, json.dumps(json_safe(data), indent=2, allow_nan=False, default=str) + "\n")

    doc = _analysis_document(runs, signals, notes, written, heatmaps, out)
    md_path, html_path = out / "analysis.md", out / "analysis.html"
    write_document(doc, md_path, html_path, title=_title(runs))
    return {"markdown": md_path, "html": html_path, "json": json_path, **written}


def _title(runs: Sequence[RunData]) -> str:
    return "opd analyze: " + ", ".join(r.name for r in runs)


def _analysis_document(
    runs: Sequence[RunData],
    signals: Sequence[dict[str, Any]],
    notes: Sequence[str],
    written: dict[str, Path],
    heatmaps: dict[str, dict[str, Path]],
    out: Path,
) -> list[Block]:
    """analysis.md and analysis.html as one document, so the two always say the same thing."""
    header, rows = _signal_table(runs, signals)
    eval_keys = [k for k in metric_keys(runs) if k.startswith("eval/")]
    eval_rows = [
        [k, *[_g(series(r, k)[1][-1]) if series(r, k)[1] else "n/a" for r in runs]] for k in eval_keys
    ]
    names = [esc(r.name) for r in runs]
    doc: list[Block] = [
        Heading(esc(_title(runs)), 1),
        Paragraph("Runs: " + "; ".join(f"{code(r.name)} = {esc(str(r.path))}" for r in runs)),
        Heading("Success signals"),
        Paragraph("initial -> final (mean of the first / last 10% of steps), least-squares slope per step."),
        Table([esc(h) for h in header], [[esc(c) for c in row] for row in rows]),
        Heading("Reading"),
        Bullets(
            [
                f"**{esc(r.name)}** ({esc(s['verdict'])}): {esc(s['reading'])}"
                for r, s in zip(runs, signals, strict=True)
            ]
            + [esc(n) for n in notes]
        ),
    ]
    if eval_rows:
        doc += [
            Heading("Final evaluation"),
            Table(["metric", *names], [[esc(c) for c in row] for row in eval_rows], numeric=True),
        ]
    events = [f"{esc(r.name)}: {esc(_event_text(ev))}" for r in runs for ev in r.events]
    doc += [Heading("Events"), Bullets(events) if events else Paragraph("none")]
    warn = [f"{esc(r.name)}: {esc(w)}" for r in runs for w in r.warnings]
    if warn:
        doc += [Heading("Read warnings"), Bullets(warn)]
    key = (
        [Figure(_rel(written["key_metrics"], out), "key metrics", wide=True)]
        if "key_metrics" in written
        else []
    )
    maps = [Figure(_rel(p, out), f"{name}: {m} by response position") for name, ms in heatmaps.items()
            for m, p in ms.items()]  # fmt: skip
    curves = [Figure(_rel(p, out), k.split(":", 1)[1]) for k, p in written.items() if k.startswith("curve:")]
    doc += [Heading("Figures"), Figures(key + maps), Heading("All metrics"), Figures(curves)]
    return doc
