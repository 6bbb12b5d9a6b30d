"""Pieces every `opd` command module shares: the stderr console, pass-through options, error exit."""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from opd.errors import InterruptedRun, OpdError

# Progress, notes and errors go to stderr so stdout stays clean for data (e.g. `opd config show`).
console = Console(stderr=True, soft_wrap=True)

# Set to 1 to see the traceback behind an error message (`fail`); `opd --debug` sets it.
DEBUG_ENV = "OPD_DEBUG"

# Commands whose every config field is a `--section.field VALUE` option take unknown options through.
PASSTHROUGH = {
    "allow_extra_args": True,
    "ignore_unknown_options": True,
    "help_option_names": ["-h", "--help"],
}


def fail(exc: Exception, code: int = 2) -> None:
    """One red line instead of a traceback; the message is printed literally (no rich markup). An
    exception's own ``exit_code`` (e.g. `opd.errors.InterruptedRun`: 130) wins over ``code``.

    With ``OPD_DEBUG=1`` in the environment (the CLI's ``--debug``) the traceback of what caused the
    error (the library exception opd translated, e.g. a torch or gguf error) is printed first: the one
    line is for users, the traceback for a bug report. The red line stays last either way.
    """
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        console.print(Text("".join(traceback.format_exception(exc)), style="dim"))
    console.print(Text.assemble(("error: ", "bold red"), str(exc)))
    raise typer.Exit(getattr(exc, "exit_code", code))


def given_options(**kw: Any) -> dict[str, Any]:
    """Only the options the user actually gave, so YAML values are not overwritten by defaults."""
    return {k: v for k, v in kw.items() if v is not None and v != []}


def is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


# What gloo and NCCL say in the surviving processes when another process of the run died or raised.
_PEER_GONE = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "nccl communicator was aborted",
    "remote worker crashing",
)


def peer_failure(exc: BaseException) -> OpdError | None:
    """The one line for a process of a multi-process run whose collective failed because another process
    failed first (the first error, the cause, is in that process's log above): without it every
    surviving rank prints a 60-line torch traceback that buries the real one. None when `exc` is not
    that (a single process, or another error)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    text = str(exc).lower()
    if not (isinstance(exc, RuntimeError) and any(s in text for s in _PEER_GONE)):
        return None
    rank = os.environ.get("RANK", "?")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = next((line for line in lines if any(s in line.lower() for s in _PEER_GONE)), lines[0])
    lost = OpdError(
        f"rank {rank}: another process of this run failed or was killed, so this one stopped too "
        f"(torch: {first[:160]}); the cause is the first error of another rank in the log above"
    )
    lost.__cause__ = exc  # what `opd --debug` prints
    return lost


def startup_interrupted(again: str) -> InterruptedRun:
    """A Ctrl-C while models load (before a command's own SIGINT handling takes over): exit 130 with
    what to rerun, instead of click's bare "Aborted!"."""
    return InterruptedRun(f"interrupted during start-up, before any work was saved; rerun {again}")


def exit_code(exc: OpdError) -> int:
    """3: a non-finite step (stop_on_nan); 4: a declared collapse (stop_on_collapse); 5: the teacher
    servers stayed down (a resume redoes the step); 2: every other expected failure."""
    from opd.teachers.http import TeacherUnavailableError
    from opd.train.alarms import CollapseError
    from opd.train.trainer import NonFiniteLossError

    codes = ((NonFiniteLossError, 3), (CollapseError, 4), (TeacherUnavailableError, 5))
    return next((c for t, c in codes if isinstance(exc, t)), 2)


@contextlib.contextmanager
def training_errors(rerun: str) -> Iterator[None]:
    """How `opd train`, `sft` and `cold-start` end on a failure, in one place: a Ctrl-C while models
    load exits 130 saying what to rerun (`rerun`); a process whose peer died prints one line
    (`peer_failure`); an expected failure is one line with its `exit_code`; anything else is a bug and
    keeps its traceback."""
    try:
        yield
    except KeyboardInterrupt:
        fail(startup_interrupted(rerun))
    except RuntimeError as exc:
        lost = peer_failure(exc)
        if lost is None:
            raise
        fail(lost)
    except OpdError as exc:
        fail(exc, exit_code(exc))
