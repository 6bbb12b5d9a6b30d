"""Collapse alarms: watch a run's per-step metrics for the signatures of a collapsing OPD run.

The paper (finding 7) reports that long response budgets collapse late: the overlap ratio drops, the
student's entropy and the gradient norm spike, and responses run into the budget. Such a run can burn
hours of GPU time after it has stopped learning, and its last checkpoints hold damaged weights. The
`CollapseMonitor` here turns those signatures into alarms while the run is going:

* each watched signal has a baseline, an exponential moving average of its own clean history
  (``alarms.ema``); the first ``alarms.warmup_steps`` values form it as a plain mean and cannot alarm;
* a step alarms on a signal when the signal crosses its threshold relative to the baseline (a ratio for
  entropy, length and gradient norm, an absolute difference for overlap and truncation rates, which
  live in [0, 1]);
* a step with any alarm is NOT used to update any baseline, so a collapse that unfolds over several
  steps cannot drag its own reference along with it;
* ``alarms.patience`` consecutive alarming steps declare a collapse; a single spike only warns;
* a non-finite loss, gradient norm or watched signal is a ``nan`` alarm at once, warm-up or not (it
  counts toward the patience like any other alarm; the trainer's ``stop_on_nan`` already stops a run on
  the first non-finite loss unless the user turned it off).

`CheckpointJudge` decides which checkpoint holds good weights from those alarms. This module is pure
logic (no torch, and no I/O but a directory check): the trainer feeds it the already-reduced metrics, which
are identical on every process, and stores `CollapseMonitor.state_dict` in its checkpoints so a resumed
run keeps its baselines instead of learning them again from a possibly already drifting state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from opd.config import AlarmConfig
from opd.errors import OpdError

__all__ = ["SIGNALS", "Alarm", "CheckpointJudge", "CollapseError", "CollapseMonitor", "watch_step"]

SIGNALS: dict[str, str] = {
    "entropy_student": "student entropy",
    "overlap_ratio": "overlap ratio",
    "response_len_mean": "mean response length",
    "truncation_rate": "truncation rate",
    "grad_norm": "gradient norm",
}
"""Watched metric -> its name in messages. The metric names are the trainer's metrics.jsonl keys, so an
alarm's `signal` joins directly with the step rows it refers to."""

NAN = "nan"
"""The signal of a non-finite loss, gradient norm or watched metric."""

_PRIORITY = (NAN, "overlap_ratio", "entropy_student", "truncation_rate", "response_len_mean", "grad_norm")
"""Which signal names a collapse when several alarmed equally often: the most specific first, the
gradient norm (heavy-tailed even in healthy runs) last."""

_ALWAYS_FINITE = ("loss", "grad_norm")
"""Metrics checked for NaN/inf even though they are not (all) watched against a baseline."""


class CollapseError(OpdError):
    """A run was stopped because a collapse was declared (``stop_on_collapse``).

    `checkpoint` is the last checkpoint known to precede the collapse, or None when there is none.
    """

    def __init__(self, message: str, *, step: int, signal: str, checkpoint: str | None = None):
        super().__init__(message)
        self.step = step
        self.signal = signal
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class Alarm:
    """One signal over its threshold at one step.

    `baseline` and `threshold` are None for ``nan`` alarms, which need no baseline. `value` may be a
    non-finite float for them.
    """

    step: int
    signal: str
    value: float
    baseline: float | None
    threshold: float | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(x: Any) -> float | None:
    """A metric as a float, or None when absent or not a number; non-finite floats are kept."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


class CollapseMonitor:
    """Per-step collapse detection over a run's metrics (see the module docstring for the rules).

    Call `update` once per step with the step's metrics; it returns that step's alarms. A streak of
    ``patience`` consecutive alarming steps declares a collapse: `declared` is true for that one update,
    `collapsed` becomes true and stays true, and `reason`, `collapse_step` and `collapse_signal` describe
    the latest declaration (a run that recovers and collapses again declares again). `alarming` tells
    whether the last step alarmed, `streak` how many consecutive steps did, `streak_start` since when.
    """

    def __init__(self, cfg: AlarmConfig | None = None):
        self.cfg = cfg or AlarmConfig()
        self._base: dict[str, dict[str, float]] = {}  # signal -> {"mean": float, "n": count}
        self.streak = 0
        self.streak_start: int | None = None
        self._streak_counts: dict[str, int] = {}
        self.alarming = False
        self.declared = False
        self.collapsed = False
        self.collapse_step: int | None = None
        self.collapse_signal: str | None = None
        self.reason: str | None = None

    # ------------------------------------------------------------------------------------------------

    def baseline(self, signal: str) -> float | None:
        """The signal's current baseline, or None while it has no values yet."""
        b = self._base.get(signal)
        return None if b is None else b["mean"]

    def _warm(self, signal: str) -> bool:
        b = self._base.get(signal)
        return b is not None and b["n"] >= self.cfg.warmup_steps

    def _check(self, step: int, signal: str, value: float, base: float) -> Alarm | None:
        c = self.cfg
        name = SIGNALS[signal]
        if signal == "entropy_student":
            if c.entropy_ratio is None:
                return None
            thr = max(c.entropy_ratio * base, base + c.entropy_min_delta)
            if value > thr:
                return Alarm(step, signal, value, base, thr,
                             f"{name} {value:.4g} nats is {value / base if base > 0 else math.inf:.2f}x its "
                             f"baseline {base:.4g} (alarm above {thr:.4g})")  # fmt: skip
        elif signal == "overlap_ratio":
            if c.overlap_drop is None:
                return None
            thr = base - c.overlap_drop
            if value < thr:
                return Alarm(step, signal, value, base, thr,
                             f"{name} {value:.3f} fell {base - value:.3f} below its baseline {base:.3f} "
                             f"(alarm below {thr:.3f})")  # fmt: skip
        elif signal == "truncation_rate":
            if c.truncation_jump is None:
                return None
            thr = base + c.truncation_jump
            if value > thr:
                return Alarm(step, signal, value, base, thr,
                             f"{name} {value:.3f} is {value - base:.3f} above its baseline {base:.3f} "
                             f"(alarm above {thr:.3f})")  # fmt: skip
        else:  # ratio signals: response length, gradient norm
            ratio = c.length_ratio if signal == "response_len_mean" else c.grad_norm_ratio
            if ratio is None or base <= 0:  # a ratio to a zero baseline means nothing
                return None
            thr = ratio * base
            if value > thr:
                unit = " tokens" if signal == "response_len_mean" else ""
                return Alarm(step, signal, value, base, thr,
                             f"{name} {value:.4g}{unit} is {value / base:.2f}x its baseline {base:.4g} "
                             f"(alarm above {thr:.4g})")  # fmt: skip
        return None

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[Alarm]:
        """Judge step `step`'s metrics; returns its alarms (empty when clean or disabled).

        Missing metrics are skipped (the trainer omits a mean over zero tokens rather than logging 0).
        """
        self.declared = False
        if not self.cfg.enabled:
            self.alarming = False
            return []
        alarms: list[Alarm] = []
        bad = {
            key: float(v)
            for key in (*_ALWAYS_FINITE, *SIGNALS)
            if (v := _num(metrics.get(key))) is not None and not math.isfinite(v)
        }
        if bad:
            what = ", ".join(f"{k}={v}" for k, v in bad.items())
            alarms.append(Alarm(step, NAN, next(iter(bad.values())), None, None, f"non-finite {what}"))
        clean: dict[str, float] = {}
        for signal in SIGNALS:
            value = _num(metrics.get(signal))
            if value is None or signal in bad:
                continue
            clean[signal] = value
            if self._warm(signal):
                alarm = self._check(step, signal, value, self._base[signal]["mean"])
                if alarm is not None:
                    alarms.append(alarm)

        self.alarming = bool(alarms)
        if alarms:
            if self.streak == 0:
                self.streak_start = step
                self._streak_counts = {}
            self.streak += 1
            for a in alarms:
                self._streak_counts[a.signal] = self._streak_counts.get(a.signal, 0) + 1
            if self.streak == self.cfg.patience:
                self._declare(step, alarms)
        else:
            self.streak = 0
            self.streak_start = None
            self._streak_counts = {}
            self._absorb(clean)
        return alarms

    def _absorb(self, values: Mapping[str, float]) -> None:
        """Fold a clean step into the baselines: plain mean while warming up, then the EMA."""
        for signal, value in values.items():
            b = self._base.setdefault(signal, {"mean": 0.0, "n": 0})
            n = int(b["n"])
            if n < self.cfg.warmup_steps:
                b["mean"] = (b["mean"] * n + value) / (n + 1)
            else:
                b["mean"] = self.cfg.ema * b["mean"] + (1.0 - self.cfg.ema) * value
            b["n"] = n + 1

    def _declare(self, step: int, alarms: list[Alarm]) -> None:
        ranked = sorted(self._streak_counts.items(), key=lambda kv: (-kv[1], _PRIORITY.index(kv[0])))
        self.declared = True
        self.collapsed = True
        self.collapse_step = step
        self.collapse_signal = ranked[0][0]
        now = next((a.message for a in alarms if a.signal == self.collapse_signal), alarms[0].message)
        signals = ", ".join(f"{s} {n}x" for s, n in ranked)
        self.reason = (
            f"collapse at step {step}: {self.streak} consecutive alarming steps since step {self.streak_start} "
            f"(patience {self.cfg.patience}; {signals}); now {now}"
        )

    # ------------------------------------------------------------------------------------------------
    # persistence (JSON-safe: the trainer writes it into the checkpoint's state.json)

    def state_dict(self) -> dict[str, Any]:
        return {
            "baselines": {k: {"mean": float(v["mean"]), "n": int(v["n"])} for k, v in self._base.items()},
            "streak": self.streak,
            "streak_start": self.streak_start,
            "streak_counts": dict(self._streak_counts),
            "alarming": self.alarming,
            "collapsed": self.collapsed,
            "collapse_step": self.collapse_step,
            "collapse_signal": self.collapse_signal,
            "reason": self.reason,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._base = {
            k: {"mean": float(v["mean"]), "n": int(v["n"])} for k, v in state.get("baselines", {}).items()
        }
        self.streak = int(state.get("streak", 0))
        self.streak_start = state.get("streak_start")
        self._streak_counts = {k: int(v) for k, v in state.get("streak_counts", {}).items()}
        self.alarming = bool(state.get("alarming", False))
        self.collapsed = bool(state.get("collapsed", False))
        self.collapse_step = state.get("collapse_step")
        self.collapse_signal = state.get("collapse_signal")
        self.reason = state.get("reason")


class CheckpointJudge:
    """Which checkpoint holds good weights, as the alarms tell.

    A checkpoint saved after step s holds the weights that step s+1's rollouts and metrics measure, so it
    only counts as good once step s+1 came out clean (`judge`); one whose next step alarmed is never named
    as the one to go back to. `keep`: the run's keep_checkpoints, for saying why a good one is gone."""

    def __init__(self, keep: int):
        self.keep = keep
        self.last: Path | None = None  # the newest checkpoint written (or resumed from)
        self.good: Path | None = None  # the newest one a clean step vouched for
        self._unjudged: Path | None = None

    def saved(self, path: Path) -> None:
        self.last = self._unjudged = path

    def resumed(self, latest: Path, good: Path | None) -> None:
        """Resumed from `latest`; `good` is what its state recorded (its weights are judged again)."""
        self.last = self._unjudged = latest
        self.good = good

    def judge(self, alarming: bool) -> None:
        """The step after the newest checkpoint ended: clean metrics vouch for it, alarms condemn it."""
        if self._unjudged is not None:
            if not alarming:
                self.good = self._unjudged
            self._unjudged = None

    def describe_good(self) -> str:
        """The checkpoint to go back to, or why there is none, for the stop and collapse messages."""
        good = self.good
        if good is not None and good.is_dir():
            return str(good)
        if good is not None:
            return (
                f"none left ({good.name} was rotated away by keep_checkpoints={self.keep}; "
                "keep at least 2 to always hold one from before the alarms)"
            )
        if self.last is not None:
            return (
                f"none verified ({self.last} holds the weights whose rollouts raised the alarms; "
                "restart from the base model or use it with care)"
            )
        return "none (no checkpoint was written before the alarms)"

    def collapse(self, monitor: CollapseMonitor, step: int, *, stop: bool) -> CollapseError | str:
        """A collapse declared at `step`: the `CollapseError` to raise (`stop`, alarms.stop_on_collapse) or the
        line to log when the run goes on."""
        reason = monitor.reason or f"collapse at step {step}"
        where = self.describe_good()
        if stop:
            good = self.good
            return CollapseError(
                f"training stopped on a {reason}; the collapsed weights were not saved; last good checkpoint: {where}",
                step=step,
                signal=monitor.collapse_signal or NAN,
                checkpoint=str(good) if good is not None and good.is_dir() else None,
            )
        return f"{reason}; continuing because stop_on_collapse is false; last good checkpoint: {where}"


def watch_step(monitor: CollapseMonitor, judge: CheckpointJudge, acc: Any, step: int, metrics: Mapping[str, Any], *,
               log_row: Callable[[int, dict[str, Any]], Any], log: Callable[[str], Any]) -> tuple[bool, bool]:  # fmt: skip
    """Feed the collapse monitor one step's metrics; log its alarms (`log_row`: metrics.jsonl rows with
    ``kind: alarm``; `log`: the console); judge the checkpoint written before the step.

    Returns (this step alarmed, a collapse was declared at this step). Every process runs the monitor on the
    same reduced metrics; the decisions are still taken from the main process (broadcast) so no rank can
    take another branch on a rounding difference."""
    alarms = monitor.update(step, metrics)
    alarming, declared = monitor.alarming, monitor.declared
    if acc.num_processes > 1:
        import torch
        from accelerate.utils import broadcast

        flags = broadcast(torch.tensor([float(alarming), float(declared)], device=acc.device), from_process=0)
        alarming, declared = bool(flags[0].item()), bool(flags[1].item())
    for alarm in alarms:
        row = alarm.to_dict()
        del row["step"]
        log_row(alarm.step, {"kind": "alarm", **row, "collapsed": monitor.collapsed})
        log(f"[yellow]alarm:[/] step {alarm.step} {alarm.signal}: {alarm.message}")
    judge.judge(alarming)  # the newest checkpoint's weights produced this step's rollouts
    return alarming, declared
