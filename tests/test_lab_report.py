"""The lab report is derived from result files: verdicts follow the numbers, missing experiments are
"not run", figures are drawn from the same files. Synthetic result.json files, no training."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from opd.lab.experiments import EXPERIMENTS, run_metrics, stat
from opd.lab.report import build_report, load_results, summarize, write_summary


def _levels(acc: dict[int, float]) -> dict[str, dict[str, float]]:
    return {str(lv): {"acc": a, "format_A": a, "format_B": 0.0, "truncated": 0.0} for lv, a in acc.items()}


def fake_result(
    experiment: str,
    arm: str,
    seed: int,
    *,
    gap: tuple[float, float],
    easy: tuple[float, float] = (0.95, 0.95),
    teacher_gap: float = 0.9,
    overlap: tuple[float, float] = (0.6, 0.8),
    mass: tuple[float, float] = (0.8, 0.95),
    entropy_gap: tuple[float, float] = (0.3, 0.1),
    steps: int = 40,
) -> dict[str, Any]:
    """A result.json as the runner writes it, with linear trajectories between start and end values."""

    def lerp(a: float, b: float, i: int) -> float:
        return a + (b - a) * i / (steps - 1)

    metrics = []
    for i in range(steps):
        metrics.append(
            {
                "step": i + 1,
                "loss": 0.5 - 0.004 * i,
                "grad_norm": 0.8,
                "overlap_ratio": lerp(*overlap, i) + 0.001 * seed,
                "overlap_mass_student": lerp(*mass, i),
                "overlap_mass_teacher": lerp(*mass, i) - 0.01,
                "overlap_token_advantage": lerp(-0.2, -0.05, i),
                "entropy_student": 0.4,
                "entropy_teacher": 0.3,
                "entropy_gap": lerp(*entropy_gap, i),
                "reverse_kl": lerp(0.5, 0.1, i),
                "entropy_student/bin0": 0.3,
                "entropy_student/bin1": 0.5,
            }
        )
    jitter = 0.005 * seed
    return {
        "format": 1,
        "experiment": experiment,
        "arm": arm,
        "seed": seed,
        "steps": steps,
        "gap_level": 4,
        "accuracy": {
            "before": _levels({2: easy[0], 3: easy[0], 4: gap[0], 5: 0.0}),
            "after": _levels({2: easy[1], 3: easy[1], 4: gap[1] + jitter, 5: 0.0}),
            "teacher": _levels({2: 1.0, 3: 1.0, 4: teacher_gap, 5: 0.8}),
        },
        "metrics": metrics,
        "eval_curve": [{"step": s, "acc": lerp(gap[0], gap[1], min(s, steps - 1))} for s in (0, 20, 39)],
        "wall_time_s": 30.0,
    }


def write(runs: Path, res: dict[str, Any]) -> Path:
    path = runs / res["experiment"] / res["arm"] / f"seed{res['seed']}" / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return path


def _verdicts(summary: dict[str, Any]) -> dict[str, str]:
    return {v["claim_id"]: v["status"] for v in summary["verdicts"]}


def write_thinking_patterns(runs: Path, *, compatible_after: float) -> None:
    for seed in range(3):
        write(runs, fake_result("thinking_patterns", "compatible", seed, gap=(0.3, compatible_after)))
        write(
            runs,
            fake_result(
                "thinking_patterns", "incompatible", seed, gap=(0.3, 0.28), easy=(0.95, 0.6),
                overlap=(0.35, 0.36), mass=(0.4, 0.45), entropy_gap=(0.6, 0.6),
            ),
        )  # fmt: skip


def test_stat_mean_and_sample_std() -> None:
    s = stat([1.0, 2.0, 3.0, float("nan"), None])
    assert s.n == 3 and s.mean == 2.0 and s.std == pytest.approx(1.0)
    assert stat([]).n == 0 and math.isnan(stat([]).mean)
    assert stat([0.5]).std == 0.0


def test_run_metrics_from_result() -> None:
    m = run_metrics(fake_result("thinking_patterns", "compatible", 0, gap=(0.3, 0.6), teacher_gap=0.9))
    assert m["gap_before"] == 0.3 and m["gap_after"] == pytest.approx(0.6)
    assert m["gap_delta"] == pytest.approx(0.3)
    assert m["gap_recovery"] == pytest.approx(0.5)
    assert m["easy_delta"] == pytest.approx(0.0)
    assert m["overlap_ratio_initial"] < m["overlap_ratio_final"]
    assert m["overlap_ratio_rise"] > 0.1
    # teacher not above the student: gap recovery undefined, not a number that looks like a measurement
    m2 = run_metrics(fake_result("x", "a", 0, gap=(0.3, 0.3), teacher_gap=0.2))
    assert math.isnan(m2["gap_recovery"])


def test_verdicts_follow_the_numbers(tmp_path: Path) -> None:
    spec = EXPERIMENTS["thinking_patterns"]
    write_thinking_patterns(tmp_path, compatible_after=0.7)
    good = summarize(spec, load_results(tmp_path, spec.name))
    assert good["status"] == "complete"
    assert _verdicts(good) == {"1a": "reproduced", "1b": "reproduced", "1c": "reproduced"}
    arms = good["arms"]
    assert arms["compatible"]["headline"]["gap_after"]["n"] == 3
    assert arms["compatible"]["headline"]["gap_after"]["mean"] == pytest.approx(0.705)
    assert arms["compatible"]["headline"]["gap_after"]["std"] == pytest.approx(0.005)

    # Same files, but the compatible teacher no longer helps: the verdict must flip.
    write_thinking_patterns(tmp_path, compatible_after=0.3)
    bad = summarize(spec, load_results(tmp_path, spec.name))
    assert _verdicts(bad)["1a"] == "partly"  # overlap still rises, accuracy does not
    assert _verdicts(bad)["1b"] == "partly"  # flat/destructive, but no longer worse than the compatible arm


def test_novelty_vs_scale_gap_recovery(tmp_path: Path) -> None:
    spec = EXPERIMENTS["novelty_vs_scale"]
    for seed in range(3):
        write(
            tmp_path,
            fake_result(spec.name, "novel", seed, gap=(0.3, 0.6), teacher_gap=0.9, overlap=(0.6, 0.8)),
        )
        write(
            tmp_path,
            fake_result(spec.name, "big", seed, gap=(0.3, 0.33), teacher_gap=0.5, overlap=(0.7, 0.75)),
        )
    v = _verdicts(summarize(spec, load_results(tmp_path, spec.name)))
    assert v == {"2a": "reproduced", "2b": "reproduced"}
    for seed in range(3):  # the big teacher now recovers as much: 2a must not say "reproduced"
        write(tmp_path, fake_result(spec.name, "big", seed, gap=(0.3, 0.42), teacher_gap=0.5, overlap=(0.5, 0.6),
                                    mass=(0.7, 0.8)))  # fmt: skip
    v = _verdicts(summarize(spec, load_results(tmp_path, spec.name)))
    assert v["2a"] == "not reproduced" and v["2b"] == "not reproduced"


def test_report_lists_only_the_claims_that_ran(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_thinking_patterns(runs, compatible_after=0.7)
    rep = build_report(runs, runs / "report.md", plots=False)
    md = rep["markdown"].read_text()
    html = rep["html"].read_text()
    # the report opens with a summary in plain words: what ran and what it showed, from the files
    assert md.index("## Summary") < md.index("## Paper claims tested")
    summary = md[md.index("## Summary") : md.index("## Paper claims tested")]
    assert "1 experiment ran" in summary and "3 reproduced" in summary
    assert "70.5" in summary and "toward teacher_novel" in summary  # the compatible arm's gap-level accuracy
    assert "| experiment | paper claim | lab result | status |" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| 1. Thinking patterns (3 seeds)")]
    assert len(rows) == 3 and all(r.rstrip().endswith("| reproduced |") for r in rows)
    # no row for a claim that was not run: they are counted, with the commands that run them
    assert "| not run |" not in md and "not run" not in html.split("<table>")[1].split("</table>")[0]
    others = sum(len(s.claims) for n, s in EXPERIMENTS.items() if n != "thinking_patterns")
    assert f"{others} more claims of the paper (in {len(EXPERIMENTS) - 1} other experiments" in md
    assert "`opd lab list`" in md and "`opd lab run NAME`" in md
    for name, spec in EXPERIMENTS.items():  # no section for an experiment that did not run
        assert (f"## {spec.title}" in md) == (name == "thinking_patterns")
    assert "<table>" in html and "70.5 ± 0.5" in md

    write_thinking_patterns(runs, compatible_after=0.31)
    md2 = build_report(runs, runs / "report.md", plots=False)["markdown"].read_text()
    rows2 = [ln for ln in md2.splitlines() if ln.startswith("| 1. Thinking patterns (3 seeds)")]
    assert not rows2[0].rstrip().endswith("| reproduced |")


def test_every_claim_not_reproduced_is_explained_with_its_numbers(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    spec = EXPERIMENTS["novelty_vs_scale"]
    for seed in range(3):  # the big teacher recovers more of the gap and starts with the lower overlap
        write(
            runs, fake_result(spec.name, "novel", seed, gap=(0.3, 0.4), teacher_gap=0.9, overlap=(0.6, 0.8))
        )
        write(runs, fake_result(spec.name, "big", seed, gap=(0.3, 0.55), teacher_gap=0.6, overlap=(0.4, 0.5),
                                mass=(0.7, 0.8)))  # fmt: skip
    rep = build_report(runs, runs / "report.md", plots=False)
    verdicts = {v["claim_id"]: v for v in rep["summaries"][1]["verdicts"]}
    assert verdicts["2a"]["status"] == verdicts["2b"]["status"] == "not reproduced"
    md = rep["markdown"].read_text()
    why = md[md.index("## Why some claims") :].split("\n## ")[0]
    line_2a = next(ln for ln in why.splitlines() if ln.startswith("- **2a not reproduced**"))
    # gap recovery from the files: novel (0.4+j-0.3)/(0.9-0.3) ~ 17.5%, big (0.55+j-0.3)/(0.6-0.3) ~ 85.0%
    assert "17.5" in line_2a and "85.0" in line_2a and "recovered" in line_2a
    line_2b = next(ln for ln in why.splitlines() if ln.startswith("- **2b not reproduced**"))
    assert "lower overlap ratio" in line_2b and verdicts["2b"]["result"].split("big ")[1][:5] in line_2b
    # the numbers follow the files: a closer race changes the sentence
    for seed in range(3):
        write(runs, fake_result(spec.name, "big", seed, gap=(0.3, 0.42), teacher_gap=0.6, overlap=(0.4, 0.5)))
    md = build_report(runs, runs / "report.md", plots=False)["markdown"].read_text()
    assert "41.7" in md.split("- **2a")[1].split("\n")[0]  # (0.425 - 0.3) / (0.6 - 0.3)


def test_each_figure_is_shown_once_with_a_caption(tmp_path: Path) -> None:
    from opd.lab.plots import CAPTIONS

    runs = tmp_path / "runs"
    write_thinking_patterns(runs, compatible_after=0.7)
    rep = build_report(runs, runs / "report.md", plots=True)
    md, html = rep["markdown"].read_text(), rep["html"].read_text()
    shown = [ln for ln in md.splitlines() if ln.startswith("![")]
    srcs = [ln.split("](")[1].rstrip(")") for ln in shown]
    assert len(srcs) == len(set(srcs)) >= 6  # each panel once
    assert (
        "thinking_patterns/figures/thinking_patterns.png" not in srcs
    )  # the grid only linked, not shown again
    assert html.count("<img ") == len(srcs)
    lines = md.splitlines()
    for ln in shown:
        i = lines.index(ln)
        caption = lines[i + 2]  # the paragraph right under the image
        metric = ln.split("/figures/")[1].split(".png")[0]
        assert caption.startswith(CAPTIONS[metric].split(".")[0]) and "Here, first → last step" in caption
        assert "compatible (teacher_novel)" in caption
        assert ".png" not in ln.split("](")[0]  # the alt text is a title, not a file name


def test_write_summary_and_partial_status(tmp_path: Path) -> None:
    spec = EXPERIMENTS["thinking_patterns"]
    write(tmp_path, fake_result(spec.name, "compatible", 0, gap=(0.3, 0.7)))
    (tmp_path / spec.name / "incompatible" / "seed0").mkdir(parents=True)
    (tmp_path / spec.name / "incompatible" / "seed0" / "result.json").write_text(
        "{truncated"
    )  # killed mid-write
    s = write_summary(spec, tmp_path)
    assert s["status"] == "partial" and s["runs"] == 1
    assert json.loads((tmp_path / spec.name / "summary.json").read_text())["verdicts"] == s["verdicts"]
    v = _verdicts(s)
    assert v["1a"] == "reproduced" and v["1b"] == "not run" and v["1c"] == "not run"


def test_plots_from_synthetic_results(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_thinking_patterns(runs, compatible_after=0.7)
    rep = build_report(runs, runs / "report.md", plots=True)
    figs = {p.name for p in rep["figures"]}
    assert {"thinking_patterns.png", "overlap_ratio.png", "accuracy.png", "overlap_mass_student.png"} <= figs
    for p in rep["figures"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(thinking_patterns/figures/overlap_ratio.png)" in rep["markdown"].read_text()


def test_cli_report_and_list(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from opd.lab.demo import register_experiments

    app = typer.Typer()
    lab_app = typer.Typer()
    app.add_typer(lab_app, name="lab")
    register_experiments(lab_app, app)
    runs = tmp_path / "runs"
    write_thinking_patterns(runs, compatible_after=0.7)
    res = CliRunner().invoke(app, ["lab", "report", "--runs", str(runs), "--no-plots"])
    assert res.exit_code == 0, res.output
    assert "reproduced 3" in res.output and "not run" in res.output
    assert (runs / "report.md").is_file() and (runs / "report.html").is_file()
    res = CliRunner().invoke(app, ["lab", "list"])
    assert res.exit_code == 0 and "thinking_patterns" in res.output and "long_horizon" in res.output
    res = CliRunner().invoke(app, ["lab", "run", "no_such_experiment"])
    assert res.exit_code == 2 and "unknown experiment" in res.output
