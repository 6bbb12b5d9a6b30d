"""The lab world: verifiable multi-step addition with two thinking patterns and difficulty levels.

Why this task: OPD's phenomenology (paper brief §3) needs (a) two solution formats that reach the same
answer through different intermediate tokens, so that a teacher trained on one pattern puts little mass
on the other pattern's tokens at the student's states, and (b) levels, so a teacher can hold a capability
the student lacks. Summing N two-digit numbers gives both with a vocabulary of 16 symbols, solutions of
10-45 tokens, and exact answer checking, which keeps every model small enough to train on a laptop CPU.

A problem of level N is N numbers in 10..99; the prompt is the plain text ``a+b+...=`` (prompt template
``raw``; the tokenizer adds BOS). Two patterns:

* ``A``, left-to-right running sum: ``12+35+80=`` -> ``12+35=47;47+80=127;#127``
* ``B``, column sums then combine: ``12+35+80=`` -> ``t1+3+8=12;u2+5+0=7;120+7=127;#127``
  (tens digits, units digits, then tens*10 + units). B starts with a different symbol and never writes a
  partial sum of whole numbers, so the two patterns disagree from the first response token on.

Every response ends with a single ``#answer`` segment; the model then emits EOS (the tokenizer's EOS is
the training target after the answer, and generation stops on it).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import PreTrainedTokenizerFast

from opd.evaluation.verify import Verdict

__all__ = [
    "CHARSET",
    "EVAL_PROBLEMS_PER_LEVEL",
    "EVAL_SEED",
    "LEVELS",
    "LabVerifier",
    "MAX_NEW_TOKENS",
    "PATTERNS",
    "Problem",
    "build_lab_tokenizer",
    "eval_problems",
    "heldout_prompts",
    "make_problems",
    "parse_answer",
    "parse_prompt",
    "pattern_of",
    "solution",
    "write_prompt_file",
]

Pattern = Literal["A", "B"]
PATTERNS: tuple[Pattern, ...] = ("A", "B")
LEVELS: tuple[int, ...] = (2, 3, 4, 5)
"""Number of addends; level 2 has only 90**2 = 8,100 distinct problems, level 5 about 5.9e9."""

LOW, HIGH = 10, 99  # two-digit addends: both patterns need exactly a tens and a units column
CHARSET = "0123456789+=;#tu"
"""Every symbol of prompts and solutions of both patterns (with pad/bos/eos/unk: a few dozen ids)."""

EVAL_SEED = 20240613
EVAL_PROBLEMS_PER_LEVEL = 200
MAX_NEW_TOKENS = 96
"""Response budget for lab generation: about twice the longest solution (level 5, pattern A: 48 tokens
with EOS), so a response only hits the budget when the model fails to stop (see `LabVerifier`)."""


@dataclass(frozen=True)
class Problem:
    """One addition problem; `prompt` is what the model sees, `answer` the gold final answer."""

    numbers: tuple[int, ...]
    level: int
    prompt: str = field(default="")
    answer: str = field(default="")

    def __post_init__(self) -> None:
        nums = tuple(int(x) for x in self.numbers)
        object.__setattr__(self, "numbers", nums)
        if not self.prompt:
            object.__setattr__(self, "prompt", "+".join(map(str, nums)) + "=")
        if not self.answer:
            object.__setattr__(self, "answer", str(sum(nums)))


_PROMPT_RE = re.compile(r"^(\d+(?:\+\d+)+)=$")


def parse_prompt(prompt: str) -> Problem:
    """The Problem of a prompt string ``a+b+...=`` (ValueError for anything else)."""
    m = _PROMPT_RE.match(prompt.strip())
    if not m:
        raise ValueError(f"not a lab prompt: {prompt!r} (expected e.g. '12+35+80=')")
    nums = tuple(int(x) for x in m.group(1).split("+"))
    return Problem(numbers=nums, level=len(nums))


def solution(problem: Problem, pattern: Pattern) -> str:
    """The canonical response of `pattern` for `problem`, ending in ``#answer`` (no EOS)."""
    nums = problem.numbers
    total = sum(nums)
    if pattern == "A":
        steps = []
        acc = nums[0]
        for x in nums[1:]:
            steps.append(f"{acc}+{x}={acc + x}")
            acc += x
        return ";".join(steps) + f";#{total}"
    if pattern == "B":
        tens = [x // 10 for x in nums]
        units = [x % 10 for x in nums]
        st, su = sum(tens), sum(units)
        return (
            f"t{'+'.join(map(str, tens))}={st};u{'+'.join(map(str, units))}={su};"
            f"{st * 10}+{su}={st * 10 + su};#{total}"
        )
    raise ValueError(f"unknown pattern {pattern!r}; use 'A' or 'B'")


def make_problems(level: int, n: int, *, seed: int, exclude: Iterable[str] | set[str] = ()) -> list[Problem]:
    """`n` distinct problems of `level`, none of whose prompts is in `exclude` (held-out sets).

    Distinctness and exclusion are by prompt string, which is what a model sees; order of addends
    matters (``12+35=`` and ``35+12=`` are different prompts with different pattern-A solutions).
    """
    if level < 2:
        raise ValueError(f"level {level}: a problem needs at least 2 addends")
    excluded = set(exclude)
    space = (HIGH - LOW + 1) ** level
    if n > space - len(excluded):
        raise ValueError(f"level {level} has {space} problems; cannot draw {n} distinct ones outside exclude")
    rng = random.Random(f"{seed}:{level}")
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < n:
        p = Problem(numbers=tuple(rng.randint(LOW, HIGH) for _ in range(level)), level=level)
        if p.prompt in seen or p.prompt in excluded:
            continue
        seen.add(p.prompt)
        out.append(p)
    return out


def eval_problems(level: int, n: int = EVAL_PROBLEMS_PER_LEVEL) -> list[Problem]:
    """The fixed held-out evaluation problems of a level (no training set may contain them)."""
    return make_problems(level, n, seed=EVAL_SEED)


def heldout_prompts(levels: Sequence[int] = LEVELS) -> set[str]:
    """Prompt strings of every held-out evaluation problem: pass as `exclude` when making training data."""
    return {p.prompt for lv in levels for p in eval_problems(lv)}


def write_prompt_file(path: str | Path, problems: Sequence[Problem]) -> Path:
    """A JSONL prompt file (`prompt`, `answer`, `level`) that `opd eval`/`opd train` read as is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": p.prompt, "answer": p.answer, "level": p.level}) for p in problems]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


_ANSWER_RE = re.compile(r"(?:^|;)#(\d+)$")


def parse_answer(response: str) -> str | None:
    """The value of the final ``#answer`` segment, or None.

    Strict on purpose: the response must end with ``#digits`` right after a ``;`` (or be only that), and
    contain no other ``#``. A model that fails to stop after its answer writes more symbols, so its
    response no longer ends in a lone ``#answer`` and counts as no answer.
    """
    text = response.strip()
    if text.count("#") != 1:
        return None
    m = _ANSWER_RE.search(text)
    return m.group(1) if m else None


_FORMAT_RE: dict[str, re.Pattern[str]] = {
    "A": re.compile(r"^(?:\d+\+\d+=\d+;)+#\d+$"),
    "B": re.compile(r"^t\d(?:\+\d)+=\d+;u\d(?:\+\d)+=\d+;\d+\+\d+=\d+;#\d+$"),
}


def pattern_of(response: str, prompt: str | None = None) -> Pattern | None:
    """Which pattern a response follows, or None.

    With `prompt`, the response must equal that pattern's canonical solution exactly (format
    exact-match, arithmetic included); without it, only the shape of the pattern is checked, so a
    well-formed but miscomputed response still counts as its pattern.
    """
    text = response.strip()
    if prompt is not None:
        problem = parse_prompt(prompt)
        for pat in PATTERNS:
            if text == solution(problem, pat):
                return pat
        return None
    for pat in PATTERNS:
        if _FORMAT_RE[pat].match(text):
            return pat
    return None


class LabVerifier:
    """Grader for lab problems: correct iff the response's ``#answer`` equals the gold answer.

    Use as ``opd.evaluation.verify.get_verifier("opd.lab.world:LabVerifier")`` (instantiated without arguments).
    The intermediate steps are not graded (a wrong step with a right answer counts as right, as with
    outcome rewards in the paper). Truncated responses (no EOS within the budget) are graded on their
    text like any other, which is opd.evaluation.eval's convention; with `MAX_NEW_TOKENS` at twice the longest
    solution, a response that hits the budget has written past its answer, so it cannot end in a lone
    ``#answer`` (see `parse_answer`) and counts wrong: in effect an answer counts only when EOS came.
    """

    name = "lab"

    def __call__(self, response: str, answer: str) -> Verdict:
        got = parse_answer(response)
        if got is None:
            return Verdict(False, None, "no final answer")
        ok = got == str(answer).strip()
        return Verdict(ok, got, "" if ok else "mismatch")


def build_lab_tokenizer() -> PreTrainedTokenizerFast:
    """A real character-level fast tokenizer over `CHARSET` with pad/bos/eos/unk (ids 0..3).

    Reuses `opd.models.tiny.build_tiny_tokenizer`, so it also carries the tiny chat template and role tokens;
    lab prompts use the ``raw`` template, where the tokenizer only prepends BOS.
    """
    from opd.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(charset=CHARSET)
