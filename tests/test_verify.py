"""Answer extraction and verifiers, against the real math-verify package."""

from __future__ import annotations

import sys
import textwrap
import threading

import pytest

from opd.errors import ConfigError
from opd.evaluation.verify import (
    ExactVerifier,
    MathVerifier,
    Verdict,
    VerifierError,
    extract_final_answer,
    extract_last_number,
    get_verifier,
    normalize_answer,
    safe_verify,
)


@pytest.fixture(scope="module")
def math_v() -> MathVerifier:
    return get_verifier("math")


# ---------------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is \boxed{42}.", "42"),
        (r"first \boxed{1}, then corrected: \boxed{2}", "2"),  # last box counts
        (r"\boxed{\frac{a}{b}}", r"\frac{a}{b}"),  # nested braces
        (r"\boxed{\left(\frac{1}{2}, \sqrt{3}\right)}", r"\left(\frac{1}{2}, \sqrt{3}\right)"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not close the box
        (r"\fbox{7}", "7"),
        (r"\boxed {8}", "8"),
        (r"\boxed{3} and a truncated \boxed{\frac{1}{", "3"),  # an unclosed last box falls back
        ("reasoning...\nAnswer: 42", "42"),
        ("Answer: 1\nmore thoughts\nAnswer: $\\frac{3}{4}$", r"\frac{3}{4}"),
        ("**Answer:** 17.", "17"),
        ("Final answer: -5", "-5"),
        ("the result is 42", None),  # bare numbers are not answers
        ("", None),
        (r"\boxed{1} ... Answer: 2", "1"),  # a box beats an Answer: line
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_normalize_answer():
    assert normalize_answer(r"$\text{ 12,000 }.$") == "12000"
    assert normalize_answer(r"\left( 1, 2 \right)") == "(1,2)"
    assert normalize_answer(r"\dfrac{1}{2}") == r"\frac{1}{2}"
    assert normalize_answer("5 cm") == "5cm"  # unit words stay in plain string comparison


# ---------------------------------------------------------------------------------------------------
# The math verifier (real math-verify)


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{1/2}", r"\frac12"),
        (r"\boxed{\dfrac{3}{4}}", "0.75"),
        (r"\boxed{\left( 1, 2 \right)}", "(1,2)"),  # tuple / interval with \left \right
        (r"\boxed{\{3, 1, 2\}}", r"\{1,2,3\}"),  # sets compare unordered
        (r"\boxed{-3}", "-3"),
        (r"\boxed{x^2+2x+1}", "(x+1)^2"),  # symbolic equality
        (r"\boxed{5 \text{ cm}}", "5"),  # units dropped (math-verify's unit normalisation)
        (r"\boxed{5 cm}", "5"),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2"),
        (r"\boxed{12,000}", "12000"),
        ("so:\nAnswer: 42", "42"),
        ("Answer: $\\frac{3}{4}$", "0.75"),
        (r"\boxed{1} no wait \boxed{2}", "2"),
        (r"\boxed{\text{(B)}}", "(B)"),  # string fallback for non-math answers
        ("\\boxed{7}", 7),  # numeric gold (from a JSON number)
    ],
)
def test_math_verifier_accepts_equivalent(math_v, response, gold):
    v = math_v(response, gold)
    assert v.correct, v


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        (r"\boxed{-3}", "3"),  # sign matters
        (r"\boxed{43}", "42"),
        (r"\boxed{2} no wait \boxed{1}", "2"),  # the last box counts, even if an earlier one was right
        (r"\boxed{\frac{1}{3}}", "0.33"),
    ],
)
def test_math_verifier_rejects_wrong(math_v, response, gold):
    v = math_v(response, gold)
    assert not v.correct and v.reason == "mismatch" and v.extracted is not None, v


def test_no_answer(math_v):
    assert math_v("I think it is probably 42", "42") == Verdict(False, None, "no final answer")
    assert ExactVerifier()("nothing here", "1") == Verdict(False, None, "no final answer")


def test_exact_verifier_is_string_based():
    v = get_verifier("exact")
    assert v.name == "exact"
    assert v(r"\boxed{ Paris }", "paris").correct
    assert v(r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}").correct
    assert not v(r"\boxed{0.5}", r"\frac{1}{2}").correct  # no math equivalence
    assert not v(r"\boxed{5 cm}", "5").correct


def test_math_verifier_in_worker_thread(math_v):
    """math-verify's signal timeouts fail outside the main thread; ours switches them off there."""
    results: dict[int, list[bool]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            cases = [(r"\boxed{\frac{1}{2}}", "0.5"), (r"\boxed{x^2+2x+1}", "(x+1)^2"), (r"\boxed{3}", "4")]
            results[i] = [math_v(r, g).correct for r, g in cases]
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == {i: [True, True, False] for i in range(3)}


def test_math_verify_signal_timeouts_really_fail_in_threads():
    """Guard for the premise: with math-verify's own timeouts, parsing in a worker thread raises."""
    import math_verify

    caught: list[BaseException] = []

    def work() -> None:
        try:
            math_verify.parse("$1/2$", parsing_timeout=5, raise_on_error=True)
        except BaseException as exc:
            caught.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert caught and "thread" in str(caught[0])


# ---------------------------------------------------------------------------------------------------
# Pluggable verifiers and errors


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_grader.py").write_text(
        textwrap.dedent(
            """
            from opd.evaluation.verify import Verdict

            def contains(response, answer):
                return answer in response

            def full(response, answer):
                return Verdict(response.strip() == answer, response.strip(), "custom")

            def boom(response, answer):
                raise RuntimeError("grader exploded")

            class Lenient:
                name = "lenient"
                def __call__(self, response, answer):
                    return Verdict(True, None, "always")

            class NeedsArgs:
                def __init__(self, x):
                    pass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_grader"
    sys.modules.pop("my_grader", None)


def test_custom_verifier_callable(plugin_module):
    v = get_verifier(f"{plugin_module}:contains")
    assert v.name == "my_grader:contains"
    good = v(r"it is \boxed{42}", "42")
    assert good.correct and good.extracted == "42"
    assert not v("it is 41", "42").correct
    full = get_verifier(f"{plugin_module}:full")
    assert full("x", "x") == Verdict(True, "x", "custom")


def test_custom_verifier_class(plugin_module):
    v = get_verifier(f"{plugin_module}:Lenient")
    assert v("anything", "1") == Verdict(True, None, "always")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("no_such_module_xyz:f", "cannot import module"),
        ("my_grader:missing", "has no attribute"),
        ("my_grader:NeedsArgs", "cannot instantiate"),
        ("nonsense", "unknown verifier"),
        (":f", "expected math"),
    ],
)
def test_bad_verifier_specs(plugin_module, spec, needle):
    with pytest.raises(ConfigError, match=needle):
        get_verifier(spec)


def test_raising_verifier_is_counted_not_fatal(plugin_module):
    v = get_verifier(f"{plugin_module}:boom")
    verdict = safe_verify(v, r"\boxed{3}", "3")
    assert not verdict.correct
    assert verdict.extracted == "3"
    assert verdict.reason.startswith("verifier error: RuntimeError: grader exploded")
    with pytest.raises(VerifierError, match="grader exploded") as info:
        safe_verify(v, r"\boxed{3}", "3", strict=True)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_safe_verify_passes_verdicts_through(math_v):
    assert safe_verify(math_v, r"\boxed{2}", "2") == Verdict(True, "2", "")


def test_math_flexible_falls_back_to_last_number():
    strict, flex = get_verifier("math"), get_verifier("math-flexible")
    assert flex.name == "math-flexible"
    assert extract_last_number("7 + 5 = 12.") == "12"
    assert extract_last_number("it costs -3,000 or 1/2") == "1/2"
    assert extract_last_number("no digits") is None
    assert not strict("7 + 5 = 12.", "12").correct
    v = flex("7 + 5 = 12.", "12")
    assert v.correct and v.extracted == "12"
    assert flex(r"maybe 12, but \boxed{13}", "12").extracted == "13"  # a box still wins
    assert flex("no idea", "12") == Verdict(False, None, "no final answer")
