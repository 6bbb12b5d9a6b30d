"""The objective's one entry point: the student side and a teacher *target*, whatever the teacher was.

A target is what `opd.teachers.contract` hands over for a micro-batch:

- `TeacherHidden` (an in-process teacher's last hidden states and LM head; the default path),
- dense logits ``[B, T, V_t]`` (an in-process teacher with ``loss.from_hidden_states false``),
- `TeacherTopK` (an engine or server: top-K log-probs and the sampled token's).

The row maths is picked here from the target's type, so the trainer never asks which kind of teacher it
holds. The student side is either its logits (`logits_loss`) or its hidden states and head
(`hidden_loss_sum`, which never builds ``[B, T, V]``); both give the same loss and gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from opd.objectives.hidden import ChunkCallback, head_loss_sum
from opd.objectives.token import DEFAULT_CHUNK_ELEMENTS, ChunkElements, per_token_loss
from opd.objectives.topk import TeacherTopK, sparse_per_token_loss

__all__ = ["Objective", "TeacherHidden", "hidden_loss_sum", "logits_loss", "nonfinite_target_positions"]


class TeacherHidden(NamedTuple):
    """A teacher's last hidden states `[B, T, H_t]` at the response positions and its LM head
    (`weight` `[V_t, H_t]`, `bias` `[V_t]` or None), for `hidden_loss_sum`; all constant."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None


@dataclass(frozen=True)
class Objective:
    """The loss settings of a run (`loss.*` of the config) and the shared vocabulary, as the row maths takes
    them. `chunk_rows`: masked rows per chunk on the logits path; `chunk_size` / `chunk_max_elements`: the
    hidden-state path's chunking (rows are derived from the vocabulary there; ``"auto"`` is resolved by the
    hidden states' device, while a run's Objective holds the number its device resolved it to)."""

    signal: str
    divergence: str = "reverse_kl"
    k: int = 16
    support: str = "student"
    renorm: str = "both"
    beta: float = 0.5
    vocab_size: int | None = None
    chunk_rows: int | None = 2048
    chunk_size: int | None = 2048
    chunk_max_elements: ChunkElements = DEFAULT_CHUNK_ELEMENTS

    def _maths(self) -> dict[str, Any]:
        return dict(signal=self.signal, divergence=self.divergence, k=self.k, support=self.support,
                    renorm=self.renorm, beta=self.beta, vocab_size=self.vocab_size)  # fmt: skip


def logits_loss(s_logits: Tensor, target: Tensor | TeacherTopK, tokens: Tensor, mask: Tensor,
                obj: Objective) -> Tensor:  # fmt: skip
    """Per-token loss ``[B, T]`` from the student's logits and a dense-logits or top-K target."""
    if isinstance(target, TeacherTopK):
        return sparse_per_token_loss(s_logits, target, tokens, mask, **obj._maths())
    return per_token_loss(s_logits, target, tokens, mask, chunk_size=obj.chunk_rows, **obj._maths())


def hidden_loss_sum(h: Tensor, w: Tensor, b: Tensor | None, target: TeacherHidden | TeacherTopK, tokens: Tensor,
                    mask: Tensor, obj: Objective, *, on_chunk: ChunkCallback | None = None,
                    project_dtype: torch.dtype | None = None) -> Tensor:  # fmt: skip
    """The summed per-token loss (0-dim) from the student's hidden states and head, one chunk of masked rows
    projected at a time (`opd.objectives.hidden.head_loss_sum`); equal to ``logits_loss(...).sum()``."""
    kw: dict[str, Any] = dict(chunk_size=obj.chunk_size, max_chunk_elements=obj.chunk_max_elements,
                              on_chunk=on_chunk, project_dtype=project_dtype, **obj._maths())  # fmt: skip
    if isinstance(target, TeacherTopK):
        return head_loss_sum(h, w, b, target, tokens, mask, **kw)
    return head_loss_sum(
        h, w, b, target.hidden, tokens, mask, w_teacher=target.weight, b_teacher=target.bias, **kw
    )


def nonfinite_target_positions(target: Any, mask: Tensor, vocab_size: int) -> Tensor:
    """How many response positions of `mask` have a teacher score holding NaN/inf (0-dim, on the device, no
    host sync), to tell whether a non-finite step came from the teacher.

    Top-K log-probs use -inf for emptied slots and for a token the teacher gives probability 0, so only NaN
    and +inf count there; hidden states and dense logits must be finite everywhere. The target may be wider
    than `mask` (a top-K target keeps its rollout chunk's columns); its first columns are the mask's."""
    if isinstance(target, TeacherTopK):
        lp = target.logprobs
        bad = torch.isnan(lp).any(-1) | (lp == math.inf).any(-1) | torch.isnan(target.token_logprob)
    elif isinstance(target, TeacherHidden):
        bad = ~torch.isfinite(target.hidden).all(-1)
    else:
        bad = ~torch.isfinite(target[..., :vocab_size]).all(-1)
    # A top-K target keeps the rollout chunk's columns (`TeacherTopK.select`) while the micro-batch's mask is
    # trimmed to its own last response column (`Rollout.select`): the first columns are the same positions.
    bad = bad[:, : mask.shape[1]]
    return (bad & mask.to(bad.device).bool()).sum()
