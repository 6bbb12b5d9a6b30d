"""The objective's options in one registry: signals, supports, renormalisations and divergences.

Config validation (`opd.config.LossConfig`), the help of `opd config fields loss` / `opd train --help`, the
objective table of docs/api.md (`markdown_table`) and the tests all read these entries, so a name, its
description and the combinations it allows are written once. A divergence carries its fast row function
(what `divergence_from_log_probs` runs on every row) and a deliberately plain float64 reference (a Python
loop over the support); `tests/test_objective_registry.py` checks every entry's two against each other, so
adding a divergence is one `register_divergence(Divergence(...))` call and nothing else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DIVERGENCES",
    "KINDS",
    "RENORMS",
    "SIGNALS",
    "SUPPORTS",
    "Divergence",
    "NameView",
    "Renorm",
    "Signal",
    "Support",
    "divergence",
    "entries",
    "field_description",
    "lookup",
    "markdown_table",
    "register_divergence",
    "renorm",
    "signal",
    "support",
    "unregister_divergence",
]

# (p, log_p, q, log_q, beta) -> [N]: p, q are zero on slots outside the support, log_p, log_q finite there
DivergenceRows = Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]
# (log_p [n], log_q [n], beta) -> 0-dim, float64 log-probabilities of ONE row over its support
DivergenceReference = Callable[[Tensor, Tensor, float], Tensor]

_NAME = re.compile(r"[a-z][a-z0-9_]*")  # a YAML value and a command-line word (--loss.divergence NAME)


@dataclass(frozen=True)
class Signal:
    """Which tokens the loss sees at a position. ``divergences``: the only divergences it is defined for
    (None: all), with ``why`` saying so in the error a refused combination gets."""

    name: str
    description: str
    divergences: tuple[str, ...] | None = None
    why: str = ""

    @property
    def summary(self) -> str:
        """The description with the combinations it allows, for help and docs."""
        if self.divergences is None:
            return self.description
        return f"{self.description} (needs divergence {' or '.join(self.divergences)})"


@dataclass(frozen=True)
class Support:
    """Whose top-k set the tokens of ``signal="topk"`` come from."""

    name: str
    description: str

    @property
    def summary(self) -> str:
        return self.description


@dataclass(frozen=True)
class Renorm:
    """How ``signal="topk"`` forms its loss on the support. ``signals`` / ``divergences``: the only ones it
    is defined for (None: all); ``short`` names it in errors."""

    name: str
    description: str
    short: str
    signals: tuple[str, ...] | None = None
    divergences: tuple[str, ...] | None = None

    def allows(self, signal: str, divergence: str) -> bool:
        return (self.signals is None or signal in self.signals) and (
            self.divergences is None or divergence in self.divergences
        )

    @property
    def summary(self) -> str:
        limits = [f"{opt} {' or '.join(names)}" for opt, names in
                  (("signal", self.signals), ("divergence", self.divergences)) if names is not None]  # fmt: skip
        return self.description + (f" ({' with '.join(limits)} only)" if limits else "")


@dataclass(frozen=True)
class Divergence:
    """D(p ‖ q) per row: ``rows`` is the fast path (batched over rows, zero-probability slots contribute
    nothing, gradients finite); ``reference`` a plain float64 loop over one row's support that the tests
    hold ``rows`` to. ``uses_beta``: whether ``beta`` changes it."""

    name: str
    description: str
    rows: DivergenceRows
    reference: DivergenceReference
    uses_beta: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"divergence name {self.name!r} is invalid: use lower-case letters, digits and _ "
                             "(e.g. hellinger)")  # fmt: skip
        if not self.description:
            raise ValueError(f"divergence {self.name!r} needs a description (it is shown in help and docs)")
        for part in ("rows", "reference"):
            if not callable(getattr(self, part)):
                raise ValueError(f"divergence {self.name!r}: {part} must be a function")

    @property
    def summary(self) -> str:
        return self.description + (" (beta: loss.beta)" if self.uses_beta else "")


# --------------------------------------------------------------------------------------------------------
# Built-in divergences: fast rows and float64 references
# --------------------------------------------------------------------------------------------------------


def kl_terms(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """Sum of a·(log a − log b) with the 0·log 0 = 0 convention.

    The ``where`` keeps masked slots (a = 0) out of both value and gradient even if their log-terms are
    meaningless, which is what makes padded top-k slots NaN-free.
    """
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def _reverse_kl_rows(p: Tensor, log_p: Tensor, q: Tensor, log_q: Tensor, beta: float) -> Tensor:
    return kl_terms(p, log_p, log_q)


def _forward_kl_rows(p: Tensor, log_p: Tensor, q: Tensor, log_q: Tensor, beta: float) -> Tensor:
    return kl_terms(q, log_q, log_p)


def _jsd_rows(p: Tensor, log_p: Tensor, q: Tensor, log_q: Tensor, beta: float) -> Tensor:
    # The endpoints are the exact KLs because the formula itself degenerates to 0 there (the trap that
    # made a clamped beta = 1 train nothing elsewhere).
    if beta == 1.0:
        return kl_terms(p, log_p, log_q)
    if beta == 0.0:
        return kl_terms(q, log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
    return beta * kl_terms(q, log_q, log_m) + (1.0 - beta) * kl_terms(p, log_p, log_m)


def _tvd_rows(p: Tensor, log_p: Tensor, q: Tensor, log_q: Tensor, beta: float) -> Tensor:
    return 0.5 * (p - q).abs().sum(-1)


def _reference_kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for i in range(log_a.shape[0]):
        a = torch.exp(log_a[i])
        if float(a.detach()) > 0:
            total = total + a * (log_a[i] - log_b[i])
    return total


def _reverse_kl_reference(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    return _reference_kl(log_p, log_q)


def _forward_kl_reference(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    return _reference_kl(log_q, log_p)


def _jsd_reference(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """The mixture in probability space, entry by entry; the endpoints are the exact KLs by definition."""
    if beta == 1.0:
        return _reference_kl(log_p, log_q)
    if beta == 0.0:
        return _reference_kl(log_q, log_p)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(log_p.shape[0]):
        p, q = torch.exp(log_p[i]), torch.exp(log_q[i])
        log_m = torch.log((1 - beta) * p + beta * q)
        total = total + beta * q * (log_q[i] - log_m) + (1 - beta) * p * (log_p[i] - log_m)
    return total


def _tvd_reference(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for i in range(log_p.shape[0]):
        total = total + 0.5 * torch.abs(torch.exp(log_p[i]) - torch.exp(log_q[i]))
    return total


# --------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------

# kind (the option loss.<kind>) -> {name: entry}, in the order help and docs list them; the dicts are the
# registry itself, which register_divergence extends
_ENTRIES: dict[str, dict[str, Any]] = {
    "signal": {
        e.name: e
        for e in (
            Signal(
                "sampled",
                "the sampled token only: a policy gradient with the detached reward log q(y) - log p(y), "
                "the one-sample estimate of reverse KL",
                divergences=("reverse_kl",),
                why="the sampled-token signal is the one-sample estimator of reverse KL only",
            ),
            Signal("topk", "the top-k tokens of loss.support, the loss formed on them as loss.renorm says"),
            Signal("full", "the whole vocabulary: the exact divergence, computed in row chunks"),
        )
    },
    "support": {
        e.name: e
        for e in (
            Support("student", "the student's top-k tokens"),
            Support(
                "teacher",
                "the teacher's top-k tokens (the one support a top-K teacher, vLLM or HTTP, serves)",
            ),
            Support("overlap", "the tokens in both top-k sets"),
            Support("non_overlap", "the tokens in exactly one of the two top-k sets"),
            Support("union", "the tokens in either top-k set"),
        )
    },
    "renorm": {
        e.name: e
        for e in (
            Renorm(
                "both",
                "paper Eq. 5: both models renormalised on the support, the divergence taken there",
                short="renormalise p and q on the support",
            ),
            Renorm(
                "weights",
                "the released code's estimator: the full reverse-KL gradient truncated to the "
                "support and divided by its mass",
                short="the released-code weighting",
                signals=("topk",),
                divergences=("reverse_kl",),
            ),
        )
    },
    "divergence": {
        e.name: e
        for e in (
            Divergence(
                "reverse_kl", "KL(student || teacher), the paper's", _reverse_kl_rows, _reverse_kl_reference
            ),
            Divergence("forward_kl", "KL(teacher || student)", _forward_kl_rows, _forward_kl_reference),
            Divergence(
                "jsd",
                "generalized Jensen-Shannon, TRL's convention: mixture m = (1 - beta) p + beta q, "
                "beta 0 exactly forward KL, beta 1 exactly reverse KL",
                _jsd_rows,
                _jsd_reference,
                uses_beta=True,
            ),
            Divergence(
                "tvd", "total variation: half the L1 distance between p and q", _tvd_rows, _tvd_reference
            ),
        )
    },
}
KINDS: tuple[str, ...] = tuple(_ENTRIES)
_BUILT_IN: frozenset[str] = frozenset(_ENTRIES["divergence"])


class NameView(Sequence[str]):
    """The names of one kind, live: a divergence registered later is in it (``in``, iteration, ``join``)."""

    def __init__(self, kind: str) -> None:
        self._kind = kind

    def __getitem__(self, index: Any) -> Any:
        return tuple(_ENTRIES[self._kind])[index]

    def __len__(self) -> int:
        return len(_ENTRIES[self._kind])

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_ENTRIES[self._kind]))

    def __contains__(self, name: object) -> bool:
        return name in _ENTRIES[self._kind]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]  # equal to a tuple but mutable, as a list

    def __repr__(self) -> str:
        return repr(tuple(self))


SIGNALS = NameView("signal")
SUPPORTS = NameView("support")
RENORMS = NameView("renorm")
DIVERGENCES = NameView("divergence")


def entries(kind: str) -> tuple[Any, ...]:
    """Every entry of ``kind`` ("signal", "support", "renorm", "divergence"), in registry order."""
    return tuple(_ENTRIES[kind].values())


def lookup(kind: str, name: str) -> Any:
    """The entry ``name`` of ``kind``; a ValueError naming the registry's names if there is none."""
    found = _ENTRIES[kind].get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"unknown {kind}={name!r}; use one of {', '.join(_ENTRIES[kind])}")
    return found


def signal(name: str) -> Signal:
    return lookup("signal", name)


def support(name: str) -> Support:
    return lookup("support", name)


def renorm(name: str) -> Renorm:
    return lookup("renorm", name)


def divergence(name: str) -> Divergence:
    return lookup("divergence", name)


def register_divergence(spec: Divergence) -> Divergence:
    """Add a divergence: from then on the objective functions compute it, config validation accepts
    ``loss.divergence NAME`` (the help lists the names registered when `opd.config` was imported) and
    `markdown_table` lists it. Every signal and renorm that allows all divergences allows it."""
    if not isinstance(spec, Divergence):
        raise TypeError(f"register_divergence takes a Divergence, not {type(spec).__name__}")
    if spec.name in _ENTRIES["divergence"]:
        raise ValueError(f"divergence {spec.name!r} is already registered; pick another name")
    _ENTRIES["divergence"][spec.name] = spec
    return spec


def unregister_divergence(name: str) -> None:
    """Remove a divergence `register_divergence` added (the built-in ones stay: configs default to them)."""
    if name in _BUILT_IN:
        raise ValueError(f"divergence {name!r} is built in and cannot be unregistered")
    lookup("divergence", name)
    del _ENTRIES["divergence"][name]


# --------------------------------------------------------------------------------------------------------
# Help and docs
# --------------------------------------------------------------------------------------------------------

# kind -> what the option decides, the first words of its help
_LEADS: dict[str, str] = {
    "signal": "which tokens the loss sees at each position",
    "support": "signal topk: whose top-k set the tokens come from",
    "renorm": "signal topk: how the loss is formed on the support",
    "divergence": "how the student's distribution p is compared with the teacher's q",
}


def field_description(kind: str) -> str:
    """The help of config field ``loss.<kind>``: what it decides, then every name with its description."""
    return f"{_LEADS[kind]}: " + " | ".join(f"{e.name} = {e.summary}" for e in entries(kind))


def markdown_table() -> str:
    """The registry as the markdown table docs/api.md shows (``| option | value | what it is |``)."""
    lines = ["| option | value | what it is |", "| --- | --- | --- |"]
    for kind in KINDS:
        for e in entries(kind):
            text = e.summary.replace("|", "\\|")  # "KL(student || teacher)" must not split the cell
            lines.append(f"| `loss.{kind}` | `{e.name}` | {text} |")
    return "\n".join(lines) + "\n"
