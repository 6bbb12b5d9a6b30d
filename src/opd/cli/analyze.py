"""`opd analyze RUN_DIR...`: curves, position heatmaps and success-vs-failure signals of training runs.

Kept out of cli.py like `opd eval`; `register(app)` adds the command. The work is done by
`opd.analysis.analyze`; this module only parses arguments, prints and turns expected failures into one line.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from opd.errors import ConfigError, OpdError


def run_names(run_dirs: Sequence[Path], names: Sequence[str]) -> list[str]:
    """Labels for the runs: the given --name values in order, defaults (dir names) for the rest."""
    from opd.analysis.analyze import default_names

    if len(names) > len(run_dirs):
        raise ConfigError(f"{len(names)} --name values for {len(run_dirs)} run directories")
    if any(not n.strip() for n in names):
        raise ConfigError("--name: empty name")
    out = [n.strip() for n in names] + default_names(run_dirs)[len(names) :]
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise ConfigError(f"--name: the name(s) {', '.join(map(repr, dup))} label more than one run")
    return out


def default_out(run_dirs: Sequence[Path]) -> Path:
    """RUN/analysis for one run (the analysis lives with its run); ./analysis for a comparison."""
    return Path(run_dirs[0]) / "analysis" if len(run_dirs) == 1 else Path("analysis")


def _cell(st: dict[str, Any]) -> str:
    def g(x: Any) -> str:
        return f"{x:.3g}" if isinstance(x, float) and math.isfinite(x) else "n/a"

    return f"{g(st['initial'])} → {g(st['final'])}\nslope {g(st['slope'])}"


def signals_table(names: Sequence[str], signals: Sequence[dict[str, Any]]) -> Table:
    """Success signals side by side: one column per run, initial → final and slope per metric."""
    from opd.analysis.analyze import SIGNAL_METRICS

    t = Table(title="opd analyze: success signals (initial → final, slope per step)", show_header=True)
    t.add_column("signal", no_wrap=True)
    for n in names:
        t.add_column(n, justify="right")
    t.add_row("steps", *[str(s["n_steps"]) for s in signals])
    for m in SIGNAL_METRICS:
        t.add_row(m, *[_cell(s["metrics"][m]) for s in signals])
    t.add_row("verdict", *[f"[bold]{s['verdict']}[/]" for s in signals])
    return t


def run_analyze(
    run_dirs: Sequence[Path], names: Sequence[str], out: Path | None, console: Console
) -> dict[str, Path]:
    """Load, analyze and write; print the signals table, readings, events and the files written."""
    from opd.analysis.analyze import compare_runs, load_run, success_signals, write_analysis
    from opd.cli.common import console as err

    labels = run_names(run_dirs, names)
    with warnings.catch_warnings():  # read warnings are printed below, once, in the CLI's own style
        warnings.simplefilter("ignore")
        runs = [load_run(p, n) for p, n in zip(run_dirs, labels, strict=True)]
    for run in runs:
        for w in run.warnings:
            err.print(f"[yellow]warning:[/] {w}", markup=True, highlight=False)
    out_dir = out or default_out(run_dirs)
    files = write_analysis(runs, out_dir)
    signals = [success_signals(r) for r in runs]
    console.print(signals_table(labels, signals))
    for run, s in zip(runs, signals, strict=True):
        console.print(f"[bold]{run.name}[/] ({s['verdict']}): ", end="")
        console.print(s["reading"], markup=False, highlight=False)
    for note in compare_runs(runs, signals):
        console.print(f"note: {note}", markup=False, highlight=False)
    events = [(r.name, ev) for r in runs for ev in r.events]
    if events:
        console.print(f"[yellow]{len(events)} event(s) logged:[/]")
        for name, ev in events:
            rest = ", ".join(f"{k}={v}" for k, v in ev.items() if k not in ("step", "kind"))
            console.print(
                f"  {name} step {ev['step']}: {ev.get('kind')} {rest}".rstrip(), markup=False, highlight=False
            )
    pngs = [p for k, p in files.items() if p.suffix == ".png"]
    console.print(
        f"wrote {files['markdown']}, {files['html']}, {files['json']}", markup=False, highlight=False
    )
    console.print(f"and {len(pngs)} figure(s) under {out_dir}", markup=False, highlight=False)
    return files


def register(app: typer.Typer) -> None:
    """Add the `analyze` command to the opd CLI."""

    @app.command("analyze")
    def analyze_command(
        run_dirs: list[Path] = typer.Argument(..., help="run directories (each with a metrics.jsonl)"),
        out: Path | None = typer.Option(
            None,
            "--out",
            "-o",
            help="output directory [RUN_DIR/analysis for one run, ./analysis for several]",
        ),
        name: list[str] = typer.Option([], "--name", "-n", help="label of a run, in order (repeatable)"),
    ) -> None:
        """Curves of every logged metric, entropy by response position x step, and success signals.

        Writes OUT/analysis.md, OUT/analysis.html, OUT/analysis.json and the PNGs (OUT/curves/,
        OUT/heatmaps/, OUT/key_metrics.png).
        """
        from opd.cli.common import fail

        try:
            run_analyze(list(run_dirs), list(name), out, Console(soft_wrap=True))
        except OpdError as exc:
            fail(exc)
