"""Losses from a top-K teacher equal the dense objectives they stand for (float64, values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from opd.errors import ConfigError
from opd.objectives.token import DIVERGENCES, per_token_loss
from opd.objectives.topk import check_sparse_objective, sparse_per_token_loss, topk_from_logits

B, T, V, K = 3, 5, 40, 12


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[0] = True
    return s, t, y, mask


CASES = [
    {"signal": "sampled"},
    *({"signal": "topk", "support": "teacher", "k": k, "renorm": "both", "divergence": d, "beta": 0.3}
      for d in DIVERGENCES for k in (4, K)),  # every registered divergence, on part and all of the top-K
    {"signal": "topk", "support": "teacher", "k": 8, "renorm": "weights"},
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_sparse_loss_equals_dense_values_and_gradients(case: dict) -> None:
    s, t, y, mask = _inputs()
    kw = {"divergence": "reverse_kl", "k": 16, "support": "teacher", "renorm": "both", "beta": 0.5, **case}
    s1 = s.clone().requires_grad_(True)
    dense = per_token_loss(s1, t, y, mask, chunk_size=None, **kw)
    dense.sum().backward()
    s2 = s.clone().requires_grad_(True)
    sparse = sparse_per_token_loss(s2, topk_from_logits(t, y, K), y, mask, **kw)
    sparse.sum().backward()
    assert torch.allclose(sparse, dense, atol=1e-12, rtol=1e-10)
    assert torch.allclose(s2.grad, s1.grad, atol=1e-12, rtol=1e-10)
    assert torch.all(sparse[~mask] == 0)


def test_sampled_token_outside_the_teacher_topk_uses_its_own_logprob() -> None:
    s, t, y, mask = _inputs(1)
    top = topk_from_logits(t, y, 2)  # most sampled tokens are outside a top-2
    outside = ~(top.ids == y.unsqueeze(-1)).any(-1)
    assert outside[mask].any()
    dense = per_token_loss(s, t, y, mask, signal="sampled", chunk_size=None)
    assert torch.allclose(sparse_per_token_loss(s, top, y, mask, signal="sampled"), dense, atol=1e-12)


@pytest.mark.parametrize(
    ("signal", "support", "k", "match"),
    [("full", "student", 16, "signal full"), ("topk", "student", 16, "support student"),
     ("topk", "overlap", 16, "support overlap"), ("topk", "teacher", 32, "top-K 20")],
)  # fmt: skip
def test_impossible_objectives_are_refused_with_alternatives(signal, support, k, match) -> None:
    with pytest.raises(ConfigError, match=match) as exc:
        check_sparse_objective(signal, support, k, 20)
    assert "sampled" in str(exc.value) or "loss.k" in str(exc.value)


@pytest.mark.parametrize("k", [1, 4, 8, 12])
def test_sparse_diagnostics_equal_the_dense_ones(k: int) -> None:
    from opd.diagnostics import finalize, token_diagnostics
    from opd.objectives.topk import SPARSE_METRICS, sparse_diagnostic_sums

    s, t, y, mask = _inputs(2)
    # make the pair agree a lot so overlaps are large and varied (and some rows empty at k=1)
    t = 0.6 * s + 0.4 * t
    dense = token_diagnostics(s, t, mask, k=k)
    sparse = finalize(sparse_diagnostic_sums(s, topk_from_logits(t, y, K), mask, k=k))
    for key in SPARSE_METRICS:
        assert sparse[key] == pytest.approx(dense[key], rel=1e-9, abs=1e-12), key
    assert sparse["n_tokens"] == dense["n_tokens"]
    with pytest.raises(ConfigError, match="diagnostics.k"):
        sparse_diagnostic_sums(s, topk_from_logits(t, y, 4), mask, k=8)


def test_topk_fidelity_reports_agreement_and_drift() -> None:
    from opd.objectives.topk import topk_fidelity

    s, t, y, mask = _inputs(3)
    exact = topk_from_logits(t, y, 8)
    rep = topk_fidelity(exact, t, mask, again=exact)
    assert (
        rep["top_max_abs_delta"] < 1e-12 and rep["top1_agreement"] == 1.0 and rep["topk_set_agreement"] == 1.0
    )
    assert rep["deterministic"] == 1.0 and rep["ok"] == 1.0
    noisy = topk_from_logits(t + 0.5 * torch.randn_like(t), y, 8)  # a drifting engine
    rep = topk_fidelity(noisy, t, mask, again=topk_from_logits(t, y, 8))
    assert rep["top_mean_abs_delta"] > 0.05 and rep["top1_agreement"] < 1.0
    assert rep["deterministic"] == 0.0 and rep["ok"] == 0.0


@pytest.mark.parametrize(("signal", "k"), [("sampled", 16), ("topk", 8), ("topk", 12)])
def test_sparse_signal_stats_equal_the_dense_ones(signal: str, k: int) -> None:
    from opd.objectives.token import signal_stats
    from opd.objectives.topk import sparse_signal_stats

    s, t, y, mask = _inputs(3)
    dense = signal_stats(s, t, y, mask, signal=signal, k=k, support="teacher", chunk_size=None)
    sparse = sparse_signal_stats(s, topk_from_logits(t, y, K), y, mask, signal=signal, k=k)
    assert sparse.keys() == dense.keys()
    for key in dense:
        assert sparse[key] == pytest.approx(dense[key], rel=1e-10, abs=1e-12), key
    empty = sparse_signal_stats(s, topk_from_logits(t, y, K), y, torch.zeros_like(mask), signal=signal, k=k)
    assert empty == {"reward_mean": 0.0, "adv_max_abs": 0.0, "p_minus_q_at_max_adv": 0.0, "n_tokens": 0.0}


def test_topk_from_prompt_logprobs_matches_the_dense_topk() -> None:
    """An engine's per-position dicts (top-k plus the actual token at its own rank) give the same
    `TeacherTopK` as cutting the dense logits; padding positions stay -inf; a short answer is refused."""
    from opd.objectives.topk import topk_from_prompt_logprobs

    s, t, y, mask = _inputs(4)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor([[5], [3], [1]])  # response prefixes
    log_q = torch.log_softmax(t, -1)
    rows = []
    for r in range(B):
        entries = []
        for j in range(int(mask[r].sum())):
            order = log_q[r, j].argsort(descending=True)
            rank = {int(v): i + 1 for i, v in enumerate(order)}
            entry = {int(v): (rank[int(v)], float(log_q[r, j, v])) for v in order[:K]}
            entry[int(y[r, j])] = (rank[int(y[r, j])], float(log_q[r, j, y[r, j]]))
            entries.append(entry)
        rows.append(entries)
    got = topk_from_prompt_logprobs(rows, y, K)
    ref = topk_from_logits(t, y, K)
    assert torch.equal(got.ids[mask], ref.ids[mask])
    assert torch.allclose(got.logprobs[mask].double(), ref.logprobs[mask], atol=1e-6)
    assert torch.allclose(got.token_logprob[mask].double(), ref.token_logprob[mask], atol=1e-6)
    assert torch.isinf(got.token_logprob[~mask]).all()
    sub = got.select(slice(1, 3))
    assert sub.ids.shape == (2, T, K) and torch.equal(sub.ids, got.ids[1:3])
    with pytest.raises(ValueError, match="raise its --max-logprobs"):
        topk_from_prompt_logprobs(rows, y, K + 5)
    rows[0][0].pop(int(y[0, 0]))
    with pytest.raises(ValueError, match="no log-prob for the scored token"):
        topk_from_prompt_logprobs(rows, y, K)


def test_padded_teacher_rows_leave_the_support() -> None:
    """An engine ranks a padded teacher's extra rows too: `restrict` empties those slots, after which
    losses, stats and diagnostics are finite and equal the dense ones when the padded rows carry ~no
    mass (real checkpoints), and never index past the student's vocabulary."""
    from opd.objectives.token import signal_stats
    from opd.objectives.topk import sparse_diagnostic_sums, sparse_signal_stats

    s, t, y, mask = _inputs(5)
    pad = torch.full((B, T, 8), -1e4, dtype=torch.float64)
    t_pad = torch.cat([t, pad], -1)
    loud = t_pad.clone()
    loud[..., V:] = 10.0  # padded rows that dominate: they fill the engine's top-K
    quiet_top = topk_from_logits(t_pad, y, K).restrict(V)
    assert torch.equal(quiet_top.ids, topk_from_logits(t, y, K).ids)
    for kw in ({"signal": "topk", "k": 8, "support": "teacher"}, {"signal": "sampled"}):
        dense = per_token_loss(s, t, y, mask, chunk_size=None, **kw)
        assert torch.allclose(sparse_per_token_loss(s, quiet_top, y, mask, **kw), dense, atol=1e-10)
    dense_stats = signal_stats(s, t, y, mask, signal="topk", k=8, support="teacher", chunk_size=None)
    got = sparse_signal_stats(s, quiet_top, y, mask, signal="topk", k=8)
    assert got["adv_max_abs"] == pytest.approx(dense_stats["adv_max_abs"], rel=1e-8)
    loud_top = topk_from_logits(loud, y, K).restrict(V)
    assert (~loud_top.valid).any() and int(loud_top.ids.max()) < V
    s_req = s.clone().requires_grad_(True)
    loss = sparse_per_token_loss(s_req, loud_top, y, mask, signal="topk", k=K, support="teacher")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s_req.grad).all()
    stats = sparse_signal_stats(s, loud_top, y, mask, signal="topk", k=K)
    diag = sparse_diagnostic_sums(s, loud_top, mask, k=K)
    assert all(math.isfinite(v) for v in stats.values())
    assert all(torch.isfinite(v).all() for v in diag.values())


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_sparse_stats_and_diagnostics_do_not_depend_on_chunking(chunk) -> None:
    from opd.objectives.topk import sparse_diagnostic_sums, sparse_signal_stats

    s, t, y, mask = _inputs(6)
    top = topk_from_logits(t, y, K)
    ref_d = sparse_diagnostic_sums(s, top, mask, k=8, chunk_size=10**6)
    got_d = sparse_diagnostic_sums(s, top, mask, k=8, chunk_size=chunk)
    for key in ref_d:
        assert float(got_d[key]) == pytest.approx(float(ref_d[key]), rel=1e-12), key
    for signal in ("sampled", "topk"):
        ref_s = sparse_signal_stats(s, top, y, mask, signal=signal, k=8, chunk_size=10**6)
        got_s = sparse_signal_stats(s, top, y, mask, signal=signal, k=8, chunk_size=chunk)
        assert got_s == pytest.approx(ref_s, rel=1e-12)
