"""Evaluation: estimators against brute force, evaluate() plumbing on the tiny pair, `opd eval` CLI."""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from opd.cli import app
from opd.config import DataConfig, EvalConfig
from opd.data import PromptRecord, load_prompts
from opd.errors import DataError
from opd.evaluation.eval import (
    InLoopEvaluator,
    auroc,
    avg_at_k,
    evaluate,
    gap_recovery,
    pass_at_k,
    rollout_reward_auroc,
    write_results,
)
from opd.evaluation.verify import Verdict, VerifierError
from opd.models.loading import load_model, load_tokenizer, prepare_tokenizer


def _out(res) -> str:
    return " ".join((res.output or "").split())


# ---------------------------------------------------------------------------------------------------
# Estimators


def test_pass_at_k_matches_enumeration_of_all_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            labels = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(labels, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_large_n():
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)  # pass@1 = c/n
    assert pass_at_k(2000, 3, 100) == pytest.approx(1 - math.comb(1997, 100) / math.comb(2000, 100))
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_avg_at_k():
    assert avg_at_k([True, False, True, True]) == 0.75
    assert avg_at_k([[True, False], [False, False]]) == 0.25
    assert math.isnan(avg_at_k([]))


def _auroc_pairs(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pair_counting_with_ties():
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(2, 30)
        scores = [float(rng.randint(0, 5)) for _ in range(n)]  # many ties
        labels = [rng.random() < 0.4 for _ in range(n)]
        if trial == 0:
            labels[0], labels[1] = True, False
        if all(labels) or not any(labels):
            assert math.isnan(auroc(scores, labels))
            continue
        assert auroc(scores, labels) == pytest.approx(_auroc_pairs(scores, labels), abs=1e-12)
    assert auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert auroc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    assert auroc([1, 1, 1], [True, False, True]) == 0.5
    with pytest.raises(ValueError):
        auroc([1.0, float("nan")], [True, False])


def test_gap_recovery():
    assert gap_recovery(0.2, 0.5, 0.8) == pytest.approx(0.5)
    assert gap_recovery(0.2, 0.1, 0.8) == pytest.approx(-1 / 6)
    assert gap_recovery(0.2, 0.9, 0.8) == pytest.approx(7 / 6)  # student passes the teacher
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert math.isnan(gap_recovery(0.5, 0.6, 0.5))


# ---------------------------------------------------------------------------------------------------
# evaluate() on the tiny model


@pytest.fixture(scope="module")
def tiny_student(tiny_pair):
    tok = load_tokenizer(str(tiny_pair["student"]))
    prepare_tokenizer(tok)
    return load_model(str(tiny_pair["student"])), tok


class ParityOracle:
    """Correct iff the response has an even number of characters: deterministic, about half right."""

    name = "parity"

    def __call__(self, response: str, answer: str) -> Verdict:
        return Verdict(len(response) % 2 == 0, response[-3:] or None, "oracle")


class AlwaysRight:
    name = "always"

    def __call__(self, response: str, answer: str) -> Verdict:
        return Verdict(True, "x", "")


def _records(path: Path, n: int) -> list[PromptRecord]:
    return load_prompts(path)[:n]


def test_evaluate_plumbing(tiny_student, tiny_pair):
    model, tok = tiny_student
    records = _records(tiny_pair["prompts"], 5)
    k = 4
    res = evaluate(model, tok, records, samples=k, temperature=1.0, top_p=1.0, max_new_tokens=6, batch_size=2,
                   verifier=ParityOracle(), template="raw", progress=False)  # fmt: skip
    assert len(res.problems) == 5
    for i, p in enumerate(res.problems):
        assert p.index == i and p.source.endswith(f"prompts.jsonl:{i + 1}") and p.answer == records[i].answer
        assert p.n == k and len(p.samples) == k
        assert p.correct == sum(len(s.text) % 2 == 0 for s in p.samples)
        for s in p.samples:
            assert 1 <= s.length <= 6 and s.reason == "oracle"
            assert isinstance(s.truncated, bool) and (s.length == 6 or not s.truncated)
    s = res.summary
    assert [key for key in s if key.startswith("pass@")] == [f"pass@{j}" for j in range(1, k + 1)]
    flat = [x for p in res.problems for x in p.samples]
    assert s[f"avg@{k}"] == pytest.approx(sum(x.correct for x in flat) / len(flat))
    assert s["pass@1"] == pytest.approx(s[f"avg@{k}"])
    assert s[f"pass@{k}"] == pytest.approx(sum(p.correct > 0 for p in res.problems) / 5)
    assert s["truncation_rate"] == pytest.approx(sum(x.truncated for x in flat) / len(flat))
    assert s["mean_length"] == pytest.approx(sum(x.length for x in flat) / len(flat))
    assert s["n_problems"] == 5 and s["samples"] == k and s["verifier_errors"] == 0
    assert s["no_answer_rate"] == 0.0 and s["verifier"] == "parity"
    assert 0.0 < s["truncation_rate"] <= 1.0  # a random model rarely stops within 6 tokens
    # same seed and batching: identical samples (sampling seeds are keyed by the problems' indices)
    again = evaluate(model, tok, records, samples=k, temperature=1.0, top_p=1.0, max_new_tokens=6,
                     batch_size=2, verifier=ParityOracle(), template="raw", progress=False)  # fmt: skip
    assert [x.text for p in again.problems for x in p.samples] == [x.text for x in flat]


def test_evaluate_always_right_and_progress(tiny_student, tiny_pair):
    model, tok = tiny_student
    res = evaluate(model, tok, _records(tiny_pair["prompts"], 3), samples=3, temperature=0.7, top_p=0.95,
                   max_new_tokens=4, batch_size=8, verifier=AlwaysRight(), template="raw", progress=True)  # fmt: skip
    assert res.summary["avg@3"] == 1.0
    assert all(res.summary[f"pass@{j}"] == 1.0 for j in (1, 2, 3))


def test_evaluate_counts_verifier_errors_and_strict_raises(tiny_student, tiny_pair):
    model, tok = tiny_student

    def boom(response: str, answer: str) -> Verdict:
        raise ZeroDivisionError("bad grader")

    records = _records(tiny_pair["prompts"], 2)
    kw = dict(
        samples=2, temperature=1.0, top_p=1.0, max_new_tokens=3, batch_size=2, template="raw", progress=False
    )
    res = evaluate(model, tok, records, verifier=boom, **kw)
    assert res.summary["verifier_errors"] == 4 and res.summary["avg@2"] == 0.0
    assert res.problems[0].samples[0].reason.startswith("verifier error: ZeroDivisionError")
    with pytest.raises(VerifierError, match="bad grader"):
        evaluate(model, tok, records, verifier=boom, strict=True, **kw)


def test_missing_answer_refused_before_generation(tmp_path, tiny_tokenizer):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")
    records = load_prompts(p)
    with pytest.raises(DataError, match=rf"{p}:2: record has no answer.*needs an `answer` field"):
        evaluate(None, tiny_tokenizer, records, samples=2, verifier=AlwaysRight(), template="raw")  # type: ignore[arg-type]


def test_write_results_atomic(tiny_student, tiny_pair, tmp_path, monkeypatch):
    model, tok = tiny_student
    res = evaluate(model, tok, _records(tiny_pair["prompts"], 2), samples=2, max_new_tokens=3,
                   verifier=ParityOracle(), template="raw", progress=False)  # fmt: skip
    files = write_results(res, tmp_path / "out", "m")
    lines = [json.loads(x) for x in files["samples"].read_text().splitlines()]
    assert [r["n"] for r in lines] == [2, 2] and set(lines[0]["samples"][0]) >= {
        "correct",
        "extracted",
        "text",
    }
    summary = json.loads(files["summary"].read_text())
    assert summary["avg@2"] == res.summary["avg@2"]
    before = files["summary"].read_text()

    import opd.train.checkpoint

    real_replace = opd.train.checkpoint.os.replace

    def crash_on_summary(src, dst):
        if str(dst).endswith(".summary.json"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(opd.train.checkpoint.os, "replace", crash_on_summary)
    res.summary["avg@2"] = 0.123
    with pytest.raises(OSError):
        write_results(res, tmp_path / "out", "m")
    assert files["summary"].read_text() == before  # old summary intact, never half-written


def test_in_loop_evaluator(tiny_pair, tiny_student):
    model, tok = tiny_student
    cfg = EvalConfig(prompts=str(tiny_pair["prompts"]), samples=2, max_new_tokens=4, max_problems=3,
                     verifier="exact", batch_size=2)  # fmt: skip
    ev = InLoopEvaluator(cfg, DataConfig(template="raw"), tok)
    assert len(ev.records) == 3 and len(ev.prompt_ids) == 3
    model.train()
    state = torch.random.get_rng_state()
    m1 = ev.run(model)
    assert torch.equal(state, torch.random.get_rng_state())  # training RNG untouched
    assert model.training  # mode restored
    assert set(m1) == {"eval/avg@2", "eval/pass@1", "eval/pass@2", "eval/mean_length", "eval/truncation_rate",
                       "eval/no_answer_rate", "eval/verifier_errors"}  # fmt: skip
    assert all(isinstance(v, float) for v in m1.values())
    assert ev.run(model) == m1  # same prompts, same seeds
    model.eval()


def test_rollout_reward_auroc(tiny_pair, tiny_student):
    from opd.generation.rollout import HFGenerator, SamplingParams
    from opd.models.loading import shared_vocab_size

    model, tok = tiny_student
    teacher = load_model(str(tiny_pair["teacher"]))
    ids = [tok(r.text)["input_ids"] for r in _records(tiny_pair["prompts"], 3)]
    roll = HFGenerator(model, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id]).generate(
        ids, SamplingParams(max_new_tokens=5), 2, 0, [0, 1, 2]
    )
    vocab = shared_vocab_size(model, teacher, tok)
    correct = [True, False] * 3
    out = rollout_reward_auroc(model, teacher, roll, correct, vocab_size=vocab)
    assert len(out["rewards"]) == 6 and out["n_correct"] == 3 and out["n_incorrect"] == 3
    assert out["auroc"] == pytest.approx(_auroc_pairs(out["rewards"], correct))
    same = rollout_reward_auroc(model, model, roll, correct)
    assert all(abs(r) < 1e-6 for r in same["rewards"])
    with pytest.raises(ValueError):
        rollout_reward_auroc(model, teacher, roll, [True])


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_two_models_gap_recovery(tiny_pair, tmp_path):
    out = tmp_path / "ev"
    s, t = str(tiny_pair["student"]), str(tiny_pair["teacher"])
    res = CliRunner().invoke(app, [
        "eval", "--model", s, "--name-as", f"big={t}", "--before", "student", "--after", s, "--teacher", "big",
        "--prompts", str(tiny_pair["prompts"]), "--max-problems", "3", "--samples", "2",
        "--max-new-tokens", "4", "--template", "raw", "--verifier", "exact", "--out", str(out),
    ])  # fmt: skip
    text = _out(res)
    assert res.exit_code == 0, text
    assert "comparison" in text and "avg@2" in text and "pass@1" in text and "gap recovery" in text
    for name in ("student", "big"):
        summary = json.loads((out / f"{name}.summary.json").read_text())
        assert summary["n_problems"] == 3 and summary["samples"] == 2 and summary["name"] == name
        assert len((out / f"{name}.samples.jsonl").read_text().splitlines()) == 3
    cmp = json.loads((out / "comparison.json").read_text())
    assert cmp["roles"] == {"before": "student", "after": "student", "teacher": "big"}
    assert "gap_recovery" in cmp  # null (NaN) when both score 0, a number otherwise
    assert not list(out.glob(".*tmp*"))


def test_cli_config_file_and_override(tiny_pair, tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        f"models: [{tiny_pair['student']}]\nprompts: {tiny_pair['prompts']}\nsamples: 3\nmax_new_tokens: 3\n"
        f"template: raw\nmax_problems: 2\nout: {tmp_path / 'a'}\n"
    )
    res = CliRunner().invoke(app, ["eval", "--config", str(cfg), "--samples", "2"])
    assert res.exit_code == 0, _out(res)
    summary = json.loads((tmp_path / "a" / "student.summary.json").read_text())
    assert summary["samples"] == 2 and summary["n_problems"] == 2 and summary["max_new_tokens"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("smaples: 3\n")
    res = CliRunner().invoke(app, ["eval", "--config", str(bad)])
    assert res.exit_code == 2 and "smaples" in _out(res) and "Traceback" not in _out(res)


def test_cli_errors_are_one_line(tiny_pair, tmp_path):
    p = tmp_path / "noans.jsonl"
    p.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_pair["student"]), "--prompts", str(p)])
    assert res.exit_code == 2 and f"{p}:1: record has no answer" in _out(res)
    res = CliRunner().invoke(app, ["eval", "--prompts", str(p)])
    assert res.exit_code == 2 and "no model to evaluate" in _out(res)
    res = CliRunner().invoke(app, ["eval", "--model", "x", "--prompts", str(tiny_pair["prompts"]),
                                   "--verifier", "nope_mod_xyz:f"])  # fmt: skip
    assert res.exit_code == 2 and "cannot import module" in _out(res)


def test_cli_strict_verifier_error_leaves_no_summary(tiny_pair, tmp_path, monkeypatch):
    (tmp_path / "grader_boom.py").write_text(
        textwrap.dedent(
            """
            def boom(response, answer):
                raise RuntimeError("grader exploded")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "ev"
    args = ["eval", "--model", str(tiny_pair["student"]), "--prompts", str(tiny_pair["prompts"]),
            "--max-problems", "2", "--samples", "2", "--max-new-tokens", "3", "--template", "raw",
            "--verifier", "grader_boom:boom", "--out", str(out)]  # fmt: skip
    try:
        res = CliRunner().invoke(app, [*args, "--strict"])
        assert res.exit_code == 2 and "grader exploded" in _out(res)
        assert not out.exists() or not list(out.iterdir())  # nothing, not even a partial file
        res = CliRunner().invoke(app, args)  # lenient: graded wrong, counted, reported
        assert res.exit_code == 0, _out(res)
        assert "4 sample(s) could not be graded" in _out(res)
        assert json.loads((out / "student.summary.json").read_text())["verifier_errors"] == 4
    finally:
        sys.modules.pop("grader_boom", None)


# ---------------------------------------------------------------------------------------------------
# Portable output names


def test_portable_names_are_valid_everywhere_readable_and_unique():
    from opd.evaluation.eval import portable_name, portable_names

    assert portable_name("lab:student") == "lab_student"
    assert portable_name('a<b>c"d/e\\f|g?h*i\x01j') == "a_b_c_d_e_f_g_h_i_j"
    assert (
        portable_name("run. ") == "run"
        and portable_name("NUL") == "_NUL"
        and portable_name("com1.x") == "_com1.x"
    )
    assert portable_name("Qwen3-1.7B") == "Qwen3-1.7B"  # nothing else changes
    stems = portable_names(["a:b", "a_b", "A_B", "x"])
    assert stems == {
        "a:b": "a_b",
        "a_b": "a_b-2",
        "A_B": "A_B-3",
        "x": "x",
    }  # unique, also case-insensitively


def test_cli_output_names_have_no_colon_and_lab_models_get_the_lab_verifier(tmp_path):
    """`opd eval --model lab:student --name-as before:x=lab:student`: files lab_student.* and before_x.*
    (no `:`), the display names kept inside; no --verifier/--template given, so the lab's are used and
    said so, and the lab's answers are read (no unreadable-answers warning, avg@k above 0)."""
    from opd.errors import ModelError
    from opd.lab.zoo import eval_prompt_path, zoo_path

    try:
        zoo_path("student")
    except ModelError as exc:
        pytest.skip(f"lab zoo not built: {exc}")
    out = tmp_path / "ev"
    res = CliRunner().invoke(app, [
        "eval", "--model", "lab:student", "--name-as", "before:x=lab:student", "--prompts", str(eval_prompt_path(2)),
        "--max-problems", "4", "--samples", "2", "--max-new-tokens", "64", "--out", str(out),
    ], env={"COLUMNS": "400"})  # fmt: skip
    text = _out(res)
    assert res.exit_code == 0, text
    assert "lab:student: using verifier opd.lab.world:LabVerifier and template raw" in text
    names = sorted(p.name for p in out.iterdir())
    assert names == ["before_x.samples.jsonl", "before_x.summary.json", "comparison.json",
                     "lab_student.samples.jsonl", "lab_student.summary.json"]  # fmt: skip
    assert not any(c in n for n in names for c in '<>:"\\|?*')
    summary = json.loads((out / "lab_student.summary.json").read_text())
    assert summary["name"] == "lab:student" and summary["verifier"] == "opd.lab.world:LabVerifier"
    assert summary["unparsed_predictions"] == 0 and summary["avg@2"] > 0
    assert set(json.loads((out / "comparison.json").read_text())["models"]) == {"lab:student", "before:x"}


def test_eval_warning_on_unreadable_answers_names_the_models_own_verifier(tmp_path, caplog):
    """An explicit `--verifier math` on a lab model is kept, and the warning (the wording doctor shares)
    names the lab's verifier instead of math-flexible."""
    from opd.errors import ModelError
    from opd.lab.zoo import eval_prompt_path, zoo_path

    try:
        zoo_path("student")
    except ModelError as exc:
        pytest.skip(f"lab zoo not built: {exc}")
    with caplog.at_level("WARNING", logger="opd.evaluation.eval"):
        res = CliRunner().invoke(app, [
            "eval", "--model", "lab:student", "--prompts", str(eval_prompt_path(2)), "--max-problems", "2",
            "--samples", "1", "--max-new-tokens", "64", "--verifier", "math", "--out", str(tmp_path),
        ], env={"COLUMNS": "400"})  # fmt: skip
    assert res.exit_code == 0, _out(res)
    assert "using verifier" not in _out(res) and "using template raw" in _out(res)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "2 of 2 responses have no final answer the math verifier can read" in warned
    assert "use --verifier opd.lab.world:LabVerifier." in warned
