"""`opd analyze`: reading run dirs, series, position matrices, success signals, report files and CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml
from typer.testing import CliRunner

from opd.analysis.analyze import (
    bin_ranges,
    compare_runs,
    default_names,
    load_run,
    metric_keys,
    position_matrix,
    series,
    success_signals,
    write_analysis,
)
from opd.cli.analyze import register, run_names
from opd.errors import OpdError

N = 20  # steps of the synthetic runs; the edge window is then max(1, 20 // 10) = 2 steps


def _improving_row(s: int) -> dict:
    row = {
        "step": s,
        "loss": 1.0 - 0.02 * (s - 1),
        "grad_norm": 5.0 + 0.5 * (s - 1),
        "p_minus_q_at_max_adv": 0.5,
        "overlap_ratio": 0.70 + 0.01 * (s - 1),
        "overlap_token_advantage": -0.2 + 0.009 * (s - 1),
        "entropy_gap": 0.1 - 0.004 * (s - 1),
        "entropy_student": 0.3,
        "entropy_student/bin0": float(s),
        "entropy_student/bin1": 10.0 * s,
        "entropy_teacher/bin0": 0.1,
        "entropy_teacher/bin1": 0.2,
        "reverse_kl": "nan" if s == 3 else 0.5,  # how tracking.py writes a non-finite value
        "note": "free text",  # a non-numeric key: kept, never plotted
    }
    if s % 2 == 0:
        row["entropy_student/bin2"] = 100.0 * s  # odd steps: no response reached bin 2
    return row


def _flat_row(s: int) -> dict:
    return {
        "step": s, "loss": 0.01, "grad_norm": 0.1, "p_minus_q_at_max_adv": 0.05, "overlap_ratio": 0.75,
        "overlap_token_advantage": -0.01, "entropy_gap": 0.02, "entropy_student": 0.2,
    }  # fmt: skip


def _write_run(path: Path, rows: list[dict], *, tail: str = "", bins: int = 3, budget: int = 30) -> Path:
    path.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (path / "metrics.jsonl").write_text(text)
    cfg = {"rollout": {"max_new_tokens": budget}, "diagnostics": {"k": 16, "position_bins": bins}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def improving(tmp_path) -> Path:
    rows = [{"step": 0, "kind": "eval", "eval/avg@4": 0.5, "eval/pass@1": 0.5}]
    rows += [_improving_row(s) for s in range(1, N + 1)]
    rows.insert(6, {"step": 5, "kind": "alarm", "message": "overlap dropped", "metric": "overlap_ratio"})
    rows.insert(8, {"step": 7, "kind": "some_future_kind", "whatever": [1, 2]})
    rows.append({"step": N, "kind": "eval", "eval/avg@4": 0.7, "eval/pass@1": 0.75})
    return _write_run(tmp_path / "good", rows, tail='{"step": 21, "loss": 0.')


@pytest.fixture
def flat(tmp_path) -> Path:
    return _write_run(tmp_path / "flat", [_flat_row(s) for s in range(1, N + 1)])


def _no_nan(text: str) -> dict:
    def bad(name: str) -> None:
        raise AssertionError(f"{name} in JSON")

    return json.loads(text, parse_constant=bad)


# ---------------------------------------------------------------------------------------------------


def test_load_run_sorts_rows_and_skips_truncated_line(improving):
    with pytest.warns(UserWarning, match="truncated"):
        run = load_run(improving)
    assert run.name == "good"
    assert [r["step"] for r in run.train] == list(range(1, N + 1))
    assert [r["step"] for r in run.evals] == [0, N]
    assert [(e["step"], e["kind"]) for e in run.events] == [(5, "alarm"), (7, "some_future_kind")]
    assert run.config["rollout"]["max_new_tokens"] == 30
    assert run.config_get("diagnostics.position_bins") == 3
    assert run.config_get("no.such.key", "x") == "x"
    assert len(run.warnings) == 1 and "metrics.jsonl:25" in run.warnings[0]


def test_missing_metrics_names_the_path(tmp_path):
    with pytest.raises(OpdError) as err:
        load_run(tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg
    assert "is it a run directory? expected RUN_DIR/metrics.jsonl" in msg


def test_bad_middle_line_is_skipped_not_fatal(tmp_path):
    rows = [
        json.dumps(_flat_row(1)),
        "not json",
        json.dumps([1, 2]),
        json.dumps({"loss": 1}),
        json.dumps(_flat_row(2)),
    ]
    d = tmp_path / "r"
    d.mkdir()
    (d / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning):
        run = load_run(d)
    assert [r["step"] for r in run.train] == [1, 2]
    assert len(run.warnings) == 3
    assert run.config is None


def test_series_and_metric_keys(improving):
    with pytest.warns(UserWarning):
        run = load_run(improving)
    steps, values = series(run, "loss")
    assert steps == list(range(1, N + 1))
    assert values == pytest.approx([1.0 - 0.02 * (s - 1) for s in steps])
    assert series(run, "eval/avg@4") == ([0, N], [0.5, 0.7])
    steps, values = series(run, "reverse_kl")
    assert math.isnan(values[2]) and values[0] == 0.5  # "nan" string read back as a float
    assert series(run, "never_logged") == ([], [])
    keys = metric_keys([run])
    assert "loss" in keys and "eval/avg@4" in keys and "reverse_kl" in keys
    assert not any("/bin" in k for k in keys)
    assert "note" not in keys and "step" not in keys and "kind" not in keys
    assert keys.index("eval/avg@4") > keys.index("loss")  # training keys first


def test_position_matrix_exact(improving):
    with pytest.warns(UserWarning):
        run = load_run(improving)
    steps, mat = position_matrix(run, "entropy_student")
    assert steps == list(range(1, N + 1))
    assert mat.shape == (3, N)
    np.testing.assert_array_equal(mat[0], np.arange(1, N + 1, dtype=float))
    np.testing.assert_array_equal(mat[1], 10.0 * np.arange(1, N + 1))
    expected = np.array([100.0 * s if s % 2 == 0 else np.nan for s in range(1, N + 1)])
    np.testing.assert_array_equal(mat[2], expected)
    # configured bins that no response reached still get a (NaN) row
    steps_t, mat_t = position_matrix(run, "entropy_teacher")
    assert mat_t.shape == (3, N) and np.isnan(mat_t[2]).all() and (mat_t[1] == 0.2).all()
    assert position_matrix(run, "overlap_ratio")[0] == []
    assert position_matrix(run, "overlap_ratio")[1].shape == (0, 0)


def test_bin_ranges_match_the_trainers_rule():
    assert bin_ranges(3, 30) == [(0, 9), (10, 19), (20, 29)]
    for n_bins, budget in ((4, 10), (3, 7), (4, 96), (5, 5)):
        ranges = bin_ranges(n_bins, budget)
        for t in range(budget):
            b = min(t * n_bins // budget, n_bins - 1)  # opd.diagnostics
            assert ranges[b][0] <= t <= ranges[b][1], (n_bins, budget, t)
    assert bin_ranges(0, 10) == []


def test_success_signals_numbers_and_improving_reading(improving):
    with pytest.warns(UserWarning):
        run = load_run(improving)
    sig = success_signals(run)
    assert sig["n_steps"] == N
    loss = sig["metrics"]["loss"]
    # window of 2 steps: initial = mean(loss@1, loss@2), final = mean(loss@19, loss@20)
    assert loss["initial"] == pytest.approx((1.0 + 0.98) / 2)
    assert loss["final"] == pytest.approx((0.64 + 0.62) / 2)
    assert loss["change"] == pytest.approx(0.63 - 0.99)
    assert loss["slope"] == pytest.approx(-0.02)
    assert sig["metrics"]["grad_norm"]["slope"] == pytest.approx(0.5)
    assert sig["metrics"]["p_minus_q_at_max_adv"]["slope"] == pytest.approx(0.0)
    assert sig["metrics"]["overlap_ratio"]["initial"] == pytest.approx(0.705)
    assert sig["metrics"]["overlap_ratio"]["final"] == pytest.approx(0.885)
    assert sig["trends"] == {
        "overlap_ratio": "better",
        "overlap_token_advantage": "better",
        "entropy_gap": "better",
    }
    assert sig["verdict"] == "improving"
    assert "aligning" in sig["reading"] and "eval/avg@4 0.5" in sig["reading"]
    assert sig["outcome"] == {"key": "eval/avg@4", "first_step": 0, "first": 0.5, "last_step": N, "last": 0.7}


def test_flat_run_reads_as_failing_and_is_flagged_against_a_good_one(improving, flat):
    with pytest.warns(UserWarning):
        good = load_run(improving)
    bad = load_run(flat)
    sig = success_signals(bad)
    assert sig["trends"] == {
        "overlap_ratio": "flat",
        "overlap_token_advantage": "flat",
        "entropy_gap": "flat",
    }
    assert sig["verdict"] == "flat"
    assert "failing" in sig["reading"]
    assert sig["metrics"]["loss"]["slope"] == pytest.approx(0.0)
    notes = compare_runs([good, bad], [success_signals(good), sig])
    assert len(notes) == 1 and notes[0].startswith("flat:")
    assert compare_runs([bad], [sig]) == []


def test_degrading_and_too_short_runs(tmp_path):
    rows = []
    for s in range(1, N + 1):
        r = _flat_row(s)
        r["overlap_ratio"] = 0.9 - 0.01 * s
        r["entropy_gap"] = 0.02 + 0.01 * s
        rows.append(r)
    assert success_signals(load_run(_write_run(tmp_path / "d", rows)))["verdict"] == "degrading"
    short = success_signals(load_run(_write_run(tmp_path / "s", rows[:3])))
    assert short["verdict"] == "too short" and short["metrics"]["loss"]["n"] == 3
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert success_signals(load_run(empty))["verdict"] == "no data"


def test_write_analysis_files(improving, flat, tmp_path):
    with pytest.warns(UserWarning):
        runs = [load_run(improving), load_run(flat)]
    files = write_analysis(runs, tmp_path / "out")
    for key in ("markdown", "html", "json", "key_metrics", "curve:loss", "curve:eval/avg@4",
                "heatmap:good:entropy_student", "heatmap:good:entropy_teacher"):  # fmt: skip
        assert files[key].is_file() and files[key].stat().st_size > 0, key
    pngs = [p for p in files.values() if p.suffix == ".png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    assert not any(k.startswith("heatmap:flat") for k in files)  # no binned keys: skipped, no error
    data = _no_nan(files["json"].read_text())
    good, bad = data["runs"]
    assert good["success_signals"]["verdict"] == "improving" and bad["success_signals"]["verdict"] == "flat"
    assert good["final"]["loss"] == pytest.approx(0.62)
    assert [e["kind"] for e in good["events"]] == ["alarm", "some_future_kind"]
    assert good["warnings"] and good["max_new_tokens"] == 30
    assert all((tmp_path / "out" / rel).is_file() for rel in data["files"].values())
    md = files["markdown"].read_text()
    assert "overlap dropped" in md and "## Success signals" in md and "curves/loss.png" in md
    page = files["html"].read_text()
    assert 'src="key_metrics.png"' in page and 'src="heatmaps/good_entropy_student.png"' in page
    assert "/tmp" not in page.split("<img", 1)[1]  # figures referenced relatively


def test_default_names_disambiguate_by_parent(tmp_path):
    paths = [tmp_path / "a" / "seed0" / "opd", tmp_path / "a" / "seed1" / "opd", tmp_path / "b"]
    assert default_names(paths) == ["seed0/opd", "seed1/opd", "b"]
    assert default_names([tmp_path / "x", tmp_path / "x"]) == ["x", "x#2"]
    assert run_names(paths, ["first"]) == ["first", "seed1/opd", "b"]
    with pytest.raises(OpdError, match="3 --name values for 1"):
        run_names(paths[:1], ["a", "b", "c"])
    with pytest.raises(OpdError, match="more than one run"):
        run_names(paths[:2], ["same", "same"])


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")  # a second command, so typer keeps `analyze` as a subcommand name
    def noop() -> None:
        pass

    return app


def test_cli_two_runs(improving, flat, tmp_path):
    out = tmp_path / "cmp"
    res = CliRunner().invoke(
        _app(), ["analyze", str(improving), str(flat), "--name", "good", "--name", "bad", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    text = res.output
    assert "success signals" in text and "verdict" in text and "improving" in text and "flat" in text
    assert "overlap_ratio" in text and "good" in text and "bad" in text
    assert "alarm" in text and "truncated" in text  # events and read warnings are shown
    assert "wrote" in text and "analysis.md" in text
    assert (out / "analysis.html").is_file() and (out / "key_metrics.png").is_file()


def test_cli_defaults_and_errors(improving, flat, tmp_path, monkeypatch):
    runner = CliRunner()
    res = runner.invoke(_app(), ["analyze", str(flat)])
    assert res.exit_code == 0, res.output
    assert (flat / "analysis" / "analysis.json").is_file()  # one run: RUN_DIR/analysis
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(_app(), ["analyze", str(flat), str(improving)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "analysis" / "analysis.md").is_file()  # several: ./analysis
    res = runner.invoke(_app(), ["analyze", str(tmp_path / "missing")])
    assert res.exit_code == 2
    assert "error:" in res.output and "missing" in res.output and "is it a run directory" in res.output
    res = runner.invoke(_app(), ["analyze", str(flat), "--name", "a", "--name", "b"])
    assert res.exit_code == 2 and "2 --name values for 1" in res.output


def test_real_tiny_training_run_end_to_end(tmp_path):
    """A real 3-step OPD run on the tiny models, then the analysis of its run dir."""
    from opd.config import load_config
    from opd.models.tiny import save_tiny_pair
    from opd.train.trainer import OPDTrainer

    pair = save_tiny_pair(tmp_path / "pair")
    run_dir = tmp_path / "run"
    args = {
        "student": pair["student"], "teacher": pair["teacher"], "prompts": pair["prompts"], "run_dir": run_dir,
        "prompts_per_step": 4, "micro_batch_size": 8, "rollout.rollouts_per_prompt": 2,
        "rollout.max_new_tokens": 8, "rollout.batch_size": 4, "optim.lr": 1e-3, "steps": 3,
        "checkpoint_every": 3, "tracking.tensorboard": False, "diagnostics.k": 8, "loss.k": 8,
        "diagnostics.position_bins": 2, "save_final": False,
    }  # fmt: skip
    argv = [x for k, v in args.items() for x in (f"--{k}", str(v))]
    trainer = OPDTrainer(load_config(None, argv), log=lambda m: None)
    trainer.setup()
    trainer.train()

    run = load_run(run_dir)
    assert [r["step"] for r in run.train] == [1, 2, 3] and not run.warnings
    steps, mat = position_matrix(run, "entropy_student")
    assert steps == [1, 2, 3] and mat.shape == (2, 3) and np.isfinite(mat[0]).all()
    sig = success_signals(run)
    assert sig["verdict"] == "too short" and math.isfinite(sig["metrics"]["loss"]["initial"])
    files = write_analysis([run], run_dir / "analysis")
    assert files["heatmap:run:entropy_student"].stat().st_size > 0
    assert files["heatmap:run:entropy_teacher"].stat().st_size > 0
    assert files["curve:overlap_ratio"].stat().st_size > 0
    data = _no_nan(files["json"].read_text())
    assert data["runs"][0]["position_bins"] == 2 and data["runs"][0]["train_steps"] == 3


def test_read_metrics_skips_a_torn_last_line_only(tmp_path: Path) -> None:
    from opd.errors import OpdError
    from opd.train.tracking import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(OpdError, match="metrics.jsonl:1"):
        read_metrics(tmp_path)


def test_falling_accuracy_reads_as_failing_even_when_alignment_improves(tmp_path):
    """The lab's incompatible pair: overlap rises, entropy gap shrinks, and held-out accuracy collapses."""
    rows = [{"step": 0, "kind": "eval", "eval/avg@1": 0.51}]
    rows += [_improving_row(s) for s in range(1, N + 1)]
    rows.append({"step": N, "kind": "eval", "eval/avg@1": 0.0})
    sig = success_signals(load_run(_write_run(tmp_path / "bad", rows)))
    assert sig["verdict"] == "failing"
    assert "0.51 -> 0" in sig["reading"] and "opd doctor" in sig["reading"]
