"""Answer verifiers: decide whether a model response reaches the reference answer.

Accuracy (avg@k, pass@k, gap recovery) is only as good as the grader, so the rules are explicit:

* The *final answer* of a response is the content of its LAST ``\\boxed{...}`` / ``\\fbox{...}``
  (balanced braces, so ``\\boxed{\\frac{a}{b}}`` works); if there is none, the last ``Answer: ...``
  line (the DAPO prompt format), with surrounding ``$...$`` stripped; otherwise there is no answer and
  the response is wrong ("no final answer"). Bare numbers at the end of a response are NOT taken:
  guessing answers out of free text rewards rambling and makes no-answer rates meaningless.
* ``math``: the extracted answer and the gold answer are parsed with math-verify (LaTeX and plain
  expression grammars) and compared symbolically (``1/2 == \\frac{1}{2} == 0.5``, sets, tuples,
  intervals). math-verify's unit normalisation drops unit words (``5 cm`` and ``5\\text{ cm}`` equal
  ``5``) -- the usual convention for competition math, where gold answers carry no units. If
  math-verify cannot parse either side, the normalised strings are compared (see `normalize_answer`).
  math-verify is lenient on brackets: ``(1,2)`` and ``\\{1,2\\}`` compare equal.
* ``math-flexible``: like ``math``, but a response with neither a box nor an ``Answer:`` line is graded on
  its last number (as lm-eval's "flexible-extract" does for GSM8K). For small or base models that do not
  follow the answer format; ``no_answer_rate`` then counts responses without any number.
* ``exact``: normalised string equality only.
* ``package.module:callable``: your own grader, a callable ``(response, answer) -> Verdict | bool`` or a
  class that is instantiated without arguments to give one.

math-verify guards its sympy work with ``signal.alarm`` timeouts, which only work in the main thread
(elsewhere ``signal.signal`` raises). We use its timeouts in the main thread and switch them off in any
other thread (e.g. a data-loader or a thread pool), so the same verifier works everywhere.

A verifier that raises must not kill an hour-long evaluation: `safe_verify` turns the exception into a
wrong `Verdict` whose reason starts with ``"verifier error:"`` (eval counts them), unless ``strict``.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from opd.errors import ConfigError, OpdError

__all__ = [
    "Verdict",
    "Verifier",
    "ExactVerifier",
    "MathVerifier",
    "extract_final_answer",
    "extract_last_number",
    "get_verifier",
    "normalize_answer",
    "UNPARSED_WARN_SHARE",
    "mostly_unparsed",
    "verifier_name",
    "prediction_unparsed",
    "reference_parses",
    "unparsed_references_message",
    "unparsed_responses_message",
    "safe_verify",
    "VERIFIER_ERROR",
    "VerifierError",
]

VERIFIER_ERROR = "verifier error"
NO_ANSWER = "no final answer"
# Verdict reasons of the math verifier when math-verify cannot parse one side (then strings are compared).
UNPARSED_REFERENCE = "unparsed reference"
UNPARSED_ANSWER = "unparsed answer"
UNPARSED_BOTH = "unparsed reference and answer"


class VerifierError(OpdError):
    """A verifier raised and the caller asked for strict grading (the original exception is chained)."""


@dataclass
class Verdict:
    """The grade of one response; `extracted` makes wrong grades debuggable from the samples file."""

    correct: bool
    extracted: str | None  # the final answer found in the response, None if none
    reason: str = ""  # e.g. "no final answer", "mismatch", "verifier error: ..."


@runtime_checkable
class Verifier(Protocol):
    """Anything with a name that grades ``(response, answer)``."""

    name: str

    def __call__(self, response: str, answer: str) -> Verdict: ...


# ----------------------------------------------------------------------------------------------------
# Extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "Answer: x" at the start of a line, tolerating markdown emphasis ("**Answer:** x", "**Answer**: x").
_ANSWER_RE = re.compile(r"(?im)^[ \t>*#_]*(?:final\s+)?answer\s*[*_]{0,2}\s*[:：]\s*[*_]{0,2}\s*(.+?)\s*$")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}/\\fbox{...} with balanced braces (None if unclosed / absent)."""
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    for start in reversed(starts):  # an unclosed last box (truncated response) falls back to earlier ones
        depth = 1
        i = start
        while i < len(text):
            ch = text[i]
            if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                i += 2  # escaped brace, as in \boxed{\{1,2\}}
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
            i += 1
    return None


def _strip_math_delimiters(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            return s[len(left) : len(s) - len(right)].strip()
    return s


def extract_final_answer(text: str) -> str | None:
    """The response's final answer: last \\boxed/\\fbox content, else the last "Answer:" line, else None."""
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    matches = _ANSWER_RE.findall(text)
    if matches:
        ans = _strip_math_delimiters(matches[-1].rstrip("*_ ").strip())
        ans = ans.rstrip(".").strip()
        boxed_inside = _last_boxed(ans)
        if boxed_inside is not None:
            return boxed_inside
        return ans or None
    return None


_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_last_number(text: str) -> str | None:
    """The last number in `text` (``-3``, ``12,000``, ``0.5``, ``3/4``), for the ``math-flexible`` verifier."""
    matches = [m.group(0).rstrip(",") for m in _NUMBER_RE.finditer(text or "")]
    return matches[-1] if matches else None


# ----------------------------------------------------------------------------------------------------
# String normalisation (the exact verifier and math's fallback)

_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\s*\{([^{}]*)\}")


def normalize_answer(s: str) -> str:
    """Canonical string form: no math delimiters, \\text{} wrappers, spaces, `\\left`/`\\right`, `\\!`,
    ``dfrac``/``tfrac`` spellings, thousands commas in plain numbers, or trailing period; lower case.

    Unit words are NOT stripped here (``5 cm`` != ``5`` for ``exact``): dropping words in a plain string
    comparison would also drop meaningful text answers. The ``math`` verifier drops units via math-verify.
    """
    s = _strip_math_delimiters(s.strip())
    s = _TEXT_RE.sub(r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("°", "")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s.lower()


class ExactVerifier:
    """Normalised exact string match: fast and predictable, for non-math answers (names, labels)."""

    name = "exact"

    def __call__(self, response: str, answer: str) -> Verdict:
        extracted = extract_final_answer(response)
        if extracted is None:
            return Verdict(False, None, NO_ANSWER)
        ok = normalize_answer(extracted) == normalize_answer(str(answer))
        return Verdict(ok, extracted, "" if ok else "mismatch")


# ----------------------------------------------------------------------------------------------------
# math-verify


class _TimeoutWarningFilter(logging.Filter):
    """math-verify warns when its timeouts are off; off is our deliberate choice outside the main thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_filter_installed = False


def _import_math_verify() -> Any:
    global _filter_installed
    try:
        import math_verify
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ConfigError(
            "the `math` verifier needs math-verify: pip install 'math-verify[antlr4_13_2]==0.9.0' "
            "(or use --verifier exact)"
        ) from exc
    if not _filter_installed:
        for name in ("math_verify.parser", "math_verify.grader", "math_verify"):
            logging.getLogger(name).addFilter(_TimeoutWarningFilter())
        _filter_installed = True
    return math_verify


class MathVerifier:
    """Symbolic equivalence via math-verify, with a normalised string match when it cannot parse.

    `timeout_seconds` bounds each parse/compare in the main thread (signal-based, Unix); in other threads
    timeouts are disabled because signals cannot be installed there.
    """

    name = "math"

    def __init__(self, timeout_seconds: int = 5, *, flexible: bool = False) -> None:
        mv = _import_math_verify()
        self._mv = mv
        self.timeout_seconds = timeout_seconds
        self.flexible = flexible
        if flexible:
            self.name = "math-flexible"
        self._configs = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]

    def _timeout(self) -> int | None:
        if self.timeout_seconds and threading.current_thread() is threading.main_thread():
            return self.timeout_seconds
        return None

    def _parse(self, s: str, timeout: int | None) -> list[Any]:
        s = s.strip()
        if not s:
            return []
        # math-verify's LaTeX grammar wants math delimiters; add them unless already there.
        wrapped = s if "$" in s or "\\(" in s or "\\[" in s or "\\boxed" in s else f"${s}$"
        parsed = self._mv.parse(wrapped, extraction_config=self._configs, parsing_timeout=timeout)
        if not parsed and wrapped != s:
            parsed = self._mv.parse(s, extraction_config=self._configs, parsing_timeout=timeout)
        return parsed

    @staticmethod
    def _has_math(parsed: list[Any]) -> bool:
        # math-verify returns [expression, original string], or just [string] when it found no expression
        return any(not isinstance(x, str) for x in parsed)

    def parses(self, answer: str) -> bool:
        """Whether math-verify can read a reference answer as mathematics; if not, grading is string
        equality only, so a problem set of unreadable references scores ~0 whatever the model does."""
        return self._has_math(self._parse(str(answer), self._timeout()))

    def __call__(self, response: str, answer: str) -> Verdict:
        extracted = extract_final_answer(response)
        if extracted is None and self.flexible:
            extracted = extract_last_number(response)
        if extracted is None:
            return Verdict(False, None, NO_ANSWER)
        answer = str(answer)
        if normalize_answer(extracted) == normalize_answer(answer):
            return Verdict(True, extracted, "")  # cheap and saves sympy time on the common case
        timeout = self._timeout()
        gold = self._parse(answer, timeout)
        pred = self._parse(extracted, timeout)
        g, p = self._has_math(gold), self._has_math(pred)
        which = "" if g and p else UNPARSED_ANSWER if g else UNPARSED_REFERENCE if p else UNPARSED_BOTH
        if not gold or not pred:
            return Verdict(False, extracted, f"mismatch ({which}; string compare)")
        ok = bool(self._mv.verify(gold, pred, timeout_seconds=timeout))
        return Verdict(ok, extracted, "" if ok else f"mismatch ({which})" if which else "mismatch")


# ----------------------------------------------------------------------------------------------------
# Pluggable verifiers


class _CallableVerifier:
    """Wraps a user callable returning a Verdict or a bool (then the answer is extracted for the log)."""

    def __init__(self, fn: Any, name: str) -> None:
        self._fn = fn
        self.name = name

    def __call__(self, response: str, answer: str) -> Verdict:
        out = self._fn(response, answer)
        if isinstance(out, Verdict):
            return out
        if out is not None and not isinstance(out, str):  # bool, numpy bool, 0/1
            ok = bool(out)
            return Verdict(ok, extract_final_answer(response), "" if ok else "mismatch")
        raise TypeError(f"verifier {self.name} returned {type(out).__name__}, expected Verdict or bool")


def _load_custom(spec: str) -> Verifier:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"verifier {spec!r}: expected math, exact or package.module:callable")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"verifier {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
            "is it installed or on PYTHONPATH?"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"verifier {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as exc:
            raise ConfigError(
                f"verifier {spec!r}: cannot instantiate {attr} without arguments: {exc}"
            ) from None
    if not callable(obj):
        raise ConfigError(f"verifier {spec!r}: {attr} is not callable")
    return _CallableVerifier(obj, name=spec)


def get_verifier(spec: str = "math") -> Verifier:
    """`math` (math-verify, string fallback), `math-flexible` (also the last number when there is no
    boxed/Answer: line), `exact` (normalised match), or `package.module:callable`."""
    spec = (spec or "math").strip()
    if spec == "math":
        return MathVerifier()
    if spec == "math-flexible":
        return MathVerifier(flexible=True)
    if spec == "exact":
        return ExactVerifier()
    if ":" in spec:
        return _load_custom(spec)
    raise ConfigError(
        f"unknown verifier {spec!r}: use math, math-flexible, exact, or package.module:callable"
    )


def reference_parses(verifier: Verifier, answer: str) -> bool | None:
    """Whether `verifier` can read reference `answer`: None when it cannot tell (custom verifiers).

    Used by evaluation to tell "the references are unreadable" apart from "the model is wrong": both
    give 0% accuracy. ``exact`` reads anything that is not blank after normalisation.
    """
    try:
        if isinstance(verifier, MathVerifier):
            return verifier.parses(answer)
        if isinstance(verifier, ExactVerifier):
            return bool(normalize_answer(str(answer)))
    except Exception:  # a parser crash means "cannot read it"; grading reports its own errors
        return False
    return None


def prediction_unparsed(extracted: str | None, reason: str) -> bool:
    """Whether a graded response had no answer the verifier could read (none found, or math-verify could
    not parse it), from the `Verdict` fields a sample keeps."""
    return extracted is None or UNPARSED_ANSWER in reason or UNPARSED_BOTH in reason


UNPARSED_WARN_SHARE = 0.5  # warn (and doctor withholds its verdict) at this share of unreadable answers


def mostly_unparsed(bad: int, total: int) -> bool:
    """Whether `bad` of `total` unreadable answers are enough to make accuracies meaningless: at least
    `UNPARSED_WARN_SHARE` of them (eval warns then; doctor also withholds its novelty verdict)."""
    return total > 0 and bad >= UNPARSED_WARN_SHARE * total


def verifier_name(verifier: Any) -> str:
    return getattr(verifier, "name", type(verifier).__name__)


def unparsed_references_message(bad: int, total: int, verifier: Any, source: str, answer: str) -> str:
    """The warning when `bad` of `total` reference answers cannot be read (`opd eval` and `opd doctor`)."""
    return (
        f"{bad} of {total} reference answers cannot be parsed by the {verifier_name(verifier)} verifier (e.g. "
        f"{source}: {answer!r}); they are compared as plain strings, so a low accuracy may mean unreadable "
        "references, not a bad model: fix the answer field or choose another verifier (--verifier exact or "
        "package.module:callable)."
    )


def unparsed_responses_message(
    bad: int, total: int, verifier: Any, *, whose: str | None = None, suggest: str | None = None
) -> str:
    """The warning when `bad` of `total` responses (of model `whose`, when given) have no final answer
    the verifier can read (`opd eval` and `opd doctor`); `suggest` names a better verifier (a model's own
    default, see `opd.models.loading.model_defaults`), else ``math-flexible``."""
    of = f" of {whose}" if whose else ""
    use = suggest or "math-flexible"
    return (
        f"{bad} of {total} responses{of} have no final answer the {verifier_name(verifier)} verifier can read; "
        "the model may not follow the answer format (\\boxed{} or an 'Answer:' line): check the template, or "
        f"use --verifier {use}."
    )


def safe_verify(verifier: Verifier, response: str, answer: str, *, strict: bool = False) -> Verdict:
    """Grade one response; an exception becomes a wrong Verdict ("verifier error: ...") unless `strict`,
    which raises `VerifierError` instead."""
    try:
        verdict = verifier(response, answer)
        if not isinstance(verdict, Verdict):
            verdict = Verdict(bool(verdict), extract_final_answer(response))
        return verdict
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        if strict:
            name = getattr(verifier, "name", type(verifier).__name__)
            raise VerifierError(
                f"verifier {name} raised {msg} on answer {answer!r} (response ends {response[-80:]!r}); "
                "fix the verifier, or drop strict to grade such samples wrong and count them"
            ) from exc
        return Verdict(False, extract_final_answer(response), f"{VERIFIER_ERROR}: {msg[:300]}")
