"""A step's metrics: this process's accumulators reduced over processes, then one flat row of floats.

Every process runs the same reductions in the same order (collectives), so every process ends the step
holding the same row; the row is what metrics.jsonl, the alarms and the progress bar read. The metric names
and their meaning are listed in docs/metrics.md; `opd.diagnostics.finalize` turns the diagnostic sums into
their means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd.device import host
from opd.diagnostics import EngineDrift, StepStats, finalize
from opd.generation.rollout import Rollout

__all__ = ["StepTotals", "reduce_step", "step_metrics"]

Reduce = Callable[[torch.Tensor], torch.Tensor]  # a sum over processes
MaxRow = Callable[
    [torch.Tensor], torch.Tensor
]  # the host row (of every process's) with the largest first entry


@dataclass
class StepTotals:
    """The step's sums over every process (host float64 from here on)."""

    loss: float  # token mean of the per-token loss over the global batch
    reward_mean: float  # token mean of the sampled-token reward log q - log p
    sums: dict[str, torch.Tensor]  # the diagnostic sums (`opd.diagnostics.finalize` makes them means)
    best_adv: torch.Tensor  # (|advantage|, p - q there) at the step's largest |advantage|
    lengths: torch.Tensor  # (sum of response lengths, truncated responses, responses)
    len_max: float


def reduce_step(rollouts: list[Rollout], loss_sum: torch.Tensor, stats: StepStats, global_tokens: int, *,
                reduce: Reduce, max_row: MaxRow) -> StepTotals:  # fmt: skip
    """Cross-process reductions of one step: exact sums first, means after (so 1 or N processes agree)."""
    n_tok = max(global_tokens, 1)
    sums, keys = stats.sums, sorted(stats.sums)
    if keys:  # one collective for every diagnostic sum
        vec = reduce(torch.stack([sums[k].double() for k in keys]))
        sums = {k: vec[j] for j, k in enumerate(keys)}
    lengths = torch.cat([host(r.lengths) for r in rollouts])
    truncated = torch.cat([host(r.truncated) for r in rollouts])
    return StepTotals(
        loss=float(reduce(loss_sum)) / n_tok,
        reward_mean=float(reduce(torch.tensor(stats.reward_sum, dtype=torch.float64))) / n_tok,
        sums=sums,
        best_adv=max_row(stats.best_adv),
        lengths=reduce(torch.stack([lengths.sum(), truncated.sum(), torch.tensor(float(len(lengths)))])),
        len_max=float(max_row(lengths.max().reshape(1))[0]),
    )


def step_metrics(totals: StepTotals, *, grad_norm: float, lr: float, epoch: float, global_tokens: int,
                 times: dict[str, float], engine: EngineDrift | None, t_sync: float | None, reduce: Reduce,
                 max_row: MaxRow) -> dict[str, float]:  # fmt: skip
    """The step's row for metrics.jsonl. `engine`/`t_sync`: the rollout engine's log-prob drift against the
    training forward and its weight-sync time, for a generator that is synced (vLLM); None otherwise."""
    n_seq = max(float(totals.lengths[2]), 1)
    metrics: dict[str, float] = {
        "loss": totals.loss,
        "grad_norm": grad_norm,
        "lr": lr,
        "reward_mean": totals.reward_mean,
        "kl_sampled": -totals.reward_mean,
        "adv_max_abs": float(totals.best_adv[0]),
        "p_minus_q_at_max_adv": float(totals.best_adv[1]),
        "response_len_mean": float(totals.lengths[0]) / n_seq,
        "response_len_max": totals.len_max,
        "truncation_rate": float(totals.lengths[1]) / n_seq,
        "response_tokens": float(global_tokens),
        "tokens_per_s": global_tokens / times["step_time_s"],
        **times,
        "epoch": epoch,
    }
    if t_sync is not None:
        metrics["time_weight_sync_s"] = t_sync
        if engine is not None:
            ed = reduce(torch.stack([engine.abs_sum, engine.count]))
            if float(ed[1]) > 0:
                metrics["engine_logprob_delta_mean"] = float(ed[0] / ed[1])
                metrics["engine_logprob_delta_max"] = float(max_row(host(engine.max.reshape(1)))[0])
    metrics.update(finalize(totals.sums))
    return metrics
