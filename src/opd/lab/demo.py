"""`opd demo` (the main job) and the `opd lab run / report / list` commands.

`opd demo` with no arguments loads the shipped zoo (checking its checksums; building it when missing),
runs experiment 1 (thinking patterns: compatible vs incompatible teacher, 3 seeds), then experiment 2
(novelty vs scale) if the remaining budget allows, shows progress, prints the comparison tables with the
verdicts, and writes the report with its figures. Experiment 2's novel arm is experiment 1's compatible
arm (same models, settings and seeds), so it is copied rather than re-trained, and experiment 2 costs
three runs. The budget check uses measured run times, not guesses: a new seed starts only when the time
one seed took still fits.

`register_experiments(lab_app, app)` is called by `opd.lab.cli.register`, which owns the `lab` sub-app.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = [
    "DEMO_EXPERIMENTS",
    "plan_lines",
    "print_summary",
    "register_experiments",
    "result_line",
    "run_demo",
]

DEMO_EXPERIMENTS = ("thinking_patterns", "novelty_vs_scale")
_STATUS_STYLE = {"reproduced": "green", "partly": "yellow", "not reproduced": "red", "not run": "dim"}


def _cell(summary_arm: dict[str, Any], a: str, b: str, pct: bool) -> str:
    """``start → end ± sd`` from two headline stats (the spread shown is the end value's)."""
    h = summary_arm.get("headline", {})
    sa, sb = h.get(a), h.get(b)
    if not sa or not sb or not sa.get("n") or not sb.get("n"):
        return "–"
    k, d = (100.0, 1) if pct else (1.0, 3)
    spread = f" ± {k * sb['std']:.{d}f}" if sb["n"] > 1 else ""
    return f"{k * sa['mean']:.{d}f} → {k * sb['mean']:.{d}f}{spread}"


def _one(summary_arm: dict[str, Any], m: str, pct: bool) -> str:
    s = summary_arm.get("headline", {}).get(m)
    if not s or not s.get("n"):
        return "–"
    k, d = (100.0, 1) if pct else (1.0, 3)
    return f"{k * s['mean']:.{d}f}" + (f" ± {k * s['std']:.{d}f}" if s["n"] > 1 else "")


def print_claims(console: Console, summary: dict[str, Any]) -> None:
    """One line per claim that was run (status: the lab's numbers), and why where it was not reproduced;
    the claims' wording is in the report and `opd lab list`."""
    for v in summary.get("verdicts", []):
        if v["status"] == "not run":
            continue
        style = _STATUS_STYLE.get(v["status"], "")
        console.print(
            f"  claim {v['claim_id']} [{style}]{v['status']}[/]: {escape(v['result'])}", soft_wrap=True
        )
        if v.get("why") and v["status"] != "reproduced":
            console.print(f"     why: {escape(v['why'])}", soft_wrap=True, highlight=False)


def print_summary(console: Console, summary: dict[str, Any], *, claims: bool = True) -> None:
    """A compact comparison table (mean ± std over seeds) and the verdicts; the report has every metric."""
    table = Table(title=summary["title"])
    for h in ("arm", "seeds", "gap-level acc % (before → after)", "gap recovery %", "easy levels Δ pts",
              "overlap@4 (start → end)", "overlap mass (start → end)"):  # fmt: skip
        table.add_column(h, overflow="fold")
    for name, a in summary.get("arms", {}).items():
        if not a.get("seeds"):
            continue
        table.add_row(
            name, str(a["seeds"]), _cell(a, "gap_before", "gap_after", True), _one(a, "gap_recovery", True),
            _one(a, "easy_delta", True), _cell(a, "overlap_ratio_initial", "overlap_ratio_final", False),
            _cell(a, "overlap_mass_student_initial", "overlap_mass_student_final", False),
        )  # fmt: skip
    console.print(table)
    if not claims:
        return
    verdicts = Table(show_header=True, title="paper claim vs lab result")
    verdicts.add_column("claim", overflow="fold", ratio=3)
    verdicts.add_column("status")
    verdicts.add_column("lab result", overflow="fold", ratio=3)
    for v in summary.get("verdicts", []):
        style = _STATUS_STYLE.get(v["status"], "")
        verdicts.add_row(f"{v['claim_id']}: {v['claim']}", f"[{style}]{v['status']}[/]", v["result"])
    console.print(verdicts)


def _load_zoo(zoo_root: Path | None, console: Console, *, build_if_missing: bool) -> Any:
    """The zoo as a LabZoo: verified against its checksums; built first when absent (and allowed)."""
    from opd.errors import ModelError
    from opd.lab import zoo as z
    from opd.lab.runner import LabZoo

    root = Path(zoo_root) if zoo_root else z.ZOO_DIR
    if not (root / z.MANIFEST).is_file():
        if not build_if_missing:
            raise ModelError(f"no lab zoo at {root}; build it with `opd lab build`")
        console.print(
            f"[yellow]no lab zoo at {root}[/]: building it now (fixed seeds; ~15-20 min on 2 CPU cores)"
        )
        z.build_zoo(root, console=console)
    problems = z.verify_zoo(root)
    if problems:
        raise ModelError(
            f"the lab zoo at {root} does not match its MANIFEST checksums ({'; '.join(problems[:3])}"
            f"{' ...' if len(problems) > 3 else ''}); rebuild it with `opd lab build --force`"
        )
    console.print(f"[green]ok[/] lab zoo at {root}: {len(z.ZOO_NAMES)} models, checksums verified")
    return LabZoo.shipped(root)


def _zoo_table(zoo: Any) -> Table | None:
    from opd.lab import zoo as z

    if not zoo.manifest:
        return None
    levels = [str(lv) for lv in zoo.manifest["world"]["levels"]]
    table = Table(title="lab zoo: greedy accuracy per level (%) on held-out problems")
    for h in ["model", "pattern", *[f"L{lv}" for lv in levels], "format exact-match"]:
        table.add_column(h)
    for row in z.accuracy_rows(zoo.manifest):
        table.add_row(*row)
    return table


EST_STEP_S = 0.5
"""Seconds per OPD step of the lab's settings (16 prompts x 4 rollouts, one torch thread), measured on this
project's 2-core CPU machine: the demo's 9 runs of 80 steps took 6.5 min. Only for the up-front estimate."""
EST_RUN_S = 4.0
"""Seconds per run besides its steps (set-up, the evaluation after training), same machine."""

DEMO_SHOWS: dict[str, str] = {
    "thinking_patterns": "OPD lifts the student on the level it could not solve when the teacher solves problems "
    "the way the student does, and breaks the student when the teacher uses another pattern (expected: that arm "
    "collapses, its answers become unreadable)",
    "novelty_vs_scale": "a teacher with a capability the student lacks recovers more of the gap than a bigger "
    "teacher trained on the same data",
}
"""What each demo experiment is meant to show, in plain words (the claims it tests; the verdicts judge them)."""


def _planned_runs(runs: Path, seeds: list[int]) -> dict[str, int]:
    """Runs each demo experiment will train (not already on disk; experiment 2's novel arm is copied)."""
    from opd.lab.registry import EXPERIMENTS
    from opd.lab.runner import result_path

    out = {}
    for name in DEMO_EXPERIMENTS:
        spec = EXPERIMENTS[name]
        n = 0
        for seed in seeds or list(spec.seeds):
            for arm in spec.arms:
                if result_path(runs, name, arm.name, seed).is_file():
                    continue
                if name == "novelty_vs_scale" and arm.name == "novel":
                    continue  # copied from thinking_patterns/compatible, which the demo runs first
                n += 1
        out[name] = n
    return out


def plan_lines(*, seeds: int | None, steps: int | None, budget_minutes: float, runs: Path) -> list[str]:
    """What the demo will run and show, and how long it should take: printed before anything runs."""
    from opd.lab.registry import EXPERIMENTS

    first = EXPERIMENTS[DEMO_EXPERIMENTS[0]]
    chosen = list(range(seeds)) if seeds is not None else list(first.seeds)
    planned = _planned_runs(runs, chosen)
    lines = ["opd demo: on-policy distillation (OPD) in a small lab world, on this machine's CPU or GPU.",
             f"It distils lab:student (a 0.2M-parameter model that solves sums of 2-3 numbers and half of level 4) "
             f"toward different teachers, {len(chosen)} seed(s) x {steps or first.steps} OPD steps per run:"]  # fmt: skip
    for i, name in enumerate(DEMO_EXPERIMENTS, 1):
        spec = EXPERIMENTS[name]
        arms = ", ".join(f"{a.name} ({a.teacher.removeprefix('lab:')})" for a in spec.arms)
        reuse = "; its novel arm reuses experiment 1's runs" if name == "novelty_vs_scale" else ""
        lines.append(
            f"  {i}. {spec.title.split(': ', 1)[-1]}: arms {arms}; {planned[name]} run(s) to train{reuse}."
        )
        lines.append(f"     Shows: {DEMO_SHOWS.get(name, spec.description)}.")
    total = sum(planned.values())
    est = total * (EST_RUN_S + EST_STEP_S * (steps or first.steps))
    lines.append(f"Time: {total} training run(s), about {max(1.0, est / 60):.0f} min on 2 CPU cores (less on a GPU); "
                 f"budget {budget_minutes:g} min (--budget-minutes): experiment 2 runs only if it still fits.")  # fmt: skip
    lines.append(f"Results go to {runs}/; the report (what ran, the paper's claims vs these runs, figures) to "
                 f"{runs}/report.md and report.html.")  # fmt: skip
    return lines


def result_line(summaries: list[dict[str, Any]]) -> str:
    """The demo's outcome in one line: each teacher's effect on the gap level, and the claims' tally."""
    from opd.lab.report import status_counts

    seen: dict[str, str] = {}
    before = ""
    gap = 4
    for s in summaries:
        gap = s.get("gap_level", gap)
        for a in s.get("arms", {}).values():
            h = a.get("headline", {})
            b, f = h.get("gap_before") or {}, h.get("gap_after") or {}
            if not a.get("seeds") or not b.get("n") or not f.get("n"):
                continue
            before = before or f"{100 * b['mean']:.1f}%"
            seen.setdefault(str(a.get("teacher", "")).removeprefix("lab:"), f"{100 * f['mean']:.1f}%")
    counts = status_counts(summaries)
    tally = ", ".join(f"{n} {k}" for k, n in counts.items()) or "none judged"
    effects = ", ".join(f"{v} toward {k}" for k, v in seen.items())
    head = (
        f"the student's level-{gap} accuracy went from {before} to {effects}" if seen else "no run finished"
    )
    return f"result: {head}; paper claims tested: {sum(counts.values())} ({tally})."


def run_demo(
    *,
    budget_minutes: float = 10.0,
    runs: Path = Path("runs/lab"),
    zoo_root: Path | None = None,
    seeds: int | None = None,
    steps: int | None = None,
    console: Console | None = None,
    zoo: Any = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Run the demo; returns {"summaries", "report", "wall_time_s", "ran"}. `zoo` injects a LabZoo (tests).

    `device`: where the runner's own model loads run (`LabRunner.device`; ``auto`` = GPU when available).
    What it prints: the plan (`plan_lines`), the zoo check, one progress bar over all the runs to train with
    its ETA (plain lines with the ETA in a log file), a line per run, the tables, where the report is and
    the one-line result. The libraries' own output is off (`opd.progress.quiet_libraries`), and the
    evaluator's warnings about unreadable answers become one counted line per run (`count_unreadable_answers`).
    """
    from opd.device import resolve_device
    from opd.lab.registry import EXPERIMENTS
    from opd.lab.report import build_report
    from opd.lab.runner import LabRunner, RichReporter, rich_progress
    from opd.progress import quiet_libraries

    resolve_device(device)  # before the zoo is loaded or built: `cuda` without CUDA fails here
    console = console or Console(stderr=True)
    out = Console()
    t0 = time.monotonic()
    deadline = t0 + 60.0 * budget_minutes
    runs = Path(runs)
    for line in plan_lines(seeds=seeds, steps=steps, budget_minutes=budget_minutes, runs=runs):
        out.print(line, highlight=False, soft_wrap=True)
    summaries: list[dict[str, Any]] = []
    ran: list[str] = []
    with quiet_libraries():
        if zoo is None:
            zoo = _load_zoo(zoo_root, console, build_if_missing=True)
        table = _zoo_table(zoo)
        if table is not None:
            out.print(table)
        first = EXPERIMENTS[DEMO_EXPERIMENTS[0]]
        chosen0 = list(range(seeds)) if seeds is not None else list(first.seeds)
        planned = _planned_runs(runs, chosen0)
        with rich_progress(console, name="opd demo") as progress:
            reporter = RichReporter(progress, console, total_runs=max(1, sum(planned.values())),
                                    steps_per_run=int(steps or first.steps), label="all runs",
                                    run_bars=not getattr(progress, "plain", False))  # fmt: skip
            runner = LabRunner(zoo=zoo, out_root=runs, reporter=reporter, device=device)
            for name in DEMO_EXPERIMENTS:
                spec = EXPERIMENTS[name]
                chosen = list(range(seeds)) if seeds is not None else list(spec.seeds)
                if name != DEMO_EXPERIMENTS[0]:
                    per_run = _seconds_per_run(summaries)
                    todo = _new_runs(spec, runs, chosen)
                    left = deadline - time.monotonic()
                    if per_run is not None and todo * per_run > left:
                        fit = int(left // (per_run * max(1, todo / max(1, len(chosen)))))
                        if fit < 1:
                            console.print(f"[yellow]skipping {spec.title}[/]: {todo} runs x ~{per_run:.0f}s do not fit "
                                          f"in the remaining {max(0.0, left):.0f}s of the {budget_minutes:g}-minute budget")  # fmt: skip
                            reporter.set_total_runs(reporter.trained)
                            continue
                        chosen = chosen[:fit]
                        console.print(f"[yellow]budget[/]: running {spec.title} with {fit} seed(s)")
                        reporter.set_total_runs(reporter.trained + _new_runs(spec, runs, chosen))
                console.rule(spec.title)
                summary = runner.run_experiment(spec, seeds=chosen, steps=steps, deadline=deadline)
                summaries.append(summary)
                ran.append(name)
        wall = time.monotonic() - t0
        lead = (f"`opd demo` ran {len(ran)} experiment(s) in {wall / 60:.1f} min of wall time (budget "
                f"{budget_minutes:g} min); runs whose result files already existed were reused, not re-trained.")  # fmt: skip
        rep = build_report(runs, runs / "report.md", lead=lead)
    for s in summaries:
        print_summary(out, s, claims=False)
        print_claims(out, s)
    out.print(f"report: {rep['markdown']}", highlight=False, soft_wrap=True)
    if rep.get("html"):
        out.print(f"        {rep['html']} (open it in a browser)", highlight=False, soft_wrap=True)
    out.print(f"demo wall time: {wall / 60:.1f} min", highlight=False)
    out.print(result_line(summaries), highlight=False, soft_wrap=True)
    return {"summaries": summaries, "report": rep, "wall_time_s": wall, "ran": ran}


def _seconds_per_run(summaries: list[dict[str, Any]]) -> float | None:
    """Measured seconds per freshly trained run so far (None before any)."""
    total = sum(float(s.get("wall_time_s") or 0) for s in summaries)
    n = sum(int(s.get("runs_trained") or 0) for s in summaries)
    return total / n if n and total > 0 else None


def _new_runs(spec: Any, runs: Path, seeds: list[int]) -> int:
    """How many of the experiment's runs are not already on disk or copyable (an estimate for the budget):
    an arm identical to an earlier experiment's arm is copied, which the runner detects by fingerprint;
    here the demo knows experiment 2's novel arm is experiment 1's compatible arm."""
    from opd.lab.runner import result_path

    n = 0
    for seed in seeds:
        for arm in spec.arms:
            if result_path(runs, spec.name, arm.name, seed).is_file():
                continue
            if (
                spec.name == "novelty_vs_scale"
                and arm.name == "novel"
                and result_path(runs, "thinking_patterns", "compatible", seed).is_file()
            ):
                continue
            n += 1
    return n


def _lab_list() -> None:
    """List the lab experiments, their arms and the paper claims they test."""
    from opd.lab.registry import EXPERIMENTS

    console = Console()
    for e in EXPERIMENTS.values():
        console.print(f"[bold]{e.name}[/]  {e.title}  ({e.steps} steps x {len(e.seeds)} seeds)")
        for a in e.arms:
            console.print(f"    arm {a.name}: {a.student} -> {a.teacher}")
        for c in e.claims:
            console.print(f"    claim {c.id} ({c.finding}): {c.text}")


def _run_named(
    names: list[str],
    console: Console,
    *,
    seeds: int | None,
    steps: int | None,
    arm: list[str] | None,
    runs: Path,
    zoo_root: Path | None,
    force: bool,
    device: str,
) -> dict[str, Any]:
    """Run the named experiments one after another and rebuild the report; kept out of the command so the
    command holds only its options and the error handling that turns library errors into exit code 2."""
    from opd.device import resolve_device
    from opd.lab.registry import EXPERIMENTS
    from opd.lab.report import build_report
    from opd.lab.runner import LabRunner, RichReporter, rich_progress

    resolve_device(device)  # before the zoo is checked: `cuda` without CUDA fails here
    zoo = _load_zoo(zoo_root, console, build_if_missing=False)
    for n in names:
        spec = EXPERIMENTS[n]
        chosen = list(range(seeds)) if seeds is not None else list(spec.seeds)
        n_arms = len(arm) if arm else len(spec.arms)
        console.rule(spec.title)
        with rich_progress(console) as progress:
            reporter = RichReporter(progress, console, total_runs=len(chosen) * n_arms)
            runner = LabRunner(zoo=zoo, out_root=runs, reporter=reporter, force=force, device=device)
            summary = runner.run_experiment(spec, seeds=chosen, steps=steps, arms=arm or None)
        print_summary(Console(), summary)
    return build_report(runs, runs / "report.md")


def _lab_run(
    name: str = typer.Argument(..., help="experiment name (`opd lab list`), or `all`"),
    seeds: int | None = typer.Option(None, "--seeds", help="number of seeds (default: the experiment's, 3)"),
    steps: int | None = typer.Option(None, "--steps", help="OPD steps per run (default: the experiment's)"),
    arm: list[str] | None = typer.Option(None, "--arm", help="run only this arm (repeatable)"),
    runs: Path = typer.Option(Path("runs/lab"), "--runs", help="results directory"),
    zoo_root: Path | None = typer.Option(None, "--zoo", help="zoo directory (default: the shipped zoo)"),
    force: bool = typer.Option(False, "--force", help="re-run even when results exist"),
    device: str = typer.Option(
        "auto",
        "--device",
        help="where evaluations and probes run: auto (GPU when available) | cpu | cuda[:N]",
    ),
) -> None:
    """Run a lab experiment (OPD runs x seeds + per-level evaluation); print its table, write plots."""
    from opd.errors import OpdError
    from opd.lab.registry import EXPERIMENTS

    console = Console(stderr=True)
    names = list(EXPERIMENTS) if name == "all" else [name]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        console.print(
            f"[bold red]error:[/] unknown experiment {unknown[0]!r}; known: {', '.join(EXPERIMENTS)}"
        )
        raise typer.Exit(2)
    try:
        rep = _run_named(names, console, seeds=seeds, steps=steps, arm=arm, runs=runs, zoo_root=zoo_root,
                         force=force, device=device)  # fmt: skip
    except (OpdError, KeyError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    console.print(f"results under {runs}; report: {rep['markdown']}")


def _lab_report(
    runs: Path = typer.Option(Path("runs/lab"), "--runs", help="results directory"),
    out: Path | None = typer.Option(
        None, "--out", help="markdown path (default RUNS/report.md; HTML beside it)"
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="draw the figures"),
) -> None:
    """Gather all lab results into one report (paper claim - lab result - status), from result files only."""
    from opd.lab.report import build_report

    rep = build_report(runs, out or runs / "report.md", plots=plots)
    counts: dict[str, int] = {}
    for s in rep["summaries"]:
        for v in s["verdicts"]:
            counts[v["status"]] = counts.get(v["status"], 0) + 1
    Console().print(f"report: {rep['markdown']} (HTML: {rep['html']}); claims: "
                    + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))  # fmt: skip


def _demo(
    budget_minutes: float = typer.Option(
        10.0, "--budget-minutes", help="wall-time budget for the experiments"
    ),
    runs: Path = typer.Option(Path("runs/lab"), "--runs", help="results directory"),
    zoo_root: Path | None = typer.Option(None, "--zoo", help="zoo directory (default: the shipped zoo)"),
    seeds: int | None = typer.Option(None, "--seeds", help="number of seeds (default 3)"),
    steps: int | None = typer.Option(None, "--steps", help="OPD steps per run (default: the experiment's)"),
    device: str = typer.Option(
        "auto",
        "--device",
        help="where evaluations and probes run: auto (GPU when available) | cpu | cuda[:N]",
    ),
) -> None:
    """The lab in minutes on a CPU: OPD works with a compatible teacher and fails with an incompatible one."""
    from opd.errors import OpdError

    try:
        run_demo(budget_minutes=budget_minutes, runs=runs, zoo_root=zoo_root, seeds=seeds, steps=steps,
                 device=device)  # fmt: skip
    except OpdError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None


def register_experiments(lab_app: typer.Typer, app: typer.Typer) -> None:
    """Add `lab run NAME`, `lab report`, `lab list` to the lab sub-app and `demo` to the top-level app."""
    lab_app.command("list")(_lab_list)
    lab_app.command("run")(_lab_run)
    lab_app.command("report")(_lab_report)
    app.command("demo")(_demo)
