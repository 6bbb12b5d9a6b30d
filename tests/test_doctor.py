"""`opd doctor`: the pure pieces against hand computations, the verdict rules, and real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from opd.evaluation.doctor import (
    DoctorConfig,
    DoctorThresholds,
    continuation_prefixes,
    novelty_stats,
    run_doctor,
    verdict,
)
from opd.report.doctor import write_doctor_report


def test_novelty_stats_by_hand() -> None:
    s = [[True, False, False], [True, True, True], [False, False], [True, False]]
    t = [[True, True, False], [True, True, False], [True, True], [False, False]]
    out = novelty_stats(s, t)
    s_acc = (1 / 3 + 1 + 0 + 0.5) / 4
    t_acc = (2 / 3 + 2 / 3 + 1 + 0) / 4
    assert out["student_acc"] == pytest.approx(s_acc)
    assert out["teacher_acc"] == pytest.approx(t_acc)
    assert out["accuracy_gap"] == pytest.approx(t_acc - s_acc)
    # majority-solved: student solves #2 only (#4 is a tie: not solved); teacher solves #1, #2, #3
    assert out["teacher_only_share"] == pytest.approx(2 / 4)
    assert out["student_only_share"] == 0.0
    assert out["problems"] == 4
    se = math.sqrt(s_acc * (1 - s_acc) / 10 + t_acc * (1 - t_acc) / 10)  # 10 samples on each side
    assert out["accuracy_gap_se"] == pytest.approx(se)


def test_novelty_stats_skips_problems_without_samples() -> None:
    out = novelty_stats([[True], []], [[False], [True]])
    assert out["problems"] == 1 and out["student_acc"] == 1.0 and out["teacher_acc"] == 0.0
    empty = novelty_stats([[]], [[]])
    assert empty["problems"] == 0 and math.isnan(empty["accuracy_gap"])


def test_continuation_prefixes_never_swallow_the_stop_token() -> None:
    assert continuation_prefixes([10, 4, 2, 1], 0.5) == [5, 2, None, None]
    assert continuation_prefixes([10], 0.0) == [0]
    assert continuation_prefixes([10], 0.95) == [None]  # 9 of 10 tokens: only the EOS would be left


def _m(**kw: float) -> dict[str, float]:
    base = {"reverse_kl": 0.3, "overlap_ratio": 0.7, "overlap_mass_student": 0.98, "overlap_mass_teacher": 0.99,
            "overlap_token_advantage": -0.07, "entropy_gap": 0.07}  # fmt: skip
    base.update(kw)
    return base


@pytest.mark.parametrize(
    ("metrics", "code"),
    [
        (_m(reverse_kl=0.0), "identical"),
        (_m(overlap_mass_teacher=0.46), "incompatible"),
        (_m(overlap_token_advantage=-0.43), "incompatible"),
        (_m(), "compatible_unknown_novelty"),
        (_m(student_acc=0.5, teacher_acc=0.45, accuracy_gap=-0.05, teacher_only_share=0.0), "weak_teacher"),
        (_m(student_acc=0.5, teacher_acc=0.45, accuracy_gap=-0.05, teacher_only_share=0.3), "weak_teacher"),
        (_m(student_acc=0.5, teacher_acc=0.55, accuracy_gap=0.05, teacher_only_share=0.05), "no_gain"),
        (_m(student_acc=0.5, teacher_acc=0.55, accuracy_gap=0.05, teacher_only_share=0.2), "go"),
        (_m(student_acc=0.3, teacher_acc=0.9, accuracy_gap=0.6, teacher_only_share=0.6), "go"),
    ],
)
def test_verdict_rules(metrics: dict[str, float], code: str) -> None:
    v = verdict(metrics, DoctorThresholds())
    assert v.code == code
    assert v.headline and v.recipe and v.reasons


def test_verdict_thresholds_are_configurable() -> None:
    m = _m(
        overlap_mass_teacher=0.85, student_acc=0.3, teacher_acc=0.9, accuracy_gap=0.6, teacher_only_share=0.6
    )
    assert verdict(m, DoctorThresholds()).code == "incompatible"
    assert verdict(m, DoctorThresholds(min_overlap_mass=0.8)).code == "go"


def test_config_rejects_bad_depths() -> None:
    with pytest.raises(ValueError, match="depths"):
        DoctorConfig(depths=[1.5])


def test_doctor_on_the_tiny_pair_end_to_end(tmp_path: Path) -> None:
    from opd.models.tiny import save_tiny_pair

    paths = save_tiny_pair(tmp_path / "pair")
    cfg = DoctorConfig(
        student=str(paths["student"]), teachers=[str(paths["teacher"]), str(paths["student"])],
        prompts=str(paths["prompts"]), templates=["raw", "format:Q: {prompt}\nA:"], n_prompts=3, samples=2,
        teacher_samples=1, max_new_tokens=8, depths=[0.5], continuation_rollouts=3, k=8, out=str(tmp_path / "doc"),
    )  # fmt: skip
    seen: list[float] = []
    res = run_doctor(cfg, progress=lambda label, frac: seen.append(frac))
    assert seen and seen[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in seen)
    assert set(res["templates"]) == {"raw", "format:Q: {prompt}\nA:"}
    assert res["recommended_template"] in res["templates"]
    student_as_teacher = res["teachers"]["student"]
    assert student_as_teacher["verdict"]["code"] == "identical"
    for tmpl in res["templates"]:
        m = student_as_teacher["by_template"][tmpl]
        assert m["reverse_kl"] == pytest.approx(0.0, abs=1e-9)
        assert m["overlap_ratio"] == pytest.approx(1.0)
    other = res["teachers"]["teacher"]["by_template"]["raw"]
    assert other["reverse_kl"] > 1e-4 and 0.0 <= other["overlap_ratio"] <= 1.0
    assert "overlap_ratio/bin0" in other and "continuation_advantage@0.5" in other
    pair = res["pairs"]["raw"]["teacher|student"]
    assert pair["overlap_ratio"] == pytest.approx(other["overlap_ratio"])
    assert any("hit the 8-token budget" in f for f in res["flags"])  # random tiny models never stop
    best = res["recommended_template"]
    if any(f.startswith(f"template {best}:") for f in res["flags"]):
        assert res["teachers"]["teacher"]["verdict"]["reliable"] is False
    files = write_doctor_report(res, cfg.out)
    data = json.loads(files["json"].read_text())  # strict JSON: no NaN
    assert data["teachers"]["student"]["verdict"]["code"] == "identical"
    md = files["markdown"].read_text()
    assert "identical to the student" in md and "## Templates" in md and "How the verdict is decided" in md
    assert files["html"].read_text().startswith("<!doctype html>")
    assert (tmp_path / "doc" / "by_position.png").stat().st_size > 1000


def test_doctor_metrics_match_token_diagnostics(tmp_path: Path) -> None:
    """The doctor's batched sums equal one `token_diagnostics` call on the same rollouts."""
    from opd.data import load_prompts
    from opd.diagnostics import token_diagnostics
    from opd.evaluation.doctor import _rollouts
    from opd.evaluation.eval import prepare_prompts
    from opd.generation.rollout import SamplingParams
    from opd.generation.sampling import stop_ids_for
    from opd.generation.scoring import response_logits
    from opd.models.loading import load_model, load_tokenizer, prepare_tokenizer
    from opd.models.tiny import save_tiny_pair

    paths = save_tiny_pair(tmp_path / "pair")
    cfg = DoctorConfig(student=str(paths["student"]), teachers=[str(paths["teacher"])], prompts=str(paths["prompts"]),
                       templates=["raw"], n_prompts=2, samples=2, teacher_samples=0, max_new_tokens=6,
                       continuation_rollouts=0, k=5, score_batch=1, batch_size=1)  # fmt: skip
    res = run_doctor(cfg)
    tok = load_tokenizer(str(paths["student"]))
    prepare_tokenizer(tok)
    s = load_model(str(paths["student"])).eval()
    t = load_model(str(paths["teacher"])).eval()
    records = load_prompts(paths["prompts"])[:2]
    _, ids = prepare_prompts(records, tok, template="raw")
    rolls = _rollouts(s, tok, ids, n=2, params=SamplingParams(1.0, 1.0, 0, 6), batch_size=1, seed=0,
                      stop_ids=stop_ids_for(tok, s))  # fmt: skip
    # same seeds as the doctor (chunk_seed(seed, template index 0, first prompt)) -> same rollouts
    ref_rows = []
    with torch.no_grad():
        for r in rolls:
            ref_rows.append(
                token_diagnostics(response_logits(s, r), response_logits(t, r), r.response_mask, k=5)
            )
    n = [x["n_tokens"] for x in ref_rows]
    ref = sum(x["overlap_ratio"] * w for x, w in zip(ref_rows, n, strict=True)) / sum(n)
    got = res["teachers"]["teacher"]["by_template"]["raw"]
    assert got["n_tokens"] == sum(n)
    assert got["overlap_ratio"] == pytest.approx(ref, rel=1e-6)


def test_doctor_refuses_missing_inputs() -> None:
    from opd.errors import ConfigError

    with pytest.raises(ConfigError, match="--teacher"):
        run_doctor(DoctorConfig(student="x", prompts="p"))


# The lab's measured truth (opd lab run thinking_patterns novelty_vs_scale, 3 seeds, 80 steps): OPD toward
# teacher_novel recovered 71.9 ± 4.4% of the gap, toward teacher_big 78.4 ± 4.7%, toward
# teacher_incompatible it destroyed the student (gap level 49% -> 0%). The doctor, before any training,
# must call the first two "go" and the third "incompatible".
LAB_TRUTH = {"teacher_novel": "go", "teacher_big": "go", "teacher_incompatible": "incompatible"}


def test_doctor_verdicts_match_the_lab_outcomes(tmp_path: Path) -> None:
    from opd.errors import ModelError
    from opd.lab.zoo import GAP_LEVEL, ZOO_NAMES, eval_prompt_path, zoo_path

    try:
        paths = {n: str(zoo_path(n)) for n in ZOO_NAMES}
    except ModelError as exc:
        pytest.skip(f"lab zoo not built: {exc}")
    cfg = DoctorConfig(
        student=paths["student"], teachers=[paths[n] for n in LAB_TRUTH], prompts=str(eval_prompt_path(GAP_LEVEL)),
        templates=["raw"], n_prompts=32, samples=4, teacher_samples=2, max_new_tokens=96, k=4, depths=[0.25],
        continuation_rollouts=8, verifier="opd.lab.world:LabVerifier", out=str(tmp_path),
    )  # fmt: skip
    res = run_doctor(cfg)
    got = {n: t["verdict"]["code"] for n, t in res["teachers"].items()}
    assert got == LAB_TRUTH, {n: t["verdict"]["reasons"] for n, t in res["teachers"].items()}
    inc = res["teachers"]["teacher_incompatible"]["by_template"]["raw"]
    novel = res["teachers"]["teacher_novel"]["by_template"]["raw"]
    assert inc["overlap_mass_teacher"] < 0.7 < 0.95 < novel["overlap_mass_teacher"]
    assert novel["accuracy_gap"] > 0.3 and novel["continuation_advantage@0.25"] > 0.3


def _lab_or_skip() -> str:
    from opd.errors import ModelError
    from opd.lab.zoo import GAP_LEVEL, eval_prompt_path, zoo_path

    try:
        zoo_path("student")
    except ModelError as exc:
        pytest.skip(f"lab zoo not built: {exc}")
    return str(eval_prompt_path(GAP_LEVEL))


_SMALL = ["--n-prompts", "8", "--samples", "2", "--teacher-samples", "2", "--max-new-tokens", "96", "--k", "4",
          "--continuation-rollouts", "0"]  # fmt: skip


def test_doctor_withholds_its_verdict_when_the_verifier_cannot_read_the_answers(tmp_path: Path) -> None:
    """The lab's answers are bare numbers: `--verifier math` reads none of them, so every accuracy is 0%.
    The doctor must not call the teacher that solves everything `weak_teacher`: it warns as `opd eval`
    does, withholds the novelty verdict naming the lab's verifier, and says so in doctor.json and the
    report; compatibility verdicts (which need no answers) still stand."""
    from typer.testing import CliRunner

    from opd.cli import app

    prompts = _lab_or_skip()
    res = CliRunner().invoke(app, [
        "doctor", "--student", "lab:student", "--teacher", "lab:teacher_novel", "--teacher", "lab:teacher_incompatible",
        "--prompts", prompts, "--verifier", "math", *_SMALL, "--out", str(tmp_path), "--no-plots",
    ], env={"COLUMNS": "400"})  # fmt: skip
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert (
        "16 of 16 responses of the student lab:student have no final answer the math verifier can read" in out
    )
    assert "use --verifier opd.lab.world:LabVerifier" in out
    assert "using verifier" not in out  # the user chose math: no lab default taken for it
    data = json.loads((tmp_path / "doctor.json").read_text())
    novel, inc = (
        data["teachers"]["teacher_novel"]["verdict"],
        data["teachers"]["teacher_incompatible"]["verdict"],
    )
    assert novel["code"] == "unreadable_answers" and novel["withheld"] is True
    assert "weak_teacher" not in out and "--verifier opd.lab.world:LabVerifier" in novel["recipe"]
    assert inc["code"] == "incompatible" and inc["withheld"] is False
    answers = data["answers"]
    assert answers["verifier"] == "math" and answers["withheld"] == ["teacher_novel"]
    assert answers["student"] == {"unparsed": 16, "total": 16}
    assert answers["teachers"]["teacher_novel"] == {"unparsed": 16, "total": 16}
    assert answers["references"] == {"unparsed": 0, "total": 8}
    assert answers["use_verifier"] == "opd.lab.world:LabVerifier"
    md = (tmp_path / "report.md").read_text()
    assert (
        "no verdict on new capability for teacher_novel: the math verifier could not read most answers" in md
    )
    assert "Rerun with --verifier opd.lab.world:LabVerifier" in md


def test_doctor_on_lab_models_takes_the_lab_verifier_and_template_by_default(tmp_path: Path) -> None:
    """No --verifier, no --template: `lab:` models bring the lab's (one line says so), and the verdicts
    are the lab's truth (go for the compatible teacher with new capability)."""
    prompts = _lab_or_skip()
    notes: list[str] = []
    cfg = DoctorConfig(student="lab:student", teachers=["lab:teacher_novel"],
                       prompts=prompts, n_prompts=8, samples=2, teacher_samples=2, max_new_tokens=96, k=4,
                       continuation_rollouts=0, out=str(tmp_path))  # fmt: skip
    res = run_doctor(cfg, log=notes.append)
    assert notes[0] == (
        "lab:student (and 1 more): using verifier opd.lab.world:LabVerifier and template raw (the defaults of lab: "
        "models; set --verifier / --template to override)"
    )
    assert res["config"]["verifier"] == "opd.lab.world:LabVerifier" and res["config"]["templates"] == ["raw"]
    assert res["teachers"]["teacher_novel"]["verdict"]["code"] == "go"
    assert res["answers"]["withheld"] == [] and res["answers"]["student"]["unparsed"] == 0
    assert not any("warning" in n for n in notes)
    assert cfg.verifier == "math"  # the caller's config is not changed
