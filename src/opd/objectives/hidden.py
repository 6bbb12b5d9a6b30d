"""OPD loss from hidden states and LM-head weights, never materialising ``[B, T, V]`` logits.

Why: at Qwen's V = 151,936 the student's logits (kept for backward, plus their gradient) and the
teacher's logits are the largest tensors of a micro-batch, far larger than the hidden states that produce
them (H = 1.5k-4k). Every OPD per-token loss depends on one row of logits only, so the loss can be formed
one chunk of masked rows at a time: project the chunk's student rows (with gradient) and teacher rows (no
gradient) to the vocabulary, take the per-row loss, form the chunk's gradient with respect to the student
hidden states and head weight while the chunk is in memory, and drop it. Peak memory is then one chunk of
``[n, V]`` student and teacher logits (and their float32 temporaries) instead of ``[B, T, V]`` twice; the
gradient with respect to the head weight ``[V, H]`` is accumulated once, which the optimiser needs anyway.
Prompt and padding rows are never projected: only the masked response rows are gathered. This is the
approach of TRL's DistillationTrainer.

The row maths is not rewritten here: the dense teacher goes through ``opd.objectives.token._make_row_loss`` and
the top-K teacher through ``opd.objectives.topk.sparse_per_token_loss``, so every divergence, support and
signal keeps one definition. ``opd.objectives.token.token_loss`` on explicit logits stays the readable reference,
and the tests check this path equal to it in float64 (values and gradients) for every combination.

Diagnostics ride along through ``on_chunk``: it receives each chunk's detached student and teacher rows
in the forward, so the trainer computes its metrics on the same bounded chunks. The head arrives as one
``[V, H]`` tensor in the autograd graph of whatever the optimiser steps (`opd.generation.scoring.head_weights` builds
it for tied, LoRA'd and FSDP-sharded heads), so its gradient flows on to those parameters; under autocast
``project_dtype`` runs the student's projection in the autocast dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from opd.objectives.token import (
    DEFAULT_CHUNK_ELEMENTS,
    ChunkElements,
    _make_row_loss,
    chunk_rows,
    compute_dtype,
    masked_positions,
    row_chunks,
    validate_objective,
)
from opd.objectives.topk import TeacherTopK, check_sparse_objective, sparse_row_loss

__all__ = ["ChunkCallback", "head_loss_sum", "projected_rows", "spread_rows"]

# on_chunk(student_rows [n, V], teacher_rows [n, V] or TeacherTopK with [n, K] / [n] fields, b_idx [n], t_idx [n])
ChunkCallback = Callable[[Tensor, "Tensor | TeacherTopK", Tensor, Tensor], None]


def _shared_rows(v_student: int, v_teacher: int | None, vocab_size: int | None) -> int:
    """Rows of the heads that are real shared tokens; same rule as ``objectives.shared_vocab`` on logits."""
    top = v_student if v_teacher is None else min(v_student, v_teacher)
    if vocab_size is None:
        return top
    if vocab_size < 1 or vocab_size > top:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {top}] (student head has {v_student} rows"
            + ("" if v_teacher is None else f", teacher head {v_teacher}")
            + ")"
        )
    return vocab_size


def _project(h_rows: Tensor, w: Tensor, b: Tensor | None, v: int, dtype: torch.dtype) -> Tensor:
    """Logits of the first ``v`` vocabulary rows, in the weight's dtype (as the model's head), then ``dtype``."""
    w = w if w.shape[0] == v else w[:v]
    out = h_rows.to(w.dtype) @ w.T
    if b is not None:
        out = out + (b if b.shape[0] == v else b[:v])
    return out.to(dtype)


class _HeadChunkedLoss(torch.autograd.Function):
    """Sum of per-row losses over masked rows, each chunk's gradient formed in the forward.

    The loss is a sum of row-local terms, so its gradient is the sum of the chunks' gradients; the forward
    stores them and the backward only scales them by the incoming scalar. The stored gradients are scaled
    in place and released, so backward may run once.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        h: Tensor,
        w: Tensor,
        b: Tensor | None,
        cfg: dict[str, Any],
    ) -> Tensor:
        dtype: torch.dtype = cfg["dtype"]
        v: int = cfg["v"]
        b_idx, t_idx = cfg["b_idx"], cfg["t_idx"]
        needs = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        on = cfg["grad_enabled"]  # needs_input_grad ignores no_grad mode
        want = [on and needs[0], on and needs[1], on and needs[2] and b is not None]
        any_grad = any(want)
        grad_h = torch.zeros_like(h) if want[0] else None
        grad_w = torch.zeros(w.shape, dtype=dtype, device=w.device) if want[1] else None
        grad_b = torch.zeros(b.shape, dtype=dtype, device=b.device) if want[2] and b is not None else None
        total = torch.zeros((), dtype=dtype, device=h.device)
        # Autocast: the head is cast once, not once per chunk; the head's matmuls (forward and backward) run
        # in that dtype as the model's own head would, the gradients accumulate in the compute dtype.
        low = cfg["project_dtype"] or w.dtype
        w_low = w.detach()[:v].to(low)
        b_low = b.detach()[:v].to(low) if b is not None else None
        for start, stop in row_chunks(b_idx.numel(), cfg["chunk_size"]):
            bi, ti = b_idx[start:stop], t_idx[start:stop]
            h_low = h.detach()[bi, ti].to(low)
            out = h_low @ w_low.T
            if b_low is not None:
                out = out + b_low
            # The loss is differentiated with respect to the chunk's logits only; the head's gradients are
            # then two matmuls written straight into the accumulators (no [V, H] temporary per chunk).
            s_rows = out.to(dtype).requires_grad_(any_grad)
            del out
            with torch.enable_grad() if any_grad else torch.no_grad():
                loss = cfg["chunk_loss"](s_rows, bi, ti).sum()
            if any_grad:
                (g,) = torch.autograd.grad(loss, s_rows)
                g_low = g.to(low)
                if grad_h is not None:
                    grad_h[bi, ti] = (g_low @ w_low).to(grad_h.dtype)
                if grad_w is not None:
                    if low == dtype:
                        grad_w[:v].addmm_(g_low.T, h_low)
                    else:
                        grad_w[:v] += g_low.T @ h_low
                if grad_b is not None:
                    grad_b[:v] += g.sum(0)
                del g, g_low
            total += loss.detach()
            del s_rows, loss, h_low
        ctx.grads = (  # type: ignore[attr-defined]
            grad_h,
            grad_w.to(w.dtype) if grad_w is not None else None,
            grad_b.to(b.dtype) if grad_b is not None and b is not None else None,
        )
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grads = ctx.grads  # type: ignore[attr-defined]
        if grads is None:
            raise RuntimeError(
                "head_loss_sum supports a single backward pass (its stored gradients are scaled in place "
                "to save memory); call it again for another backward"
            )
        ctx.grads = None  # type: ignore[attr-defined]
        out = tuple(g.mul_(grad_out.to(g.dtype)) if g is not None else None for g in grads)
        return (*out, None)


def _check_student(h_student: Tensor, w_student: Tensor, b_student: Tensor | None, tokens: Tensor | None,
                   mask: Tensor, signal: str) -> None:  # fmt: skip
    """Shape errors here, in words, rather than as a matmul failure deep inside a chunk of the backward."""
    if h_student.dim() != 3 or w_student.dim() != 2 or h_student.shape[-1] != w_student.shape[-1]:
        raise ValueError(
            f"need h_student [B, T, H] and w_student [V, H]; got {tuple(h_student.shape)}, "
            f"{tuple(w_student.shape)}"
        )
    if b_student is not None and tuple(b_student.shape) != (w_student.shape[0],):
        raise ValueError(f"b_student must be [V] = [{w_student.shape[0]}]; got {tuple(b_student.shape)}")
    bt = tuple(h_student.shape[:2])
    if tuple(mask.shape) != bt:
        raise ValueError(f"mask must be [B, T] = {bt}; got {tuple(mask.shape)}")
    if tokens is not None and tuple(tokens.shape) != bt:
        raise ValueError(f"tokens must be [B, T] = {bt}; got {tuple(tokens.shape)}")
    if signal == "sampled" and tokens is None:
        raise ValueError("signal='sampled' needs tokens (the sampled token at every position)")


def _check_teacher(teacher: Tensor, w_teacher: Tensor | None, b_teacher: Tensor | None,
                   bt: tuple[int, ...]) -> None:  # fmt: skip
    if w_teacher is None:
        raise ValueError("a hidden-state teacher needs w_teacher [V_t, H_t]")
    if teacher.dim() != 3 or tuple(teacher.shape[:2]) != bt or teacher.shape[-1] != w_teacher.shape[-1]:
        raise ValueError(
            f"need teacher hidden states [B, T, H_t] with B, T = {bt} and w_teacher [V_t, H_t]; got "
            f"{tuple(teacher.shape)}, {tuple(w_teacher.shape)}"
        )
    if b_teacher is not None and tuple(b_teacher.shape) != (w_teacher.shape[0],):
        raise ValueError(f"b_teacher must be [V_t] = [{w_teacher.shape[0]}]; got {tuple(b_teacher.shape)}")


def _sparse_chunk_loss(teacher: TeacherTopK, y: Tensor, on_chunk: ChunkCallback | None, **objective: Any
                       ) -> Callable[[Tensor, Tensor, Tensor], Tensor]:  # fmt: skip
    """The loss of one chunk of student logit rows against a top-K teacher: the chunk's rows of the
    teacher's ids/log-probs through `sparse_row_loss` (the row maths of `sparse_per_token_loss`, without a
    mask, so no host sync per chunk)."""

    def chunk_loss(s_rows: Tensor, bi: Tensor, ti: Tensor) -> Tensor:
        flat = TeacherTopK(teacher.ids[bi, ti], teacher.logprobs[bi, ti], teacher.token_logprob[bi, ti])
        if on_chunk is not None:
            with torch.no_grad():
                on_chunk(s_rows.detach(), flat, bi, ti)
        return sparse_row_loss(s_rows, flat, y[bi, ti], **objective)

    return chunk_loss


def _dense_chunk_loss(teacher: Tensor, w_teacher: Tensor, b_teacher: Tensor | None, y_all: Tensor | None,
                      on_chunk: ChunkCallback | None, row_loss: Callable[..., Tensor], v: int,
                      dtype: torch.dtype) -> Callable[[Tensor, Tensor, Tensor], Tensor]:  # fmt: skip
    """The loss of one chunk of student logit rows against a hidden-state teacher, whose rows are
    projected through its head here, chunk by chunk, without gradient (the teacher is frozen)."""
    h_t, w_t = teacher.detach(), w_teacher.detach()
    b_t = b_teacher.detach() if b_teacher is not None else None

    def chunk_loss(s_rows: Tensor, bi: Tensor, ti: Tensor) -> Tensor:
        with torch.no_grad():
            t_rows = _project(h_t[bi, ti], w_t, b_t, v, dtype)
            if on_chunk is not None:
                on_chunk(s_rows.detach(), t_rows, bi, ti)
        y = y_all[bi, ti] if y_all is not None else None
        return row_loss(s_rows, t_rows, y)

    return chunk_loss


def head_loss_sum(
    h_student: Tensor,
    w_student: Tensor,
    b_student: Tensor | None,
    teacher: Tensor | TeacherTopK,
    tokens: Tensor | None,
    mask: Tensor,
    *,
    signal: str,
    divergence: str = "reverse_kl",
    k: int = 16,
    support: str = "student",
    renorm: str = "both",
    beta: float = 0.5,
    vocab_size: int | None = None,
    chunk_size: int | None = 2048,
    max_chunk_elements: ChunkElements = DEFAULT_CHUNK_ELEMENTS,
    w_teacher: Tensor | None = None,
    b_teacher: Tensor | None = None,
    on_chunk: ChunkCallback | None = None,
    project_dtype: torch.dtype | None = None,
) -> Tensor:
    """Sum over masked positions of the per-token OPD loss, from hidden states and head weights (0-dim).

    Equal to ``per_token_loss(h_s @ w_s.T + b_s, h_t @ w_t.T + b_t, ...).sum()`` (dense teacher, given as
    hidden states ``[B, T, H_t]`` with ``w_teacher``) or to ``sparse_per_token_loss(...).sum()`` (a
    ``TeacherTopK``), with the same gradients. A sum rather than a mean because the trainer normalises by
    the global token count of the step. ``vocab_size`` keeps the first rows of both heads, as
    ``per_token_loss(vocab_size=)`` keeps the first logit columns. Rows per chunk are
    ``chunk_rows(V, chunk_size, max_chunk_elements, device)`` (``"auto"``: by the hidden states' device, see
    `opd.objectives.token.chunk_elements`; ``chunk_size=None``: one chunk, capped by ``max_chunk_elements``
    unless that is None too). The teacher gets no gradient. No host sync per chunk: the masked positions
    are found once (one ``nonzero``), the sums stay on the device.

    ``on_chunk``, when given, is called once per chunk in the forward (under no_grad) with the chunk's
    detached student logits ``[n, V]`` (the first ``vocab_size`` columns, in the compute dtype), the
    teacher's rows (logits ``[n, V]``, or a ``TeacherTopK`` of the chunk's rows: ``[n, K]`` / ``[n]``)
    and the rows' batch and response-position indices ``[n]`` (masked rows, row-major order).

    ``project_dtype`` (the student's autocast dtype, e.g. bfloat16) runs the student's projection in that
    dtype, as the model's own head would under autocast; the loss maths stays in float32 at least and the
    gradients come back in the weights' dtypes. The teacher's head always projects in its weight's dtype.
    """
    validate_objective(signal, divergence, support, renorm, beta, k)
    _check_student(h_student, w_student, b_student, tokens, mask, signal)
    y_all = tokens.long() if tokens is not None else None
    if isinstance(teacher, TeacherTopK):
        if w_teacher is not None or b_teacher is not None:
            raise ValueError("a TeacherTopK teacher carries its own log-probs; pass no w_teacher/b_teacher")
        check_sparse_objective(signal, support, k, teacher.k)
        v = _shared_rows(w_student.shape[0], None, vocab_size)
        dtype = compute_dtype(h_student, w_student)
        y = y_all if y_all is not None else torch.zeros(mask.shape, dtype=torch.long, device=h_student.device)
        chunk_loss = _sparse_chunk_loss(teacher, y, on_chunk, signal=signal, divergence=divergence, k=k,
                                        renorm=renorm, beta=float(beta))  # fmt: skip
    else:
        _check_teacher(teacher, w_teacher, b_teacher, tuple(mask.shape))
        assert w_teacher is not None  # checked above; for type checkers
        v = _shared_rows(w_student.shape[0], w_teacher.shape[0], vocab_size)
        dtype = compute_dtype(h_student, w_student, teacher, w_teacher)
        row_loss = _make_row_loss(signal, divergence, k, support, renorm, float(beta))
        chunk_loss = _dense_chunk_loss(teacher, w_teacher, b_teacher, y_all, on_chunk, row_loss, v, dtype)

    b_idx, t_idx = masked_positions(mask)
    cfg = {
        "dtype": dtype,
        "v": v,
        "b_idx": b_idx,
        "t_idx": t_idx,
        "chunk_size": chunk_rows(v, chunk_size, max_chunk_elements, device=h_student.device),
        "chunk_loss": chunk_loss,
        "grad_enabled": torch.is_grad_enabled(),
        "project_dtype": project_dtype,
    }
    return _HeadChunkedLoss.apply(h_student, w_student, b_student, cfg)


def spread_rows(rows: Tensor, t_idx: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Rows ``[n, ...]`` laid out as a ``[n, width, ...]`` batch (an expanded view, no copy) and a mask that is
    True at ``(i, t_idx[i])`` only, so every ``[B, T, ...]`` function (diagnostics with position bins, signal
    stats) sees row i at its own response position. Sums over the mask equal sums over the rows."""
    n = rows.shape[0]
    mask = torch.zeros((n, width), dtype=torch.bool, device=rows.device)
    mask[torch.arange(n, device=rows.device), t_idx.to(rows.device)] = True
    return rows.unsqueeze(1).expand(n, width, *rows.shape[1:]), mask


@torch.no_grad()
def projected_rows(
    heads: list[tuple[Tensor, Tensor, Tensor | None]],
    mask: Tensor,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = 2048,
    max_chunk_elements: ChunkElements = DEFAULT_CHUNK_ELEMENTS,
) -> Iterator[tuple[Tensor, Tensor, list[Tensor]]]:
    """The logits of several models at the masked rows, one chunk of rows at a time, without gradient.

    Why: scoring (doctor, prompt selection) compares a student with one or more teachers on the same
    rollouts; projecting each model's hidden states ``[B, T, H]`` chunk by chunk bounds memory by one chunk
    of ``[n, V]`` rows per model instead of ``[B, T, V]`` per model. ``heads`` holds ``(hidden [B, T, H_m],
    weight [V_m, H_m], bias [V_m] or None)`` per model; all hidden states share ``mask``'s ``[B, T]``. Yields
    ``(b_idx [n], t_idx [n], [logits [n, V] per model])`` over the masked rows in row-major order, in float32
    (float64 when any input is), with ``V`` the shared vocabulary (``vocab_size``, else the smallest head).
    """
    if not heads:
        raise ValueError("projected_rows needs at least one (hidden, weight, bias) head")
    bt = tuple(mask.shape)
    v: int | None = None
    for i, (h, w, b) in enumerate(heads):
        if h.dim() != 3 or tuple(h.shape[:2]) != bt or w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(
                f"head {i}: need hidden [B, T, H] with B, T = {bt} and weight [V, H]; got "
                f"{tuple(h.shape)}, {tuple(w.shape)}"
            )
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"head {i}: bias must be [V] = [{w.shape[0]}]; got {tuple(b.shape)}")
        v = w.shape[0] if v is None else min(v, w.shape[0])
    assert v is not None
    v = _shared_rows(v, None, vocab_size)
    dtype = compute_dtype(*(x for h, w, _ in heads for x in (h, w)))
    b_idx, t_idx = masked_positions(mask)
    rows_per_chunk = chunk_rows(v, chunk_size, max_chunk_elements, device=heads[0][0].device)
    for start, stop in row_chunks(b_idx.numel(), rows_per_chunk):
        bi, ti = b_idx[start:stop], t_idx[start:stop]
        yield bi, ti, [_project(h[bi, ti], w, b, v, dtype) for h, w, b in heads]
