"""What `opd demo` prints: the plan first, one progress bar with an ETA, no library noise, expected
warnings as one counted line, and at the end where the report is and the one-line result."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import make_tiny_zoo

from opd.lab.runner import LabZoo, UnreadableAnswers, count_unreadable_answers
from opd.progress import quiet_libraries


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> LabZoo:
    """Four random lab-tokenizer models under the zoo's names and small held-out files."""
    return make_tiny_zoo(tmp_path_factory.mktemp("tinyzoo"), problems_per_level=8)


def test_quiet_libraries_hides_the_weights_bar_and_keeps_errors(tiny_zoo, capfd, caplog, monkeypatch) -> None:
    from transformers.utils import logging as hf_logging

    from opd.models.loading import load_model

    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    monkeypatch.delenv("OPD_DEBUG", raising=False)
    path = str(tiny_zoo.models["student"])
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    load_model(path)
    assert "Loading weights" in capfd.readouterr().err  # the bar this hides is real
    with quiet_libraries():
        load_model(path)
        logging.getLogger("transformers.modeling_utils").warning("a library notice")
        logging.getLogger("transformers.modeling_utils").error("a real library error")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "a library notice" not in err
    shown = [r.getMessage() for r in caplog.records]
    assert "a real library error" in shown and "a library notice" not in shown
    # everything is back as it was
    assert hf_logging.get_verbosity() == verbosity and hf_logging.is_progress_bar_enabled() == bars
    load_model(path)
    assert "Loading weights" in capfd.readouterr().err


def test_the_lab_tokenizer_is_saved_left_padded(tiny_zoo) -> None:
    """The cause of the demo's padding_side notices: lab tokenizers now say left padding themselves."""
    from opd.lab import zoo as z
    from opd.models.loading import load_tokenizer, prepare_tokenizer

    for path in [
        tiny_zoo.models["student"],
        *([z.zoo_path("student")] if (z.ZOO_DIR / z.MANIFEST).is_file() else []),
    ]:
        tok = load_tokenizer(str(path))
        assert tok.padding_side == "left" and prepare_tokenizer(tok) == []


def test_unreadable_answers_become_one_counted_line(tiny_zoo, caplog) -> None:
    """A random model writes no `#answer`: the evaluator warns; inside the lab's counter it is counted instead."""
    from opd.data import load_prompts
    from opd.evaluation.eval import evaluate_prepared, prepare_prompts
    from opd.lab.world import LabVerifier
    from opd.models.loading import load_model, load_tokenizer

    path = str(tiny_zoo.models["student"])
    tok, model = load_tokenizer(path), load_model(path)
    records = load_prompts(tiny_zoo.eval_files[4])
    _, ids = prepare_prompts(records, tok, template="raw")

    def run() -> None:
        evaluate_prepared(model, tok, records, ids, samples=1, temperature=0.0, top_p=1.0, max_new_tokens=8,
                          batch_size=8, verifier=LabVerifier(), seed=0, progress=False)  # fmt: skip

    with caplog.at_level(logging.WARNING):
        run()
    assert any("no final answer" in r.getMessage() for r in caplog.records)  # the warning the counter catches
    caplog.clear()
    with caplog.at_level(logging.WARNING), count_unreadable_answers() as found:
        run()
        run()
    assert not any("no final answer" in r.getMessage() for r in caplog.records)
    assert found.evaluations == 2 and found.answers == 2 * len(records) and found.unreadable > len(records)
    collapsed = {"gap_level": 4, "accuracy": {
        "before": {str(lv): {"acc": a} for lv, a in ((2, 1.0), (3, 1.0), (4, 0.5))},
        "after": {str(lv): {"acc": a} for lv, a in ((2, 0.2), (3, 0.1), (4, 0.0))}}}  # fmt: skip
    line = found.line("thinking_patterns/incompatible/seed0", collapsed)
    assert line.startswith(
        f"thinking_patterns/incompatible/seed0: {found.unreadable} of {found.answers} answers"
    )
    assert "expected: this run collapsed, easy levels -85.0 pts" in line
    assert "expected" not in UnreadableAnswers(1, 5, 8).line("x", {**collapsed, "accuracy": {
        "before": collapsed["accuracy"]["before"], "after": collapsed["accuracy"]["before"]}})  # fmt: skip


def test_plan_says_what_runs_and_how_long(tmp_path: Path) -> None:
    from opd.lab.demo import plan_lines

    lines = plan_lines(seeds=2, steps=40, budget_minutes=10, runs=tmp_path / "r")
    text = "\n".join(lines)
    assert len(lines) <= 10
    assert "2 seed(s) x 40 OPD steps" in text
    assert "compatible (teacher_novel)" in text and "incompatible (teacher_incompatible)" in text
    assert "big (teacher_big)" in text and "reuses experiment 1's runs" in text
    assert "6 training run(s), about" in text and "min" in text and "budget 10 min" in text
    assert f"{tmp_path / 'r'}/report.md" in text


def test_demo_output_from_plan_to_report(tiny_zoo, tmp_path: Path, capfd, monkeypatch) -> None:
    """A real (tiny) demo: plan first, bars with an ETA, no library noise, the report and result last."""
    from opd.lab.demo import run_demo

    monkeypatch.setenv("OPD_PROGRESS_EVERY", "0")  # plain lines at each 10% only: the log is deterministic
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    monkeypatch.delenv("OPD_DEBUG", raising=False)
    runs = tmp_path / "runs"
    res = run_demo(runs=runs, seeds=1, steps=1, zoo=tiny_zoo, device="cpu")
    cap = capfd.readouterr()
    out = cap.out + cap.err
    assert cap.out.startswith("opd demo: on-policy distillation")
    for noise in ("Loading weights", "padding_side", "[transformers]", "use --verifier", "Warning"):
        assert noise not in out, noise
    progress = [ln for ln in cap.err.splitlines() if ln.startswith("opd demo: ")]
    assert any("eta 0:" in ln and "run 1/3: thinking_patterns/compatible/seed0" in ln for ln in progress)
    assert progress[-1].startswith("opd demo: 3/3 (100%)")  # 3 runs x 1 step, the copied run not counted
    tail = cap.out.rstrip().splitlines()[-4:]
    assert tail[0] == f"report: {runs / 'report.md'}" and str(runs / "report.html") in tail[1]
    assert tail[-1].startswith("result: the student's level-4 accuracy went from ")
    assert "paper claims tested: 5" in tail[-1]
    assert res["ran"] == ["thinking_patterns", "novelty_vs_scale"]
    md = (runs / "report.md").read_text()
    assert md.split("\n## ")[1].startswith("Summary") and "`opd demo` ran 2 experiment(s)" in md
