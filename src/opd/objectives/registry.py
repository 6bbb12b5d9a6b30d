"""The objective's options in one registry: signals, supports, renormalisations and divergences.

Config validation (`opd.config.LossConfig`), the help of `opd config fields loss` / `opd train --help`, the
objective table of docs/api.md (`markdown_table`) and the tests all read these entries, so a name, its
description and the combinations it allows are written once. A divergence carries its fast row function
(what `divergence_from_log_probs` runs on every row) and a deliberately plain float64 reference (a Python
loop over the support); `tests/test_objective_registry.py` checks every entry's two against each other, so
adding a divergence is one `register_divergence(Divergence(...))` call and nothing else. The maths of
``renorm="tail"`` (the k+1 tail bucket, `tail_bucket_log_probs`) lives here too, with its own float64
reference (`tail_bucket_reference`), because it turns any registered divergence into one over k+1 outcomes.
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
    "rest_log_prob",
    "rest_of_rows",
    "signal",
    "support",
    "tail_bucket_log_probs",
    "tail_bucket_reference",
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
# renorm "tail": the k+1 tail bucket, fast and float64 reference
# --------------------------------------------------------------------------------------------------------


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler 2012); each branch gets an input clamped
    to its own side so neither produces an inf whose zero-weighted gradient would still be NaN."""
    cut = -math.log(2.0)
    near = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near, far)


def rest_log_prob(log_sel: Tensor, valid: Tensor) -> Tensor:
    """log(1 - the mass on the support) ``[N, 1]`` from full-vocabulary log-probabilities at the support
    ``[N, k]`` alone (what a top-K teacher returns), in log space: `_log1mexp` of the support's logsumexp.

    The remaining mass is floored at the dtype's epsilon, so a support holding (by rounding) all of the
    mass, e.g. an engine's top-K log-probs summing to a hair over 1, gives a tiny tail instead of a NaN; an
    empty support leaves all of it (log 1 = 0)."""
    top = math.log1p(-torch.finfo(log_sel.dtype).eps)  # log of the largest support mass kept below 1
    # an empty row's logsumexp is -inf with a NaN gradient: one fake slot keeps it finite, `where` drops it
    nonempty = valid.any(-1, keepdim=True)
    safe = valid | (~nonempty & (torch.arange(valid.shape[-1], device=valid.device) == 0))
    mass = torch.logsumexp(log_sel.masked_fill(~safe, float("-inf")), dim=-1, keepdim=True)
    return torch.where(nonempty, _log1mexp(mass.clamp(max=top)), 0.0)


def rest_of_rows(
    rows: Tensor, ids: Tensor, valid: Tensor, lse: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The exact log-probability of every token outside the support, from a model's whole logit rows
    ``[N, V]`` (the support: ``ids`` ``[N, k]`` where ``valid``; ids may repeat; ``lse`` ``[N, 1]``: the rows'
    logsumexp if already known): ``(log_rest [N, 1], has_rest [N, 1])``. A logsumexp over the tokens
    outside, so a tail far below the float32 resolution of 1 - mass is still exact, and so is its gradient;
    ``has_rest`` is False where the support covers the whole vocabulary (log_rest is then a placeholder)."""
    n, v = rows.shape
    # one byte per token; invalid slots write to a spare column, repeated ids all write True (deterministic)
    inside = torch.zeros((n, v + 1), dtype=torch.bool, device=rows.device)
    inside = inside.scatter_(-1, torch.where(valid, ids, v), True)[:, :v]
    has_rest = ~inside.all(-1, keepdim=True)
    # rows with nothing outside keep their whole row, so the logsumexp and its gradient stay finite
    outside = rows.masked_fill(inside & has_rest, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(rows, -1, keepdim=True)
    return torch.logsumexp(outside, -1, keepdim=True) - lse, has_rest


def tail_bucket_log_probs(log_p_sel: Tensor, log_q_sel: Tensor, valid: Tensor, log_p_rest: Tensor,
                          log_q_rest: Tensor, has_rest: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """renorm "tail": both models' distributions over the k support slots plus one slot for the rest.

    ``log_p_sel`` / ``log_q_sel`` ``[N, k]`` are FULL-vocabulary log-probabilities at the support ids (not
    renormalised; the student's live), ``valid`` ``[N, k]`` marks the real slots (invalid ones may hold any
    finite value), ``log_p_rest`` / ``log_q_rest`` ``[N, 1]`` each model's log-mass outside the support
    (`rest_of_rows` from whole rows, `rest_log_prob` from the support alone) and ``has_rest`` ``[N, 1]``
    whether any token is outside (None: everywhere). Returns ``(log_p, log_q, valid)`` of ``[N, k + 1]``: the
    support slots as given and, last, the rest, valid where ``has_rest``. Both are proper distributions over
    k + 1 outcomes, so every registered divergence applies unchanged and, for the built-in ones (all
    f-divergences), is >= 0 and at most the full-vocabulary divergence, the outcomes being a coarsening of
    the vocabulary (data-processing inequality; `tests/test_tail_bucket.py` checks both).
    """
    rest_valid = torch.ones_like(valid[..., :1]) if has_rest is None else has_rest
    log_p = torch.cat([torch.where(valid, log_p_sel, 0.0), torch.where(rest_valid, log_p_rest, 0.0)], -1)
    log_q = torch.cat([torch.where(valid, log_q_sel, 0.0), torch.where(rest_valid, log_q_rest, 0.0)], -1)
    return log_p, log_q, torch.cat([valid, rest_valid], dim=-1)


def tail_bucket_reference(log_p_row: Tensor, log_q_row: Tensor, ids: Sequence[int], divergence: str,
                          beta: float) -> Tensor:  # fmt: skip
    """The tail-bucket divergence of ONE row in plain float64: ``log_p_row`` / ``log_q_row`` ``[V]`` are both
    models' full-vocabulary log-probabilities (only the entries at ``ids`` are read, so a top-K teacher's
    known ones suffice), ``ids`` the support. The k + 1 outcomes are the ids one by one and "any other
    token", whose probability is 1 minus the sum of the others; the divergence is the registered entry's
    own reference over those outcomes."""
    p_slots, q_slots = [], []
    p_rest = torch.ones((), dtype=torch.float64)
    q_rest = torch.ones((), dtype=torch.float64)
    for i in ids:
        p_i, q_i = torch.exp(log_p_row[i].double()), torch.exp(log_q_row[i].double())
        p_slots.append(p_i)
        q_slots.append(q_i)
        p_rest = p_rest - p_i
        q_rest = q_rest - q_i
    log_p = torch.log(torch.stack([*p_slots, p_rest]))
    log_q = torch.log(torch.stack([*q_slots, q_rest]))
    return lookup("divergence", divergence).reference(log_p, log_q, beta)


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
            Renorm(
                "tail",
                "the k+1 tail bucket: neither model renormalised, each one's mass outside the support "
                "(1 - its mass on it) added as one extra slot, the divergence taken over those k+1 outcomes, "
                "a lower bound of the full-vocabulary one; any support with a full-distribution teacher, "
                "loss.support teacher with a top-K teacher (vLLM/HTTP), whose top-K gives its tail",
                short="add each model's remaining mass as one extra slot",
                signals=("topk",),
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
