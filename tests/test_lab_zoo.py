"""The lab zoo: shipped models load through the ordinary loader, checksums hold, recorded structure."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from opd.errors import ModelError
from opd.lab import zoo as z
from opd.lab.world import (
    LEVELS,
    MAX_NEW_TOKENS,
    LabVerifier,
    build_lab_tokenizer,
    eval_problems,
    heldout_prompts,
    make_problems,
    solution,
)
from opd.models.loading import load_model, load_tokenizer

shipped = pytest.mark.skipif(
    not (z.ZOO_DIR / z.MANIFEST).is_file(), reason="no shipped lab zoo (run `opd lab build`)"
)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return z.load_manifest()


def _acc(manifest: dict, name: str, level: int, mode: str = "greedy") -> float:
    return manifest["models"][name]["accuracy"][mode][str(level)]["acc"]


def test_unknown_lab_model_names_the_known_ones() -> None:
    with pytest.raises(ModelError) as err:
        load_model("lab:nope")
    for name in z.ZOO_NAMES:
        assert name in str(err.value)


def test_batcher_encoding_equals_the_tokenizer() -> None:
    tok = build_lab_tokenizer()
    spec = z.SPECS["teacher_incompatible"]
    batcher = z._Batcher(spec, tok, heldout_prompts())
    for _ in range(20):
        p = batcher.problem()
        ids, labels = batcher.encode(p)
        assert ids == tok(p.prompt + solution(p, "B"))["input_ids"] + [tok.eos_token_id]
        n_prompt = len(tok(p.prompt)["input_ids"])
        assert labels[:n_prompt] == [z.IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        assert p.prompt not in batcher.exclude


@shipped
def test_shipped_student_loads_and_solves_an_easy_problem() -> None:
    tok = load_tokenizer("lab:student")
    model = load_model("lab:student")
    assert tok.get_vocab() == build_lab_tokenizer().get_vocab()
    p = eval_problems(2)[0]
    ids = torch.tensor([tok(p.prompt)["input_ids"]])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    new = out[0, ids.shape[1] :].tolist()
    assert new[-1] == tok.eos_token_id
    text = tok.decode(new, skip_special_tokens=True)
    assert text == solution(p, "A")
    assert LabVerifier()(text, p.answer).correct


@shipped
def test_shipped_manifest_checksums_verify() -> None:
    assert z.verify_zoo() == []
    total = sum(p.stat().st_size for p in z.ZOO_DIR.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024


@shipped
def test_shipped_eval_files_are_the_heldout_problems(manifest: dict) -> None:
    for level in LEVELS:
        rows = [json.loads(x) for x in z.eval_prompt_path(level).read_text().splitlines()]
        assert [r["prompt"] for r in rows] == [p.prompt for p in eval_problems(level)]
        assert {r["level"] for r in rows} == {level}


@shipped
def test_shipped_zoo_has_the_intended_structure(manifest: dict) -> None:
    gap = manifest["world"]["gap_level"]
    hard = max(manifest["world"]["levels"])
    # The student is good on the easy levels and partly inside the gap (some support, not solved).
    assert _acc(manifest, "student", 2) >= 0.9
    assert 0.05 <= _acc(manifest, "student", gap, "t1") <= 0.6
    # The compatible novel teacher brings the new capability, in the student's pattern.
    assert _acc(manifest, "teacher_novel", gap) >= _acc(manifest, "student", gap) + 0.3
    assert _acc(manifest, "teacher_novel", hard) >= 0.5
    novel = manifest["models"]["teacher_novel"]["accuracy"]["greedy"][str(gap)]
    assert novel["format_A"] >= 0.5 and novel["format_B"] == 0.0
    # The same-pipeline big teacher: more parameters, the student's data mix, higher scores where the
    # student has support (the gap level), nothing on the level neither has seen (no new capability).
    big = manifest["models"]["teacher_big"]
    assert big["train"]["params"] > 2 * manifest["models"]["student"]["train"]["params"]
    assert big["spec"]["mix"] == manifest["models"]["student"]["spec"]["mix"]
    assert _acc(manifest, "teacher_big", gap) >= _acc(manifest, "student", gap) + 0.1
    assert _acc(manifest, "teacher_big", hard) <= 0.05
    assert big["accuracy"]["greedy"][str(gap)]["format_B"] == 0.0
    # The incompatible teacher is strong on hard levels, in pattern B only.
    inc = manifest["models"]["teacher_incompatible"]["accuracy"]["greedy"]
    assert inc[str(gap)]["acc"] >= _acc(manifest, "student", gap) + 0.2
    assert inc[str(hard)]["acc"] >= 0.4  # the student has 0 there
    assert all(inc[str(lv)]["format_A"] == 0.0 for lv in manifest["world"]["levels"])
    assert inc[str(gap)]["format_B"] >= 0.5
    # At the student's states the compatible teacher agrees more than the incompatible one.
    d = manifest["gap_diagnostics"]["teachers"]
    assert (
        d["teacher_novel"]["k4/overlap_mass_teacher"] > d["teacher_incompatible"]["k4/overlap_mass_teacher"]
    )
    assert d["teacher_novel"]["reverse_kl"] < d["teacher_incompatible"]["reverse_kl"]


def test_tiny_build_writes_a_verifiable_zoo(tmp_path) -> None:
    """The whole build path on 3-step models: files, manifest, checksums, tamper detection, refusal."""
    specs = {
        name: dataclasses.replace(s, steps=3, warmup=1, batch=8, hidden=16, ffn=32, layers=1, heads=2)
        if s.init_from is None
        else dataclasses.replace(s, steps=2, warmup=1, batch=8)
        for name, s in z.SPECS.items()
    }
    m = z.build_zoo(tmp_path / "zoo", specs=specs, eval_n=4, diag_n=4, max_new_tokens=6, threads=1)
    root = tmp_path / "zoo"
    assert z.verify_zoo(root) == []
    for name in z.ZOO_NAMES:
        assert (root / name / "model.safetensors").is_file()
        assert z.zoo_path(name, root) == root / name
        acc = m["models"][name]["accuracy"]
        assert set(acc) == {"greedy", "t1"} and set(acc["greedy"]) == {str(lv) for lv in LEVELS}
    assert set(m["gap_diagnostics"]["teachers"]) == set(z.ZOO_NAMES) - {"student"}
    assert "k4/overlap_ratio" in m["gap_diagnostics"]["teachers"]["teacher_novel"]
    assert m["models"]["teacher_novel"]["spec"]["init_from"] == "student"
    with pytest.raises(ModelError):
        z.build_zoo(root, specs=specs, eval_n=4, diag_n=4, max_new_tokens=6)  # exists, no force
    (root / "student" / "config.json").write_text("{}")
    assert z.verify_zoo(root) == ["checksum mismatch: student/config.json"]
    (root / "extra.txt").write_text("x")
    assert "not in manifest: extra.txt" in z.verify_zoo(root)


def test_training_data_never_contains_heldout_problems() -> None:
    tok = build_lab_tokenizer()
    held = heldout_prompts()
    batcher = z._Batcher(z.SPECS["student"], tok, held)
    drawn = [batcher.problem() for _ in range(3000)]
    assert not held & {p.prompt for p in drawn}
    assert {p.level for p in drawn} <= set(z.SPECS["student"].mix)
    # make_problems with the same exclusion is how experiments draw OPD prompts
    assert not held & {p.prompt for p in make_problems(4, 500, seed=9, exclude=held)}
