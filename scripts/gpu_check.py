#!/usr/bin/env python3
"""The GPU check: every opd entry point that touches a device, run on one machine, with one verdict.

    scripts/gpu_check.py OUT_DIR            # on a CUDA machine (refuses to start without one)
    scripts/gpu_check.py --cpu OUT_DIR      # the same steps on the CPU at tiny sizes (CI runs this)
    scripts/gpu_check.py --list             # the steps, in order

Why a script: opd's test suite runs on CPUs only, and a GPU machine is rare, short-lived and offline. So
the GPU run has to be prepared in advance, finish within minutes, need nothing from the network, and
leave a readable verdict even when it is stopped part-way. Running the same steps with `--cpu` in CI
keeps the script from rotting between GPU runs.

Steps, in this order, by value (each its own subprocess, timeout and log; `--only` / `--skip` pick them):
  deps            imports on this machine; installs carried wheels (.gpu_carry/wheels) for missing ones
  tiny, train     `opd tiny` + `opd train --config configs/tiny.yaml`
  resume          `opd train`, SIGKILL after the first checkpoint, `opd train --resume`: every step once
  fsdp            torchrun (1 process per GPU; 2 gloo processes on CPU) `opd train --sharding fsdp`
  bench-trl, bench-fp32/-bf16  benchmarks/step_vs_trl.py: TRL vs opd full/topk/sampled on a
                  Qwen2.5-0.5B/1.5B-shaped pair with random weights and the real 151,936-token vocabulary
                  (--cpu: the same architecture and vocabulary at toy width), fp32 and then bf16 mixed
                  precision (the student's; the teacher fp32 with autocast off on both sides)
  accelerate-*    `accelerate launch --config_file configs/accelerate/<each>.yaml` `opd train`
  generate, sft, eval, doctor   on the shipped lab zoo models
  lab-run         `opd lab run thinking_patterns` (one arm, one seed, two steps)
  check, analyze, cold-start, prompts-select   cheap extras, last, each only if its estimate fits

Prints the plan first (each step's estimate, `--estimates` takes an earlier run's seconds), then runs the
steps within `--budget-s`: a step still running when the budget runs out is stopped and recorded as
stopped (a SKIP, not a failure), and the ones left are skipped. OUT_DIR gets three files and nothing else
(the GPU machine returns at most 8): summary.md, results.json (both rewritten after every step, so a
killed run still leaves what it found) and logs.tar.gz (every step's log, the benchmark's JSON and its
arms' logs; repacked after every step and every 30 s during one). Prints the pass/fail table and the
benchmark tables; exits 1 if any step FAILED (2: usage, or no GPU without --cpu).

The GPU machine has no network: `scripts/gpu_check_prepare.sh` (run where PyPI is reachable) downloads
the wheels it lacks into .gpu_carry/wheels; carry `.gpu_carry` with the checkout. opd itself is not
installed there: every child gets the checkout's `src` (and .gpu_carry/site) on PYTHONPATH and runs as
`python -m opd.cli` (opd's entry points come from `opd.runtime.OPD_ENTRY_POINTS` then);
`scripts/plain_checkout.py` builds that situation on a developer machine, and CI runs the check in it.
This file uses the standard library only, so it can report a broken environment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu_carry"
ZOO = REPO / "src" / "opd" / "lab" / "zoo_files"
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

# Import name of each carried wheel's distribution (wheel file names use the normalised distribution name).
WHEEL_MODULES = {
    "antlr4_python3_runtime": "antlr4",
    "typing_extensions": "typing_extensions",
}
# Modules the check needs: opd's own (a FAIL of `deps` when missing) and the benchmark's TRL arms.
CORE_MODULES = (
    "torch",
    "transformers",
    "accelerate",
    "tokenizers",
    "safetensors",
    "pydantic",
    "typer",
    "rich",
    "yaml",
    "math_verify",
    "opd.cli",
)
OPTIONAL_MODULES = ("trl", "datasets", "gguf", "peft", "tensorboard", "matplotlib")
HOW_TO_GET_TRL = (
    "trl is not importable here: run scripts/gpu_check_prepare.sh on a machine with PyPI and carry "
    ".gpu_carry with the checkout (or pip install 'opd[bench]')"
)


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the --cpu run: how much work each step does."""

    budget_s: float
    train_steps: int
    resume_steps: int
    fsdp_procs: int
    gen_prompts: int
    gen_tokens: int
    bench_size: str
    bench_prompts: int
    bench_rollouts: int
    bench_tokens: int
    bench_warmup: int
    bench_steps: int
    bench_matmul_s: float
    bench_arm_timeout_s: float


# GPU: an H200 measured ~8.5 s per step at 16 prompts x 4 rollouts x 256 tokens on the 0.5B/1.5B pair and
# ~30 s of start-up per arm; 8 x 4 x 128 with 1 warm-up + 2 timed steps keeps 8 arms near 4 minutes. The
# budget leaves a device call of 600 s (the most one may run) time to start, stop the last step and pack up.
GPU = Sizes(
    budget_s=520,
    train_steps=4,
    resume_steps=8,
    fsdp_procs=1,
    gen_prompts=16,
    gen_tokens=64,
    bench_size="qwen",
    bench_prompts=8,
    bench_rollouts=4,
    bench_tokens=128,
    bench_warmup=1,
    bench_steps=2,
    bench_matmul_s=0.5,
    bench_arm_timeout_s=150,
)
# CPU (2 cores): the same steps at toy sizes, about 5 minutes in all.
CPU = Sizes(
    budget_s=1200,
    train_steps=3,
    resume_steps=6,
    fsdp_procs=2,
    gen_prompts=8,
    gen_tokens=48,
    bench_size="qwen-tiny",
    bench_prompts=1,
    bench_rollouts=2,
    bench_tokens=8,
    bench_warmup=1,
    bench_steps=1,
    bench_matmul_s=0.2,
    bench_arm_timeout_s=150,
)


@dataclass
class StepResult:
    """One row of the table."""

    name: str
    status: str
    seconds: float = 0.0
    device: str = ""
    command: str = ""
    log: str = ""  # its path inside logs.tar.gz
    note: str = ""
    estimate_s: float | None = None


@dataclass(frozen=True)
class Step:
    """A named step; `run` does the work and returns its row. A step starts when at least `min_s` of the
    budget is left; an `extra` one (they run last) only when its whole estimate fits (a SKIP otherwise,
    not a failure). `gpu_s` / `cpu_s`: the estimate of its seconds on the GPU machine and with --cpu on
    2 cores (measured there; `--estimates results.json` takes an earlier run's seconds instead)."""

    name: str
    what: str
    run: Callable[[Check], StepResult]
    needs: tuple[str, ...] = ()
    timeout_s: float = 300
    min_s: float = 10
    extra: bool = False
    gpu_s: float = 30
    cpu_s: float = 30


class StepFailed(Exception):
    """A step's own verification failed (the command ran, but its output is wrong)."""


# ----------------------------------------------------------------------------------------------------
# the run: environment, subprocesses, results


class Check:
    """State of one check run: options, environment of the children, results written as they come."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, out: Path, work: Path) -> None:
        self.args = args
        self.cpu: bool = args.cpu
        self.sizes = sizes
        self.out = out
        self.work = work
        # Logs are written in the scratch directory and packed into OUT/logs.tar.gz after every step and every
        # ARCHIVE_EVERY_S during one: OUT holds three files however many steps ran (the GPU machine returns
        # at most 8), and a run killed part-way still leaves the log of the step it was in.
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.estimates: dict[str, float] = {}  # step -> seconds (the plan's), set by main()
        self.plan: list[dict[str, Any]] = []
        self.stopped_by_budget = False  # the last `run` was killed because the budget ran out
        self.python = args.python or sys.executable
        self.results: list[StepResult] = []
        self.env_info: dict[str, Any] = {}
        self.bench: dict[str, Any] = {}
        self.t0 = time.monotonic()
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")
        self.budget_s = args.budget_s if args.budget_s is not None else sizes.budget_s
        self.site: Path | None = None  # .gpu_carry/site once step_deps found or made it for this interpreter
        self.current: subprocess.Popen[bytes] | None = None
        self.step_deadline: float | None = None
        self.running: str | None = None  # the step in progress, named if the run is interrupted
        self._help: dict[str, str] = {}

    # -- environment ------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The children's environment: the checkout's src (and carried packages) importable, no hub access
        (the GPU machine is offline: a hub lookup would only retry), and on --cpu no visible GPU."""
        env = dict(os.environ)
        paths = [str(self.site)] if self.site else []
        paths.append(str(REPO / "src"))
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env.update(
            PYTHONPATH=os.pathsep.join(paths),
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            TOKENIZERS_PARALLELISM="false",
            WANDB_MODE="disabled",
            MPLBACKEND="Agg",
        )
        if self.cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    @property
    def device(self) -> str:
        """The device column of a one-process step."""
        if self.cpu:
            return "cpu"
        return f"cuda ({self.env_info.get('gpu_name', '?')})"

    def opd(self, *args: str) -> list[str]:
        return [self.python, "-m", "opd.cli", *args]

    def device_flag(self, *command: str) -> list[str]:
        """`--device cpu` for the opd commands that have the option, on --cpu (CUDA_VISIBLE_DEVICES hides the
        GPU anyway; the flag also checks the option itself). Read from `--help`, so the check follows the
        CLI."""
        if not self.cpu:
            return []
        key = " ".join(command)
        if key not in self._help:
            proc = subprocess.run(
                self.opd(*command, "--help"),
                capture_output=True,
                text=True,
                env=self.env(),
                timeout=60,
                cwd=REPO,
            )
            self._help[key] = proc.stdout
        return ["--device", "cpu"] if "--device" in self._help[key] else []

    # -- budget -----------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def budget_left(self) -> float:
        return self.budget_s - self.elapsed()

    def timeout_for(self, step_timeout: float) -> float:
        return max(1.0, min(self._own_timeout(step_timeout), self.budget_left()))

    def _own_timeout(self, step_timeout: float) -> float:
        """The timeout a command has from its step alone (its own and the step's deadline), budget aside."""
        if self.step_deadline is not None:
            return min(step_timeout, self.step_deadline - time.monotonic())
        return step_timeout

    def cut_by_budget(self, step_timeout: float) -> bool:
        """Whether a command given `step_timeout` now is limited by the budget rather than by its step."""
        return self.budget_left() < self._own_timeout(step_timeout)

    def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> int | None:
        """`proc.wait(timeout)`, refreshing logs.tar.gz every ARCHIVE_EVERY_S meanwhile; None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                return proc.wait(max(0.0, min(left, ARCHIVE_EVERY_S)))
            except subprocess.TimeoutExpired:
                if left <= ARCHIVE_EVERY_S:
                    return None
                self.write_archive()

    # -- subprocesses -----------------------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        return self.logs / f"{len(self.results) + 1:02d}-{name}.log"

    def run(
        self, argv: Sequence[str], log: Path, timeout: float, *, env: dict[str, str] | None = None
    ) -> tuple[int | None, float]:
        """Run `argv` in its own process group, appending to `log`; (exit code or None on timeout, seconds).
        A timeout kills the whole group (torchrun's and the benchmark's children too)."""
        cut = self.cut_by_budget(timeout)
        timeout = self.timeout_for(timeout)
        self.stopped_by_budget = False
        t = time.monotonic()
        with open(log, "a") as fh:
            fh.write(f"$ {shlex.join(argv)}\n")
            fh.flush()
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env or self.env(),
                cwd=REPO,
                start_new_session=True,
            )
            self.current = proc
            rc = self.wait(proc, timeout)
            if rc is None:
                kill_group(proc)
                self.stopped_by_budget = cut
                why = "the check's --budget-s ran out" if cut else "timeout"
                fh.write(f"\n[gpu_check] killed after {timeout:.0f} s ({why})\n")
            self.current = None  # left set on an interrupt, so that main() kills the group
        return rc, time.monotonic() - t

    def simple(
        self,
        name: str,
        argv: Sequence[str],
        timeout: float,
        *,
        device: str | None = None,
        verify: Callable[[str], str] | None = None,
        shown: str | None = None,
    ) -> StepResult:
        """One command: PASS when it exits 0 and `verify(log text)` (which raises StepFailed) agrees."""
        log = self.log_path(name)
        rc, secs = self.run(argv, log, timeout)
        row = StepResult(
            name,
            PASS,
            secs,
            device or self.device,
            shown or pretty(argv, self.python, self.work),
            rel(log, self.work),
        )
        text = log.read_text(errors="replace")
        if rc is None and self.stopped_by_budget:
            row.status, row.note = SKIP, self.budget_stop_note(name, secs)
        elif rc is None:
            row.status, row.note = FAIL, f"timed out after {secs:.0f} s; {last_error(text)}"
        elif rc != 0:
            row.status, row.note = FAIL, f"exit code {rc}: {last_error(text)}"
        elif verify is not None:
            try:
                row.note = verify(text)
            except StepFailed as exc:
                row.status, row.note = FAIL, str(exc)
        return row

    def budget_stop_note(self, name: str, secs: float) -> str:
        est = self.estimates.get(name)
        return (
            f"stopped at the budget ({self.budget_s:.0f} s) after {secs:.0f} s"
            + (f" (estimate {est:.0f} s)" if est else "")
            + f": not a failure; rerun it alone with --only {name}"
        )

    # -- results ----------------------------------------------------------------------------------

    def record(self, row: StepResult) -> None:
        if row.estimate_s is None:
            row.estimate_s = self.estimates.get(row.name)
        self.results.append(row)
        self.write()
        mark = {PASS: "ok  ", FAIL: "FAIL", SKIP: "skip"}[row.status]
        print(f"[{mark}] {row.name:<18} {row.seconds:6.1f} s  {row.note}", flush=True)

    def write(self) -> None:
        """results.json and summary.md, rewritten after every step."""
        data = {
            "mode": "cpu" if self.cpu else "gpu",
            "started": self.started,
            "elapsed_s": round(self.elapsed(), 1),
            "budget_s": self.budget_s,
            "environment": self.env_info,
            "plan": self.plan,
            "steps": [asdict(r) for r in self.results],
            "benchmark": self.bench,
            "failed": [r.name for r in self.results if r.status == FAIL],
            "stopped_by_budget": [
                r.name for r in self.results if r.status == SKIP and "at the budget" in r.note
            ],
            "logs": ARCHIVE,
        }
        atomic_write(self.out / "results.json", json.dumps(data, indent=2))
        atomic_write(self.out / "summary.md", render_summary(data))
        self.write_archive()

    def write_archive(self) -> None:
        """OUT/logs.tar.gz: every step's log, the benchmark's JSON and its arms' own logs, under `logs/`."""
        write_archive(self.work, self.out / ARCHIVE)


ARCHIVE = "logs.tar.gz"
OUTPUTS = ("summary.md", "results.json", ARCHIVE)  # all the check writes to OUT_DIR
ARCHIVE_EVERY_S = 30.0
ARCHIVE_MEMBER_MAX = 4 * 2**20  # a bigger log keeps its last 4 MiB (the GPU machine returns <= 16 MiB a file)
# What of the scratch directory goes into the archive (relative to it): the steps' logs, and the benchmark's
# JSON, arm logs, specs and results (logs/bench-fp32.json, logs/bench-fp32/trl.log, ...).
ARCHIVE_GLOBS = ("logs/*.log", "logs/*.json", "logs/*/*.log", "logs/*/*.json")


def write_archive(work: Path, dest: Path) -> int:
    """Pack `work`'s logs (ARCHIVE_GLOBS) into `dest` (written beside it, then renamed); the member count.
    A file over ARCHIVE_MEMBER_MAX keeps its tail, marked as cut."""
    import io
    import tarfile

    files = sorted({p for g in ARCHIVE_GLOBS for p in work.glob(g) if p.is_file()})
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for f in files:
            with contextlib.suppress(OSError):  # a file removed while packing is left out
                data = f.read_bytes()
                if len(data) > ARCHIVE_MEMBER_MAX:
                    cut = len(data) - ARCHIVE_MEMBER_MAX
                    data = f"[gpu_check: first {cut} bytes cut]\n".encode() + data[-ARCHIVE_MEMBER_MAX:]
                info = tarfile.TarInfo(str(f.relative_to(work)))
                info.size, info.mtime, info.mode = len(data), int(f.stat().st_mtime), 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, dest)
    return len(files)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def pretty(argv: Sequence[str], python: str, work: Path | None = None) -> str:
    """A command as a person would type it: `python -m opd.cli X` -> `opd X`, the interpreter -> `python`,
    the checkout's and the scratch directory's paths shortened (to relative and `WORK/`)."""
    parts = list(argv)
    head = ""
    if len(parts) >= 3 and parts[0] == python and parts[1] == "-m" and parts[2] in LAUNCHERS:
        head, parts = LAUNCHERS[parts[2]] + " ", parts[3:]
    elif parts and parts[0] == python:
        parts[0] = "python"
    text = head + shlex.join(parts)
    if work is not None:
        text = text.replace(str(work), "WORK")
    return text.replace(str(REPO) + "/", "")


LAUNCHERS = {
    "opd.cli": "opd",
    "torch.distributed.run": "torchrun",
    "accelerate.commands.launch": "accelerate launch",
}


def words(template: str, **paths: Any) -> list[str]:
    """A command's arguments from a readable template: `words("run --out {out}", out=path)`; the values are
    quoted before splitting, so paths with spaces stay one argument."""
    return shlex.split(template.format(**{k: shlex.quote(str(v)) for k, v in paths.items()}))


_ERROR_RE = re.compile(r"(error|exception|traceback|refus|failed|killed)", re.IGNORECASE)


def last_error(text: str, width: int = 300) -> str:
    """The most telling line of a failed command's log: the last one that looks like an error."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("$ ")]
    for ln in reversed(lines):
        if _ERROR_RE.search(ln):
            return ln[:width]
    return lines[-1][:width] if lines else "(no output)"


# ----------------------------------------------------------------------------------------------------
# rendering


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], max_width: int = 70) -> str:
    """A plain fixed-width table for the terminal (no rich: this file is stdlib-only)."""

    def clip(c: object) -> str:
        return str(c) if len(str(c)) <= max_width else str(c)[: max_width - 1] + "…"

    rows = [[clip(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def step_rows(steps: Sequence[dict[str, Any]]) -> list[list[str]]:
    def est(s: dict[str, Any]) -> str:
        return "-" if s.get("estimate_s") is None else f"{s['estimate_s']:.0f}"

    return [
        [s["name"], s["status"], f"{s['seconds']:.1f}", est(s), s["device"], s["note"], s["log"]]
        for s in steps
    ]


STEP_HEADERS = ("step", "status", "s", "estimate s", "device", "note", "log")


def verdict(data: dict[str, Any]) -> str:
    steps = data["steps"]
    n = {k: sum(1 for s in steps if s["status"] == k) for k in (PASS, FAIL, SKIP)}
    word = "FAILED" if n[FAIL] else "PASSED"
    stopped = len(data.get("stopped_by_budget") or [])
    budget = f" ({stopped} stopped at the budget)" if stopped else ""
    return f"{word}: {n[PASS]} passed, {n[FAIL]} failed, {n[SKIP]} skipped{budget}"


def describe_env(env: dict[str, Any]) -> str:
    if not env:
        return "environment not probed"
    dev = env.get("gpu_name") or "no GPU"
    if env.get("gpu_count"):
        dev = f"{env['gpu_count']} x {dev} ({env.get('gpu_mem_gib', '?')} GiB)"
    return (
        f"GPU: {dev}; CPU: {env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores); "
        f"python {env.get('python', '?')}, "
        f"torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda') or '-'}), transformers "
        f"{env.get('transformers', '?')}, accelerate {env.get('accelerate', '?')}, "
        f"trl {env.get('trl') or 'missing'}; opd from {rel(Path(env.get('opd_from') or '?'), REPO)} "
        + (f"(installed: {env['opd_distribution']})" if env.get("opd_distribution") else "(not installed)")
    )


def bench_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """A compact table of one benchmark JSON: the numbers a reader compares across arms."""
    results = result.get("results", {})
    meta = result.get("meta", {})
    trl = next(
        (r["summary"] for k, r in results.items() if k in ("trl", "trl-bf16") and "summary" in r), None
    )
    cuda = any((r.get("summary") or {}).get("cuda_peak_alloc_mb") for r in results.values())
    headers = [
        "arm",
        "step s",
        "rollout / teacher / update s",
        "gen tok/s",
        "vs TRL",
        "update in",
        "teacher in",
        "CUDA peak MB" if cuda else "peak RSS MB",
    ]
    rows = []
    for name, r in results.items():
        label = (meta.get("labels") or {}).get(name, name)
        if "summary" not in r:
            err = [ln for ln in str(r.get("error", "?")).splitlines() if ln.strip()]
            rows.append([label, "FAILED", (err[-1] if err else "?")[:120], "", "", "", "", ""])
            continue
        s = r["summary"]
        ratio = f"{s['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if trl and trl.get("tokens_per_s") else "-"
        mem = s.get("cuda_peak_alloc_mb") if cuda else s.get("peak_rss_mb")
        rows.append(
            [
                label,
                f"{s['median_step_s']:.3f}",
                f"{s['median_rollout_s']:.2f} / {s['median_teacher_s']:.2f} / {s['median_update_s']:.2f}",
                f"{s['tokens_per_s']:.1f}",
                ratio,
                str(s.get("update_compute_dtype", "?")),
                str(s.get("teacher_compute_dtype", "?")),
                "-" if mem is None else f"{mem:.0f}",
            ]
        )
    return headers, rows


def bench_caption(result: dict[str, Any]) -> str:
    m = result.get("meta", {})
    if not m:
        return ""
    parts = [
        f"device {m.get('device', '?')}",
        f"student {m.get('student_desc', '?')}",
        f"teacher {m.get('teacher_desc', '?')}",
        f"{m.get('prompts_per_step')} prompts x {m.get('rollouts')} rollouts x "
        f"{m.get('max_new_tokens')} tokens",
        f"{m.get('warmup')} warm-up + {m.get('steps')} timed steps",
        f"student autocast {m.get('student_autocast', 'none')}",
        f"teacher {m.get('teacher_precision') or m.get('teacher_dtype', 'float32')} on both sides",
    ]
    if m.get("teacher_precision_mismatch"):
        parts.append(f"NOT LIKE FOR LIKE: {'; '.join(m['teacher_precision_mismatch'])}")
    if m.get("partial"):
        parts.append("PARTIAL (the run stopped before every arm finished)")
    return "; ".join(parts)


def render_summary(data: dict[str, Any]) -> str:
    lines = [
        f"# opd GPU check ({data['mode']}): {verdict(data)}",
        "",
        f"- started {data['started']}; {data['elapsed_s']:.0f} s elapsed (budget {data['budget_s']:.0f} s)",
        f"- {describe_env(data['environment'])}",
        f"- every log (the `log` column), the benchmark's JSON and its arms' logs: `{data.get('logs', ARCHIVE)}`",
        "",
        markdown_table(STEP_HEADERS, step_rows(data["steps"])),
        "",
        "## Commands",
        "",
    ]
    lines += [f"- `{s['name']}`: `{s['command']}`" for s in data["steps"] if s["command"]]
    if data.get("plan"):
        lines += [
            "",
            "## Plan (before the first step)",
            "",
            markdown_table(PLAN_HEADERS, plan_rows(data["plan"])),
        ]
    for key, bench in data.get("benchmark", {}).items():
        lines += ["", f"## Benchmark {key}", "", bench_caption(bench.get("json", {})), ""]
        if bench.get("json", {}).get("results"):
            lines.append(markdown_table(*bench_rows(bench["json"])))
        if bench.get("table"):
            lines += ["", "The benchmark's own table:", "", "```text", bench["table"], "```"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# deps: probe the interpreter, install carried wheels

PROBE = r"""
import importlib, json, sys
out = {"python": sys.version.split()[0], "modules": {}}
for name in sys.argv[1].split(","):
    try:
        mod = importlib.import_module(name)
        if name == "trl":  # trl imports lazily: load what the benchmark uses
            mod.DistillationTrainer, mod.DistillationConfig
        out["modules"][name] = {"ok": True, "version": getattr(mod, "__version__", None),
                                "file": getattr(mod, "__file__", None)}
    except Exception as exc:
        out["modules"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
try:  # opd installed (its metadata found), or a plain source tree on PYTHONPATH (opd's own entry-point table)
    import importlib.metadata as md
    try:
        d = md.distribution("opd")
        out["opd_distribution"] = str(getattr(d, "_path", None) or d.locate_file(""))
    except md.PackageNotFoundError:
        out["opd_distribution"] = None
    from opd.runtime import entry_points
    out["opd_model_schemes"] = sorted(ep.name + ("" if getattr(ep, "dist", None) else " (opd's own table)")
                                      for ep in entry_points("opd.model_schemes"))
except Exception as exc:
    out["opd_distribution_error"] = f"{type(exc).__name__}: {exc}"[:400]
try:
    import torch
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        out["gpu_count"] = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        out["gpu_name"] = props.name
        out["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
        out["bf16"] = torch.cuda.is_bf16_supported()
except Exception as exc:
    out["torch_error"] = repr(exc)
print("PROBE" + json.dumps(out))
"""


def probe(check: Check, log: Path) -> dict[str, Any]:
    argv = [check.python, "-c", PROBE, ",".join((*CORE_MODULES, *OPTIONAL_MODULES))]
    rc, _ = check.run(argv, log, 180)
    text = log.read_text(errors="replace")
    found = [ln for ln in text.splitlines() if ln.startswith("PROBE")]
    if rc != 0 or not found:
        raise StepFailed(f"the interpreter probe failed (exit {rc}): {last_error(text)}")
    return json.loads(found[-1][len("PROBE") :])


def wheel_module(wheel: Path) -> str:
    dist = wheel.name.split("-")[0].lower()
    return WHEEL_MODULES.get(dist, dist)


SITE_TAG = ".python-tag"


def wheel_fits(wheel: Path, tag: str) -> bool:
    """Whether a wheel's Python tag suits an interpreter (`interpreter_tag`: "cpython-312 x86_64"): py3,
    py312 or cp312 (the platform tags were chosen by gpu_check_prepare.sh)."""
    version = tag.split()[0].rsplit("-", 1)[-1] if tag else ""
    parts = wheel.name.removesuffix(".whl").split("-")
    py_tags = parts[-3].split(".") if len(parts) >= 5 else []
    return any(t in ("py3", f"py{version}", f"cp{version}") for t in py_tags)


def interpreter_tag(python: str) -> str:
    """What compiled wheels depend on: the interpreter's cache tag (cpython-312) and the machine."""
    code = "import platform, sys; print(sys.implementation.cache_tag, platform.machine())"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()


def install_wheels(check: Check, wheels: list[Path], log: Path) -> str:
    """Install `wheels` into .gpu_carry/site: pip --no-index --no-deps --target (nothing is fetched), or,
    where this Python has no pip, by unpacking them (a wheel is a zip of its site-packages files)."""
    site = CARRY / "site"
    tag = interpreter_tag(check.python)
    if site.is_dir() and (not (site / SITE_TAG).exists() or (site / SITE_TAG).read_text().strip() != tag):
        shutil.rmtree(site)  # built for another interpreter: start over rather than mix the two
    site.mkdir(parents=True, exist_ok=True)
    has_pip = subprocess.run([check.python, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        argv = [
            check.python,
            *words(
                "-m pip install --no-index --no-deps --upgrade --quiet --disable-pip-version-check "
                "--target {site}",
                site=site,
            ),
            *map(str, wheels),
        ]
        rc, _ = check.run(argv, log, 300)
        if rc != 0:
            raise StepFailed(
                f"pip install of the carried wheels failed (exit {rc}): {last_error(log.read_text())}"
            )
        how = "pip --target"
    else:
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(site)
        how = "unzip (no pip)"
    (site / SITE_TAG).write_text(tag)
    check.site = site
    return f"installed {len(wheels)} carried wheel(s) into .gpu_carry/site ({how})"


def step_deps(check: Check) -> StepResult:
    """Probe the interpreter; install carried wheels for the modules it lacks; probe again."""
    log = check.log_path("deps")
    t = time.monotonic()
    row = StepResult(
        "deps",
        PASS,
        device="host",
        command=f"{pretty([check.python], check.python)} -c <probe>",
        log=rel(log, check.work),
    )
    notes = []
    try:
        site = CARRY / "site"
        if site.is_dir():
            # packages carried and installed by an earlier run; only for the interpreter they were built for
            # (a cp312 pydantic-core on a 3.11 PYTHONPATH would break every import)
            tag = (site / SITE_TAG).read_text().strip() if (site / SITE_TAG).exists() else "?"
            if tag == interpreter_tag(check.python):
                check.site = site
            else:
                notes.append(f"ignoring .gpu_carry/site (built for {tag})")
        info = probe(check, log)
        missing = [m for m, v in info["modules"].items() if not v["ok"]]
        wheels_dir = CARRY / "wheels"
        if missing and wheels_dir.is_dir():
            wheels = sorted(wheels_dir.glob("*.whl"))
            # a carried wheel is installed when its module cannot be found by the children; typing_extensions
            # also when pydantic is missing (pydantic-core needs a newer one than the machine may have)
            absent = missing_modules(check, sorted({wheel_module(w) for w in wheels}))
            if "pydantic" in missing:
                absent.add("typing_extensions")
            todo = [w for w in wheels if wheel_module(w) in absent]
            tag = interpreter_tag(check.python)
            other = [w for w in todo if not wheel_fits(w, tag)]
            todo = [w for w in todo if w not in other]
            if other:
                notes.append(
                    f"{len(other)} carried wheel(s) are for another Python than {tag}: not installed"
                )
            if todo:
                try:
                    notes.append(install_wheels(check, todo, log))
                except StepFailed as exc:  # go on: the probe below names what is still missing
                    notes.append(str(exc))
                info = probe(check, log)
        elif missing:
            notes.append("no .gpu_carry/wheels to install from")
        check.env_info.update(describe_probe(info))
        bad_core = [m for m in CORE_MODULES if not info["modules"][m]["ok"]]
        bad_opt = [m for m in OPTIONAL_MODULES if not info["modules"][m]["ok"]]
        if bad_core:
            row.status = FAIL
            notes.insert(
                0, "cannot import " + "; ".join(f"{m} ({info['modules'][m]['error']})" for m in bad_core)
            )
        if bad_opt:
            notes.append("optional missing: " + ", ".join(bad_opt))
        if not bad_core:
            notes.insert(0, "imports ok")
    except StepFailed as exc:
        row.status = FAIL
        notes.append(str(exc))
    row.seconds = time.monotonic() - t
    row.note = "; ".join(notes)
    return row


def missing_modules(check: Check, modules: Sequence[str]) -> set[str]:
    """Which of `modules` the children cannot find (`find_spec` in their environment, nothing imported)."""
    code = (
        "import importlib.util, sys\n"
        "print(','.join(m for m in sys.argv[1].split(',') if importlib.util.find_spec(m) is None))"
    )
    proc = subprocess.run(
        [check.python, "-c", code, ",".join(modules)],
        env=check.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return {m for m in proc.stdout.strip().split(",") if m}


def describe_probe(info: dict[str, Any]) -> dict[str, Any]:
    mods = info["modules"]

    def ver(name: str) -> str | None:
        return mods.get(name, {}).get("version") if mods.get(name, {}).get("ok") else None

    return {
        "python": info.get("python"),
        "torch": ver("torch"),
        "torch_cuda": info.get("torch_cuda"),
        "transformers": ver("transformers"),
        "accelerate": ver("accelerate"),
        "trl": ver("trl"),
        "datasets": ver("datasets"),
        "opd_from": str(
            Path(mods.get("opd.cli", {}).get("file") or "?").parent.parent
        ),  # cli/__init__.py: the package
        "opd_distribution": info.get("opd_distribution"),  # None: not installed (a plain checkout)
        "opd_model_schemes": info.get("opd_model_schemes"),
        "cuda_available": info.get("cuda_available", False),
        "gpu_count": info.get("gpu_count", 0),
        "gpu_name": info.get("gpu_name"),
        "gpu_mem_gib": info.get("gpu_mem_gib"),
        "bf16": info.get("bf16"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "modules": {
            k: (v.get("version") or "ok") if v["ok"] else f"MISSING: {v['error']}" for k, v in mods.items()
        },
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------------
# the opd steps


def tiny_dir(check: Check) -> Path:
    return check.work / "tiny"


def train_args(check: Check, run_dir: Path, steps: int, checkpoint_every: int | None = None) -> list[str]:
    t = tiny_dir(check)
    return words(
        "train --config {cfg} --student {s} --teacher {t} --prompts {p} --run_dir {run} --steps {n} "
        "--checkpoint_every {every}",
        cfg=REPO / "configs" / "tiny.yaml",
        s=t / "student",
        t=t / "teacher",
        p=t / "prompts.jsonl",
        run=run_dir,
        n=steps,
        every=checkpoint_every or steps,
    )


def train_rows(run_dir: Path) -> list[int]:
    """The step numbers of the training rows of metrics.jsonl (eval and alarm rows left out)."""
    rows = []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if r.get("kind", "train") == "train":
                    rows.append(int(r["step"]))
    return rows


def verify_run(run_dir: Path, steps: int, processes: int | None = None) -> Callable[[str], str]:
    def check_it(text: str) -> str:
        got = train_rows(run_dir)
        if got != list(range(1, steps + 1)):
            raise StepFailed(f"metrics.jsonl steps {got}, expected 1..{steps}")
        if not (run_dir / "final").is_dir():
            raise StepFailed(f"no final model in {run_dir}")
        m = re.search(r"on (\d+) process\(es\)", text)
        if processes is not None and (not m or int(m.group(1)) != processes):
            raise StepFailed(
                f"expected {processes} process(es), the log says: {m.group(0) if m else 'nothing'}"
            )
        return f"{steps} steps, final model saved" + (f", {m.group(1)} process(es)" if m else "")

    return check_it


def step_tiny(check: Check) -> StepResult:
    def verify(_: str) -> str:
        missing = [p for p in ("student", "teacher", "prompts.jsonl") if not (tiny_dir(check) / p).exists()]
        if missing:
            raise StepFailed(f"missing {missing}")
        return "tiny pair written"

    return check.simple("tiny", check.opd("tiny", str(tiny_dir(check))), 120, verify=verify)


def step_train(check: Check) -> StepResult:
    n = check.sizes.train_steps
    run = check.work / "train"
    return check.simple("train", check.opd(*train_args(check, run, n)), 240, verify=verify_run(run, n, 1))


def step_resume(check: Check) -> StepResult:
    """Start a run, SIGKILL it as soon as its first checkpoint is in place, resume it, and check that
    metrics.jsonl then has every step exactly once (the rows logged after that checkpoint are redone)."""
    n = check.sizes.resume_steps
    run = check.work / "resume"
    log = check.log_path("resume")
    first = check.opd(*train_args(check, run, n, checkpoint_every=2))
    second = check.opd("train", "--resume", str(run))
    shown = (
        f"{pretty(first, check.python, check.work)}  # SIGKILL after the first checkpoint; then: "
        f"{pretty(second, check.python, check.work)}"
    )
    row = StepResult("resume", FAIL, 0.0, check.device, shown, rel(log, check.work))
    t = time.monotonic()
    cut = check.cut_by_budget(300)
    timeout = check.timeout_for(300)
    with open(log, "a") as fh:
        fh.write(f"$ {shlex.join(first)}\n")
        fh.flush()
        proc = subprocess.Popen(
            first, stdout=fh, stderr=subprocess.STDOUT, env=check.env(), cwd=REPO, start_new_session=True
        )
        check.current = proc  # left set on an interrupt, so that main() kills the group
        ckpt = None
        packed = time.monotonic()
        while proc.poll() is None and time.monotonic() - t < timeout:
            ckpts = sorted(p for p in (run / "checkpoints").glob("step_*") if p.is_dir())
            if ckpts:
                ckpt = ckpts[0]
                break
            if time.monotonic() - packed > ARCHIVE_EVERY_S:
                check.write_archive()
                packed = time.monotonic()
            time.sleep(0.05)
        rows_at_kill = train_rows(run)
        exit_code = proc.poll()
        kill_group(proc)
        check.current = None
        fh.write(
            f"\n[gpu_check] SIGKILL after {ckpt.name if ckpt else 'no checkpoint'}; metrics rows then: "
            f"{rows_at_kill}\n"
        )
    if ckpt is None or exit_code is not None:
        row.seconds = time.monotonic() - t
        if exit_code is not None:
            why = f"the first run exited (code {exit_code}) before it could be killed after a checkpoint"
        elif cut:
            row.status, row.note = SKIP, check.budget_stop_note("resume", row.seconds)
            return row
        else:
            why = f"no checkpoint appeared within {timeout:.0f} s"
        row.note = f"{why}: {last_error(log.read_text(errors='replace'))}"
        return row
    rc, _ = check.run(second, log, max(1.0, timeout - (time.monotonic() - t)))
    row.seconds = time.monotonic() - t
    text = log.read_text(errors="replace")
    if rc is None and check.stopped_by_budget:
        row.status, row.note = SKIP, check.budget_stop_note("resume", row.seconds)
        return row
    if rc != 0:
        row.note = f"resume: {'timed out' if rc is None else f'exit code {rc}'}: {last_error(text)}"
        return row
    got = train_rows(run)
    if "resumed from" not in text:
        row.note = "the resumed run did not say 'resumed from'"
    elif got != list(range(1, n + 1)):
        row.note = f"metrics.jsonl steps after resume: {got}, expected each of 1..{n} once"
    else:
        row.status = PASS
        logged = f"steps 1..{rows_at_kill[-1]} logged" if rows_at_kill else "no step logged"
        row.note = (
            f"SIGKILL once {ckpt.name} existed ({logged}); resumed: steps 1..{n} each once in metrics.jsonl"
        )
    return row


def step_fsdp(check: Check) -> StepResult:
    n = check.sizes.train_steps
    procs = check.sizes.fsdp_procs
    run = check.work / "fsdp"
    launch = words("-m torch.distributed.run --standalone --nproc_per_node {procs} -m opd.cli", procs=procs)
    argv = [check.python, *launch, *train_args(check, run, n), "--sharding", "fsdp"]
    device = (
        f"cpu x {procs} processes (gloo)" if check.cpu else f"{check.device} x {procs} process(es) (nccl)"
    )
    return check.simple("fsdp", argv, 300, device=device, verify=verify_run(run, n, procs))


def accelerate_configs() -> list[Path]:
    return sorted((REPO / "configs" / "accelerate").glob("*.yaml"))


def make_accelerate_step(config: Path) -> Step:
    name = f"accelerate-{config.stem}"

    def run(check: Check) -> StepResult:
        n = check.sizes.train_steps
        out = check.work / name
        # On CPU: --cpu with one process (accelerate --cpu --num_processes 2 silently runs one process, which
        # opd then refuses; the 2-process CPU path is the torchrun step). On a GPU: one process, one GPU.
        launch = words("-m accelerate.commands.launch --config_file {cfg} --num_processes 1", cfg=config)
        launch += ["--cpu"] if check.cpu else []
        argv = [check.python, *launch, "-m", "opd.cli", *train_args(check, out, n)]
        return check.simple(name, argv, 300, verify=verify_run(out, n, 1))

    return Step(
        name,
        f"accelerate launch --config_file configs/accelerate/{config.name} ... opd train",
        run,
        needs=("tiny",),
        timeout_s=300,
    )


def lab_dir(check: Check) -> Path:
    return check.work / "lab"


def level_file() -> Path:
    return ZOO / "eval" / "level4.jsonl"


def step_generate(check: Check) -> StepResult:
    s = check.sizes
    out = lab_dir(check) / "teacher.jsonl"
    argv = check.opd(
        *words(
            "generate --model lab:teacher_novel --prompts {prompts} --max-prompts {n} "
            "--max-new-tokens {tokens} "
            "--template raw --batch-size {n} --filters truncated,repetition --out {out}",
            prompts=level_file(),
            n=s.gen_prompts,
            tokens=s.gen_tokens,
            out=out,
        )
    )

    def verify(_: str) -> str:
        n = len(out.read_text().splitlines()) if out.exists() else 0
        if n == 0:
            raise StepFailed(f"{out.name} has no kept responses")
        return f"{n}/{s.gen_prompts} teacher responses kept"

    return check.simple("generate", argv, 180, verify=verify)


def step_sft(check: Check) -> StepResult:
    run = lab_dir(check) / "sft"
    argv = check.opd(
        *words(
            "sft --model lab:student --data {data} --run_dir {run} --template raw --steps 4 --batch_size 8 "
            "--micro_batch_size 4 --max_seq_len 256",
            data=lab_dir(check) / "teacher.jsonl",
            run=run,
        )
    )

    def verify(_: str) -> str:
        if not (run / "final").is_dir():
            raise StepFailed("no final model")
        return "4 steps, final model saved"

    return check.simple("sft", argv, 180, verify=verify)


def step_eval(check: Check) -> StepResult:
    s = check.sizes
    out = lab_dir(check) / "eval"
    models = ["--model", "lab:student", "--model", "lab:teacher_novel"]
    sft_final = lab_dir(check) / "sft" / "final"
    if sft_final.is_dir():
        models += ["--name-as", f"sft={sft_final}"]
    argv = check.opd(
        "eval",
        *models,
        *words(
            "--prompts {prompts} --max-problems {n} --samples 2 --max-new-tokens {tokens} --template raw "
            "--verifier opd.lab.world:LabVerifier --out {out}",
            prompts=level_file(),
            n=s.gen_prompts,
            tokens=s.gen_tokens,
            out=out,
        ),
        *check.device_flag("eval"),
    )

    def verify(_: str) -> str:
        summaries = sorted(p.name.removesuffix(".summary.json") for p in out.glob("*.summary.json"))
        if not (out / "comparison.json").exists() or len(summaries) < 2:
            raise StepFailed(f"expected comparison.json and a summary per model, found {summaries}")
        accs = []
        for name in summaries:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                d = json.loads((out / f"{name}.summary.json").read_text())
                acc = next(v for k, v in d.items() if k.startswith("avg@"))
                accs.append(f"{name} {100 * acc:.0f}%")
        return "avg@2 " + ", ".join(accs) if accs else f"models {summaries}"

    return check.simple("eval", argv, 180, verify=verify)


def step_doctor(check: Check) -> StepResult:
    out = lab_dir(check) / "doctor"
    argv = check.opd(
        *words(
            "doctor --student lab:student --teacher lab:teacher_novel --prompts {prompts} --n-prompts 8 "
            "--samples 2 "
            "--teacher-samples 1 --max-new-tokens 48 --k 4 --continuation-rollouts 2 --template raw "
            "--verifier opd.lab.world:LabVerifier --out {out} --no-plots",
            prompts=level_file(),
            out=out,
        ),
        *check.device_flag("doctor"),
    )

    def verify(_: str) -> str:
        try:
            d = json.loads((out / "doctor.json").read_text())
        except (OSError, ValueError) as exc:
            raise StepFailed(f"no readable doctor.json: {exc}") from exc
        found = sorted(set(re.findall(r'"(go|no_gain|weak_teacher|incompatible|identical)"', json.dumps(d))))
        return f"doctor.json written; verdicts {found}" if found else "doctor.json written"

    return check.simple("doctor", argv, 240, verify=verify)


def step_lab_run(check: Check) -> StepResult:
    runs = check.work / "lab-runs"
    argv = check.opd(
        *words("lab run thinking_patterns --seeds 1 --steps 2 --arm compatible --runs {runs}", runs=runs)
    )

    def verify(_: str) -> str:
        path = runs / "thinking_patterns" / "compatible" / "seed0" / "result.json"
        try:
            r = json.loads(path.read_text())
            lv = str(r["gap_level"])
            before, after = r["accuracy"]["before"][lv]["acc"], r["accuracy"]["after"][lv]["acc"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StepFailed(f"no readable {rel(path, check.work)}: {exc}") from exc
        gap = f"gap level {100 * before:.1f}% -> {100 * after:.1f}%"
        return f"thinking_patterns/compatible, 1 seed x 2 steps: {gap}"

    return check.simple("lab-run", argv, 300, verify=verify)


# -- benchmark --------------------------------------------------------------------------------------

_BENCH_TABLE_RE = re.compile(r"^={20,}$")


def bench_table(text: str) -> str:
    """The benchmark's printed table: from its header block to the line before the ratios / details."""
    lines = text.splitlines()
    starts = [i for i, ln in enumerate(lines) if _BENCH_TABLE_RE.match(ln)]
    if not starts:
        return ""
    out = []
    for ln in lines[starts[0] :]:
        if ln.startswith("what each side did:"):
            break
        out.append(ln.rstrip())
    return "\n".join(out).strip()


def slow_bf16_on_cpu(check: Check) -> str:
    """Why bf16 arms cannot run on this CPU ("" when they can), in opd.precision's own words."""
    code = (
        "from opd.precision import check_dtype_speed\n"
        "try:\n    print(check_dtype_speed('cpu', 'bfloat16', 'student.autocast') or '')\n"
        "except Exception as e:\n    print('refused: ' + str(e))\n"
    )
    try:
        out = subprocess.run([check.python, "-c", code], env={**check.env(), "OPD_PRECISION_PROBE": "1"},
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return line if line.startswith("refused: ") else ""


def trl_available(check: Check) -> bool:
    return bool(check.env_info.get("trl"))


def make_bench_step(precision: str) -> Step:
    name = f"bench-{precision}"

    def run(check: Check) -> StepResult:
        s = check.sizes
        if precision == "bf16" and check.cpu and (why := slow_bf16_on_cpu(check)):
            # CI machines differ: on a CPU without bf16 instructions opd refuses bf16 autocast (precision_check)
            # and a bf16 arm would run ~150x slower than fp32. The refusal itself is tested in the suite.
            return StepResult(name, SKIP, 0.0, "cpu", "", "", why)
        trl_arm = "trl" if precision == "fp32" else "trl-bf16"
        arms = ([trl_arm] if trl_available(check) else []) + ["opd-full", "opd-topk", "opd-sampled"]
        out_json = check.logs / f"{name}.json"
        argv = [
            check.python,
            *words(
                "{script} --size {size} --models-dir {models} --keep {keep} --frameworks {arms} "
                "--prompts-per-step {p} --rollouts {r} --max-new-tokens {tokens} --warmup {warmup} "
                "--steps {steps} --matmul-seconds {mm} "
                "--threads {threads} --child-timeout {arm_timeout} --json {out}",
                script=REPO / "benchmarks" / "step_vs_trl.py",
                size=s.bench_size,
                models=check.work / "bench-models",
                keep=check.logs / name,
                arms=",".join(arms),
                p=s.bench_prompts,
                r=s.bench_rollouts,
                tokens=s.bench_tokens,
                warmup=s.bench_warmup,
                steps=s.bench_steps,
                mm=s.bench_matmul_s,
                threads=min(16, os.cpu_count() or 2),
                arm_timeout=s.bench_arm_timeout_s,
                out=out_json,
            ),
        ]
        if check.args.tokenizer:
            argv += ["--tokenizer", str(Path(check.args.tokenizer).resolve())]
        if precision == "bf16":
            argv += ["--student-autocast", "bfloat16"]
        timeout = len(arms) * s.bench_arm_timeout_s + 240  # + building the pair
        row = check.simple(name, argv, timeout)
        text = (check.work / row.log).read_text(errors="replace")
        result: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            result = json.loads(out_json.read_text())
        check.bench[precision] = {"json": result, "table": bench_table(text), "json_file": out_json.name}
        results = result.get("results", {})
        failed = [k for k, r in results.items() if "error" in r]
        missing = [a for a in arms if a not in results]
        built = re.search(r"built the (\S+) pair \(random weights\) on (\S+) in ([\d.]+) s", text)
        notes = [f"arms {', '.join(arms)}"]
        teacher = (result.get("meta") or {}).get("teacher_precision")
        if teacher:
            notes.append(f"teacher {teacher} on every arm")
        if built:
            notes.append(f"pair built on {built.group(2)} in {built.group(3)} s")
        mismatch = (result.get("meta") or {}).get("teacher_precision_mismatch") or []
        if row.status == SKIP:  # stopped at the budget: what ran is kept, the rest is not a failure
            done = [k for k, r in results.items() if "error" not in r]
            notes = [row.note, f"arms done: {', '.join(done) or 'none'} of {', '.join(arms)}"]
        elif failed or missing or mismatch:
            row.status = FAIL
            if mismatch:
                notes.insert(0, f"teacher precision differs between arms: {mismatch}")
            if failed or missing:
                notes.insert(0, f"failed arms: {failed + missing}")
        if row.status == FAIL and row.note:
            notes.append(row.note)
        row.note = "; ".join(notes)
        if results:
            print(text_table(*bench_rows(result)), flush=True)
        return row

    what = "TRL vs opd full/topk/sampled, " + ("fp32" if precision == "fp32" else "bf16 mixed precision")
    return Step(name, what, run, needs=("deps",), timeout_s=1500, min_s=60)


def step_bench_trl(check: Check) -> StepResult:
    """TRL's arms need trl + datasets; without them the benchmark runs opd's arms and this row says how."""
    if trl_available(check):
        return StepResult("bench-trl", PASS, 0.0, "host", "", "", f"trl {check.env_info['trl']} importable")
    why = (check.env_info.get("modules") or {}).get("trl", "")
    return StepResult("bench-trl", FAIL, 0.0, "host", "", "", HOW_TO_GET_TRL + (f" [{why}]" if why else ""))


# -- extras -----------------------------------------------------------------------------------------


def step_check(check: Check) -> StepResult:
    t = tiny_dir(check)
    argv = check.opd(
        *words(
            "check --student {s} --teacher {t} --prompts {p}",
            s=t / "student",
            t=t / "teacher",
            p=t / "prompts.jsonl",
        ),
        *check.device_flag("check"),
    )
    return check.simple("check", argv, 120, verify=lambda text: last_line(text, "check finished"))


def step_analyze(check: Check) -> StepResult:
    run = check.work / "train"
    out = check.work / "analyze"
    argv = check.opd("analyze", str(run), "--out", str(out))

    def verify(_: str) -> str:
        if not (out / "analysis.md").exists():
            raise StepFailed("no analysis.md")
        return "analysis.md + plots written"

    return check.simple("analyze", argv, 120, verify=verify)


def step_cold_start(check: Check) -> StepResult:
    t = tiny_dir(check)
    argv = check.opd(
        *words(
            "cold-start --config {cfg} --work_dir {work} --sft_prompts {p} --opd_prompts {p} "
            "--generate.model {t} --sft.model {s} --opd.teacher.path {t}",
            cfg=REPO / "configs" / "cold_start_tiny.yaml",
            work=check.work / "cold-start",
            p=t / "prompts.jsonl",
            s=t / "student",
            t=t / "teacher",
        )
    )

    def verify(text: str) -> str:
        last_line(text, "cold start done")
        return "generate -> sft -> opd, each stage done"

    return check.simple("cold-start", argv, 240, verify=verify)


def step_prompts_select(check: Check) -> StepResult:
    pool = lab_dir(check) / "candidates.jsonl"
    pool.parent.mkdir(parents=True, exist_ok=True)
    pool.write_text("".join(level_file().read_text().splitlines(keepends=True)[:16]))
    out = lab_dir(check) / "selected.jsonl"
    argv = check.opd(
        *words(
            "prompts select --student lab:student --teacher lab:teacher_novel --candidates {pool} --n 8 "
            "--mix 0.25 --rollouts 2 --max-new-tokens 48 --k 4 --template raw --out {out} "
            "--no-score-teacher-prompts",
            pool=pool,
            out=out,
        ),
        *check.device_flag("prompts", "select"),
    )

    def verify(_: str) -> str:
        n = len(out.read_text().splitlines()) if out.exists() else 0
        if n != 8:
            raise StepFailed(f"{n} prompts selected, expected 8")
        return "8 of 16 prompts selected"

    return check.simple("prompts-select", argv, 180, verify=verify)


def last_line(text: str, needle: str) -> str:
    for ln in reversed(text.splitlines()):
        if needle in ln:
            return ln.strip()[:200]
    raise StepFailed(f"no line with {needle!r} in the output")


# ----------------------------------------------------------------------------------------------------
# the plan


# Seconds each step is expected to take: (GPU machine, --cpu on 2 cores). The CPU column is measured (the
# 2-core box, opd from a plain checkout, 231 s in all); the GPU column is reckoned from the H200's first run
# (~30 s of start-up per benchmark arm, an opd command's imports and CUDA start ~10 s; 560 s without the
# extras) until a full run measures it: pass that run's results.json as --estimates to plan with its seconds.
ESTIMATES: dict[str, tuple[float, float]] = {
    "deps": (10, 7),
    "tiny": (10, 6),
    "train": (20, 10),
    "resume": (40, 22),
    "fsdp": (35, 14),
    "bench-trl": (0, 0),
    "bench-fp32": (150, 45),
    "bench-bf16": (130, 50),
    "accelerate-*": (30, 9),
    "generate": (20, 8),
    "sft": (20, 6),
    "eval": (25, 10),
    "doctor": (30, 6),
    "lab-run": (40, 10),
    "check": (15, 6),
    "analyze": (10, 4),
    "cold-start": (40, 5),
    "prompts-select": (30, 8),
}


def all_steps() -> list[Step]:
    """The steps in the order they run, by value: the training paths (one process, resume, FSDP) and the
    opd-vs-TRL benchmark first, then the other launchers and the lab-zoo commands, the extras last; a step
    the budget has no room for left is skipped, so what is cut is what matters least."""
    steps = [
        Step("deps", "imports; install carried wheels for missing ones", step_deps, timeout_s=600),
        Step("tiny", "opd tiny", step_tiny, needs=("deps",)),
        Step("train", "opd train --config configs/tiny.yaml", step_train, needs=("tiny",)),
        Step(
            "resume",
            "opd train, SIGKILL after the first checkpoint, opd train --resume",
            step_resume,
            needs=("tiny",),
        ),
        Step("fsdp", "torchrun ... opd train --sharding fsdp", step_fsdp, needs=("tiny",)),
        Step(
            "bench-trl",
            "TRL importable for the benchmark's TRL arms",
            step_bench_trl,
            needs=("deps",),
            min_s=0,
        ),
        make_bench_step("fp32"),
        make_bench_step("bf16"),
        *(make_accelerate_step(c) for c in accelerate_configs()),
        Step("generate", "opd generate (lab zoo teacher)", step_generate, needs=("deps",)),
        Step("sft", "opd sft (lab zoo student on the generated data)", step_sft, needs=("generate",)),
        Step("eval", "opd eval (lab zoo student, teacher, SFT result)", step_eval, needs=("deps",)),
        Step("doctor", "opd doctor (lab zoo pair)", step_doctor, needs=("deps",)),
        Step(
            "lab-run", "opd lab run thinking_patterns (1 arm, 1 seed, 2 steps)", step_lab_run, needs=("deps",)
        ),
        Step("check", "opd check (tiny pair)", step_check, needs=("tiny",), extra=True, min_s=20),
        Step(
            "analyze",
            "opd analyze (the train step's run)",
            step_analyze,
            needs=("train",),
            extra=True,
            min_s=20,
        ),
        Step(
            "cold-start",
            "opd cold-start --config configs/cold_start_tiny.yaml",
            step_cold_start,
            needs=("tiny",),
            extra=True,
            min_s=60,
        ),
        Step(
            "prompts-select",
            "opd prompts select (lab zoo pair)",
            step_prompts_select,
            needs=("deps",),
            extra=True,
            min_s=40,
        ),
    ]
    out = []
    for step in steps:
        key = "accelerate-*" if step.name.startswith("accelerate-") else step.name
        gpu_s, cpu_s = ESTIMATES[key]
        out.append(replace(step, gpu_s=gpu_s, cpu_s=cpu_s))
    return out


def estimates_for(steps: Sequence[Step], cpu: bool, earlier: Path | None = None) -> dict[str, float]:
    """Each step's estimate in seconds: its mode's column, or what the same step took in an earlier run's
    results.json (of the same mode; a step that did not run there keeps the column's)."""
    est = {s.name: s.cpu_s if cpu else s.gpu_s for s in steps}
    if earlier is not None:
        try:
            data = json.loads(earlier.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: --estimates {earlier}: not a readable results.json ({exc})") from exc
        if data.get("mode") != ("cpu" if cpu else "gpu"):
            raise SystemExit(
                f"error: --estimates {earlier} is a {data.get('mode')} run; this one is "
                f"{'cpu' if cpu else 'gpu'}: give a results.json of the same mode"
            )
        for row in data.get("steps", []):
            if row.get("name") in est and row.get("status") in (PASS, FAIL) and row.get("seconds"):
                est[row["name"]] = round(float(row["seconds"]), 1)
    return est


def make_plan(steps: Sequence[Step], estimates: dict[str, float], budget_s: float) -> list[dict[str, Any]]:
    """The plan printed before the first step, if every step takes its estimate: when each would end
    (`by_s`; None for a step the budget leaves no room for, which then takes no time) and whether it
    fits. The rules are run_steps's: an extra starts only when its whole estimate fits, any other step
    while its `min_s` is left (and is stopped at the budget)."""
    plan, t = [], 0.0
    for s in steps:
        est = estimates.get(s.name, 0.0)
        starts = t + (max(s.min_s, est) if s.extra else s.min_s) <= budget_s
        if starts:
            t += est
            fits = "yes" if t <= budget_s else "starts; may be stopped at the budget"
        else:
            fits = "no: skipped unless earlier steps are faster"
        plan.append(
            {
                "step": s.name,
                "estimate_s": est,
                "by_s": round(t, 1) if starts else None,
                "fits": fits,
                "what": s.what,
            }
        )
    return plan


PLAN_HEADERS = ("step", "estimate s", "done by s", "in budget", "what")


def plan_rows(plan: Sequence[dict[str, Any]]) -> list[list[str]]:
    def by(p: dict[str, Any]) -> str:
        return "-" if p["by_s"] is None else f"{p['by_s']:.0f}"

    return [[p["step"], f"{p['estimate_s']:.0f}", by(p), p["fits"], p["what"]] for p in plan]


def select(steps: list[Step], only: str | None, skip: str | None) -> tuple[list[Step], list[str]]:
    """Steps picked by --only (with the steps they need) / --skip (comma lists; a trailing * matches a
    prefix); `deps` always runs, since every other step depends on it. Returns the steps and the unknown
    names."""
    names = [s.name for s in steps]

    def match(pattern: str) -> list[str]:
        p = pattern.strip()
        return [n for n in names if (n.startswith(p[:-1]) if p.endswith("*") else n == p)]

    unknown: list[str] = []
    chosen = set(names)
    if only:
        chosen = {"deps"}
        for p in only.split(","):
            got = match(p)
            unknown += [] if got else [p]
            chosen.update(got)
        needs = {s.name: s.needs for s in steps}
        todo = list(chosen)
        while todo:  # and what they need (`--only train` runs tiny first)
            for n in needs.get(todo.pop(), ()):
                if n not in chosen:
                    chosen.add(n)
                    todo.append(n)
    if skip:
        for p in skip.split(","):
            got = match(p)
            unknown += [] if got else [p]
            chosen.difference_update(n for n in got if n != "deps")
    return [s for s in steps if s.name in chosen], unknown


def run_steps(check: Check, steps: Sequence[Step]) -> int:
    """Run `steps` in order and record each row; 1 if any step FAILED, else 0."""
    status: dict[str, str] = {}
    for step in steps:
        blocked = [n for n in step.needs if status.get(n, PASS) != PASS]
        left = check.budget_left()
        est = check.estimates.get(step.name, 0.0)
        needed = max(step.min_s, est) if step.extra else step.min_s
        if blocked:
            row = StepResult(step.name, SKIP, note=f"needs {', '.join(blocked)}, which did not pass")
        elif left < needed:
            row = StepResult(
                step.name,
                SKIP,
                note=f"budget: {max(0.0, left):.0f} s of {check.budget_s:.0f} s left, the step needs "
                f"{'its estimate, ' if step.extra else 'at least '}{needed:.0f} s; rerun it alone with "
                f"--only {step.name}",
            )
        else:
            print(f"[....] {step.name:<18} {step.what}", flush=True)
            check.step_deadline = time.monotonic() + step.timeout_s
            check.running = step.name
            try:
                row = step.run(check)
            except StepFailed as exc:
                row = StepResult(step.name, FAIL, note=str(exc))
            except Exception as exc:  # a bug in this script must not hide the other steps' results
                row = StepResult(step.name, FAIL, note=f"gpu_check error: {type(exc).__name__}: {exc}")
            finally:
                check.step_deadline = None
                check.running = None
        status[step.name] = row.status
        check.record(row)
    return 1 if any(r.status == FAIL for r in check.results) else 0


# ----------------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_check.py",
        description=__doc__.split("\n\n")[0],
        epilog="Steps: " + ", ".join(s.name for s in all_steps()),
    )
    p.add_argument(
        "out_dir",
        nargs="?",
        type=Path,
        help="where summary.md, results.json and logs.tar.gz go (nothing else)",
    )
    p.add_argument(
        "--cpu", action="store_true", help="run every step on the CPU at tiny sizes (no GPU needed)"
    )
    p.add_argument("--only", help="comma list of steps to run (deps always runs; 'bench-*' matches a prefix)")
    p.add_argument("--skip", help="comma list of steps to leave out")
    p.add_argument(
        "--budget-s",
        type=float,
        help="total seconds; a step running when it runs out is stopped (a SKIP), later ones are skipped "
        f"[{GPU.budget_s:.0f} on a GPU, {CPU.budget_s:.0f} with --cpu]",
    )
    p.add_argument(
        "--tokenizer",
        help="a real tokenizer directory for the benchmark's Qwen-shaped pair "
        "(default: a synthetic one with the same 151,936 entries)",
    )
    p.add_argument("--python", help="interpreter for every child [this one]")
    p.add_argument(
        "--work", type=Path, help="scratch directory for models and runs [a temporary one, removed]"
    )
    p.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    p.add_argument(
        "--estimates",
        type=Path,
        help="an earlier run's results.json (same mode): plan with the seconds its steps took",
    )
    p.add_argument("--list", action="store_true", help="list the steps and exit")
    for key, kind, what in (
        ("bench-prompts", int, "prompts per step"),
        ("bench-rollouts", int, "rollouts per prompt"),
        ("bench-tokens", int, "max new tokens"),
        ("bench-steps", int, "timed steps"),
        ("bench-warmup", int, "warm-up steps"),
    ):
        p.add_argument(f"--{key}", type=kind, help=f"benchmark {what} (overrides the mode's default)")
    args = p.parse_args(argv)
    if not args.list and args.out_dir is None:
        p.error("OUT_DIR is required")
    return args


def sizes_for(args: argparse.Namespace) -> Sizes:
    base = CPU if args.cpu else GPU
    over = {
        f"bench_{k}": getattr(args, f"bench_{k}")
        for k in ("prompts", "rollouts", "tokens", "steps", "warmup")
        if getattr(args, f"bench_{k}") is not None
    }
    return Sizes(**{**asdict(base), **over})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    steps = all_steps()
    estimates = estimates_for(steps, args.cpu, args.estimates)
    if args.list:
        for s in steps:
            extra = "  (extra: only when its estimate fits the budget)" if s.extra else ""
            print(f"{s.name:<20} ~{estimates[s.name]:4.0f} s  {s.what}{extra}")
        return 0
    steps, unknown = select(steps, args.only, args.skip)
    if unknown:
        print(f"error: unknown step(s) {unknown}; --list shows them", file=sys.stderr)
        return 2
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in (*OUTPUTS, "bench-fp32.json", "bench-bf16.json"):  # an earlier run's (bench-*: older layout)
        with contextlib.suppress(FileNotFoundError):
            (out / old).unlink()
    if (out / "logs").is_dir():  # the older layout's logs/NN-STEP.log
        shutil.rmtree(out / "logs", ignore_errors=True)
    tmp = None
    if args.work:
        work = args.work.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="opd-gpu-check-")
        work = Path(tmp)
    check = Check(args, sizes_for(args), out, work)
    check.estimates = estimates
    check.plan = make_plan(steps, estimates, check.budget_s)

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    print(f"opd GPU check ({'cpu' if args.cpu else 'gpu'}): results in {out}, scratch in {work}", flush=True)
    total = sum(p["estimate_s"] for p in check.plan)
    source = f"seconds from {args.estimates}" if args.estimates else "estimates"
    print(f"plan ({source}): ~{total:.0f} s of steps for a budget of {check.budget_s:.0f} s", flush=True)
    print(text_table(PLAN_HEADERS, plan_rows(check.plan)), flush=True)
    check.write()
    code = 0
    try:
        deps, rest = steps[0], steps[1:]
        code = run_steps(check, [deps])
        if check.results[-1].status == PASS:
            print(describe_env(check.env_info), flush=True)
            if not args.cpu and not check.env_info.get("cuda_available"):
                msg = (
                    "no CUDA device is visible to torch here: run on a GPU machine, or add --cpu to run "
                    "the same steps on the CPU at tiny sizes"
                )
                check.record(StepResult("gpu", FAIL, note=msg))
                print(f"error: {msg}", file=sys.stderr)
                return 2
            code = max(code, run_steps(check, rest))
        else:
            for s in rest:
                check.record(StepResult(s.name, SKIP, note="needs deps, which did not pass"))
    except KeyboardInterrupt as exc:
        if check.current is not None:
            kill_group(check.current)
        during = f" during {check.running}" if check.running else ""
        check.record(StepResult("interrupted", FAIL, note=f"stopped{during}: {exc or 'Ctrl-C'}"))
        code = 130
    finally:
        check.write()
        print()
        print(text_table(STEP_HEADERS, step_rows([asdict(r) for r in check.results])))
        for key, bench in check.bench.items():
            if bench.get("json", {}).get("results"):
                print(f"\nbenchmark {key}: {bench_caption(bench['json'])}")
                print(text_table(*bench_rows(bench["json"])))
        data = json.loads((out / "results.json").read_text())
        print(f"\n{verdict(data)} in {check.elapsed():.0f} s; {out / 'summary.md'}", flush=True)
        if tmp is not None and not args.keep_work:
            shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
