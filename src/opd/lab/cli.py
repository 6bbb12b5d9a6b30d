"""`opd lab build` and `opd lab info`: build the zoo, and show/verify the shipped one.

`register(app)` owns the `lab` sub-app: it adds it to the opd CLI, adds the zoo commands here, and
hands the sub-app to `opd.lab.demo.register_experiments` for `lab run / report / list` and `opd demo`
(when that module is present), so the lab's commands live under one name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["accuracy_table", "diagnostics_table", "register"]


def accuracy_table(manifest: dict[str, Any], mode: str = "greedy") -> Table:
    """Per-level accuracy (%) of every zoo model, with its pattern's format exact-match rate."""
    from opd.lab.zoo import accuracy_rows

    label = "greedy" if mode == "greedy" else "T=1 sampling"
    n = manifest["world"].get("eval_problems_per_level", "?")
    table = Table(title=f"lab zoo: accuracy per level (%), {label}, {n} held-out problems per level")
    levels = manifest["world"]["levels"]
    for h in ["model", "pattern", *[f"L{lv}" for lv in levels], "format exact-match"]:
        table.add_column(h, justify="left" if h in ("model", "pattern") else "right")
    for row in accuracy_rows(manifest, mode):
        table.add_row(*row)
    return table


def diagnostics_table(manifest: dict[str, Any]) -> Table:
    """Student-vs-teacher agreement at the gap level (overlap ratio/mass at k=4 and k=16, KL, entropy)."""
    d = manifest["gap_diagnostics"]
    table = Table(
        title=f"student rollouts at level {d['level']} ({d['rollouts']}, T={d['temperature']:g}) scored by each teacher"
    )
    cols = [
        ("k4/overlap_ratio", "ratio@4"),
        ("k4/overlap_mass_student", "mass_s@4"),
        ("k4/overlap_mass_teacher", "mass_t@4"),
        ("k16/overlap_ratio", "ratio@16"),
        ("k16/overlap_mass_teacher", "mass_t@16"),
        ("k4/overlap_token_advantage", "adv@4"),
        ("reverse_kl", "rev KL"),
        ("entropy_student", "H student"),
        ("entropy_teacher", "H teacher"),
    ]
    table.add_column("teacher")
    for _, h in cols:
        table.add_column(h, justify="right")
    for name, row in d["teachers"].items():
        table.add_row(name, *[f"{row[k]:.3f}" for k, _ in cols])
    return table


def register(app: typer.Typer) -> None:
    """Add the `lab` sub-app (build, info, and the experiment commands) to the opd CLI."""
    lab_app = typer.Typer(help="The lab: a small controlled world and model zoo for OPD on a CPU.")
    app.add_typer(lab_app, name="lab")

    @lab_app.command("build")
    def build(
        out: Path | None = typer.Option(None, "--out", help="zoo directory [the shipped zoo in the package]"),
        force: bool = typer.Option(False, "--force", help="overwrite an existing zoo"),
        threads: int | None = typer.Option(
            None, "--threads", help="torch threads (1 is faster when other jobs share the cores)"
        ),
    ) -> None:
        """Train the lab zoo from scratch (fixed seeds and step counts; ~15-20 min on 2 CPU cores)."""
        from opd.errors import OpdError
        from opd.lab.zoo import build_zoo

        console = Console()
        try:
            manifest = build_zoo(out, force=force, threads=threads, console=console)
        except OpdError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
        console.print(accuracy_table(manifest, "greedy"))
        console.print(accuracy_table(manifest, "t1"))
        console.print(diagnostics_table(manifest))
        b = manifest["build"]
        console.print(
            f"built in {b['total_seconds']:.0f} s (training {b['train_seconds']:.0f} s); "
            f"{manifest['total_bytes'] / 1e6:.1f} MB in {len(manifest['files'])} files"
        )

    @lab_app.command("info")
    def info(
        root: Path | None = typer.Option(None, "--zoo", help="zoo directory [the shipped zoo]"),
        as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
    ) -> None:
        """Show the zoo's manifest (accuracy per level, overlap at the gap level) and verify its checksums."""
        from opd.errors import OpdError
        from opd.lab.zoo import ZOO_DIR, load_manifest, verify_zoo

        console = Console()
        try:
            manifest = load_manifest(root)
            problems = verify_zoo(root)
        except OpdError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
        if as_json:
            print(json.dumps(manifest, indent=2))
        else:
            console.print(f"lab zoo at {root or ZOO_DIR}")
            console.print(accuracy_table(manifest, "greedy"))
            console.print(accuracy_table(manifest, "t1"))
            console.print(diagnostics_table(manifest))
            for name, entry in manifest["models"].items():
                s, t = entry["spec"], entry["train"]
                console.print(
                    f"  {name}: hidden {s['hidden']} x {s['layers']} layers, {t['params']:,} params, "
                    f"{s['steps']} steps, seed {s['seed']}, levels {s['mix']}"
                    + (f", from {s['init_from']}" if s["init_from"] else "")
                )
        if problems:
            console.print(f"[red]checksums FAIL[/] ({len(problems)}): " + "; ".join(problems[:5]))
            raise typer.Exit(1)
        console.print(f"[green]checksums ok[/] ({len(manifest['files'])} files)")

    try:
        from opd.lab.demo import register_experiments
    except ModuleNotFoundError as exc:  # the experiments module is optional for the zoo commands
        if exc.name != "opd.lab.demo":
            raise
        return
    register_experiments(lab_app, app)
