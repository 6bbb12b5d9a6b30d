"""What `opd train` and `opd check` find before any step, and what a non-finite step says about its cause.

Each case is one a user met: a teacher checkpoint damaged into NaNs refused by the head probe as "soft-capping"
(following that advice gave a NaN stop at step 1), a NaN mid-run that did not say it came from the teacher, a
prompt plus `rollout.max_new_tokens` longer than the model's context trained without a word, and a bad prompt or
eval file found only after both models had loaded (and the run directory existed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from opd.cli import app
from opd.config import load_config
from opd.errors import DataError
from opd.evaluation.checks import run_checks
from opd.generation.scoring import (
    NonFiniteOutputError,
    check_finite_probe,
    check_head_projection,
    frozen_head,
)
from opd.models.loading import load_model
from opd.objectives.objective import nonfinite_target_positions
from opd.train.trainer import NonFiniteLossError, OPDTrainer

runner = CliRunner()


def _args(pair: dict[str, Path], run_dir: Path, **extra: Any) -> list[str]:
    base = {
        "student": str(pair["student"]), "teacher": str(pair["teacher"]), "prompts": str(pair["prompts"]),
        "run_dir": str(run_dir), "prompts_per_step": 2, "micro_batch_size": 4, "rollout.rollouts_per_prompt": 2,
        "rollout.max_new_tokens": 6, "rollout.batch_size": 2, "steps": 2, "checkpoint_every": 100,
        "tracking.tensorboard": False, "diagnostics.k": 8, "loss.k": 8, "startup_checks": False,
        "save_final": False,
    }  # fmt: skip
    base.update(extra)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def _out(res: Any) -> str:
    return " ".join((res.output or "").split())


def _damaged_copy(src: Path, dst: Path, edit: Any) -> Path:
    """A copy of the model at `src` whose safetensors tensors went through `edit(dict)` (a damaged download)."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    edit(weights)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _nan_head(w: dict[str, torch.Tensor]) -> None:
    w["lm_head.weight"][3, :] = float("nan")


def _nan_embedding_row(token: int):
    def edit(w: dict[str, torch.Tensor]) -> None:
        w["model.embed_tokens.weight"][token, :] = float("nan")

    return edit


# ---------------------------------------------------------------------------------------------------------
# a NaN model is named as such at start-up


def test_the_probe_names_non_finite_logits_and_the_weights_that_hold_them(tiny_pair, tmp_path):
    teacher = load_model(str(_damaged_copy(tiny_pair["teacher"], tmp_path / "t", _nan_head)))
    with pytest.raises(NonFiniteOutputError, match=r"non-finite logits \(NaN\).*first: lm_head.weight"):
        check_finite_probe(teacher)
    # the head-projection probe no longer calls it a transformed head (it raised "soft-capping" before)
    with pytest.raises(NonFiniteOutputError) as err:
        check_head_projection(teacher, *frozen_head(teacher))
    assert "soft-capping" not in str(err.value)
    check_finite_probe(load_model(str(tiny_pair["teacher"])))  # a sound model passes


@pytest.mark.parametrize("from_hidden", ["true", "false"])
def test_train_refuses_a_nan_teacher_before_any_step(tiny_pair, tmp_path, from_hidden):
    bad = _damaged_copy(tiny_pair["teacher"], tmp_path / "nan_teacher", _nan_head)
    run = tmp_path / "run"
    res = runner.invoke(
        app, ["train", *_args(tiny_pair, run, teacher=bad, **{"loss.from_hidden_states": from_hidden})]
    )
    out = _out(res)
    assert res.exit_code == 2, out
    assert f"teacher {bad}" in out and "non-finite logits (NaN)" in out and "lm_head.weight" in out, out
    assert "soft-capping" not in out and "from_hidden_states false" not in out, out
    assert not (run / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------
# a NaN mid-run says whether the teacher's scores were finite


def _prompt_file(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _mid_run_nan(tiny_pair, tmp_path, *, damage: str, from_hidden: str) -> str:
    """Train with a model whose embedding row of one character is NaN: the start-up probe's ids do not reach it,
    so set-up passes and the first step whose sequences hold it (step 2's prompts, or a sampled "z") is
    non-finite."""
    from opd.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_pair["student"]))
    token = tok.convert_tokens_to_ids("z")
    assert token > 8  # outside the start-up probe's ids 1..8
    prompts = _prompt_file(tmp_path / "p.jsonl", ["1+1=", "2+2=", "zz+1=", "zz+2="])
    role = {"teacher": "teacher", "student": "student"}[damage]
    models = {"student": tiny_pair["student"], "teacher": tiny_pair["teacher"]}
    models[role] = _damaged_copy(models[role], tmp_path / f"nan_{role}", _nan_embedding_row(token))
    cfg = load_config(None, _args({**models, "prompts": prompts}, tmp_path / "run", **{
        "data.shuffle": "false", "loss.from_hidden_states": from_hidden, "data.template": "raw"}))  # fmt: skip
    logs: list[str] = []
    t = OPDTrainer(cfg, log=logs.append)
    t.setup()
    with pytest.raises(NonFiniteLossError) as err:
        t.train()
    return str(err.value)


@pytest.mark.parametrize("from_hidden", ["true", "false"])
def test_a_mid_run_nan_from_the_teacher_is_blamed_on_the_teacher(tiny_pair, tmp_path, from_hidden):
    msg = _mid_run_nan(tiny_pair, tmp_path, damage="teacher", from_hidden=from_hidden)
    assert "at step" in msg and "the NaN comes from the teacher" in msg and "nan_teacher" in msg, msg
    assert "response positions of this step" in msg and "last good checkpoint" in msg, msg


def test_a_mid_run_nan_of_the_student_says_the_teacher_was_finite(tiny_pair, tmp_path):
    msg = _mid_run_nan(tiny_pair, tmp_path, damage="student", from_hidden="true")
    assert "at step" in msg and "the teacher's scores are finite" in msg, msg


def test_non_finite_teacher_positions_count_only_real_problems():
    from opd.objectives.topk import TeacherTopK

    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    hidden = torch.zeros(1, 3, 4)
    hidden[0, 2, 0] = float("nan")  # a padded position: not counted
    assert int(nonfinite_target_positions(torch.zeros(1, 3, 5), mask, 5)) == 0
    from opd.teachers.hf import TeacherHidden

    assert int(nonfinite_target_positions(TeacherHidden(hidden, torch.zeros(5, 4), None), mask, 5)) == 0
    hidden[0, 1, 3] = float("inf")
    assert int(nonfinite_target_positions(TeacherHidden(hidden, torch.zeros(5, 4), None), mask, 5)) == 1
    logits = torch.zeros(1, 3, 7)
    logits[0, 0, 6] = float("nan")  # a padded vocabulary row past the shared vocabulary: not counted
    assert int(nonfinite_target_positions(logits, mask, 6)) == 0
    lp = torch.full((1, 3, 2), -1.0)
    lp[0, 0, 1] = float("-inf")  # an emptied top-K slot is legitimate
    top = TeacherTopK(torch.zeros(1, 3, 2, dtype=torch.long), lp, torch.full((1, 3), float("-inf")))
    assert int(nonfinite_target_positions(top, mask, 6)) == 0
    lp[0, 1, 0] = float("nan")
    assert int(nonfinite_target_positions(top, mask, 6)) == 1


# ---------------------------------------------------------------------------------------------------------
# prompt + response longer than the context


def _short_context_copy(src: Path, dst: Path, ctx: int) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_position_embeddings"] = ctx  # rotary positions: the weights do not depend on it
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_max_new_tokens_past_the_context_is_clamped_and_recorded(tiny_pair, tmp_path):
    teacher = _short_context_copy(tiny_pair["teacher"], tmp_path / "t", 40)
    run = tmp_path / "run"
    logs: list[str] = []
    t = OPDTrainer(load_config(None, _args(tiny_pair, run, teacher=teacher, **{"rollout.max_new_tokens": 64})),
                   log=logs.append)  # fmt: skip
    t.setup()
    longest = max(len(p) for p in t.prompt_ids)
    assert t.max_new_tokens == 40 - longest and t.sampling.max_new_tokens == 40 - longest
    warned = [m for m in logs if "rollout.max_new_tokens=64" in m]
    assert (
        warned
        and "teacher's context (40 tokens" in warned[0]
        and f"longest prompt ({longest} tokens)" in warned[0]
    )
    assert f"using rollout.max_new_tokens={40 - longest}" in warned[0] and "adjustments.json" in warned[0]
    recorded = json.loads((run / "adjustments.json").read_text())["adjustments"]
    assert [(a["setting"], a["asked"], a["used"]) for a in recorded] == [
        ("rollout.max_new_tokens", 64, 40 - longest)
    ]
    rows = t.train()
    assert all(r["len_max"] <= 40 - longest for r in rows if "len_max" in r)


def test_a_prompt_that_fills_the_context_is_an_error_naming_it(tiny_pair, tmp_path):
    student = _short_context_copy(tiny_pair["student"], tmp_path / "s", 12)
    prompts = _prompt_file(tmp_path / "p.jsonl", ["1+1=", "what is 1234 + 5678 + 9012?"])
    res = runner.invoke(app, ["train", *_args({**tiny_pair, "student": student, "prompts": prompts},
                                              tmp_path / "run", **{"data.template": "raw"})])  # fmt: skip
    out = _out(res)
    assert res.exit_code == 2, out
    assert "p.jsonl:2: prompt is" in out and "fills the student's context (12 tokens" in out, out


def test_a_context_with_room_records_nothing(tiny_pair, tmp_path):
    t = OPDTrainer(load_config(None, _args(tiny_pair, tmp_path / "run")), log=lambda m: None)
    t.setup()
    assert t.adjustments == [] and t.max_new_tokens == 6


# ---------------------------------------------------------------------------------------------------------
# the prompt and eval files are read before any model loads


@pytest.fixture
def no_model_loads(monkeypatch):
    """Make any model or tokenizer load fail loudly: the error under test must come first."""

    def refuse(*a: Any, **kw: Any) -> None:
        raise AssertionError("a model was loaded before the input files were checked")

    monkeypatch.setattr("opd.train.parts.load_pair", refuse)
    monkeypatch.setattr("opd.models.loading.load_pair_tokenizers", refuse)
    monkeypatch.setattr("opd.models.loading.load_pair", refuse)


def test_train_reads_the_prompt_file_before_the_models(tiny_pair, tmp_path, no_model_loads):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"\n', encoding="utf-8")
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        OPDTrainer(load_config(None, _args({**tiny_pair, "prompts": bad}, run))).setup()
    assert not run.exists()


def test_an_eval_file_without_answers_is_found_before_the_models_and_the_run_dir(tiny_pair, tmp_path,
                                                                                   no_model_loads):  # fmt: skip
    evals = _prompt_file(tmp_path / "eval.jsonl", ["1+1=", "2+2="])
    run = tmp_path / "run"
    cfg = load_config(None, _args(tiny_pair, run, **{"eval.prompts": evals, "eval.every": 1}))
    with pytest.raises(DataError, match=r"eval.jsonl:1: record has no answer"):
        OPDTrainer(cfg).setup()
    assert not run.exists()
    # with eval.every 0 the file is not used, so it is not judged
    cfg = load_config(None, _args(tiny_pair, run, **{"eval.prompts": evals, "eval.every": 0}))
    with pytest.raises(AssertionError, match="a model was loaded"):
        OPDTrainer(cfg).setup()


def test_check_reads_the_prompt_file_before_the_models(tiny_pair, tmp_path, no_model_loads):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        run_checks(str(tiny_pair["student"]), str(tiny_pair["teacher"]), prompts=bad, device="cpu")
