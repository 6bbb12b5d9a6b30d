"""Launching `opd` in subprocesses from tests without ever leaving a process behind.

A CI run once hit its 600 s timeout in `test_two_processes_match_one` with one torchrun rank hung at exit;
`subprocess.run(timeout=...)` killed torchrun only, and the rank (torchrun starts each worker in its own
session, so it is not even in torchrun's process group) lived on as an orphan. Everything here kills the
whole process tree on a timeout (and at interpreter exit), and a failure message carries every rank's log.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import weakref
from collections.abc import Sequence
from typing import Any

import psutil  # an accelerate dependency

DEFAULT_TIMEOUT_S = 600.0
# A rank whose peer died fails its next collective after this long instead of torch's 30 minutes.
TEST_DIST_TIMEOUT_S = "120"

_live: weakref.WeakSet[Proc] = weakref.WeakSet()


def opd_env(**extra: str) -> dict[str, str]:
    """The environment tests launch opd with: unbuffered output, one thread, a short collective timeout."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "OPD_DIST_TIMEOUT": TEST_DIST_TIMEOUT_S,
        **extra,
    }


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal `pid` and every descendant, including those in other sessions or process groups (collected
    before anything dies, since orphans are re-parented to init and could no longer be found)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            if os.getpgid(p.pid) == p.pid:  # a group leader (torchrun's workers): its own children too
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    psutil.wait_procs(procs, timeout=10)


class Proc(subprocess.Popen):
    """A `Popen` in its own session whose `communicate(timeout)` kills the whole tree on a timeout and
    fails with the output so far; `kill()` kills the tree too. Output is text, stderr merged into stdout
    unless the caller says otherwise."""

    def __init__(self, cmd: Sequence[str], **kw: Any) -> None:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        kw.setdefault("text", True)
        kw.setdefault("env", opd_env())
        kw["start_new_session"] = True
        super().__init__(list(cmd), **kw)
        self.cmd = list(cmd)
        _live.add(self)

    def kill(self) -> None:
        kill_tree(self.pid)

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[Any, Any]:
        try:
            return super().communicate(input, timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.pid)
            out, err = super().communicate()
            raise AssertionError(
                f"timed out after {timeout:.0f}s, process tree killed: {' '.join(self.cmd)}\n"
                f"--- output of all ranks ---\n{out or ''}{err or ''}"
            ) from None


def run(cmd: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT_S, **kw: Any) -> subprocess.CompletedProcess:
    """`subprocess.run` with `Proc`'s tree kill on timeout; ``stdout`` holds stdout and stderr merged."""
    proc = Proc(cmd, **kw)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.cmd, proc.returncode, out, err or "")


def torchrun(args: Sequence[str], *, nproc: int = 2, command: str = "train", timeout: float = DEFAULT_TIMEOUT_S,
             **kw: Any) -> subprocess.CompletedProcess:  # fmt: skip
    """``opd COMMAND ARGS`` on `nproc` CPU ranks (gloo) under torchrun; never outlives its timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "opd.cli", command, *args]  # fmt: skip
    return run(cmd, timeout=timeout, **kw)


def opd(args: Sequence[str], **kw: Any) -> Proc:
    """``python -m opd.cli ARGS`` started in the background (the caller communicates or signals it)."""
    return Proc([sys.executable, "-m", "opd.cli", *args], **kw)


def log_of(result: subprocess.CompletedProcess) -> str:
    """What a failed assertion should show: the exit code and every rank's output."""
    return f"exit code {result.returncode}\n--- output of all ranks ---\n{result.stdout}{result.stderr or ''}"


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        if proc.poll() is None:
            kill_tree(proc.pid)
