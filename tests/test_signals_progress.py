"""Ctrl-C/SIGTERM end a command cleanly and resumably; progress shows as plain lines in batch logs.

The signal tests send a real SIGINT to a real `opd` subprocess on the tiny pair: exit 130, one line that
says what was kept and the exact command that continues, and a continuation equal to an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from multiproc import opd, opd_env
from rich.console import Console
from safetensors.torch import load_file

from opd.progress import Progress, bar


def _wait(pred, proc: subprocess.Popen, limit: float = 300.0) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None and not pred():
        time.sleep(0.02)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# ----------------------------------------------------------------------------------------------------
# opd train / opd generate under SIGINT


@pytest.mark.slow
def test_sigint_mid_run_checkpoints_says_how_to_resume_and_resume_matches(tiny_pair, tmp_path):
    from test_trainer import _args

    # No periodic checkpoints: the only one before the end is the one the interruption writes.
    extra = {"steps": 12, "checkpoint_every": 100}
    full = opd(["train", *_args(tiny_pair, tmp_path / "full", **extra)])
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out

    run = tmp_path / "stopped"
    proc = opd(["train", *_args(tiny_pair, run, **extra)])
    _wait(lambda: len(_lines(run / "metrics.jsonl")) >= 2, proc)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    steps = [r["step"] for r in _lines(run / "metrics.jsonl")]
    n = steps[-1]
    assert 2 <= n < 12, out
    assert f"interrupted after step {n}; resume with: opd train --resume {run}" in out
    assert "Traceback" not in out
    assert (run / "checkpoints" / f"step_{n:08d}").is_dir()
    assert not (run / "final").exists()

    resumed = opd(["train", "--resume", str(run)])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    assert [r["step"] for r in _lines(run / "metrics.jsonl")] == list(range(1, 13))
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    la = [r["loss"] for r in _lines(tmp_path / "full" / "metrics.jsonl")]
    assert [r["loss"] for r in _lines(run / "metrics.jsonl")] == la


@pytest.mark.slow
def test_sigint_during_generate_keeps_the_written_batches(tiny_pair, tmp_path):
    from test_generate import _cli, _gen_args

    from opd.recipes.generate import OutputPaths

    out = tmp_path / "gen" / "teacher.jsonl"
    paths = OutputPaths.for_out(out)
    proc = _cli(_gen_args(tiny_pair, out))

    def n_lines() -> int:
        return sum(p.read_bytes().count(b"\n") for p in (paths.out, paths.rejected) if p.exists())

    _wait(lambda: n_lines() >= 8, proc)
    assert proc.poll() is None, "generate ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, log
    written = n_lines()
    assert 0 < written < 48
    assert f"interrupted after {written}/48 samples, all written to {out}" in log
    assert "continue with the same `opd generate` command" in log
    rerun = _cli(_gen_args(tiny_pair, out))
    log, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log
    assert f"resuming {out}: {written}/48 samples already written" in log
    assert n_lines() == 48


@pytest.mark.slow
def test_sigint_during_sft_checkpoints_and_resume_matches(tiny_pair, tmp_path):
    from test_sft import _cli, _sft_args, _write_data

    data = _write_data(tmp_path / "d.jsonl", n=12, reply_len=12)
    full = _cli(_sft_args(tiny_pair, data, tmp_path / "full"))
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out
    run = tmp_path / "stopped"
    proc = _cli(_sft_args(tiny_pair, data, run))
    _wait(lambda: len(_lines(run / "metrics.jsonl")) >= 3, proc)
    assert proc.poll() is None, "sft ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    n = _lines(run / "metrics.jsonl")[-1]["step"]
    assert f"interrupted after step {n}; resume with: opd sft --resume {run}" in out
    assert (run / "checkpoints" / f"step_{n:08d}").is_dir()
    resumed = _cli(["--resume", str(run)])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_second_signal_exits_at_once_with_the_resume_hint():
    code = (
        "import os, signal, time\n"
        "import opd.progress as p\n"
        "p.SAME_REQUEST_S = 0.0\n"
        "with p.StopRequests(print, lambda: 'resume with: opd train --resume runs/x') as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.2)\n"
        "    assert stop.requested == signal.SIGINT\n"
        "    print('first request noted', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "print('not reached')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=opd_env()
    )
    assert res.returncode == 130, res.stdout + res.stderr
    assert "SIGINT[/]: stopping after the current step" in res.stdout
    assert "first request noted" in res.stdout and "not reached" not in res.stdout
    assert "interrupted again: stopped at once; resume with: opd train --resume runs/x" in res.stderr


# ----------------------------------------------------------------------------------------------------
# progress without a terminal


def _plain_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=200), buf


def test_progress_prints_plain_lines_every_tenth_when_not_a_terminal():
    console, buf = _plain_console()
    with bar("opd sample", console=console, every=3600) as progress:
        assert progress.plain
        task = progress.add_task("rollouts", total=20)
        for i in range(1, 21):
            time.sleep(0.002)  # a measurable rate
            progress.update(task, completed=i)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("opd sample: 0/20 (0%)") and lines[0].endswith("| rollouts")
    for pct in range(10, 101, 10):
        assert any(f"/20 ({pct}%)" in ln for ln in lines), (pct, lines)
    assert len(lines) == 11  # the start, then one per 10%: no duplicate final line
    assert "elapsed 0:00:0" in lines[-1] and "/s" in lines[1]


def test_progress_heartbeat_and_env_interval(monkeypatch):
    monkeypatch.setenv("OPD_PROGRESS_EVERY", "0.2")
    console, buf = _plain_console()
    with Progress(console=console, name="opd doctor") as progress:
        task = progress.add_task("scoring", total=100)
        progress.update(task, completed=3)
        time.sleep(1.2)  # no update at all: the heartbeat still reports
    lines = buf.getvalue().splitlines()
    assert sum("opd doctor: 3/100 (3%)" in ln for ln in lines) >= 3, lines
    assert "eta" in lines[-1] and lines[-1].endswith("| scoring")


def test_progress_on_a_terminal_stays_a_rich_bar():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    with bar("opd train", console=console) as progress:
        assert not progress.plain
        progress.update(progress.add_task("", total=2), completed=2)
    assert "opd train" in buf.getvalue() and "2/2" in buf.getvalue()


@pytest.mark.slow
def test_train_to_a_file_logs_plain_progress_and_no_final_model_line(tiny_pair, tmp_path):
    """`opd train > log 2>&1`: counts appear as plain lines; with --save_final false the last line does
    not claim a final model."""
    from test_trainer import _args

    log = tmp_path / "log.txt"
    run = tmp_path / "run"
    with open(log, "w") as fh:
        proc = opd(["train", *_args(tiny_pair, run, steps=3, save_final="false")], stdout=fh, stderr=fh)
        proc.communicate(timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "opd train: 0/3 (0%)" in text
    assert "opd train: 3/3 (100%)" in text
    assert "final model in" not in text
    assert "save_final false: no model" in text
    assert not (run / "final").exists()


def test_debug_flag_sets_opd_debug(monkeypatch):
    import os

    from typer.testing import CliRunner

    from opd.cli import app

    # setenv first so the teardown restores the variable: the command sets os.environ itself, and a
    # leaked OPD_DEBUG=1 made every later test's subprocess print tracebacks (and fail on them)
    monkeypatch.setenv("OPD_DEBUG", "0")
    res = CliRunner().invoke(app, ["--debug", "config", "fields"])
    assert res.exit_code == 0, res.output
    assert os.environ.get("OPD_DEBUG") == "1"


def test_a_timed_out_launch_kills_the_whole_tree_and_shows_the_output():
    """torchrun starts each rank in its own session: killing torchrun's group alone left a hung rank
    behind; the helper kills every descendant and fails with the ranks' output."""
    import psutil
    from multiproc import Proc

    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        "print('rank log: child', child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = Proc([sys.executable, "-c", code])
    deadline = time.time() + 30
    while time.time() < deadline and not psutil.Process(proc.pid).children():
        time.sleep(0.05)
    child = psutil.Process(proc.pid).children()[0]
    with pytest.raises(AssertionError, match=r"(?s)timed out after 2s, process tree killed.*rank log: child"):
        proc.communicate(timeout=2)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert proc.poll() is not None


@pytest.mark.parametrize(
    ("argv", "target", "rerun"),
    [
        (["sft", "--model", "m", "--data", "d.jsonl"], "opd.train.sft.SFTTrainer", "rerun the same command"),
        (["generate", "--model", "m", "--prompts", "p", "--out", "o.jsonl"], "opd.recipes.generate.run_generate",
         "finished samples are kept"),
        (["cold-start", "--generate.model", "m"], "opd.recipes.cold_start.run_cold_start", "finished stages are skipped"),
    ],
)  # fmt: skip
def test_ctrl_c_while_a_recipe_starts_exits_130_with_what_to_rerun(monkeypatch, argv, target, rerun):
    """A Ctrl-C while models load (before the command's own signal handling) is exit 130 and one line,
    not click's bare "Aborted!" with exit 1."""
    import importlib

    from typer.testing import CliRunner

    from opd.cli import app

    module, _, attr = target.rpartition(".")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), attr, interrupted)
    monkeypatch.setattr("opd.config.load_config", lambda *a, **k: _AnyConfig())
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 130, res.output
    assert "interrupted during start-up" in res.output and rerun in res.output, res.output
    assert "Aborted" not in res.output


class _AnyConfig:
    """Stands in for a loaded config: the interrupted call reads only where the run goes and which model
    it starts from (a plain directory, so no model defaults apply)."""

    run_dir = "runs/x"
    model = "models/student"


def test_peer_failure_names_the_rank_and_points_at_the_cause(monkeypatch):
    from opd.cli.common import peer_failure

    gloo = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:30395"
    )
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert peer_failure(gloo) is None  # one process: a real error, keep its traceback
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    lost = peer_failure(gloo)
    assert lost is not None and lost.__cause__ is gloo
    assert str(lost).startswith("rank 1: another process of this run failed")
    assert "Connection closed by peer [127.0.0.1]:30395" in str(lost)
    assert peer_failure(RuntimeError("shape mismatch")) is None
    assert peer_failure(ValueError("connection closed by peer")) is None
