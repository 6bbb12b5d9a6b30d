"""Token cross-entropy from hidden states and LM-head weights, never materialising ``[B, T, V]`` logits.

Why: SFT's loss is ``-log p(target | prefix)`` at every target position, and at Qwen's V = 151,936 the
``[B, S, V]`` logits (kept for backward, their float32 copy and their gradient) are the largest tensors of
a micro-batch: 4 x 8192 positions are 20 GB of fp32 logits alone. Cross-entropy is row-local like every
OPD per-token loss, so it goes through the same chunked projection (`opd.objectives.hidden`'s
``_HeadChunkedLoss``): one chunk of masked rows is projected through the head, its loss and its gradient
with respect to the hidden states and the head weight are formed while the chunk is in memory, and the
chunk is dropped. The row maths is torch's own ``cross_entropy`` on the chunk's logits, so the chunked
path and the plain ``cross_entropy(logits, labels, reduction="sum")`` share one definition.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.objectives.hidden import _HeadChunkedLoss, _shared_rows
from opd.objectives.token import (
    DEFAULT_CHUNK_ELEMENTS,
    ChunkElements,
    chunk_rows,
    compute_dtype,
    masked_positions,
)

__all__ = ["ce_rows", "head_ce_sum"]


def ce_rows(logits: Tensor, targets: Tensor) -> Tensor:
    """``-log softmax(logits)[target]`` per row: logits ``[n, V]``, targets ``[n]`` -> ``[n]``."""
    return torch.nn.functional.cross_entropy(logits, targets.long(), reduction="none")


def head_ce_sum(
    h: Tensor,
    w: Tensor,
    b: Tensor | None,
    targets: Tensor,
    mask: Tensor,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = 2048,
    max_chunk_elements: ChunkElements = DEFAULT_CHUNK_ELEMENTS,
    project_dtype: torch.dtype | None = None,
) -> Tensor:
    """Sum over the masked positions of ``-log softmax(h @ w.T + b)[targets]`` (0-dim), in chunks of rows.

    ``h`` ``[B, T, H]``: the hidden states that predict ``targets`` ``[B, T]`` (position t predicts
    targets[t]; the caller shifts its labels); ``w`` ``[V, H]`` and ``b`` ``[V]`` or None: the LM head;
    ``mask`` ``[B, T]``: the positions that count (targets elsewhere are ignored and may hold anything).
    Equal to ``cross_entropy((h @ w.T + b).reshape(-1, V)[mask], targets[mask], reduction="sum")``, with
    the same gradients for ``h``, ``w`` and ``b``; a sum because the caller normalises by its step's token
    count. ``vocab_size`` keeps the first rows of the head (the real tokens of a padded head); the default
    keeps every row, as the model's own logits do. Chunking, devices and ``project_dtype`` (the autocast
    dtype the head's matmuls run in, the loss maths staying float32 at least) are those of
    `opd.objectives.hidden.head_loss_sum`; no host sync per chunk (one ``nonzero`` finds the rows). The
    result supports one backward pass.
    """
    if h.dim() != 3 or w.dim() != 2 or h.shape[-1] != w.shape[-1]:
        raise ValueError(f"need h [B, T, H] and w [V, H]; got {tuple(h.shape)}, {tuple(w.shape)}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"b must be [V] = [{w.shape[0]}]; got {tuple(b.shape)}")
    bt = tuple(h.shape[:2])
    if tuple(mask.shape) != bt or tuple(targets.shape) != bt:
        raise ValueError(
            f"mask and targets must be [B, T] = {bt}; got {tuple(mask.shape)}, {tuple(targets.shape)}"
        )
    if targets.is_floating_point():
        raise ValueError(f"targets must hold token ids (an integer dtype); got {targets.dtype}")
    v = _shared_rows(w.shape[0], None, vocab_size)
    y = targets.long()

    def chunk_loss(s_rows: Tensor, bi: Tensor, ti: Tensor) -> Tensor:
        return ce_rows(s_rows, y[bi, ti])

    b_idx, t_idx = masked_positions(mask)
    cfg = {
        "dtype": compute_dtype(h, w),
        "v": v,
        "b_idx": b_idx,
        "t_idx": t_idx,
        "chunk_size": chunk_rows(v, chunk_size, max_chunk_elements, device=h.device),
        "chunk_loss": chunk_loss,
        "grad_enabled": torch.is_grad_enabled(),
        "project_dtype": project_dtype,
    }
    return _HeadChunkedLoss.apply(h, w, b, cfg)
