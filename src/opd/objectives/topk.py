"""OPD losses from a teacher that only returns its top-K log-probs (vLLM prompt logprobs, HTTP servers).

Engine and remote teachers cannot return ``[B, T, V]`` logits: vLLM gives, at every position, the actual
token's log-prob and the top-K (K <= 20 by default). That is exactly enough for two of the paper's
objectives, with no approximation:

- sampled-token: needs log q(y_t) of the sampled token only;
- top-k on the TEACHER's support (k <= K): the support ids are the teacher's own top-k, Eq. 5
  renormalises both models on it (renormalising log-probs equals renormalising logits), and the
  released-code variant needs the un-renormalised log q on it, which the engine returns.

Everything else (full vocabulary, the student's or the union/overlap support, teacher entropy) needs
teacher log-probs at ids the engine did not return, so `check_sparse_objective` refuses it and names the
alternatives. ``renorm="tail"`` (opt-in) keeps to what the engine returned as well: the teacher's remaining
mass is 1 minus its top-k mass, so the divergence over the top-k plus one "everything else" slot is exact,
a lower bound of the full-vocabulary one rather than the truncated sum, which is biased and often negative. These functions mirror `opd.objectives.token` row by row and are tested against it on dense
logits cut down to their top-K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opd.errors import ConfigError
from opd.objectives import registry
from opd.objectives.token import (
    _safe_valid,
    divergence_from_log_probs,
    masked_positions,
    row_chunks,
    support_advantage,
    support_log_probs,
    validate_objective,
)

__all__ = [
    "FIDELITY_WARN_MEAN",
    "SPARSE_METRICS",
    "TeacherTopK",
    "add_sparse_row_sums",
    "check_sparse_diagnostics",
    "check_sparse_objective",
    "sparse_diagnostic_sums",
    "sparse_per_token_loss",
    "sparse_row_loss",
    "sparse_row_signal_stats",
    "sparse_signal_stats",
    "sparse_zero_sums",
    "topk_fidelity",
    "topk_from_logits",
    "topk_from_prompt_logprobs",
]


@dataclass
class TeacherTopK:
    """What a top-K teacher returns for a rollout: ``ids``/``logprobs`` ``[B, T, K]`` sorted by rank
    (true full-vocabulary log-probs, not renormalised) and ``token_logprob`` ``[B, T]`` of the sampled
    token (present even when it is outside the top-K)."""

    ids: Tensor
    logprobs: Tensor
    token_logprob: Tensor

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    def select(self, rows: slice | Tensor) -> TeacherTopK:
        """The rows of a micro-batch (the same rows as `Rollout.select`; the columns stay, since every use
        indexes masked positions)."""
        return TeacherTopK(self.ids[rows], self.logprobs[rows], self.token_logprob[rows])

    @property
    def valid(self) -> Tensor:
        """Slots holding a real entry (`restrict` empties the ones past the shared vocabulary)."""
        return torch.isfinite(self.logprobs)

    def support(
        self, b_idx: Tensor, t_idx: Tensor, k: int, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(ids, log-probs, valid) of the first `k` slots at the given positions; slots emptied by
        `restrict` are invalid and carry log-prob 0 so no -inf reaches the arithmetic."""
        return _support(self.ids[b_idx, t_idx, :k], self.logprobs[b_idx, t_idx, :k], dtype)

    def restrict(self, vocab_size: int) -> TeacherTopK:
        """Empty the slots whose ids are past the shared vocabulary (id 0, log-prob -inf).

        An engine ranks every output row of the teacher, padded ones included (Qwen2.5 pads 151665
        tokens to 151936 rows); the student has no such ids, so those slots leave the support. The
        remaining log-probs keep the engine's normalisation over all rows (see `topk_fidelity`).
        """
        outside = self.ids >= vocab_size
        if not bool(outside.any()):
            return self
        return TeacherTopK(self.ids.masked_fill(outside, 0), self.logprobs.masked_fill(outside, float("-inf")),
                           self.token_logprob)  # fmt: skip

    def to(self, device: torch.device | str) -> TeacherTopK:
        return TeacherTopK(self.ids.to(device), self.logprobs.to(device), self.token_logprob.to(device))


def _support(ids: Tensor, logprobs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """`TeacherTopK.support` of already selected slots ``[..., k]``."""
    log_q = logprobs.to(dtype)
    valid = torch.isfinite(log_q)
    return ids.long(), torch.where(valid, log_q, 0.0), valid


def topk_from_logits(teacher_logits: Tensor, tokens: Tensor, k: int) -> TeacherTopK:
    """The top-K view of dense teacher logits (what an engine would return), for tests and HF teachers."""
    log_q = torch.log_softmax(teacher_logits.double() if teacher_logits.dtype == torch.float64 else
                              teacher_logits.float(), dim=-1)  # fmt: skip
    vals, ids = log_q.topk(min(k, log_q.shape[-1]), dim=-1)
    return TeacherTopK(
        ids=ids, logprobs=vals, token_logprob=log_q.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    )


def topk_from_prompt_logprobs(rows: list[list[dict[int, tuple[int, float]]]], response_ids: Tensor,
                              k: int) -> TeacherTopK:  # fmt: skip
    """A `TeacherTopK` from an engine's per-position prompt log-probs, one list per rollout row.

    ``rows[r][j]`` is the entry of response position j: ``{token_id: (rank, logprob)}`` holding the
    engine's top-k (ranks 1..k) and the actual token (with its own rank, possibly > k). Positions past
    a row's list (padding) keep -inf log-probs and id 0, which no loss or metric reads (masked). The result
    is built on the host (the trainer places it); `response_ids` may live anywhere, read back once.
    """
    b, t = response_ids.shape
    ids = torch.zeros((b, t, k), dtype=torch.long)
    lps = torch.full((b, t, k), float("-inf"), dtype=torch.float32)
    tok_lp = torch.full((b, t), float("-inf"), dtype=torch.float32)
    tokens = response_ids.tolist()  # one device -> host copy, not one per response token
    for r, entries in enumerate(rows):
        for j, entry in enumerate(entries):
            actual = int(tokens[r][j])
            if actual not in entry:
                raise ValueError(f"the engine returned no log-prob for the scored token {actual} (row {r}, "
                                 f"position {j}): is it serving a model with another tokenizer?")  # fmt: skip
            tok_lp[r, j] = entry[actual][1]
            top = sorted((rank, tid, lp) for tid, (rank, lp) in entry.items() if rank <= k)[:k]
            if len(top) < k:
                raise ValueError(f"the engine returned {len(top)} top log-probs at row {r}, position {j}, "
                                 f"fewer than the {k} asked for; raise its --max-logprobs")  # fmt: skip
            for slot, (_, tid, lp) in enumerate(top):
                ids[r, j, slot] = tid
                lps[r, j, slot] = lp
    return TeacherTopK(ids=ids, logprobs=lps, token_logprob=tok_lp)


def check_sparse_objective(signal: str, support: str, k: int, teacher_k: int) -> None:
    """Refuse objectives a top-K teacher cannot serve, naming what would work instead."""
    ok = (
        "loss.signal sampled, or loss.signal topk with loss.support teacher and loss.k <= the teacher's top-K"
    )
    if signal == "full":
        raise ConfigError(f"loss.signal full needs the teacher's full distribution, which a top-K teacher "
                          f"(vLLM/HTTP) does not return; use {ok} (with loss.renorm tail for a lower bound of "
                          "the full divergence: the remaining mass of both models as one extra slot)")  # fmt: skip
    if signal == "topk" and support != "teacher":
        raise ConfigError(f"loss.support {support} needs teacher log-probs at the student's top-k ids, which a "
                          f"top-K teacher does not return; use {ok}")  # fmt: skip
    if signal == "topk" and k > teacher_k:
        raise ConfigError(f"loss.k {k} > the teacher's top-K {teacher_k}; lower loss.k or raise the engine's "
                          "logprob count (vLLM: --max-logprobs)")  # fmt: skip


def sparse_per_token_loss(
    student_logits: Tensor,
    teacher: TeacherTopK,
    response_tokens: Tensor,
    mask: Tensor,
    *,
    signal: str,
    divergence: str = "reverse_kl",
    k: int = 16,
    support: str = "teacher",
    renorm: str = "both",
    beta: float = 0.5,
    vocab_size: int | None = None,
) -> Tensor:
    """Per-token loss ``[B, T]`` like `opd.objectives.token.per_token_loss`, from a top-K teacher."""
    validate_objective(signal, divergence, support, renorm, beta, k)
    check_sparse_objective(signal, support, k, teacher.k)
    student = student_logits[..., :vocab_size] if vocab_size else student_logits
    dtype = _rows_dtype(student)
    b_idx, t_idx = masked_positions(mask)
    rows = TeacherTopK(
        teacher.ids[b_idx, t_idx], teacher.logprobs[b_idx, t_idx], teacher.token_logprob[b_idx, t_idx]
    )
    y = response_tokens[b_idx, t_idx] if response_tokens is not None else torch.zeros_like(b_idx)
    losses = sparse_row_loss(student[b_idx, t_idx].to(dtype), rows, y, signal=signal,
                             divergence=divergence, k=k, renorm=renorm, beta=beta)  # fmt: skip
    zeros = torch.zeros(student.shape[:2], dtype=dtype, device=student.device)
    return zeros.index_put((b_idx, t_idx), losses)


def sparse_row_loss(s_rows: Tensor, teacher: TeacherTopK, y: Tensor, *, signal: str, divergence: str = "reverse_kl",
                    k: int = 16, renorm: str = "both", beta: float = 0.5) -> Tensor:  # fmt: skip
    """`sparse_per_token_loss` of rows: the student's logits ``[n, V]`` at masked positions (in the compute
    dtype), the teacher's rows there (`TeacherTopK` of ``[n, K]`` / ``[n]``) and the sampled tokens ``y``
    ``[n]``; returns ``[n]``. No mask and so no ``nonzero``: the hidden-state loss calls it once per chunk
    without a host sync. The objective is checked by the callers (`check_sparse_objective`)."""
    dtype = s_rows.dtype
    lse = torch.logsumexp(s_rows, dim=-1, keepdim=True)
    if signal == "sampled":
        y = y.long().unsqueeze(-1)
        log_p_y = (s_rows.gather(-1, y) - lse).squeeze(-1)
        reward = (teacher.token_logprob.to(dtype) - log_p_y).detach()
        return -reward * log_p_y
    # slots emptied by `TeacherTopK.restrict` leave the support
    ids, log_q_sel, valid = _support(teacher.ids[:, :k], teacher.logprobs[:, :k], dtype)
    if renorm == "weights":
        log_p_sel = s_rows.gather(-1, ids) - lse
        return -(support_advantage(log_p_sel, log_q_sel, valid) * log_p_sel).sum(-1)
    if renorm == "tail":
        # the student's rest exactly from its whole row; the teacher's from its top-k alone (all it sent)
        log_p_rest, has_rest = registry.rest_of_rows(s_rows, ids, valid, lse)
        log_p, log_q, slots = registry.tail_bucket_log_probs(s_rows.gather(-1, ids) - lse, log_q_sel, valid,
                                                             log_p_rest, registry.rest_log_prob(log_q_sel, valid),
                                                             has_rest)  # fmt: skip
        return divergence_from_log_probs(log_p, log_q, divergence, beta, slots)
    safe, nonempty = _safe_valid(valid)
    log_p = support_log_probs(s_rows.gather(-1, ids), safe)
    log_q = support_log_probs(log_q_sel, safe)
    return torch.where(nonempty, divergence_from_log_probs(log_p, log_q, divergence, beta, safe), 0.0)


def _rows_dtype(student: Tensor) -> torch.dtype:
    """float64 for float64 inputs (the reference tests), float32 otherwise, as the dense functions."""
    return torch.float64 if student.dtype == torch.float64 else torch.float32


@torch.no_grad()
def sparse_signal_stats(student_logits: Tensor, teacher: TeacherTopK, response_tokens: Tensor, mask: Tensor, *,
                        signal: str, k: int = 16, vocab_size: int | None = None,
                        chunk_size: int | None = 2048) -> dict[str, float]:  # fmt: skip
    """`opd.objectives.token.signal_stats` from a top-K teacher (support "teacher" for topk, as the loss).

    Every quantity is known exactly: r_t needs only log q(y_t); the advantages and the p - q at the
    largest one are taken on the teacher's own top-k, where the engine returned log q. Rows are processed
    in chunks, so a 150k vocabulary costs one chunk of temporaries.
    """
    check_sparse_objective(signal, "teacher", k, teacher.k)
    student = student_logits[..., :vocab_size] if vocab_size else student_logits
    dtype = _rows_dtype(student)
    b_idx, t_idx = masked_positions(mask)
    n = b_idx.numel()
    reward_sum = torch.zeros((), dtype=torch.float64, device=student.device)
    best = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=student.device)
    for start, stop in row_chunks(n, chunk_size):
        bi, ti = b_idx[start:stop], t_idx[start:stop]
        rows = TeacherTopK(teacher.ids[bi, ti], teacher.logprobs[bi, ti], teacher.token_logprob[bi, ti])
        reward, chunk_best = sparse_row_signal_stats(student[bi, ti].to(dtype), rows, response_tokens[bi, ti],
                                                     signal=signal, k=k)  # fmt: skip
        reward_sum += reward
        best = torch.where(chunk_best[0] > best[0], chunk_best, best)
    if n == 0:
        return {"reward_mean": 0.0, "adv_max_abs": 0.0, "p_minus_q_at_max_adv": 0.0, "n_tokens": 0.0}
    reward_sum, best_abs, best_pmq = torch.cat([reward_sum.reshape(1), best]).tolist()  # one host copy
    return {
        "reward_mean": reward_sum / n,
        "adv_max_abs": best_abs,
        "p_minus_q_at_max_adv": best_pmq,
        "n_tokens": float(n),
    }


@torch.no_grad()
def sparse_row_signal_stats(s_rows: Tensor, teacher: TeacherTopK, y: Tensor, *, signal: str,
                            k: int = 16) -> tuple[Tensor, Tensor]:  # fmt: skip
    """`sparse_signal_stats` of rows (the student's logits ``[n, V]`` in the compute dtype, the teacher's rows
    ``[n, K]`` / ``[n]``, the sampled tokens ``[n]``), on the rows' device with no host sync: (the reward sum
    0-dim, ``[largest |advantage|, p - q there]``), float64. The largest is -1 where it is NaN."""
    f64 = torch.float64
    dtype = s_rows.dtype
    log_p = torch.log_softmax(s_rows, dim=-1)
    y = y.long().unsqueeze(-1)
    log_q_y = teacher.token_logprob.to(dtype).unsqueeze(-1)
    reward = (log_q_y - log_p.gather(-1, y)).squeeze(-1)
    if signal == "sampled":
        ids, log_q_sel, adv = y, log_q_y, reward.unsqueeze(-1)
    else:
        ids, log_q_sel, valid = _support(teacher.ids[:, :k], teacher.logprobs[:, :k], dtype)
        adv = torch.where(valid, support_advantage(log_p.gather(-1, ids), log_q_sel, valid), 0.0)
    score = adv.abs().flatten()
    flat = score.argmax().reshape(1)  # 1-element index tensors: a 0-dim index would be read back to the host
    row, slot = flat // ids.shape[-1], flat % ids.shape[-1]
    pmq = log_p[row, ids[row, slot]].exp() - log_q_sel[row, slot].exp()
    best = torch.cat([score[flat].to(f64), pmq.to(f64)])
    # a NaN largest is never taken (as a comparison with it is false): reported as "none"
    best = torch.where(best[0] > -1.0, best, torch.tensor([-1.0, 0.0], dtype=f64, device=best.device))
    return reward.double().sum(), best


SPARSE_METRICS: tuple[str, ...] = (
    "overlap_ratio",
    "overlap_mass_student",
    "overlap_mass_teacher",
    "overlap_token_advantage",
    "entropy_student",
)
"""The diagnostics a top-K teacher allows exactly (I_t is inside the teacher's top-k, so the teacher's
log-probs on it are known); teacher entropy, entropy gap and the full KLs need its whole distribution."""


@torch.no_grad()
def sparse_diagnostic_sums(student_logits: Tensor, teacher: TeacherTopK, mask: Tensor, *, k: int = 16,
                           vocab_size: int | None = None, chunk_size: int | None = 2048) -> dict[str, Tensor]:  # fmt: skip
    """Float64 sums/counts of `SPARSE_METRICS`, in `opd.diagnostics.diagnostic_sums`' format (so
    `merge_sums`/`finalize` and the trainer's cross-process reduction apply unchanged)."""
    check_sparse_diagnostics(k, teacher.k)
    student = student_logits[..., :vocab_size] if vocab_size else student_logits
    dtype = _rows_dtype(student)
    b_idx, t_idx = masked_positions(mask)
    out = sparse_zero_sums(student.device)  # opd.device: a step's sums live on the compute device
    for start, stop in row_chunks(b_idx.numel(), chunk_size):
        bi, ti = b_idx[start:stop], t_idx[start:stop]
        rows = TeacherTopK(teacher.ids[bi, ti], teacher.logprobs[bi, ti], teacher.token_logprob[bi, ti])
        add_sparse_row_sums(out, student[bi, ti].to(dtype), rows, k=k)
    return out


def check_sparse_diagnostics(k: int, teacher_k: int) -> None:
    if k > teacher_k:
        raise ConfigError(f"diagnostics.k {k} > the teacher's top-K {teacher_k}; lower diagnostics.k")


def sparse_zero_sums(device: torch.device | str) -> dict[str, Tensor]:
    """`sparse_diagnostic_sums`' keys, all zero, on `device`."""
    f64 = torch.float64
    out = {f"{name}__sum": torch.zeros((), dtype=f64, device=device) for name in SPARSE_METRICS}
    out["tokens__count"] = torch.zeros((), dtype=f64, device=device)
    out["overlap_nonempty__count"] = torch.zeros((), dtype=f64, device=device)
    return out


@torch.no_grad()
def add_sparse_row_sums(out: dict[str, Tensor], s_rows: Tensor, teacher: TeacherTopK, *, k: int = 16) -> None:
    """Add one chunk of rows to `sparse_zero_sums`' sums, in place on the device with no host sync: the
    student's logits ``[n, V]`` (the shared vocabulary, in the compute dtype) and the teacher's rows there
    (`TeacherTopK` of ``[n, K]`` / ``[n]``)."""
    f64 = torch.float64
    n = int(s_rows.shape[0])
    if n == 0:
        return
    dtype = s_rows.dtype
    kk = min(k, s_rows.shape[-1])
    log_p = torch.log_softmax(s_rows, dim=-1)
    sp = s_rows.topk(kk, dim=-1).indices
    sq, lq_top, sq_valid = _support(teacher.ids[:, :kk], teacher.logprobs[:, :kk], dtype)
    # [N, k(student), k(teacher)]: which student top-k id sits at which teacher slot
    match = (sp.unsqueeze(-1) == sq.unsqueeze(-2)) & sq_valid.unsqueeze(-2)
    in_i = match.any(-1)
    size = in_i.sum(-1)
    nonempty = size > 0
    lp_i = log_p.gather(-1, sp)
    lq_i = torch.where(match, lq_top.unsqueeze(-2), 0.0).sum(-1)  # the teacher's log-prob there
    mass_p = torch.where(in_i, lp_i.exp(), 0.0).sum(-1)
    mass_q = torch.where(in_i, lq_i.exp(), 0.0).sum(-1)
    safe = in_i | ~nonempty.unsqueeze(-1)
    lpt = support_log_probs(lp_i, safe)
    lqt = support_log_probs(torch.where(in_i, lq_i, lp_i), safe)
    adv = torch.where(in_i, lpt.exp() * (lqt - lpt), 0.0).sum(-1) / size.clamp_min(1).to(dtype)
    p = log_p.exp()
    h_p = -torch.where(p > 0, p * log_p, 0.0).sum(-1)
    del p, log_p
    out["tokens__count"] += float(n)
    out["overlap_ratio__sum"] += (size.to(f64) / kk).sum()
    out["overlap_mass_student__sum"] += mass_p.to(f64).sum()
    out["overlap_mass_teacher__sum"] += mass_q.to(f64).sum()
    out["overlap_token_advantage__sum"] += torch.where(nonempty, adv, 0.0).to(f64).sum()
    out["entropy_student__sum"] += h_p.to(f64).sum()
    out["overlap_nonempty__count"] += nonempty.sum().to(f64)


FIDELITY_WARN_MEAN = 0.05
"""Mean |Δ log-prob| (nats) between an engine teacher and the HF model above which start-up warns. The
measured bf16-engine vs fp32-HF gap on Qwen2.5-Coder-1.5B was 0.020 mean, 0.35 max (real-models.md)."""


@torch.no_grad()
def topk_fidelity(engine: TeacherTopK, reference_logits: Tensor, mask: Tensor, *,
                  again: TeacherTopK | None = None) -> dict[str, float]:  # fmt: skip
    """How far an engine teacher's top-K scores are from the in-process HF model's on the same ids.

    Returns max/mean |Δ log-prob| over the engine's top-K slots (the reference's log-probs at the
    engine's ids), the share of positions whose top-1 agrees and whose top-K sets are identical, whether a
    second scoring (`again`) was bitwise identical, and ``ok`` (mean |Δ| <= `FIDELITY_WARN_MEAN` and
    deterministic).
    """
    ref = topk_from_logits(reference_logits, torch.zeros_like(mask, dtype=torch.long), engine.k)
    log_q = torch.log_softmax(reference_logits.double(), dim=-1)
    m = mask.bool()
    # reference log-probs at the engine's own ids and at the sampled token
    ref_at_ids = log_q.gather(-1, engine.ids.long())
    d_top = (engine.logprobs.double() - ref_at_ids).abs()[m][engine.valid[m]]  # emptied slots skipped
    out = {
        "top_mean_abs_delta": float(d_top.mean()) if d_top.numel() else float("nan"),
        "top_max_abs_delta": float(d_top.max()) if d_top.numel() else float("nan"),
        "top1_agreement": float((engine.ids[..., 0] == ref.ids[..., 0])[m].double().mean()),
        "topk_set_agreement": float(
            (engine.ids.sort(-1).values == ref.ids.sort(-1).values).all(-1)[m].double().mean()
        ),
    }
    out["deterministic"] = float(
        again is None
        or bool(
            torch.equal(again.logprobs[m], engine.logprobs[m]) and torch.equal(again.ids[m], engine.ids[m])
        )
    )
    out["ok"] = float(out["top_mean_abs_delta"] <= FIDELITY_WARN_MEAN and out["deterministic"] == 1.0)
    return out
