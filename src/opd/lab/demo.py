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
from rich.table import Table

__all__ = ["DEMO_EXPERIMENTS", "print_summary", "register_experiments", "run_demo"]

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


def print_summary(console: Console, summary: dict[str, Any]) -> None:
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
    """
    from opd.device import resolve_device
    from opd.lab.registry import EXPERIMENTS
    from opd.lab.report import build_report
    from opd.lab.runner import LabRunner, RichReporter, rich_progress

    resolve_device(device)  # before the zoo is loaded or built: `cuda` without CUDA fails here
    console = console or Console(stderr=True)
    out = Console()
    t0 = time.monotonic()
    deadline = t0 + 60.0 * budget_minutes
    if zoo is None:
        zoo = _load_zoo(zoo_root, console, build_if_missing=True)
    table = _zoo_table(zoo)
    if table is not None:
        out.print(table)
    summaries: list[dict[str, Any]] = []
    ran: list[str] = []
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
                    console.print(f"[yellow]skipping {spec.title}[/]: {todo} runs x ~{per_run:.0f}s do not fit in "
                                  f"the remaining {max(0.0, left):.0f}s of the {budget_minutes:g}-minute budget")  # fmt: skip
                    continue
                chosen = chosen[:fit]
                console.print(f"[yellow]budget[/]: running {spec.title} with {fit} seed(s)")
        console.rule(spec.title)
        with rich_progress(console) as progress:
            reporter = RichReporter(progress, console, total_runs=len(chosen) * len(spec.arms))
            runner = LabRunner(zoo=zoo, out_root=runs, reporter=reporter, device=device)
            summary = runner.run_experiment(spec, seeds=chosen, steps=steps, deadline=deadline)
        summaries.append(summary)
        ran.append(name)
    wall = time.monotonic() - t0
    rep = build_report(runs, runs / "report.md", extra=[("Demo", (
        f"`opd demo` ran {', '.join(ran) or 'nothing'} in {wall / 60:.1f} min of wall time "
        f"(budget {budget_minutes:g} min); runs whose result files already existed were reused, not re-trained."))])  # fmt: skip
    for s in summaries:
        print_summary(out, s)
    out.print(f"demo wall time: {wall / 60:.1f} min; report: {rep['markdown']} (HTML: {rep['html']})")
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
