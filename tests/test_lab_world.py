"""The lab world: problems, both thinking patterns, answer parsing, verifier, tokenizer."""

from __future__ import annotations

import json

import pytest

from opd.evaluation.verify import Verdict, get_verifier
from opd.lab.world import (
    CHARSET,
    LEVELS,
    MAX_NEW_TOKENS,
    PATTERNS,
    LabVerifier,
    Problem,
    build_lab_tokenizer,
    eval_problems,
    heldout_prompts,
    make_problems,
    parse_answer,
    parse_prompt,
    pattern_of,
    solution,
    write_prompt_file,
)


def test_problem_fields_and_prompt_roundtrip() -> None:
    p = Problem(numbers=(12, 35, 80), level=3)
    assert p.prompt == "12+35+80=" and p.answer == "127"
    assert parse_prompt(p.prompt) == p
    with pytest.raises(ValueError):
        parse_prompt("12+35")


def test_solutions_of_both_patterns() -> None:
    p = Problem(numbers=(12, 35, 80), level=3)
    assert solution(p, "A") == "12+35=47;47+80=127;#127"
    assert solution(p, "B") == "t1+3+8=12;u2+5+0=7;120+7=127;#127"
    with pytest.raises(ValueError):
        solution(p, "C")  # type: ignore[arg-type]


@pytest.mark.parametrize("level", LEVELS)
def test_make_problems_distinct_level_and_exclusion(level: int) -> None:
    probs = make_problems(level, 300, seed=1)
    assert len({p.prompt for p in probs}) == 300
    assert all(p.level == level and len(p.numbers) == level for p in probs)
    assert all(10 <= x <= 99 for p in probs for x in p.numbers)
    assert make_problems(level, 300, seed=1) == probs  # deterministic
    excluded = {p.prompt for p in probs[:150]}
    again = make_problems(level, 300, seed=1, exclude=excluded)
    assert not excluded & {p.prompt for p in again}


def test_heldout_problems_are_fixed_and_excluded() -> None:
    held = heldout_prompts()
    assert len(held) == sum(len(eval_problems(lv)) for lv in LEVELS)
    # Level 2 has only 8,100 problems: drawing most of them must still avoid every held-out one.
    train = make_problems(2, 7000, seed=3, exclude=held)
    assert not held & {p.prompt for p in train}
    with pytest.raises(ValueError):
        make_problems(2, 8100, seed=3, exclude=held)


@pytest.mark.parametrize("level", LEVELS)
def test_both_patterns_reach_the_answer_and_are_recognised(level: int) -> None:
    tok = build_lab_tokenizer()
    for p in make_problems(level, 50, seed=7):
        texts = {pat: solution(p, pat) for pat in PATTERNS}
        assert texts["A"] != texts["B"]
        for pat, text in texts.items():
            assert parse_answer(text) == p.answer
            assert pattern_of(text) == pat
            assert pattern_of(text, p.prompt) == pat
            assert set(text) <= set(CHARSET)
            ids = tok(p.prompt + text)["input_ids"]
            assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
            assert tok.decode(ids, skip_special_tokens=True) == p.prompt + text
            assert len(ids) - len(tok(p.prompt)["input_ids"]) + 1 <= MAX_NEW_TOKENS // 2  # +1: EOS


def test_pattern_of_rejects_wrong_or_malformed() -> None:
    p = Problem(numbers=(12, 35), level=2)
    assert pattern_of("12+35=48;#48", p.prompt) is None  # right shape, wrong arithmetic
    assert pattern_of("12+35=48;#48") == "A"  # shape only
    assert pattern_of("47") is None and pattern_of("") is None
    assert pattern_of("t1+3=4;u2+5=7;40+7=47;#47", p.prompt) == "B"


def test_parse_answer_is_strict() -> None:
    assert parse_answer("12+35=47;#47") == "47"
    assert parse_answer("#47") == "47"
    assert parse_answer("12+35=47;#47;") is None
    assert parse_answer("12+35=47;#47#47") is None  # did not stop after the answer
    assert parse_answer("12+35=47") is None
    assert parse_answer("12+35=47;#") is None


def test_lab_verifier_through_get_verifier() -> None:
    v = get_verifier("opd.lab.world:LabVerifier")
    ok = v("12+35=47;#47", "47")
    assert isinstance(ok, Verdict) and ok.correct and ok.extracted == "47"
    bad = v("12+35=48;#48", "47")
    assert not bad.correct and bad.reason == "mismatch"
    none = v("12+35=47;47+", "47")
    assert not none.correct and none.extracted is None
    assert LabVerifier()("t1+3=4;u2+5=7;40+7=47;#47", "47").correct


def test_tokenizer_is_small_and_has_specials() -> None:
    tok = build_lab_tokenizer()
    assert len(tok) < 40
    assert None not in (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3


def test_write_prompt_file_is_readable_by_opd(tmp_path) -> None:
    from opd.data import load_prompts

    probs = make_problems(3, 5, seed=0)
    path = write_prompt_file(tmp_path / "p.jsonl", probs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"prompt": probs[0].prompt, "answer": probs[0].answer, "level": 3}
    recs = load_prompts(path)
    assert [r.text for r in recs] == [p.prompt for p in probs]
    assert [r.answer for r in recs] == [p.answer for p in probs]
