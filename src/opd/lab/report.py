"""`opd lab report`: every lab result in one markdown (and HTML) report, verdicts computed from files.

The report reads only ``<runs>/<experiment>/<arm>/seed<k>/result.json`` (and an experiment's
``probe.json``) and hands them to each experiment's verdict function (`opd.lab.verdicts`): nothing in
the claims table is typed by hand, and an experiment with no result files is listed as "not run". The
summaries written next to the results (``summary.json``) come from the same function, `summarize`.

The document is built once as blocks (`opd.report.render`) and rendered to both markdown and a
self-contained HTML page, so the two never disagree and no markdown library is needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opd.files import json_safe
from opd.lab.registry import EXPERIMENTS
from opd.lab.specs import ExperimentData, ExperimentSpec, Verdict
from opd.lab.stats import Stat, aggregate
from opd.report.render import Block, Bullets, Figure, Figures, Heading, Paragraph, Table, esc, write_document

__all__ = [
    "build_report",
    "comparison_rows",
    "claims_table",
    "load_probe",
    "load_results",
    "status_counts",
    "summarize",
    "write_summary",
]

METRIC_LABELS: dict[str, str] = {
    "gap_before": "gap-level acc before (%)",
    "gap_after": "gap-level acc after (%)",
    "gap_origin": "gap-level acc of the original student (%)",
    "gap_teacher": "teacher gap-level acc (%)",
    "gap_delta": "gap-level change (pts)",
    "gap_recovery": "gap recovery (%)",
    "easy_delta": "easy-level change (pts)",
    "easy_after": "easy-level acc after (%)",
    "novel_delta": "new-level change (pts)",
    "overlap_ratio_initial": "overlap ratio k=4, start",
    "overlap_ratio_final": "overlap ratio k=4, end",
    "overlap_ratio_mean": "overlap ratio k=4, mean",
    "overlap_mass_student_initial": "overlap mass (student), start",
    "overlap_mass_student_final": "overlap mass (student), end",
    "overlap_mass_student_mean": "overlap mass (student), mean",
    "overlap_mass_teacher_final": "overlap mass (teacher), end",
    "overlap_token_advantage_initial": "overlap-token advantage, start",
    "overlap_token_advantage_final": "overlap-token advantage, end",
    "entropy_gap_initial": "entropy gap, start",
    "entropy_gap_final": "entropy gap, end",
    "entropy_student_mean": "student entropy, mean",
    "reverse_kl_initial": "reverse KL, start",
    "reverse_kl_final": "reverse KL, end",
    "grad_norm_max": "max grad norm",
}
STANDARD_METRICS: tuple[str, ...] = (
    "gap_before", "gap_after", "gap_teacher", "gap_delta", "gap_recovery", "easy_delta", "novel_delta",
    "overlap_ratio_initial", "overlap_ratio_final", "overlap_mass_student_initial", "overlap_mass_student_final",
    "overlap_mass_teacher_final", "overlap_token_advantage_initial", "overlap_token_advantage_final",
    "entropy_gap_initial", "entropy_gap_final", "reverse_kl_initial", "reverse_kl_final", "wall_time_s",
)  # fmt: skip
"""Aggregated for every experiment in summary.json (beside its own headline), for uniform tables."""
PERCENT = {"gap_before", "gap_after", "gap_origin", "gap_teacher", "gap_delta", "gap_recovery", "easy_delta",
           "easy_after", "novel_delta"}  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Loading and summarising


def load_results(runs: str | Path, experiment: str) -> list[dict[str, Any]]:
    """Every readable result.json of an experiment (partial or corrupt files are skipped)."""
    out = []
    for path in sorted(Path(runs, experiment).glob("*/seed*/result.json")):
        try:
            res = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        res.setdefault("arm", path.parent.parent.name)
        res.setdefault("seed", int(path.parent.name[4:]) if path.parent.name[4:].isdigit() else 0)
        res["_path"] = str(path)
        out.append(res)
    return out


def load_probe(runs: str | Path, experiment: str) -> dict[str, Any] | None:
    try:
        return json.loads(Path(runs, experiment, "probe.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def summarize(
    spec: ExperimentSpec, results: Sequence[dict[str, Any]], probe: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Mean and spread over seeds per arm, and the verdicts, from result dicts alone."""
    known = {a.name for a in spec.arms}
    results = [r for r in results if r.get("arm") in known]
    arms, runs = aggregate(results)
    gap = int(results[0].get("gap_level", 4)) if results else 4
    data = ExperimentData(spec=spec, arms=arms, runs=runs, probe=probe, gap_level=gap)
    verdicts: list[Verdict] = spec.verdict(data)
    per_level: dict[str, dict[str, Any]] = {}
    for arm, stats in sorted(arms.items(), key=lambda kv: [a.name for a in spec.arms].index(kv[0])):
        per_level[arm] = {k: s.to_json() for k, s in stats.items() if k.startswith(("acc_before/", "acc_after/",
                                                                                      "acc_teacher/"))}  # fmt: skip
    return json_safe(
        {
            "experiment": spec.name,
            "title": spec.title,
            "description": spec.description,
            "status": "not run" if not results else ("complete" if _complete(spec, results) else "partial"),
            "gap_level": gap,
            "seeds": sorted({int(r.get("seed", 0)) for r in results}),
            "steps": sorted({int(r.get("steps", 0)) for r in results}),
            "runs": len(results),
            "headline_metrics": list(spec.headline),
            "runs_trained": sum(1 for r in results if not r.get("reused_from")),
            "arms": {
                a.name: {
                    "label": a.title,
                    "student": a.student,
                    "teacher": a.teacher,
                    "seeds": len(runs.get(a.name, [])),
                    "headline": {
                        m: arms[a.name][m].to_json()
                        for m in dict.fromkeys([*spec.headline, *STANDARD_METRICS])
                        if a.name in arms and m in arms[a.name]
                    },
                }
                for a in spec.arms
            },  # fmt: skip
            "per_level": per_level,
            "probe": {k: v for k, v in (probe or {}).items() if k not in ("fingerprint", "config")} or None,
            "verdicts": [v.to_json() for v in verdicts],
            "wall_time_s": sum(float(r.get("wall_time_s") or 0) for r in results if not r.get("reused_from")),
        }
    )


def _complete(spec: ExperimentSpec, results: Sequence[dict[str, Any]]) -> bool:
    have = {(r.get("arm"), int(r.get("seed", 0))) for r in results}
    return all((a.name, s) in have for a in spec.arms for s in spec.seeds)


def _doctor_rows(probe: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per teacher of an `opd doctor` result: the numbers the verdict used, and the verdict."""
    template = probe.get("recommended_template", "raw")

    def f(x: Any, pct: bool = False) -> str:
        if not isinstance(x, (int, float)) or not math.isfinite(x):
            return "–"
        return f"{100 * x:.1f}" if pct else f"{x:.3f}"

    header = ["teacher", "overlap ratio", "overlap mass (teacher)", "overlap-token adv.", "entropy gap",
              "student acc %", "teacher acc %", "teacher-only %", "cont. adv. @25% (pts)", "verdict"]  # fmt: skip
    rows = []
    for name, t in probe["teachers"].items():
        m = t["by_template"][template]
        rows.append([name, f(m.get("overlap_ratio")), f(m.get("overlap_mass_teacher")),
                     f(m.get("overlap_token_advantage")), f(m.get("entropy_gap")), f(m.get("student_acc"), True),
                     f(m.get("teacher_acc"), True), f(m.get("teacher_only_share"), True),
                     f(m.get("continuation_advantage@0.25"), True), t["verdict"]["code"]])  # fmt: skip
    return header, rows


def write_summary(spec: ExperimentSpec, runs: str | Path) -> dict[str, Any]:
    """Summarise an experiment's result files into <runs>/<experiment>/summary.json; returns it."""
    from opd.files import atomic_write_text

    summary = summarize(spec, load_results(runs, spec.name), load_probe(runs, spec.name))
    path = Path(runs, spec.name, "summary.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(summary, indent=1, allow_nan=False) + "\n")  # summarize: NaN as null
    return summary


# ----------------------------------------------------------------------------------------------------
# Tables


def _fmt_stat(metric: str, s: dict[str, Any] | Stat | None) -> str:
    if s is None:
        return "–"
    if isinstance(s, Stat):
        s = s.to_json()
    if not s.get("n"):
        return "–"
    scale = 100.0 if metric in PERCENT else 1.0
    digits = 1 if metric in PERCENT else 3
    txt = f"{scale * s['mean']:.{digits}f}"
    if s["n"] > 1:
        txt += f" ± {scale * s['std']:.{digits}f}"
    return txt


def comparison_rows(
    summary: dict[str, Any], metrics: Sequence[str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of an experiment's arms x headline metrics, mean ± std over seeds."""
    arms = summary.get("arms", {})
    metrics = list(metrics or summary.get("headline_metrics") or [])
    header = ["arm", "seeds", *[METRIC_LABELS.get(m, m) for m in metrics]]
    rows = []
    for a in arms.values():
        rows.append(
            [
                a["label"],
                str(a.get("seeds", 0)),
                *[_fmt_stat(m, a.get("headline", {}).get(m)) for m in metrics],
            ]
        )
    return header, rows


def claims_table(summaries: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The report's main table: paper claim — lab result (numbers) — status, one row per claim."""
    header = ["experiment", "paper claim", "lab result", "status"]
    rows = []
    for s in summaries:
        seeds = len(s.get("seeds", []))
        name = s["title"].split(":")[0] + (f" ({seeds} seed{'s' if seeds != 1 else ''})" if seeds else "")
        for v in s.get("verdicts", []):
            rows.append([name, f"({v['finding']}) {v['claim']}", v["result"], v["status"]])
    return header, rows


def _per_level_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    levels = sorted({int(k.split("/L")[1]) for arm in summary.get("per_level", {}).values() for k in arm})
    header = [
        "arm",
        *[f"L{lv} before → after (%)" for lv in levels],
        *[f"teacher L{lv} (%)" for lv in levels],
    ]
    rows = []
    for arm, stats in summary.get("per_level", {}).items():
        label = summary["arms"].get(arm, {}).get("label", arm)
        cells = []
        for lv in levels:
            b, a = stats.get(f"acc_before/L{lv}"), stats.get(f"acc_after/L{lv}")
            cells.append(f"{_fmt_stat('gap_before', b)} → {_fmt_stat('gap_after', a)}")
        cells += [_fmt_stat("gap_teacher", stats.get(f"acc_teacher/L{lv}")) for lv in levels]
        rows.append([label, *cells])
    return header, rows


_STATUS_COLOURS = {
    "reproduced": "#1a7f37",
    "partly": "#9a6700",
    "not reproduced": "#cf222e",
    "not run": "#6e7781",
}


# ----------------------------------------------------------------------------------------------------
# The report


def _relpath(path: Path, start: Path) -> str:
    try:
        return path.resolve().relative_to(start.resolve()).as_posix()
    except ValueError:
        import os

        return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _outcomes(summary: dict[str, Any]) -> str:
    """One plain sentence of what an experiment's runs did: each arm's gap-level accuracy before -> after."""
    gap = summary.get("gap_level", 4)
    parts = []
    for a in summary.get("arms", {}).values():
        h = a.get("headline", {})
        b, f = h.get("gap_before"), h.get("gap_after")
        if not a.get("seeds") or not b or not f or not b.get("n") or not f.get("n"):
            continue
        teacher = str(a.get("teacher", "")).removeprefix("lab:")
        parts.append(f"{_fmt_stat('gap_before', b)}% → {_fmt_stat('gap_after', f)}% toward {teacher}")
    if not parts:
        return ""
    return f"level-{gap} accuracy {', '.join(parts)}"


def status_counts(summaries: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many claims got each status, over the claims that were run (statuses in a fixed order)."""
    counts = {k: 0 for k in ("reproduced", "partly", "not reproduced")}
    for s in summaries:
        for v in s.get("verdicts", []):
            if v["status"] != "not run":
                counts[v["status"]] = counts.get(v["status"], 0) + 1
    return {k: n for k, n in counts.items() if n}


def _why(v: dict[str, Any]) -> str:
    """Why a claim was not (fully) reproduced, in words with its numbers; the verdict's own `why` when it
    has one, else the rule's numbers."""
    if v.get("why"):
        return str(v["why"])
    return f"the numbers ({v['result']}) do not meet the verdict's rule for this claim (opd.lab.verdicts)"


def _caption(spec: ExperimentSpec, results: Sequence[dict[str, Any]], fig: Path) -> tuple[str, str]:
    """(title, caption) of a figure: what it shows, what to look at, and its lines' start and end values."""
    from opd.lab.plots import CAPTIONS, PANELS, arm_ends

    metric = fig.stem
    title = dict(PANELS).get(metric, metric.replace("_", " "))
    text = CAPTIONS.get(metric, "")
    if metric in dict(PANELS):
        pct = metric == "accuracy"
        ends = arm_ends(spec, results, metric)
        here = "; ".join(
            f"{arm} {100 * a:.1f}% → {100 * b:.1f}%" if pct else f"{arm} {a:.3f} → {b:.3f}"
            for arm, (a, b) in ends.items()
        )
        if here:
            text += f" Here, first → last step: {here}."
    return title, text


def build_report(
    runs: str | Path = "runs/lab",
    out: str | Path | None = None,
    *,
    experiments: dict[str, ExperimentSpec] | None = None,
    plots: bool = True,
    html_out: bool = True,
    extra: Sequence[tuple[str, str]] = (),
    lead: str | None = None,
) -> dict[str, Any]:
    """Write the report; returns {"markdown": path, "html": path|None, "summaries": [...], "figures": [...]}.

    The report opens with a summary in plain words (what ran, what it showed, the claims' tally), then the
    claims that were run (the others are counted, with the commands that run them), the reasons behind each
    claim not (fully) reproduced, and a section per experiment that was run, each figure once with a caption.
    `lead` is a first sentence for the summary (the demo says it ran); `extra` adds (heading, paragraph)
    sections at the end.
    """
    runs = Path(runs)
    out = Path(out) if out is not None else runs / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    experiments = experiments or EXPERIMENTS
    summaries: list[dict[str, Any]] = []
    results_of: dict[str, list[dict[str, Any]]] = {}
    figures: dict[str, list[Path]] = {}
    for spec in experiments.values():
        results = load_results(runs, spec.name)
        results_of[spec.name] = results
        summary = summarize(spec, results, load_probe(runs, spec.name))
        summaries.append(summary)
        if plots and results:
            from opd.lab.plots import plot_experiment

            figures[spec.name] = plot_experiment(spec, results, runs / spec.name / "figures")

    ran = [s for s in summaries if s["status"] != "not run"]
    not_run = [s for s in summaries if s["status"] == "not run"]
    tested = [v for s in ran for v in s["verdicts"] if v["status"] != "not run"]
    untested = [v for s in summaries for v in s["verdicts"] if v["status"] == "not run"]
    counts = status_counts(ran)

    blocks: list[Block] = [Heading("opd lab report", 1), Heading("Summary")]
    if not ran:
        blocks.append(Paragraph(
            f"No lab results under {esc(str(runs))} yet. `opd demo` runs the first two experiments in minutes; "
            "`opd lab list` shows every experiment and `opd lab run NAME` runs one."))  # fmt: skip
    else:
        what = []
        for s in ran:
            seeds, steps = len(s["seeds"]), "/".join(str(x) for x in s["steps"])
            what.append(f"**{esc(s['title'])}** ({seeds} seed{'s' if seeds != 1 else ''}, {steps} OPD steps per "
                        f"run): {esc(s['description'])} Result: {_outcomes(s) or 'no accuracy recorded'}.")  # fmt: skip
        tally = ", ".join(f"{n} {k}" for k, n in counts.items())
        ran_words = (f"{lead} The numbers below are read from the result files under {esc(str(runs))}." if lead else
                     f"{len(ran)} experiment{'s' if len(ran) != 1 else ''} ran, from the result files under {esc(str(runs))}.")  # fmt: skip
        blocks.append(Paragraph(
            f"{ran_words} Of the {len(tested)} paper claim{'s' if len(tested) != 1 else ''} they test: {tally}."))  # fmt: skip
        blocks.append(Bullets(what))
    blocks.append(Paragraph(
        "How to read the numbers: each status is computed from the result files by the experiment's verdict "
        "function (opd.lab.verdicts), never typed in; accuracies are greedy on the zoo's held-out problems (200 per "
        "level); the gap level is the level the student could not yet solve; overlap metrics compare the "
        "student's and the teacher's top-4 next tokens over the ~23-symbol vocabulary; a ± is one standard deviation "
        "over seeds."))  # fmt: skip

    if tested:
        blocks.append(Heading("Paper claims tested"))
        header, rows = claims_table(ran)
        blocks.append(Table(header, rows, colours=_STATUS_COLOURS))
    if untested:
        names = "; ".join(esc(s["title"].split(":")[0]) for s in not_run)
        blocks.append(Paragraph(
            f"{len(untested)} more claim{'s' if len(untested) != 1 else ''} of the paper "
            + (f"(in {len(not_run)} other experiment{'s' if len(not_run) != 1 else ''}: {names}) " if not_run else "")
            + "were not tested here: `opd lab list` lists them, `opd lab run NAME` runs one experiment and "
            "`opd lab run all` runs them all, then `opd lab report` rebuilds this report."))  # fmt: skip
    partial = [f"{esc(s['title'].split(':')[0])} ({s['runs']} runs, seeds {s['seeds']})" for s in ran
               if s["status"] == "partial"]  # fmt: skip
    if partial:
        blocks.append(Paragraph("Run with fewer seeds or arms than the experiment specifies (numbers are less "
                                "certain; the default is 3 seeds): " + "; ".join(partial) + "."))  # fmt: skip
    misses = [v for v in tested if v["status"] in ("not reproduced", "partly")]
    if misses:
        blocks.append(Heading("Why some claims were not (fully) reproduced"))
        blocks.append(Bullets([f"**{v['claim_id']} {v['status']}**: {_why(v)}." for v in misses]))

    for s in ran:
        spec = experiments[s["experiment"]]
        blocks.append(Heading(s["title"]))
        blocks.append(Paragraph(s["description"]))
        claims = ", ".join(f"{v['claim_id']} {v['status']}" for v in s["verdicts"])
        blocks.append(
            Paragraph(
                f"{s['runs']} run(s), seeds {s['seeds']}, steps {s['steps']}, training+eval "
                f"time {s['wall_time_s']:.0f} s (runs reused from other experiments not counted). Claims: {claims}.",
            )
        )
        header, rows = comparison_rows(s)
        blocks.append(Table(header, rows))
        header, rows = _per_level_table(s)
        if rows:
            blocks.append(Table(header, rows))
        if s.get("probe") and "teachers" in s["probe"]:  # an `opd doctor` result
            header, rows = _doctor_rows(s["probe"])
            doctor = _relpath(runs / s["experiment"] / "doctor" / "report.md", out.parent)
            blocks.append(Paragraph(f"opd doctor before training (full report: [{esc(doctor)}]({doctor})):"))
            blocks.append(Table(header, rows))
        elif s.get("probe"):
            p = s["probe"]
            blocks.append(Paragraph("Probe: " + ", ".join(
                esc(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}") for k, v in p.items())))  # fmt: skip
        figs = figures.get(s["experiment"], [])
        grid = [f for f in figs if f.stem == s["experiment"]]
        panels = [f for f in figs if f.stem != s["experiment"]]
        if panels:
            blocks.append(Paragraph("Figures: the mean over seeds per arm, with a band of ± one standard deviation "
                                    "when there are several seeds; per-step metrics are smoothed over 5 steps."))  # fmt: skip
        num = s["title"].split(".")[0] if s["title"][:1].isdigit() else s["experiment"]
        for i, fig in enumerate(panels, 1):
            title, caption = _caption(spec, results_of[s["experiment"]], fig)
            blocks.append(Figures([Figure(_relpath(fig, out.parent), f"Figure {num}.{i}: {title}")]))
            if caption:
                blocks.append(Paragraph(esc(caption)))
        if grid:
            rel = _relpath(grid[0], out.parent)
            blocks.append(Paragraph(f"All panels in one image, for sharing: [{esc(rel)}]({rel})."))
    for heading, text in extra:
        blocks += [Heading(heading), Paragraph(text)]

    html_path = out.with_suffix(".html") if html_out else None
    write_document(blocks, out, html_path, title="opd lab report")
    return {"markdown": out, "html": html_path, "summaries": summaries,
            "figures": [f for fs in figures.values() for f in fs]}  # fmt: skip
