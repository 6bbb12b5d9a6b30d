"""One run directory, one trainer (issue 21): a second `opd train` on a directory another trainer is writing,
new or `--resume`, is refused with one line naming the holder, and nothing of the first run is touched; a
lock left by a SIGKILLed trainer is free at once (the kernel drops a dead process's flock). Real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opd.errors import ConfigError
from opd.models.tiny import save_tiny_pair
from opd.train import checkpoint as ckpt
from opd.train.loop import LOCK_FILE, lock_run_dir, unlock_run_dir

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "400"}


def _args(pair: dict[str, Path], run: Path, steps: int) -> list[str]:
    opts = {
        "student": pair["student"], "teacher": pair["teacher"], "prompts": pair["prompts"], "run_dir": run,
        "prompts_per_step": 4, "micro_batch_size": 8, "rollout.rollouts_per_prompt": 2,
        "rollout.max_new_tokens": 8, "rollout.batch_size": 2, "steps": steps, "checkpoint_every": 1,
        "tracking.tensorboard": False, "diagnostics.k": 8, "loss.k": 8, "startup_checks": False,
    }  # fmt: skip
    return ["train", *[x for k, v in opts.items() for x in (f"--{k}", str(v))]]


def _opd(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opd.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=300, **kw)  # fmt: skip


def _holder(run: Path, proc: subprocess.Popen, timeout: float = 120) -> dict:
    """Wait until `proc` holds the lock and has written a checkpoint (so it is past start-up)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[0]
        lock = run / LOCK_FILE
        if lock.exists() and lock.read_text() and ckpt.list_checkpoints(run):
            return json.loads(lock.read_text())
        time.sleep(0.2)
    raise AssertionError("the first trainer never started")


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path: Path) -> None:
    pair = save_tiny_pair(tmp_path / "pair")
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "opd.cli", *_args(pair, run, 400)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        holder = _holder(run, first)
        assert holder["pid"] == first.pid and holder["command"] == "opd train"
        config_before = (run / "config.yaml").read_bytes()
        for args in (_args(pair, run, 3), ["train", "--resume", str(run)]):  # a new run, and a resume
            res = _opd(*args)
            out = res.stdout + res.stderr
            assert res.returncode == 2, out
            assert f"is in use by pid {first.pid} on " in out and "(opd train, started " in out, out
            assert "one run directory takes one trainer at a time" in out and "Traceback" not in out, out
        assert first.poll() is None, "the first trainer was disturbed"
        assert (run / "config.yaml").read_bytes() == config_before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # the killed trainer's lock went with it: a resume takes the directory over at once
    res = _opd("train", "--resume", str(run), "--steps", str(ckpt.list_checkpoints(run)[-1][0] + 1))
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((run / LOCK_FILE).read_text())["pid"] != first.pid


def test_the_lock_is_shared_within_a_process_and_released_by_the_last_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    a = lock_run_dir(run, "opd train")
    b = lock_run_dir(run, "opd train")  # a library user resuming in the same process
    other = [
        sys.executable,
        "-c",
        f"from opd.train.loop import lock_run_dir; lock_run_dir({str(run)!r}, 'opd sft')",
    ]
    refused = subprocess.run(other, env=ENV, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and f"is in use by pid {os.getpid()}" in refused.stderr
    unlock_run_dir(a)
    assert subprocess.run(other, env=ENV, capture_output=True, timeout=60).returncode != 0  # b still holds
    unlock_run_dir(b)
    assert subprocess.run(other, env=ENV, capture_output=True, timeout=60).returncode == 0
    with pytest.raises(ConfigError, match="nothing was written"):  # the refusal is a ConfigError (exit 2)
        holder = subprocess.Popen([*other[:2], other[2] + "; import time; time.sleep(30)"], env=ENV)
        try:
            for _ in range(100):
                if (run / LOCK_FILE).read_text().find(str(holder.pid)) >= 0:
                    break
                time.sleep(0.1)
            lock_run_dir(run, "opd train")
        finally:
            holder.kill()
            holder.wait()
