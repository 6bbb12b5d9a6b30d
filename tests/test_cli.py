"""The command line as a user meets it: `opd check`, `opd train` errors, `opd config`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from opd.cli import app
from opd.models.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_pair

runner = CliRunner()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


def _out(res) -> str:
    return " ".join((res.output or "").split())


def test_check_passes_on_a_compatible_pair(pair):
    res = runner.invoke(app, ["check", "--student", str(pair["student"]), "--teacher", str(pair["teacher"]),
                              "--prompts", str(pair["prompts"]), "--k", "8"])  # fmt: skip
    out = _out(res)
    assert res.exit_code == 0, out
    assert "teacher-fidelity self-test" in out and "overlap ratio = 1.0000" in out
    assert "shared real vocabulary" in out


def test_check_refuses_a_different_tokenizer(pair, tmp_path):
    tok = build_tiny_tokenizer(charset="abcdefghijklmnopqrstuvwxyz0123456789 +=")
    model = build_tiny_model(tok)
    model.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    res = runner.invoke(
        app, ["check", "--student", str(pair["student"]), "--teacher", str(tmp_path / "other")]
    )
    assert res.exit_code != 0
    assert "FAIL" in _out(res) and "vocab" in _out(res).lower()


def _train(pair, tmp_path, prompts, *extra):
    return runner.invoke(app, ["train", "--student", str(pair["student"]), "--teacher", str(pair["teacher"]),
                               "--prompts", str(prompts), "--run_dir", str(tmp_path / "run"), "--steps", "1",
                               "--prompts_per_step", "2", "--rollout.max_new_tokens", "4", *extra])  # fmt: skip


def test_train_malformed_jsonl_names_file_and_line(pair, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1="}) + "\n" + "{not json\n")
    res = _train(pair, tmp_path, bad)
    assert res.exit_code == 2
    assert "bad.jsonl:2" in _out(res)


def test_train_prompt_too_long_names_the_record(pair, tmp_path):
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"prompt": "1+1="}) + "\n" + json.dumps({"prompt": "9" * 300}) + "\n")
    res = _train(pair, tmp_path, p, "--data.max_prompt_tokens", "64")
    assert res.exit_code == 2
    assert "long.jsonl:2" in _out(res) and "max_prompt_tokens" in _out(res)


def test_train_unknown_option_is_refused(pair, tmp_path):
    res = _train(pair, tmp_path, pair["prompts"], "--loss.sigal", "topk")
    assert res.exit_code == 2 and "did you mean --loss.signal" in _out(res)


def test_train_from_yaml_runs(pair, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"student: {{path: {pair['student']}}}\nteacher: {{path: {pair['teacher']}}}\n"
        f"data: {{prompts: {pair['prompts']}}}\nrollout: {{max_new_tokens: 6, rollouts_per_prompt: 2}}\n"
        f"prompts_per_step: 2\nsteps: 2\nrun_dir: {tmp_path / 'run'}\ntracking: {{tensorboard: true}}\n"
    )
    res = runner.invoke(app, ["train", "--config", str(cfg), "--loss.k", "4"])
    assert res.exit_code == 0, _out(res)
    out = _out(res)
    assert "ok teacher-fidelity self-test" in out and "first prompt as rendered" in out
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert "k: 4" in (tmp_path / "run" / "config.yaml").read_text()


def test_config_show_and_fields():
    res = runner.invoke(app, ["config", "show", "--loss.signal", "sampled"])
    assert res.exit_code == 0 and "signal: sampled" in res.output
    res = runner.invoke(app, ["config", "fields"])
    assert res.exit_code == 0 and "--rollout.max_new_tokens" in res.output
