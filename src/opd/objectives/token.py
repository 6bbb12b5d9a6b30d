"""Per-token on-policy distillation objectives: signals, supports, divergences and chunking.

Notation follows the paper brief: ``p`` is the student distribution (softmax of the student logits), ``q``
the teacher's. Logits are ``[B, T, V]`` and position ``t`` holds the distribution that produced response
token ``t``; ``mask`` ``[B, T]`` marks the response tokens that count.

Every per-token loss here depends on one row of logits only. That single fact drives the design: the
masked rows are gathered (padding is never computed on), processed in chunks of rows, and the gradient of
each chunk is formed while the chunk is in memory, so a 150k-entry vocabulary never needs more than one
chunk of float32 temporaries on top of the logits and their gradient.

The names of the signals, supports, renorms and divergences, what each combines with and each divergence's
row maths live in `opd.objectives.registry`; this module dispatches on them.

Teacher logits are constants everywhere: the teacher must never receive gradient (it would hold memory
for nothing and, if trainable, silently move the target).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from opd.objectives import registry
from opd.objectives.registry import DIVERGENCES, RENORMS, SIGNALS, SUPPORTS

__all__ = [
    "CPU_CHUNK_ELEMENTS",
    "DEFAULT_CHUNK_ELEMENTS",
    "DIVERGENCES",
    "GPU_CHUNK_ELEMENTS",
    "RENORMS",
    "SIGNALS",
    "SUPPORTS",
    "ChunkElements",
    "chunk_elements",
    "chunk_rows",
    "compute_dtype",
    "divergence_from_log_probs",
    "masked_positions",
    "per_token_loss",
    "row_chunks",
    "row_signal_stats",
    "shared_vocab",
    "signal_stats",
    "support_advantage",
    "support_log_probs",
    "token_loss",
    "topk_support",
    "validate_objective",
]

RowLoss = Callable[[Tensor, Tensor, Tensor | None], Tensor]
# loss.chunk_max_elements: rows x vocabulary per chunk, "auto" (by device) or None (no cap)
ChunkElements = int | Literal["auto"] | None


# --------------------------------------------------------------------------------------------------------
# Validation and shared plumbing
# --------------------------------------------------------------------------------------------------------


def validate_objective(signal: str, divergence: str, support: str, renorm: str, beta: float, k: int) -> None:
    """Reject objective combinations that have no defined meaning, before any compute is spent.

    Failing loudly matters because a silently-accepted combination (for instance a sampled-token JSD)
    would train *something*, just not what the config says.
    """
    sig = registry.signal(signal)
    registry.divergence(divergence)
    registry.support(support)
    ren = registry.renorm(renorm)
    if sig.divergences is not None and divergence not in sig.divergences:
        needed = " or ".join(f"divergence={d!r}" for d in sig.divergences)
        others = " / ".join(f"signal={s.name!r}" for s in registry.entries("signal")
                            if s.divergences is None or divergence in s.divergences)  # fmt: skip
        raise ValueError(
            f"signal={signal!r} with divergence={divergence!r} is invalid: {sig.why}. Use {needed}, or "
            f"{others} for divergence={divergence!r}."
        )
    if not ren.allows(signal, divergence):
        limits = [f"{opt}={' / '.join(map(repr, names))}" for opt, names in
                  (("signal", ren.signals), ("divergence", ren.divergences)) if names is not None]  # fmt: skip
        general = " or ".join(f"renorm={r.name!r} ({r.short})" for r in registry.entries("renorm")
                              if r.allows(signal, divergence))  # fmt: skip
        raise ValueError(
            f"renorm={renorm!r} with signal={signal!r}, divergence={divergence!r} is invalid: {ren.short} "
            f"is defined only for {' with '.join(limits)}. Use {general} for other combinations."
        )
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 <= float(beta) <= 1.0):
        raise ValueError(
            f"beta={beta!r} is invalid: the JSD mixture weight must lie in [0, 1] "
            "(0 = forward KL, 1 = reverse KL, both handled exactly)."
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} is invalid: top-k size must be an integer >= 1 (the paper uses 16).")


def shared_vocab(
    student_logits: Tensor, teacher_logits: Tensor, vocab_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Slice both logit tensors to the shared real vocabulary.

    Same-family models pad their embedding tables to different sizes (151936 vs 152064 for Qwen2.5); the
    padded rows are not real tokens, and comparing distributions of different lengths would misalign
    every probability. Slicing returns views, so nothing is copied.
    """
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is None:
        v = min(vs, vt)
    else:
        if vocab_size < 1 or vocab_size > min(vs, vt):
            raise ValueError(
                f"vocab_size={vocab_size} must be in [1, {min(vs, vt)}] "
                f"(student has {vs} logit columns, teacher {vt})"
            )
        v = vocab_size
    s = student_logits if vs == v else student_logits[..., :v]
    t = teacher_logits if vt == v else teacher_logits[..., :v]
    return s, t


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Float32 at least: bf16 log-softmax over 150k entries loses the small differences OPD trains on."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _check_shapes(student: Tensor, teacher: Tensor, mask: Tensor, tokens: Tensor | None) -> None:
    """Catch misaligned inputs early; a broadcast mismatch would otherwise compute on the wrong rows."""
    if student.dim() != 3 or teacher.dim() != 3:
        raise ValueError(
            f"logits must be [B, T, V]; got student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student and teacher disagree on [B, T]: {tuple(student.shape[:2])} vs {tuple(teacher.shape[:2])}"
        )
    if tuple(mask.shape) != tuple(student.shape[:2]):
        raise ValueError(f"mask must be [B, T] = {tuple(student.shape[:2])}; got {tuple(mask.shape)}")
    if tokens is not None and tuple(tokens.shape) != tuple(student.shape[:2]):
        raise ValueError(
            f"response_tokens must be [B, T] = {tuple(student.shape[:2])}; got {tuple(tokens.shape)}"
        )


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer or None (one chunk)")


# rows x vocabulary per chunk on the CPU: ~128 MB per fp32 temporary, 220 rows at 152k
CPU_CHUNK_ELEMENTS = 2**25
# on a CUDA device: ~1 GiB per fp32 temporary, 1766 rows at 152k (chunk_size caps it)
GPU_CHUNK_ELEMENTS = 2**28
# loss.chunk_max_elements' default: by device (`chunk_elements`)
DEFAULT_CHUNK_ELEMENTS: ChunkElements = "auto"


def chunk_elements(setting: ChunkElements, device: torch.device | str | None = None) -> int | None:
    """The rows x vocabulary cap per chunk that `setting` means on `device`: ``"auto"`` is
    `GPU_CHUNK_ELEMENTS` on a CUDA device and `CPU_CHUNK_ELEMENTS` elsewhere (the CPU, or no device given);
    a number or None is itself.

    Why by device: on the CPU a chunk's cost is its arithmetic and a small chunk keeps the temporaries in
    cache; on a GPU every chunk is a few dozen kernel launches whatever its size, so at 220 rows per chunk
    the launches (not the maths) bound the loss, and the GPU has the memory for ~1 GiB temporaries.
    """
    if setting == "auto":
        if device is not None and torch.device(device).type == "cuda":
            return GPU_CHUNK_ELEMENTS
        return CPU_CHUNK_ELEMENTS
    if setting is not None and (isinstance(setting, bool) or not isinstance(setting, int) or setting < 1):
        raise ValueError(f"max_elements={setting!r} must be a positive integer, 'auto' or None")
    return setting


def chunk_rows(
    vocab: int,
    chunk_size: int | None = 2048,
    max_elements: ChunkElements = DEFAULT_CHUNK_ELEMENTS,
    device: torch.device | str | None = None,
) -> int | None:
    """Rows per chunk (at most ``chunk_size``) so that a [rows, vocab] temporary stays under ``max_elements``
    (``"auto"``: by `device`, see `chunk_elements`; None: ``chunk_size`` alone).

    A row count alone is the wrong unit: 2048 rows are 0.8 MB at a 100-token vocabulary and 1.2 GB (fp32) at
    Qwen's 152k, and the loss and diagnostics each hold several such temporaries at once.
    """
    _check_chunk_size(chunk_size)
    cap_elements = chunk_elements(max_elements, device)
    if cap_elements is None:
        return chunk_size
    cap = max(1, cap_elements // max(vocab, 1))
    return cap if chunk_size is None else min(chunk_size, cap)


def masked_positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Batch and time indices of the counted tokens, so padding rows are never gathered or computed."""
    b_idx, t_idx = mask.bool().nonzero(as_tuple=True)
    return b_idx, t_idx


def row_chunks(n: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    """Half-open row ranges; ``None`` means a single chunk holding everything."""
    step = n if chunk_size is None else chunk_size
    step = max(step, 1)
    for start in range(0, n, step):
        yield start, min(start + step, n)


# --------------------------------------------------------------------------------------------------------
# Divergences and supports (row-local building blocks)
# --------------------------------------------------------------------------------------------------------


def divergence_from_log_probs(
    log_p: Tensor, log_q: Tensor, divergence: str, beta: float = 0.5, valid: Tensor | None = None
) -> Tensor:
    """D(p ‖ q) per row from log-probabilities, optionally restricted to ``valid`` slots.

    Invalid slots must carry finite log-values; they are given probability zero here. ``divergence`` is a
    name in `opd.objectives.registry`, whose entry holds the row maths (JSD: TRL's generalized-JSD
    convention, m = (1−β)p + βq built in log space, the endpoints exactly the KLs).
    """
    rows = registry.divergence(divergence).rows
    p = log_p.exp()
    q = log_q.exp()
    if valid is not None:
        p = torch.where(valid, p, 0.0)
        q = torch.where(valid, q, 0.0)
    return rows(p, log_p, q, log_q, beta)


def topk_support(s_rows: Tensor, t_rows: Tensor, k: int, support: str) -> tuple[Tensor, Tensor]:
    """Support as (ids ``[N, K]``, valid ``[N, K]``) instead of a V-sized mask.

    A boolean ``[N, V]`` mask would cost as much as the logits at V = 150k; ids plus a small validity mask
    cost O(N·k). ``k`` is clamped to V so tiny vocabularies are accepted. The student part always comes
    first so ``overlap`` slots keep the student's ids.
    """
    kk = min(k, s_rows.shape[-1])
    sp = s_rows.detach().topk(kk, dim=-1).indices
    all_valid = torch.ones_like(sp, dtype=torch.bool)
    if support == "student":
        return sp, all_valid
    sq = t_rows.detach().topk(kk, dim=-1).indices
    if support == "teacher":
        return sq, all_valid
    p_in_q = (sp.unsqueeze(-1) == sq.unsqueeze(-2)).any(-1)
    if support == "overlap":
        return sp, p_in_q
    q_in_p = (sq.unsqueeze(-1) == sp.unsqueeze(-2)).any(-1)
    ids = torch.cat([sp, sq], dim=-1)
    if support == "union":
        return ids, torch.cat([all_valid, ~q_in_p], dim=-1)
    if support == "non_overlap":
        return ids, torch.cat([~p_in_q, ~q_in_p], dim=-1)
    raise ValueError(f"unknown support={support!r}; use one of {', '.join(SUPPORTS)}")


def _safe_valid(valid: Tensor) -> tuple[Tensor, Tensor]:
    """Give empty rows one fake valid slot so their log-normaliser stays finite.

    An all-masked logsumexp is −inf and its gradient NaN; callers zero those rows afterwards with
    ``where``, which blocks the (finite) fake gradient too.
    """
    nonempty = valid.any(-1)
    safe = valid.clone()
    safe[:, 0] |= ~nonempty
    return safe, nonempty


def support_log_probs(values: Tensor, valid: Tensor) -> Tensor:
    """Log-softmax over the valid slots only; invalid slots get finite, meaningless values.

    Rows must have at least one valid slot (see ``_safe_valid``).
    """
    lse = torch.logsumexp(values.masked_fill(~valid, float("-inf")), dim=-1, keepdim=True)
    return values - lse


def _gather_log_probs(rows: Tensor, ids: Tensor, lse: Tensor | None = None) -> Tensor:
    """Full-vocabulary log-probs at ``ids`` without materialising a ``[N, V]`` log-softmax."""
    if lse is None:
        lse = torch.logsumexp(rows, dim=-1, keepdim=True)
    return rows.gather(-1, ids) - lse


# --------------------------------------------------------------------------------------------------------
# Row losses
# --------------------------------------------------------------------------------------------------------


def _sampled_rows(s_rows: Tensor, t_rows: Tensor, y: Tensor) -> Tensor:
    """Policy-gradient form of the one-sample reverse-KL estimator; its value is not the KL, its grad is."""
    log_p_y = _gather_log_probs(s_rows, y.unsqueeze(-1)).squeeze(-1)
    log_q_y = _gather_log_probs(t_rows, y.unsqueeze(-1)).squeeze(-1)
    reward = (log_q_y - log_p_y).detach()
    return -reward * log_p_y


def _topk_both_rows(
    s_rows: Tensor, t_rows: Tensor, *, k: int, support: str, divergence: str, beta: float
) -> Tensor:
    """Paper Eq. 5: renormalise both models on the support and take the divergence there."""
    ids, valid = topk_support(s_rows, t_rows, k, support)
    safe, nonempty = _safe_valid(valid)
    log_p = support_log_probs(s_rows.gather(-1, ids), safe)
    log_q = support_log_probs(t_rows.gather(-1, ids), safe)
    loss = divergence_from_log_probs(log_p, log_q, divergence, beta, valid=safe)
    return torch.where(nonempty, loss, 0.0)


def _topk_tail_rows(
    s_rows: Tensor, t_rows: Tensor, *, k: int, support: str, divergence: str, beta: float
) -> Tensor:
    """renorm tail: the support's k slots plus one for each model's remaining mass, neither renormalised
    (`opd.objectives.registry.tail_bucket_log_probs`)."""
    ids, valid = topk_support(s_rows, t_rows, k, support)
    log_p_rest, has_rest = registry.rest_of_rows(s_rows, ids, valid)
    log_q_rest, _ = registry.rest_of_rows(t_rows.detach(), ids, valid)
    log_p, log_q, slots = registry.tail_bucket_log_probs(
        _gather_log_probs(s_rows, ids),
        _gather_log_probs(t_rows, ids),
        valid,
        log_p_rest,
        log_q_rest,
        has_rest,
    )
    return divergence_from_log_probs(log_p, log_q, divergence, beta, valid=slots)


def support_advantage(log_p_sel: Tensor, log_q_sel: Tensor, valid: Tensor) -> Tensor:
    """Released-code advantage A(v) = w(v)·δ(v) on the support (0 on invalid slots), detached.

    w is p renormalised on the support (computed in log space so supports where the student puts
    underflowing mass still get exact weights); δ uses the UN-renormalised full-vocabulary log-probs.
    """
    log_p_sel = log_p_sel.detach()
    safe, nonempty = _safe_valid(valid)
    w = torch.where(valid, support_log_probs(log_p_sel, safe).exp(), 0.0)
    adv = torch.where(valid, w * (log_q_sel.detach() - log_p_sel), 0.0)
    return torch.where(nonempty.unsqueeze(-1), adv, 0.0)


def _topk_weights_rows(s_rows: Tensor, t_rows: Tensor, *, k: int, support: str) -> Tensor:
    """Released code: −Σ_S w·δ·log p_θ, i.e. the truncated reverse-KL gradient over the top-k mass."""
    ids, valid = topk_support(s_rows, t_rows, k, support)
    log_p_sel = _gather_log_probs(s_rows, ids)  # live
    log_q_sel = _gather_log_probs(t_rows, ids)
    adv = support_advantage(log_p_sel, log_q_sel, valid)
    return -(adv * log_p_sel).sum(-1)


def _full_rows(s_rows: Tensor, t_rows: Tensor, *, divergence: str, beta: float) -> Tensor:
    """Exact divergence over the whole shared vocabulary."""
    log_p = torch.log_softmax(s_rows, dim=-1)
    log_q = torch.log_softmax(t_rows, dim=-1)
    return divergence_from_log_probs(log_p, log_q, divergence, beta)


def _make_row_loss(signal: str, divergence: str, k: int, support: str, renorm: str, beta: float) -> RowLoss:
    """Bind the configuration once so the chunk loop only sees (student rows, teacher rows, tokens)."""
    if signal == "sampled":

        def sampled(s: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
            assert y is not None
            return _sampled_rows(s, t, y)

        return sampled
    if signal == "topk" and renorm == "weights":
        fn = functools.partial(_topk_weights_rows, k=k, support=support)
    elif signal == "topk" and renorm == "tail":
        fn = functools.partial(_topk_tail_rows, k=k, support=support, divergence=divergence, beta=beta)
    elif signal == "topk":
        fn = functools.partial(_topk_both_rows, k=k, support=support, divergence=divergence, beta=beta)
    else:
        fn = functools.partial(_full_rows, divergence=divergence, beta=beta)
    return lambda s, t, y: fn(s, t)


# --------------------------------------------------------------------------------------------------------
# Chunked autograd
# --------------------------------------------------------------------------------------------------------


class _ChunkedRowLoss(torch.autograd.Function):
    """Per-row losses computed chunk by chunk, each chunk's gradient formed while it is in memory.

    Plain autograd would keep every chunk's float32 temporaries (log-softmax, probabilities, ...) alive
    until backward, i.e. several copies of ``[N, V]``. Because each loss depends on its own row only, the
    gradient of ``Σ_rows c_row · loss_row`` is ``c_row · ∇loss_row``: the forward stores ∇loss_row in a
    buffer shaped like the student logits, and the backward only scales it. The buffer is scaled in place
    and released, so backward may run once (``chunk_size=None`` supports retain_graph/double backward).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student: Tensor,
        teacher: Tensor,
        tokens: Tensor | None,
        b_idx: Tensor,
        t_idx: Tensor,
        row_loss: RowLoss,
        chunk_size: int,
        dtype: torch.dtype,
        need_grad: bool,
    ) -> Tensor:
        out = torch.zeros(student.shape[:2], dtype=dtype, device=student.device)
        buf = torch.zeros_like(student) if need_grad else None
        for start, stop in row_chunks(b_idx.numel(), chunk_size):
            bi, ti = b_idx[start:stop], t_idx[start:stop]
            t_rows = teacher[bi, ti].to(dtype)
            y = tokens[bi, ti] if tokens is not None else None
            s_rows = student[bi, ti].detach().to(dtype)
            if buf is not None:
                with torch.enable_grad():
                    s_rows.requires_grad_(True)
                    loss = row_loss(s_rows, t_rows, y)
                    (grad,) = torch.autograd.grad(loss.sum(), s_rows)
                buf[bi, ti] = grad.to(buf.dtype)
            else:
                loss = row_loss(s_rows, t_rows, y)
            out[bi, ti] = loss.detach()
        ctx.buf = buf  # type: ignore[attr-defined]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        buf: Tensor | None = ctx.buf  # type: ignore[attr-defined]
        if buf is None:
            if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
                return (None,) * 9
            raise RuntimeError(
                "chunked per_token_loss supports a single backward pass (its gradient buffer is scaled in "
                "place to save memory); use chunk_size=None for retain_graph or repeated backward"
            )
        ctx.buf = None  # type: ignore[attr-defined]
        grad = buf.mul_(grad_out.unsqueeze(-1).to(buf.dtype))
        return (grad, None, None, None, None, None, None, None, None)


# --------------------------------------------------------------------------------------------------------
# Public losses
# --------------------------------------------------------------------------------------------------------


def per_token_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    response_tokens: Tensor | None,
    mask: Tensor,
    *,
    signal: str,
    divergence: str = "reverse_kl",
    k: int = 16,
    support: str = "student",
    renorm: str = "both",
    beta: float = 0.5,
    chunk_size: int | None = 2048,
    vocab_size: int | None = None,
) -> Tensor:
    """Per-token OPD loss ``[B, T]`` (float32, or float64 for float64 inputs), zero where ``mask`` is False.

    Exposed (rather than only the mean) because gradient accumulation must normalise by the GLOBAL token
    count of the batch: averaging per micro-batch makes the gradient depend on how the batch is split.

    ``response_tokens`` is needed only for ``signal="sampled"``. ``support`` / ``renorm`` only matter for
    ``signal="topk"``; ``beta`` only for a divergence that uses it (jsd). Chunking applies to every signal
    (each loss is row-local), so long rollouts with a 150k vocabulary stay within one chunk of temporaries.
    """
    validate_objective(signal, divergence, support, renorm, beta, k)
    _check_chunk_size(chunk_size)
    _check_shapes(student_logits, teacher_logits, mask, response_tokens)
    if signal == "sampled" and response_tokens is None:
        raise ValueError("signal='sampled' needs response_tokens (the sampled token at every position)")
    student, teacher = shared_vocab(student_logits, teacher_logits, vocab_size)
    teacher = teacher.detach()
    dtype = compute_dtype(student, teacher)
    tokens = response_tokens.long() if (signal == "sampled" and response_tokens is not None) else None
    row_loss = _make_row_loss(signal, divergence, k, support, renorm, float(beta))
    b_idx, t_idx = masked_positions(mask)

    if chunk_size is None:
        s_rows = student[b_idx, t_idx].to(dtype)
        t_rows = teacher[b_idx, t_idx].to(dtype)
        y = tokens[b_idx, t_idx] if tokens is not None else None
        losses = row_loss(s_rows, t_rows, y)
        zeros = torch.zeros(student.shape[:2], dtype=dtype, device=student.device)
        return zeros.index_put((b_idx, t_idx), losses)

    need_grad = torch.is_grad_enabled() and student.requires_grad
    return _ChunkedRowLoss.apply(
        student, teacher, tokens, b_idx, t_idx, row_loss, chunk_size, dtype, need_grad
    )


def token_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    response_tokens: Tensor | None,
    mask: Tensor,
    *,
    signal: str,
    divergence: str = "reverse_kl",
    k: int = 16,
    support: str = "student",
    renorm: str = "both",
    beta: float = 0.5,
    chunk_size: int | None = 2048,
    vocab_size: int | None = None,
) -> Tensor:
    """Token-mean of ``per_token_loss`` over this call's masked tokens (scalar).

    With no masked token the result is an exact 0 that still carries the graph, so a rank with an empty
    micro-batch takes part in gradient synchronisation instead of producing NaN or skipping backward.
    """
    per_token = per_token_loss(
        student_logits,
        teacher_logits,
        response_tokens,
        mask,
        signal=signal,
        divergence=divergence,
        k=k,
        support=support,
        renorm=renorm,
        beta=beta,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
    )
    count = mask.bool().sum().clamp_min(1).to(per_token.dtype)
    return per_token.sum() / count


# --------------------------------------------------------------------------------------------------------
# Training-time signals
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def signal_stats(
    student_logits: Tensor,
    teacher_logits: Tensor,
    response_tokens: Tensor | None,
    mask: Tensor,
    *,
    signal: str,
    k: int = 16,
    support: str = "student",
    vocab_size: int | None = None,
    chunk_size: int | None = 2048,
) -> dict[str, float]:
    """What the trainer logs about the training signal itself (paper §2 "training signals").

    Keys: ``reward_mean`` (mean r_t = log q_t(y_t) − log p_t(y_t); needs ``response_tokens``, else 0.0),
    ``adv_max_abs`` (largest |advantage|: |r_t| for sampled; |w·δ| over the support for topk, over the
    student top-k for full), ``p_minus_q_at_max_adv`` (full-vocabulary p − q at that slot) and
    ``n_tokens``. With no masked token every value is 0.0 so the logged key set never changes; read
    ``n_tokens`` to tell that case apart.
    """
    validate_objective(signal, "reverse_kl", support, "both", 0.5, k)
    _check_chunk_size(chunk_size)
    _check_shapes(student_logits, teacher_logits, mask, response_tokens)
    if signal == "sampled" and response_tokens is None:
        raise ValueError("signal='sampled' needs response_tokens to compute its advantage")
    student, teacher = shared_vocab(student_logits, teacher_logits, vocab_size)
    dtype = compute_dtype(student, teacher)
    b_idx, t_idx = masked_positions(mask)
    device = student.device
    reward_sum = torch.zeros((), dtype=torch.float64, device=device)
    best = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=device)
    for start, stop in row_chunks(b_idx.numel(), chunk_size):
        bi, ti = b_idx[start:stop], t_idx[start:stop]
        y = response_tokens[bi, ti] if response_tokens is not None else None
        reward, chunk_best = row_signal_stats(
            student[bi, ti].to(dtype), teacher[bi, ti].to(dtype), y, signal=signal, k=k, support=support
        )
        reward_sum += reward
        best = torch.where(chunk_best[0] > best[0], chunk_best, best)
    n = b_idx.numel()
    reward_sum, best_abs, best_pmq = torch.cat([reward_sum.reshape(1), best]).tolist()  # one host copy
    return {
        "reward_mean": reward_sum / n if n else 0.0,
        "adv_max_abs": max(best_abs, 0.0),
        "p_minus_q_at_max_adv": best_pmq,
        "n_tokens": float(n),
    }


def row_signal_stats(s_rows: Tensor, t_rows: Tensor, y: Tensor | None, *, signal: str, k: int = 16,
                     support: str = "student") -> tuple[Tensor, Tensor]:  # fmt: skip
    """`signal_stats` of rows ``[n, V]`` (student and teacher logits of masked positions, in the compute
    dtype) and their sampled tokens ``y`` ``[n]`` (None: no reward), on the rows' device with no host sync:
    (the reward sum 0-dim, ``[largest |advantage|, p - q there]``), float64; the largest is -1 where no
    slot is valid. The trainer's step statistics call it once per chunk of the loss."""
    f64 = torch.float64
    lse_s = torch.logsumexp(s_rows, dim=-1, keepdim=True)
    lse_t = torch.logsumexp(t_rows, dim=-1, keepdim=True)
    reward = None
    reward_sum = torch.zeros((), dtype=f64, device=s_rows.device)
    if y is not None:
        y = y.long().unsqueeze(-1)
        reward = (_gather_log_probs(t_rows, y, lse_t) - _gather_log_probs(s_rows, y, lse_s)).squeeze(-1)
        reward_sum = reward_sum + reward.sum().to(f64)
    if signal == "sampled":
        if reward is None or y is None:
            raise ValueError("signal='sampled' needs the sampled tokens to compute its advantage")
        ids, valid, adv = y, torch.ones_like(y, dtype=torch.bool), reward.unsqueeze(-1)
    else:
        ids, valid = topk_support(s_rows, t_rows, k, support if signal == "topk" else "student")
        log_p_sel = _gather_log_probs(s_rows, ids, lse_s)
        adv = support_advantage(log_p_sel, _gather_log_probs(t_rows, ids, lse_t), valid)
    score = torch.where(valid, adv.abs(), -1.0).flatten()
    if score.numel() == 0:  # no row: a shape, known on the host
        return reward_sum, torch.tensor([-1.0, 0.0], dtype=f64, device=s_rows.device)
    # 1-element index tensors throughout: indexing with a 0-dim tensor would read it back to the host
    flat = score.argmax().reshape(1)
    row, slot = flat // ids.shape[-1], flat % ids.shape[-1]
    v = ids[row, slot]
    pmq = (s_rows[row, v] - lse_s[row, 0]).exp() - (t_rows[row, v] - lse_t[row, 0]).exp()
    return reward_sum, torch.cat([score[flat].to(f64), pmq.to(f64)])
