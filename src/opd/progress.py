"""Long-running loops: their progress display and their orderly stop on Ctrl-C.

`Progress` is a drop-in for `rich.progress.Progress`. On a terminal it is rich's live bar. When the console
is not a terminal (a batch job writing ``> log 2>&1``, CI), rich draws nothing until the end, so a
ten-minute sampling phase looked like a hang; there this class prints plain lines instead, e.g.::

    opd train: 12/100 (12%) | 0.41/s | elapsed 0:00:29 | eta 0:03:34 | loss 1.23 ...

one when a task starts, then every ``OPD_PROGRESS_EVERY`` seconds (default 30) or every 10% of the total,
whichever comes first, and once at the end; a slow step still gets a line per interval (a heartbeat
thread), so a silent log always means a stuck process, never a slow one.

`StopRequests` turns the first SIGINT/SIGTERM into a request the loop honours at its next safe point
(after the current step or batch), so the work done so far is kept and the command can say how to resume;
a second signal exits at once.

`quiet_libraries()` turns off the libraries' own chatter (transformers' "Loading weights" bars, its
info/warning log lines, huggingface_hub's bars, accelerate's notices) for a command whose output should
be opd's alone; errors still show.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any

from rich import progress as _rp
from rich.console import Console
from rich.text import Text

DEFAULT_EVERY_S = 30.0
FRACTION_STEP = 0.1  # a plain line at least every 10% of a task's total
# A terminal's Ctrl-C reaches every process of the foreground group, and torchrun then forwards its own
# SIGINT/SIGTERM to its workers: signals this close to the first are one request, not a second one.
SAME_REQUEST_S = 2.0


def progress_every() -> float:
    """Seconds between plain progress lines, from ``OPD_PROGRESS_EVERY`` (default 30; <= 0 means only the
    10% marks and the ends)."""
    try:
        return float(os.environ.get("OPD_PROGRESS_EVERY", DEFAULT_EVERY_S))
    except ValueError:
        return DEFAULT_EVERY_S


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.3g}"


def _decile(fraction: float) -> int:
    """Which 10% band `fraction` is in (robust to 0.3 / 0.1 == 2.999...)."""
    return int(fraction / FRACTION_STEP + 1e-9)


def _plain(markup: str) -> str:
    try:
        return Text.from_markup(markup).plain
    except Exception:  # not valid markup: show it as it is
        return markup


class Progress(_rp.Progress):
    """`rich.progress.Progress`, printing plain periodic lines when its console is not a terminal.

    ``name`` labels the plain lines; without it the first column is used when it is fixed text (the
    ``TextColumn("[bold]opd train")`` every opd bar starts with). The whole rich API (add_task, update,
    advance, remove_task, tasks, track) works in both modes.
    """

    def __init__(self, *columns: Any, name: str | None = None, every: float | None = None, **kw: Any):
        self._plain_mode = False
        super().__init__(*columns, **kw)
        self._plain_mode = not self.disable and not self.console.is_terminal
        if self._plain_mode:
            self.disable = True  # no live display: rich would only print one final frame at the end
        self._name = name if name is not None else self._name_from_columns()
        self._every = progress_every() if every is None else every
        self._printed: dict[int, tuple[float, float]] = {}  # task id -> (time, fraction) of its last line
        self._initial: dict[int, float] = {}  # task id -> completed when added (a resumed run's start step)
        self._stop_beat = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def plain(self) -> bool:
        """True when this progress prints plain lines (the console is not a terminal)."""
        return self._plain_mode

    def _name_from_columns(self) -> str:
        first = self.columns[0] if self.columns else None
        if (
            isinstance(first, _rp.TextColumn)
            and isinstance(first.text_format, str)
            and "{" not in first.text_format
        ):
            return _plain(first.text_format).strip()
        return ""

    # -- the rich API, with a plain line where one is due ---------------------------------------------

    def start(self) -> None:
        super().start()
        if self._plain_mode and self._every > 0 and self._beat is None:
            self._stop_beat.clear()
            self._beat = threading.Thread(target=self._heartbeat, name="opd-progress", daemon=True)
            self._beat.start()

    def stop(self) -> None:
        if self._beat is not None:
            self._stop_beat.set()
            self._beat.join(timeout=5)
            self._beat = None
        if self._plain_mode:
            for task in list(self.tasks):
                if task.visible and self._printed.get(task.id, (0.0, -1.0))[1] != self._fraction(task):
                    self._print(task)
        super().stop()

    def add_task(self, description: str, *args: Any, **kw: Any) -> _rp.TaskID:
        task_id = super().add_task(description, *args, **kw)
        self._initial[task_id] = self._tasks[task_id].completed
        if self._plain_mode:
            self._print(self._tasks[task_id])
        return task_id

    def update(self, task_id: _rp.TaskID, **kw: Any) -> None:
        super().update(task_id, **kw)
        self._maybe_print(task_id)

    def advance(self, task_id: _rp.TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_print(task_id)

    def remove_task(self, task_id: _rp.TaskID) -> None:
        self._printed.pop(task_id, None)
        self._initial.pop(task_id, None)
        super().remove_task(task_id)

    # -- plain lines -------------------------------------------------------------------------------------

    @staticmethod
    def _fraction(task: _rp.Task) -> float:
        return min(1.0, task.completed / task.total) if task.total else 0.0

    def _maybe_print(self, task_id: _rp.TaskID) -> None:
        if not self._plain_mode:
            return
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or not task.visible:
                return
            when, frac = self._printed.get(task_id, (0.0, -1.0))
            now = time.monotonic()
            f = self._fraction(task)
            due = (
                (self._every > 0 and now - when >= self._every)
                or _decile(f) > _decile(max(frac, 0.0))
                or (f >= 1.0 and frac < 1.0)
            )
        if due:
            self._print(task)

    def _heartbeat(self) -> None:
        """A line per interval even while no update comes (one long step, a slow model load)."""
        while not self._stop_beat.wait(min(self._every, 5.0)):
            now = time.monotonic()
            for task in list(self.tasks):
                when, _ = self._printed.get(task.id, (now, 0.0))
                if task.visible and not task.finished and now - when >= self._every:
                    self._print(task)

    def line(self, task: _rp.Task) -> str:
        """The plain line for `task`: counts, percentage, rate, elapsed time, ETA, then its description."""
        parts = []
        total = task.total
        elapsed = task.elapsed or 0.0
        # The average rate since the task started: rich's own estimate only looks at the last 30 s, which
        # holds a single sample when one step takes longer (no rate, no ETA exactly when they matter).
        done = task.completed - self._initial.get(task.id, 0.0)
        rate = done / elapsed if done > 0 and elapsed > 0 else None
        if total == 1:  # a fraction-of-work task (opd doctor reports 0.0 .. 1.0)
            parts.append(f"{100 * self._fraction(task):.0f}%")
        elif total:
            parts.append(f"{_count(task.completed)}/{_count(total)} ({100 * self._fraction(task):.0f}%)")
            if rate:
                parts.append(f"{rate:.3g}/s" if rate >= 0.1 else f"{1 / rate:.3g}s each")
        else:
            parts.append(_count(task.completed))
        parts.append(f"elapsed {_clock(elapsed)}")
        if total and task.completed < total:
            parts.append(f"eta {_clock((total - task.completed) / rate if rate else None)}")
        detail = [_plain(str(task.description or ""))]
        detail += [_plain(str(v)) for v in task.fields.values() if isinstance(v, str)]
        head = f"{self._name}: " if self._name else ""
        return head + " | ".join(parts + [d.strip() for d in detail if d.strip()])

    def _print(self, task: _rp.Task) -> None:
        with self._lock:
            self._printed[task.id] = (time.monotonic(), self._fraction(task))
            text = self.line(task)
        self.console.print(Text(text), soft_wrap=True)


def bar(name: str, *, console: Console | None = None, enabled: bool = True, remaining: bool = True,
        **kw: Any) -> Progress:  # fmt: skip
    """opd's usual bar: ``name``, bar, done/total, elapsed, ETA and the task's description."""
    columns: list[Any] = [_rp.TextColumn(f"[bold]{name}"), _rp.BarColumn(), _rp.MofNCompleteColumn(),
                          _rp.TimeElapsedColumn()]  # fmt: skip
    if remaining:
        columns.append(_rp.TimeRemainingColumn())
    columns.append(_rp.TextColumn("{task.description}"))
    return Progress(
        *columns,
        console=console or Console(stderr=True),
        disable=not enabled,
        transient=False,
        name=name,
        **kw,
    )


# ----------------------------------------------------------------------------------------------------
# The libraries' own output

QUIET_LOGGERS = ("transformers", "accelerate", "huggingface_hub", "datasets", "torch.distributed")
"""Loggers held at ERROR inside `quiet_libraries` (their info and warnings are about the libraries'
internals: load reports, generation-flag notes, deprecations, none of which a user of opd can act on)."""
QUIET_WARNING_MODULES = r"(transformers|accelerate|huggingface_hub|datasets)(\.|$)"
"""Modules whose Python `warnings` (FutureWarning, UserWarning ...) are hidden inside `quiet_libraries`."""


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Within the block, transformers / accelerate / huggingface_hub print only errors: no "Loading weights"
    or download bars, no info or warning log lines, no Python warnings from those packages.

    Everything is restored on exit (verbosity, bars, logger levels, warning filters), so it nests and can
    wrap one phase of a command. Errors (log records at ERROR and above, exceptions) still show. A user who
    set ``TRANSFORMERS_VERBOSITY`` or ``OPD_DEBUG`` asked to see the libraries: then this does nothing.
    Not thread-safe (logger levels and warning filters are process-wide), like `warnings.catch_warnings`.
    """
    if os.environ.get("TRANSFORMERS_VERBOSITY") or os.environ.get("OPD_DEBUG"):
        yield
        return
    restore: list[Callable[[], None]] = []
    try:
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:  # pragma: no cover - transformers is a dependency
            hf_logging = None
        if hf_logging is not None:
            verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            restore.append(lambda: hf_logging.set_verbosity(verbosity))
            restore.append(hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)
        try:
            from huggingface_hub.utils import (
                are_progress_bars_disabled,
                disable_progress_bars,
                enable_progress_bars,
            )
        except ImportError:  # pragma: no cover
            pass
        else:
            hub_off = are_progress_bars_disabled()
            disable_progress_bars()
            if not hub_off:
                restore.append(enable_progress_bars)
        for name in QUIET_LOGGERS:
            lg = logging.getLogger(name)
            level = lg.level
            if lg.getEffectiveLevel() < logging.ERROR:
                lg.setLevel(logging.ERROR)
                restore.append(lambda lg=lg, level=level: lg.setLevel(level))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=QUIET_WARNING_MODULES)
            yield
    finally:
        for undo in reversed(restore):
            undo()


# ----------------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM: stop at the next safe point


class StopRequests:
    """Within ``with StopRequests(log, on_second) as stop:``, SIGINT/SIGTERM set ``stop.requested``.

    The loop checks ``stop.requested`` at its safe points (between steps/batches) and ends cleanly,
    keeping its work and printing how to resume. A second signal (more than `SAME_REQUEST_S` after the
    first, so a launcher forwarding the terminal's Ctrl-C does not count twice) prints ``on_second()`` and
    exits at once with 130, skipping clean-up: what was written atomically (checkpoints, finished output
    lines) stays. Only the main thread can own signal handlers; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log: Callable[[str], Any] | None = None, on_second: Callable[[], str] | None = None,
                 what: str = "the current step") -> None:  # fmt: skip
        self.log = log or (lambda msg: None)
        self.on_second = on_second or (lambda: "")
        self.what = what
        self.requested: int | None = None
        self._first = 0.0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.requested is None:
            self.requested = signum
            self._first = now
            self.log(
                f"[yellow]{signal.Signals(signum).name}[/]: stopping after {self.what} "
                "(send it again to stop at once)"
            )
            return
        if now - self._first < SAME_REQUEST_S:
            return
        msg = self.on_second()
        sys.stderr.write(f"interrupted again: stopped at once{'; ' + msg if msg else ''}\n")
        sys.stderr.flush()
        os._exit(130)
