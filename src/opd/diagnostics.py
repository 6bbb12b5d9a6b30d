"""Per-token diagnostics of student/teacher agreement on student rollouts (paper brief §2).

Everything is accumulated as float64 SUMS and COUNTS first (``diagnostic_sums``) and divided only at the
end (``finalize``). That split exists so the trainer can add micro-batches and all-reduce across
processes and still get the exact token-weighted mean of the whole batch; averaging per-micro-batch means
would weight tokens by how the batch happened to be split.

Conventions decided here (the brief left them open):
- ``overlap_mass_student`` / ``overlap_mass_teacher`` count a position with an empty overlap I_t as mass
  0. The released code skips such positions, which biases the mass upward exactly when the models
  disagree most (the failing runs this metric is meant to expose).
- ``overlap_token_advantage`` is averaged only over positions with a non-empty I_t: the per-token
  quantity (1/|I_t|)·Σ A_t(v) is undefined (0/0) there, and imputing 0 would read as "perfect
  agreement". ``overlap_empty_frac`` reports how many positions were excluded.
- ``k`` is clamped to the vocabulary size, and ``overlap_ratio`` divides by that clamped k.
- Position bins use the index along T, i.e. response tokens must start at t = 0 (right padding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from opd.objectives.token import (
    compute_dtype,
    masked_positions,
    row_chunks,
    shared_vocab,
    support_log_probs,
)

__all__ = [
    "BINNED_METRICS",
    "MEAN_METRICS",
    "DiagnosticSums",
    "EngineDrift",
    "StepStats",
    "StepStatsSettings",
    "target_diagnostic_sums",
    "target_signal_stats",
    "add_row_sums",
    "diagnostic_sums",
    "finalize",
    "merge_sums",
    "sequence_mean_reward",
    "token_diagnostics",
    "zero_sums",
]

# metric name -> the count it is a mean over
MEAN_METRICS: dict[str, str] = {
    "overlap_ratio": "tokens",
    "overlap_token_advantage": "overlap_nonempty",
    "entropy_student": "tokens",
    "entropy_teacher": "tokens",
    "entropy_gap": "tokens",
    "overlap_mass_student": "tokens",
    "overlap_mass_teacher": "tokens",
    "reverse_kl": "tokens",
    "forward_kl": "tokens",
}
BINNED_METRICS: tuple[str, ...] = (
    "overlap_ratio",
    "overlap_mass_student",
    "overlap_mass_teacher",
    "entropy_student",
    "entropy_teacher",
    "entropy_gap",
    "reverse_kl",
)


def _xlogy_sum(a: Tensor, log_a: Tensor) -> Tensor:
    """Σ a·log a with 0·log 0 = 0, so −inf logits (banned tokens) do not turn entropies into NaN."""
    return torch.where(a > 0, a * log_a, 0.0).sum(-1)


def _kl_sum(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def _row_metrics(s_rows: Tensor, t_rows: Tensor, k: int) -> dict[str, Tensor]:
    """Every per-token quantity for one chunk of rows; each value is ``[N]``."""
    log_p = torch.log_softmax(s_rows, dim=-1)
    log_q = torch.log_softmax(t_rows, dim=-1)
    p = log_p.exp()
    q = log_q.exp()
    h_p = -_xlogy_sum(p, log_p)
    h_q = -_xlogy_sum(q, log_q)
    rkl = _kl_sum(p, log_p, log_q)
    fkl = _kl_sum(q, log_q, log_p)
    del p, q

    kk = min(k, s_rows.shape[-1])
    sp = s_rows.topk(kk, dim=-1).indices
    sq = t_rows.topk(kk, dim=-1).indices
    in_i = (sp.unsqueeze(-1) == sq.unsqueeze(-2)).any(-1)  # slots of S^p that are also in S^q
    size = in_i.sum(-1)
    nonempty = size > 0
    lp_i = log_p.gather(-1, sp)
    lq_i = log_q.gather(-1, sp)
    mass_p = torch.where(in_i, lp_i.exp(), 0.0).sum(-1)
    mass_q = torch.where(in_i, lq_i.exp(), 0.0).sum(-1)
    # Renormalise on I_t in log space; empty rows get every slot as a stand-in so values stay finite,
    # then are zeroed and excluded through the non-empty count.
    safe = in_i | ~nonempty.unsqueeze(-1)
    lpt = support_log_probs(lp_i, safe)
    lqt = support_log_probs(lq_i, safe)
    adv = torch.where(in_i, lpt.exp() * (lqt - lpt), 0.0).sum(-1) / size.clamp_min(1).to(lp_i.dtype)
    return {
        "overlap_ratio": size.to(lp_i.dtype) / kk,
        "overlap_token_advantage": torch.where(nonempty, adv, 0.0),
        "entropy_student": h_p,
        "entropy_teacher": h_q,
        "entropy_gap": (h_q - h_p).abs(),
        "overlap_mass_student": mass_p,
        "overlap_mass_teacher": mass_q,
        "reverse_kl": rkl,
        "forward_kl": fkl,
        "_nonempty": nonempty,
    }


@torch.no_grad()
def diagnostic_sums(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    k: int = 16,
    vocab_size: int | None = None,
    chunk_size: int | None = 2048,
    position_bins: int = 0,
    bin_len: int | None = None,
) -> dict[str, Tensor]:
    """Float64 scalar sums and counts of every diagnostic over the masked tokens.

    The key set depends only on ``position_bins`` (all bins are always present, possibly 0), so every
    process produces the same keys and the dict can be all-reduced key by key. Sums are ``<name>__sum``;
    counts are ``tokens__count``, ``overlap_nonempty__count`` and ``tokens/bin{i}__count``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be an integer >= 1")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer or None")
    if position_bins < 0:
        raise ValueError(f"position_bins={position_bins} must be >= 0")
    if position_bins > 0 and (bin_len is None or bin_len < 1):
        raise ValueError("position_bins > 0 needs bin_len >= 1 (the response budget in tokens)")
    if student_logits.shape[:2] != teacher_logits.shape[:2] or tuple(mask.shape) != tuple(
        student_logits.shape[:2]
    ):
        raise ValueError(
            f"shape mismatch: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    student, teacher = shared_vocab(student_logits, teacher_logits, vocab_size)
    dtype = compute_dtype(student, teacher)
    sums = zero_sums(student.device, position_bins)
    b_idx, t_idx = masked_positions(mask)
    for start, stop in row_chunks(b_idx.numel(), chunk_size):
        bi, ti = b_idx[start:stop], t_idx[start:stop]
        add_row_sums(sums, student[bi, ti].to(dtype), teacher[bi, ti].to(dtype), ti, k=k,
                     position_bins=position_bins, bin_len=bin_len)  # fmt: skip
    return sums


class DiagnosticSums(dict):
    """`diagnostic_sums`' dict of float64 0-dim sums, as `zero_sums` makes it: its per-bin entries are views
    of one ``[position_bins]`` vector per metric (`bins`, by metric name and ``"tokens"``), so `add_row_sums`
    fills every bin with one ``index_add_`` per chunk. Used as a plain dict everywhere else."""

    bins: dict[str, Tensor]


def zero_sums(device: torch.device | str, position_bins: int = 0) -> DiagnosticSums:
    """`diagnostic_sums`' keys, all zero, on `device` (see `DiagnosticSums`)."""
    f64 = torch.float64
    sums = DiagnosticSums(
        {f"{name}__sum": torch.zeros((), dtype=f64, device=device) for name in MEAN_METRICS}
    )
    sums["tokens__count"] = torch.zeros((), dtype=f64, device=device)
    sums["overlap_nonempty__count"] = torch.zeros((), dtype=f64, device=device)
    sums.bins = {}
    if position_bins > 0:
        sums.bins = {name: torch.zeros(position_bins, dtype=f64, device=device)
                     for name in ("tokens", *BINNED_METRICS)}  # fmt: skip
        for i, view in enumerate(sums.bins["tokens"].unbind(0)):
            sums[f"tokens/bin{i}__count"] = view
        for name in BINNED_METRICS:
            for i, view in enumerate(sums.bins[name].unbind(0)):
                sums[f"{name}/bin{i}__sum"] = view
    return sums


@torch.no_grad()
def add_row_sums(sums: DiagnosticSums, s_rows: Tensor, t_rows: Tensor, t_idx: Tensor, *, k: int = 16,
                 position_bins: int = 0, bin_len: int | None = None) -> None:  # fmt: skip
    """Add one chunk of masked rows to `sums` (made by `zero_sums` with the same `position_bins`), in place
    on the device: student and teacher logits ``[n, V]`` (the shared vocabulary, in the compute dtype) and
    the rows' response positions ``t_idx`` ``[n]`` (for the bins). No host sync, no copy of the sums; the
    trainer's step statistics call it once per chunk of the loss."""
    f64 = torch.float64
    n = int(s_rows.shape[0])
    if n == 0:
        return
    metrics = _row_metrics(s_rows, t_rows, k)
    nonempty = metrics.pop("_nonempty")
    for name, values in metrics.items():
        sums[f"{name}__sum"] += values.sum().to(f64)
    sums["tokens__count"] += float(n)
    sums["overlap_nonempty__count"] += nonempty.sum().to(f64)
    if position_bins > 0:
        if bin_len is None:
            raise ValueError("position_bins > 0 needs bin_len >= 1 (the response budget in tokens)")
        if len(sums.bins["tokens"]) != position_bins:
            raise ValueError(
                f"position_bins={position_bins} but the sums were made with {len(sums.bins['tokens'])}"
            )
        bins = (t_idx * position_bins // bin_len).clamp_max(position_bins - 1)
        sums.bins["tokens"].index_add_(0, bins, torch.ones_like(bins, dtype=f64))
        for name in BINNED_METRICS:
            sums.bins[name].index_add_(0, bins, metrics[name].to(f64))


def merge_sums(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add two sum dicts (micro-batches or processes); a key missing on one side counts as zero."""
    out = {key: value + b[key] if key in b else value.clone() for key, value in a.items()}
    out.update({key: value.clone() for key, value in b.items() if key not in a})
    return out


def finalize(sums: dict[str, Tensor]) -> dict[str, float]:
    """Divide sums by their counts; a mean with zero count is omitted rather than reported as NaN or 0.

    Omission keeps logs honest (no fake 0 KL for an empty batch) and NaN out of dashboards. ``n_tokens``
    is always present.
    """
    tokens = float(sums.get("tokens__count", torch.zeros(())))
    out: dict[str, float] = {"n_tokens": tokens}
    for key, value in sums.items():
        if not key.endswith("__sum"):
            continue
        name = key[: -len("__sum")]
        base, _, suffix = name.partition("/")
        if base not in MEAN_METRICS:
            raise ValueError(f"unknown diagnostic sum {key!r}")
        count_key = MEAN_METRICS[base] + (f"/{suffix}" if suffix else "") + "__count"
        count = float(sums.get(count_key, torch.zeros(())))
        if count > 0:
            out[name] = float(value) / count
    if tokens > 0:
        nonempty = float(sums.get("overlap_nonempty__count", torch.zeros(())))
        out["overlap_empty_frac"] = (tokens - nonempty) / tokens
    return out


def token_diagnostics(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    k: int = 16,
    vocab_size: int | None = None,
    chunk_size: int | None = 2048,
    position_bins: int = 0,
    bin_len: int | None = None,
) -> dict[str, float]:
    """Token-weighted means of every diagnostic for one batch (see module docstring for conventions)."""
    return finalize(
        diagnostic_sums(
            student_logits,
            teacher_logits,
            mask,
            k=k,
            vocab_size=vocab_size,
            chunk_size=chunk_size,
            position_bins=position_bins,
            bin_len=bin_len,
        )
    )


@torch.no_grad()
def sequence_mean_reward(
    student_logits: Tensor,
    teacher_logits: Tensor,
    response_tokens: Tensor,
    mask: Tensor,
    vocab_size: int | None = None,
    chunk_size: int | None = 2048,
) -> Tensor:
    """r̄(y) ``[B]``: mean over a sequence's masked tokens of log q_t(y_t) − log p_t(y_t).

    The paper uses it as a sequence-level score (AUROC of r̄ separating correct from incorrect rollouts).
    A row with no masked token gets 0.0 rather than NaN so downstream statistics never see NaN; filter
    such rows with ``mask.any(1)`` when they matter.
    """
    if tuple(response_tokens.shape) != tuple(mask.shape) or tuple(mask.shape) != tuple(
        student_logits.shape[:2]
    ):
        raise ValueError("response_tokens and mask must both be [B, T] matching the logits")
    student, teacher = shared_vocab(student_logits, teacher_logits, vocab_size)
    dtype = compute_dtype(student, teacher)
    batch = student.shape[0]
    totals = torch.zeros(batch, dtype=dtype, device=student.device)
    b_idx, t_idx = masked_positions(mask)
    for start, stop in row_chunks(b_idx.numel(), chunk_size):
        bi, ti = b_idx[start:stop], t_idx[start:stop]
        s_rows = student[bi, ti].to(dtype)
        t_rows = teacher[bi, ti].to(dtype)
        y = response_tokens[bi, ti].long().unsqueeze(-1)
        log_p = s_rows.gather(-1, y).squeeze(-1) - torch.logsumexp(s_rows, dim=-1)
        log_q = t_rows.gather(-1, y).squeeze(-1) - torch.logsumexp(t_rows, dim=-1)
        totals.index_add_(0, bi, log_q - log_p)
    counts = mask.bool().sum(-1).clamp_min(1).to(dtype)
    return totals / counts


# --------------------------------------------------------------------------------------------------------
# A training step's statistics: one typed accumulator, rows in, sums out, the same for every target


@dataclass(frozen=True)
class StepStatsSettings:
    """What a step's statistics are computed with: the shared vocabulary, the diagnostics' top-k and position
    bins (`bin_len`: the rollouts' max_new_tokens), the loss's signal/k/support (for the signal stats) and the
    masked rows per chunk."""

    vocab_size: int
    diagnostics_k: int = 16
    position_bins: int = 4
    bin_len: int = 256
    signal: str = "topk"
    loss_k: int = 16
    support: str = "student"
    chunk_rows: int | None = 2048


def target_diagnostic_sums(
    s_det: Tensor, target: Any, mask: Tensor, st: StepStatsSettings
) -> dict[str, Tensor]:
    """`diagnostic_sums` against a dense-logits target, `sparse_diagnostic_sums` against a top-K one."""
    from opd.objectives.topk import TeacherTopK, sparse_diagnostic_sums

    kw = dict(k=st.diagnostics_k, vocab_size=st.vocab_size, chunk_size=st.chunk_rows)
    if isinstance(target, TeacherTopK):
        return sparse_diagnostic_sums(s_det, target, mask, **kw)
    return diagnostic_sums(s_det, target, mask, position_bins=st.position_bins, bin_len=st.bin_len, **kw)


def target_signal_stats(s_det: Tensor, target: Any, tokens: Tensor, mask: Tensor,
                        st: StepStatsSettings) -> dict[str, float]:  # fmt: skip
    """The loss signal's reward/advantage statistics against a dense-logits or top-K target."""
    from opd.objectives.token import signal_stats
    from opd.objectives.topk import TeacherTopK, sparse_signal_stats

    if isinstance(target, TeacherTopK):
        return sparse_signal_stats(s_det, target, tokens, mask, signal=st.signal, k=st.loss_k,
                                   vocab_size=st.vocab_size, chunk_size=st.chunk_rows)  # fmt: skip
    return signal_stats(s_det, target, tokens, mask, signal=st.signal, k=st.loss_k, support=st.support,
                        vocab_size=st.vocab_size, chunk_size=st.chunk_rows)  # fmt: skip


@dataclass
class EngineDrift:
    """The rollout engine's sampled-token log-probs against the trainer's (a cross-check only: the objective
    never uses the engine's numbers), as float64 sums on the compute device."""

    abs_sum: Tensor
    count: Tensor
    max: Tensor

    @classmethod
    def zeros(cls, device: torch.device | str) -> EngineDrift:
        z = torch.zeros((), dtype=torch.float64, device=device)
        return cls(z, z.clone(), z.clone())

    def add(self, s_logits: Tensor, tokens: Tensor, mask: Tensor, engine_logprobs: Tensor) -> None:
        sv = s_logits.float()
        lp = sv.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(sv, dim=-1)
        ok = mask & torch.isfinite(engine_logprobs)
        d = torch.where(ok, (lp - engine_logprobs).abs(), 0.0).double()
        self.abs_sum = self.abs_sum + d.sum()
        self.count = self.count + ok.sum().to(d.dtype)
        self.max = torch.maximum(self.max, d.max())


class StepStats:
    """A step's diagnostics, signal stats and engine cross-check, accumulated one chunk of response rows at a
    time: from `head_loss_sum`'s `on_chunk` (hidden-state path) or by walking the masked rows of the logits
    (`add_logits`, plain path), so both paths share one accumulator and no metric needs a `[B, T, V]` tensor
    of its own. Each chunk's rows go straight to the row functions (`add_row_sums`, `row_signal_stats` and
    their top-K twins), with each row's true response position for the bins.

    A micro-batch `mb` is anything with `response_mask`, `response_ids` and `engine_logprobs` (a Rollout).
    Device: every accumulator stays on the compute device and is added to in place, so a chunk costs no host
    sync and no copy of the sums; `reward_sum` and `best_adv` are read back (one copy each) once the step's
    last chunk is in."""

    def __init__(self, settings: StepStatsSettings, device: torch.device | str):
        self.settings, self.device = settings, device
        self.sums: dict[str, Tensor] = {}
        self.engine = EngineDrift.zeros(device)
        self._reward = torch.zeros((), dtype=torch.float64, device=device)
        self._best = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=device)  # (|adv|, p - q there)

    @property
    def reward_sum(self) -> float:
        """The sampled-token reward log q - log p summed over the step's rows (a host copy: read it after the
        step's last chunk)."""
        return float(self._reward)

    @property
    def best_adv(self) -> Tensor:
        """(largest |advantage|, p - q there) of the step, host float64 (a host copy, as `reward_sum`)."""
        return self._best.detach().to(device="cpu", dtype=torch.float64)  # as opd.device.host (a layer up)

    def start(self, mb: Any, target: Any) -> Callable[[Tensor, Any, Tensor, Tensor], None]:
        """The callback for micro-batch `mb`'s chunks; every key exists after the first call, even with no
        masked row, so processes all-reduce the same key set."""
        from opd.objectives.topk import TeacherTopK, check_sparse_diagnostics, sparse_zero_sums

        if not self.sums:
            if isinstance(target, TeacherTopK):
                check_sparse_diagnostics(self.settings.diagnostics_k, target.k)
                self.sums = sparse_zero_sums(self.device)
            else:
                self.sums = zero_sums(self.device, self.settings.position_bins)
        return lambda s, t, bi, ti: self._rows(mb, s, t, bi, ti)

    def add_logits(self, mb: Any, s_det: Tensor, target: Any) -> None:
        """Plain path: the micro-batch's detached `[B, T, V]` logits, walked in chunks of masked rows."""
        from opd.objectives.topk import TeacherTopK

        on_chunk = self.start(mb, target)
        v = self.settings.vocab_size
        b_idx, t_idx = masked_positions(mb.response_mask)
        for a, b in row_chunks(b_idx.numel(), self.settings.chunk_rows):
            bi, ti = b_idx[a:b], t_idx[a:b]
            t_rows = (TeacherTopK(target.ids[bi, ti], target.logprobs[bi, ti], target.token_logprob[bi, ti])
                      if isinstance(target, TeacherTopK) else target[bi, ti, :v])  # fmt: skip
            on_chunk(s_det[bi, ti, :v], t_rows, bi, ti)

    def _rows(self, mb: Any, s_rows: Tensor, t_rows: Any, b_idx: Tensor, t_idx: Tensor) -> None:
        """One chunk: student rows ``[n, V]``, the target's rows (logits ``[n, V]`` or a `TeacherTopK` of
        ``[n, K]`` / ``[n]``), the rows' batch and response positions ``[n]``. Device work only."""
        from opd.objectives.token import row_signal_stats
        from opd.objectives.topk import TeacherTopK, add_sparse_row_sums, sparse_row_signal_stats

        n = int(b_idx.numel())
        if n == 0:
            return
        st = self.settings
        y = mb.response_ids[b_idx, t_idx]
        if mb.engine_logprobs is not None:
            ones = torch.ones((1, n), dtype=torch.bool, device=s_rows.device)
            self.engine.add(
                s_rows.unsqueeze(0), y.unsqueeze(0), ones, mb.engine_logprobs[b_idx, t_idx].unsqueeze(0)
            )
        s_rows = s_rows[:, : st.vocab_size]
        with torch.no_grad():
            if isinstance(t_rows, TeacherTopK):
                s = s_rows.to(torch.float64 if s_rows.dtype == torch.float64 else torch.float32)
                for a, b in row_chunks(n, st.chunk_rows):
                    rows = TeacherTopK(t_rows.ids[a:b], t_rows.logprobs[a:b], t_rows.token_logprob[a:b])
                    add_sparse_row_sums(self.sums, s[a:b], rows, k=st.diagnostics_k)
                    reward, best = sparse_row_signal_stats(
                        s[a:b], rows, y[a:b], signal=st.signal, k=st.loss_k
                    )
                    self._add_signal(reward, best)
            else:
                t_rows = t_rows[:, : st.vocab_size]
                dtype = compute_dtype(s_rows, t_rows)
                s, t = s_rows.to(dtype), t_rows.to(dtype)
                for a, b in row_chunks(n, st.chunk_rows):
                    add_row_sums(self.sums, s[a:b], t[a:b], t_idx[a:b], k=st.diagnostics_k,
                                 position_bins=st.position_bins, bin_len=st.bin_len)  # fmt: skip
                    reward, best = row_signal_stats(s[a:b], t[a:b], y[a:b], signal=st.signal, k=st.loss_k,
                                                    support=st.support)  # fmt: skip
                    # a chunk without a valid slot counts as (0, 0), as `signal_stats` reports it
                    self._add_signal(reward, torch.where(best[0] >= 0, best, torch.zeros_like(best)))

    def _add_signal(self, reward: Tensor, best: Tensor) -> None:
        self._reward += reward
        self._best = torch.where(best[0] > self._best[0], best, self._best)
