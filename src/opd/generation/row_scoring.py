"""Scoring rollouts with several models from their hidden states, one chunk of response rows at a time.

Why: `opd doctor` and `opd prompts select` compare the student with one or more teachers on the student's
rollouts. Building every model's ``[B, T, V]`` logits made the vocabulary (V = 151,936 for Qwen) the
dominant memory cost of both commands, far above the ``[B, T, H]`` hidden states that produce the logits.
Every number they report is a sum over response rows of a per-row quantity, so each model's last hidden
states are projected through its own LM head one chunk of masked rows at a time
(`opd.objectives.hidden.projected_rows`), and each chunk goes through the very functions the logits path used:
`opd.diagnostics.diagnostic_sums` (the rows laid out by `opd.objectives.hidden.spread_rows`, so position bins see
every row at its true response position) and, for the sequence-mean reward, a per-row log-ratio summed into
its sequence with ``index_add``. Peak memory is one chunk of ``[n, V]`` rows per model.

The projection is ``hidden @ weight.T + bias``; a model whose forward changes its logits after the head
(logit soft-capping or scaling) is refused at load time by a probe, rather than scored on other numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from opd.diagnostics import diagnostic_sums, merge_sums
from opd.errors import ModelError
from opd.generation.rollout import Rollout
from opd.generation.scoring import check_head_projection, frozen_head, response_hidden_states
from opd.objectives.hidden import projected_rows, spread_rows
from opd.objectives.token import DEFAULT_CHUNK_ELEMENTS, compute_dtype

__all__ = [
    "Comparison",
    "ComparisonScores",
    "ScoringHead",
    "score_rollout",
    "scoring_head",
    "token_rewards",
]


class ScoringHead(NamedTuple):
    """A model with its LM head taken apart, so its hidden states can be projected chunk by chunk."""

    model: torch.nn.Module
    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V]


def scoring_head(model: torch.nn.Module, name: str) -> ScoringHead:
    """The model with its LM head's ``[V, H]`` weight and bias (tied embeddings and CPU-offloaded models
    included: `opd.generation.scoring.frozen_head`), after a probe that the model's logits are exactly that projection
    (`opd.generation.scoring.check_head_projection`).

    Checked once, before any rollout is sampled, so a model whose head cannot be projected by hand fails
    in seconds with its name rather than after minutes of generation. ``name`` says which model it is
    (e.g. ``"teacher path/to/model"``) in the error.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    try:
        if head is not None and hasattr(head, "base_layer"):
            raise ValueError(
                f"its LM head is adapter-wrapped ({type(head).__name__}); merge the adapter first"
            )
        weight, bias = frozen_head(model)
        check_head_projection(model, weight, bias)
    except ValueError as exc:
        raise ModelError(
            f"{name}: {exc}. Scoring projects the model's last hidden states through its head chunk by chunk "
            "(no [B, T, V] logits), so it needs a causal LM whose logits are hidden @ W.T + b"
        ) from None
    return ScoringHead(model, weight, bias)


@dataclass(frozen=True)
class Comparison:
    """One pair of models to compare on the rollout: ``student`` (index into the heads) in the role of
    p, ``teacher`` in the role of q, as in `opd.diagnostics`. Position bins and the reward are per
    comparison because the doctor wants them for student-teacher pairs and not for teacher-teacher pairs."""

    student: int
    teacher: int
    position_bins: int = 0
    reward: bool = False


@dataclass
class ComparisonScores:
    """What one `Comparison` measured on one rollout.

    ``sums`` are `opd.diagnostics.diagnostic_sums` sums and counts (merge across rollouts with
    `merge_sums`, divide with `finalize`); ``reward`` is ``sequence_mean_reward`` ``[B]`` (None unless
    asked for), already a per-sequence mean because a sequence never spans two rollouts."""

    sums: dict[str, Tensor]
    reward: Tensor | None


def token_rewards(student_rows: Tensor, teacher_rows: Tensor, tokens: Tensor) -> Tensor:
    """log q(y) − log p(y) ``[n]`` of each row's token, the per-row term of
    `opd.diagnostics.sequence_mean_reward`, so a sequence's mean can be summed chunk by chunk."""
    y = tokens.long().unsqueeze(-1)
    log_p = student_rows.gather(-1, y).squeeze(-1) - torch.logsumexp(student_rows, dim=-1)
    log_q = teacher_rows.gather(-1, y).squeeze(-1) - torch.logsumexp(teacher_rows, dim=-1)
    return log_q - log_p


def _check_indices(n_heads: int, comparisons: Sequence[Comparison]) -> None:
    """A wrong index would otherwise surface only after every model's forward, as an IndexError."""
    for c in comparisons:
        for i in (c.student, c.teacher):
            if not 0 <= i < n_heads:
                raise ValueError(f"comparison {c} names head {i}; there are {n_heads}")


@torch.no_grad()
def score_rollout(
    heads: Sequence[ScoringHead],
    rollout: Rollout,
    comparisons: Sequence[Comparison],
    *,
    k: int,
    vocab_size: int | None,
    bin_len: int | None = None,
    chunk_size: int | None = 2048,
    max_chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
) -> list[ComparisonScores]:
    """Every comparison's diagnostic sums (and sequence-mean reward) on ``rollout``, one per comparison.

    Equal, to float rounding, to ``diagnostic_sums`` / ``sequence_mean_reward`` on the models'
    ``response_logits`` with the same ``k``, ``vocab_size``, position bins and ``bin_len``, but each model
    runs one forward for all comparisons and only ``[n, V]`` rows per model exist at a time (rows per
    chunk: ``chunk_rows(V, chunk_size, max_chunk_elements)``). All rows are gathered on the first head's
    hidden-state device, where the sums live.
    """
    if not heads:
        raise ValueError("score_rollout needs at least one head")
    _check_indices(len(heads), comparisons)
    with torch.inference_mode():
        hidden = [response_hidden_states(h.model, rollout) for h in heads]
    device = hidden[0].device
    mask = rollout.response_mask.to(device)
    tokens = rollout.response_ids.to(device)
    width = int(mask.shape[1])
    # An empty call gives every key (zeros), so a rollout without a masked row still merges like any other.
    none = torch.zeros((1, 1), dtype=torch.bool, device=device)
    blank = torch.zeros((1, 1, 1), device=device)
    out = [
        ComparisonScores(
            diagnostic_sums(blank, blank, none, k=k, position_bins=c.position_bins, bin_len=bin_len), None
        )
        for c in comparisons
    ]
    dtype = compute_dtype(*hidden, *(h.weight for h in heads))  # the dtype projected_rows yields
    totals = {
        i: torch.zeros(mask.shape[0], dtype=dtype, device=device)
        for i, c in enumerate(comparisons)
        if c.reward
    }
    for b_idx, t_idx, rows in projected_rows(
        [(h, x.weight, x.bias) for h, x in zip(hidden, heads, strict=True)],
        mask,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        max_chunk_elements=max_chunk_elements,
    ):
        rows = [r.to(device) for r in rows]
        spread = [spread_rows(r, t_idx, width) for r in rows]
        y = tokens[b_idx, t_idx]
        for i, c in enumerate(comparisons):
            (s_view, rows_mask), (t_view, _) = spread[c.student], spread[c.teacher]
            chunk = diagnostic_sums(s_view, t_view, rows_mask, k=k, chunk_size=None,
                                    position_bins=c.position_bins, bin_len=bin_len)  # fmt: skip
            out[i].sums = merge_sums(out[i].sums, chunk)
            if i in totals:
                totals[i].index_add_(0, b_idx, token_rewards(rows[c.student], rows[c.teacher], y))
    # A sequence without a masked row gets 0.0 rather than NaN, as sequence_mean_reward does.
    counts = mask.bool().sum(-1).clamp_min(1).to(dtype)
    for i, total in totals.items():
        out[i].reward = total / counts
    return out
