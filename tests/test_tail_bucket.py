"""`loss.renorm tail`, the k+1 tail bucket: the support's k slots plus one slot holding each model's remaining
mass, so a top-K teacher (vLLM/HTTP) gets a proper divergence over k+1 outcomes instead of a truncated one.

Every registered divergence is held to `registry.tail_bucket_reference` (a float64 loop over the ids), values
and gradients, on the top-K teacher's logits path, its chunked hidden-state path and the dense teacher's
paths; the motivation test shows what the truncated estimators get wrong and that the tail bucket is a lower
bound of the full-vocabulary divergence (data-processing inequality), which they are not.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from opd.config import load_config
from opd.errors import ConfigError
from opd.objectives import registry
from opd.objectives.objective import Objective, TeacherHidden, hidden_loss_sum, logits_loss
from opd.objectives.token import DIVERGENCES, SUPPORTS, per_token_loss, topk_support
from opd.objectives.topk import TeacherTopK, sparse_per_token_loss, topk_from_logits

F64 = torch.float64
B, T, V, H, K = 2, 4, 24, 6, 8
TOL = {"atol": 1e-12, "rtol": 1e-10}


def _betas(name: str) -> tuple[float, ...]:
    return (0.0, 0.3, 1.0) if registry.divergence(name).uses_beta else (0.5,)


CASES = [(d, beta) for d in DIVERGENCES for beta in _betas(d)]


def _inputs(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Student hidden states, head weight and bias, teacher logits, sampled tokens and a mask (row 1 partly
    masked)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=F64)
    w = torch.randn(V, H, generator=g, dtype=F64)
    b = torch.randn(V, generator=g, dtype=F64) * 0.5
    t = torch.randn(B, T, V, generator=g, dtype=F64) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 2:] = False
    return h, w, b, t, y, mask


def _reference(s: Tensor, log_q: Tensor, ids: list[list[list[int]]], mask: Tensor, divergence: str,
               beta: float) -> Tensor:  # fmt: skip
    """`registry.tail_bucket_reference` at every masked position: ``[B, T]`` (0 where masked out)."""
    out = torch.zeros(mask.shape, dtype=F64)
    for bi, ti in mask.nonzero().tolist():
        log_p = torch.log_softmax(s[bi, ti], -1)
        out[bi, ti] = registry.tail_bucket_reference(log_p, log_q[bi, ti], ids[bi][ti], divergence, beta)
    return out


def _close(got: Tensor, want: Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------------
# Against the float64 reference, every divergence, every path
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("divergence", "beta"), CASES)
@pytest.mark.parametrize("k", [3, K])
def test_topk_teacher_paths_equal_the_float64_reference(divergence: str, beta: float, k: int) -> None:
    """The top-K teacher's logits path (`logits_loss`) and chunked hidden-state path (`hidden_loss_sum`,
    two rows per chunk): values and gradients (student logits; hidden states, head weight and bias)."""
    h, w, b, t, y, mask = _inputs()
    teacher = topk_from_logits(t, y, K)
    obj = Objective("topk", divergence, k, "teacher", "tail", beta, chunk_size=2, chunk_max_elements=None)
    ids = teacher.ids[..., :k].tolist()
    log_q = torch.log_softmax(t, -1)

    s = (h @ w.T + b).requires_grad_()
    got = logits_loss(s, teacher, y, mask, obj)
    want = _reference(s, log_q, ids, mask, divergence, beta)
    _close(got, want.detach(), f"{divergence} logits values")
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.5
    (grad,) = torch.autograd.grad((got * weights).sum(), s)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), s)
    _close(grad, want_grad, f"{divergence} logits grads")
    assert torch.isfinite(grad).all() and got[mask].min() > 0  # never a silent zero

    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    total = hidden_loss_sum(*leaves, teacher, y, mask, obj)
    total.backward()
    ref_leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    ref = _reference(
        ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2], log_q, ids, mask, divergence, beta
    ).sum()
    ref.backward()
    _close(total, ref.detach(), f"{divergence} hidden-state values")
    for name, mine, theirs in zip(("h", "w", "b"), leaves, ref_leaves, strict=True):
        _close(mine.grad, theirs.grad, f"{divergence} hidden-state grad {name}")


@pytest.mark.parametrize(("divergence", "beta"), CASES)
def test_dense_teacher_paths_equal_the_float64_reference_on_every_support(
    divergence: str, beta: float
) -> None:
    """With a full-distribution teacher the tail bucket is defined on every support: `per_token_loss` (chunked
    rows) and the hidden-state path of a `TeacherHidden` equal the reference on that support's ids."""
    h, w, b, _, y, mask = _inputs(3)
    g = torch.Generator().manual_seed(4)
    h_t, w_t = torch.randn(B, T, H, generator=g, dtype=F64), torch.randn(V, H, generator=g, dtype=F64)
    t = h_t @ w_t.T
    log_q = torch.log_softmax(t, -1)
    s0 = h @ w.T + b
    for support in SUPPORTS:
        ids_t, valid = topk_support(s0.reshape(B * T, V), t.reshape(B * T, V), 4, support)
        ids = [[sorted({int(i) for i, ok in zip(ids_t[bi * T + ti], valid[bi * T + ti], strict=True) if ok})
                for ti in range(T)] for bi in range(B)]  # fmt: skip
        s = s0.clone().requires_grad_()
        kw = {
            "signal": "topk",
            "divergence": divergence,
            "k": 4,
            "support": support,
            "renorm": "tail",
            "beta": beta,
        }
        got = per_token_loss(s, t, y, mask, chunk_size=3, **kw)
        want = _reference(s, log_q, ids, mask, divergence, beta)
        _close(got, want.detach(), f"{divergence}, support {support}, values")
        (grad,) = torch.autograd.grad(got.sum(), s)
        (want_grad,) = torch.autograd.grad(want.sum(), s)
        _close(grad, want_grad, f"{divergence}, support {support}, grads")

        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        obj = Objective(chunk_size=2, chunk_max_elements=None, **kw)
        total = hidden_loss_sum(*leaves, TeacherHidden(h_t, w_t, None), y, mask, obj)
        (g_h,) = torch.autograd.grad(total, leaves[0])
        _close(total, want.sum().detach(), f"{divergence}, support {support}, hidden-state values")
        ref_h = h.clone().requires_grad_()
        (want_h,) = torch.autograd.grad(
            _reference(ref_h @ w.T + b, log_q, ids, mask, divergence, beta).sum(), ref_h
        )
        _close(g_h, want_h, f"{divergence}, support {support}, hidden-state grad h")


def test_the_reference_itself_is_the_divergence_over_k_plus_one_outcomes() -> None:
    """The reference by hand on one row: KL over {a}, {b}, {everything else}."""
    log_p = torch.log(torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=F64))
    log_q = torch.log(torch.tensor([0.3, 0.4, 0.1, 0.2], dtype=F64))
    p, q = [0.5, 0.2, 0.3], [0.3, 0.4, 0.3]
    want = sum(a * torch.log(torch.tensor(a / c, dtype=F64)) for a, c in zip(p, q, strict=True))
    got = registry.tail_bucket_reference(log_p, log_q, [0, 1], "reverse_kl", 0.5)
    torch.testing.assert_close(got, want, **TOL)


# --------------------------------------------------------------------------------------------------------
# Why: what the truncated estimators get wrong
# --------------------------------------------------------------------------------------------------------


def test_truncated_topk_kl_is_biased_while_the_tail_bucket_lower_bounds_the_full_kl() -> None:
    """A student that puts mass outside the teacher's top-K. The plain truncated reverse KL (the teacher's
    top-K slots, nothing renormalised, as verl computes it) is negative on most rows, so clamping it gives 0;
    renormalising both on the support (renorm both) ignores the mass outside altogether: exactly 0 when the
    shapes on the support agree, and no gradient at all on the tokens outside. The tail bucket is >= 0, at
    most the full-vocabulary divergence for every divergence (a coarsening of the vocabulary), > 0 wherever
    the masses differ, and its gradient moves the student's mass back inside."""
    g = torch.Generator().manual_seed(11)
    n, v, k = 64, 200, 16
    t = torch.randn(1, n, v, generator=g, dtype=F64) * 3
    # the student: the teacher's shape on the teacher's top-K, with 20-70% of its mass spread outside it
    top = t.topk(k, -1).indices
    inside = torch.zeros_like(t, dtype=torch.bool).scatter_(-1, top, True)
    extra = torch.log(torch.rand(1, n, 1, generator=g, dtype=F64) * 0.5 + 0.2)
    noise = torch.randn(1, n, v, generator=g, dtype=F64)
    log_q = torch.log_softmax(t, -1)
    out_shape = torch.log_softmax(noise.masked_fill(inside, float("-inf")), -1)
    in_shape = torch.log_softmax(t.masked_fill(~inside, float("-inf")), -1)
    s = torch.where(inside, in_shape + torch.log1p(-extra.exp()), out_shape + extra).requires_grad_()
    y, mask = torch.zeros(1, n, dtype=torch.long), torch.ones(1, n, dtype=torch.bool)
    teacher = topk_from_logits(t, y, k)

    log_p = torch.log_softmax(s, -1)
    truncated = (log_p.gather(-1, top).exp() * (log_p.gather(-1, top) - log_q.gather(-1, top))).sum(-1)
    assert (truncated < 0).double().mean() > 0.5, "the plain truncated KL should be negative on most rows"
    full = {d: per_token_loss(s, t, y, mask, signal="full", divergence=d, beta=0.5) for d in DIVERGENCES}
    both = sparse_per_token_loss(s, teacher, y, mask, signal="topk", support="teacher", k=k, renorm="both")
    assert both.abs().max() < 1e-12 and full["reverse_kl"].min() > 0.1  # blind to 20-70% of the mass
    (g_both,) = torch.autograd.grad(both.sum(), s)
    assert g_both[~inside].abs().max() < 1e-12  # renorm both never moves the mass outside the support
    for d in DIVERGENCES:
        tail = sparse_per_token_loss(s, teacher, y, mask, signal="topk", support="teacher", k=k, renorm="tail",
                                     divergence=d, beta=0.5)  # fmt: skip
        assert (tail > 0).all(), d
        assert (tail <= full[d] + 1e-12).all(), f"{d}: the tail bucket must lower-bound the full divergence"
    tail = sparse_per_token_loss(s, teacher, y, mask, signal="topk", support="teacher", k=k, renorm="tail")
    (g_tail,) = torch.autograd.grad(tail.sum(), s)
    # gradient descent lowers every outside logit: their mass goes back inside the teacher's support
    assert (g_tail[~inside] > 0).all()


def test_the_lower_bound_holds_on_random_inputs_and_is_tight_on_the_whole_vocabulary() -> None:
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 10, 30, generator=g, dtype=F64) * 2
    t = torch.randn(3, 10, 30, generator=g, dtype=F64) * 2
    y, mask = torch.zeros(3, 10, dtype=torch.long), torch.ones(3, 10, dtype=torch.bool)
    for d in DIVERGENCES:
        full = per_token_loss(s, t, y, mask, signal="full", divergence=d, beta=0.3)
        for k in (1, 5, 29):
            tail = sparse_per_token_loss(s, topk_from_logits(t, y, k), y, mask, signal="topk", support="teacher",
                                         k=k, renorm="tail", divergence=d, beta=0.3)  # fmt: skip
            # k = 29: one token is left, so the bound is tight; the teacher's tail from its top-k alone,
            # 1 - (a sum near 1), carries a relative rounding error of about 1e-16 / tail
            assert (tail >= 0).all() and (tail <= full * (1 + 1e-9) + 1e-12).all(), (d, k)
        # the teacher's top-V is the vocabulary: no token is left for the extra slot, the divergence is exact
        every = sparse_per_token_loss(s, topk_from_logits(t, y, 30), y, mask, signal="topk", support="teacher",
                                      k=30, renorm="tail", divergence=d, beta=0.3)  # fmt: skip
        torch.testing.assert_close(every, full, **TOL)


# --------------------------------------------------------------------------------------------------------
# Numerics of engine inputs
# --------------------------------------------------------------------------------------------------------


def test_float32_engine_logprobs_confident_students_and_empty_rows_stay_finite() -> None:
    g = torch.Generator().manual_seed(2)
    t = torch.randn(1, 4, V, generator=g) * 2
    t[0, 0, 3] = 40.0  # a near-certain teacher: its top-K holds all the mass up to rounding
    y, mask = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool)
    teacher = topk_from_logits(t, y, K)
    # an engine's float32 log-probs summing to a hair over 1 at position 0, and position 3 emptied entirely
    # (every id past the shared vocabulary, as `TeacherTopK.restrict` leaves a padded teacher row)
    lps = teacher.logprobs.clone()
    lps[0, 0] += 1e-6
    lps[0, 3] = float("-inf")
    teacher = TeacherTopK(teacher.ids, lps, teacher.token_logprob)
    s64 = torch.randn(1, 4, V, generator=g, dtype=F64) * 2
    s64[0, 1, int(teacher.ids[0, 1, 0])] = 30.0  # a confident student: its tail ~1e-12, far below fp32's eps
    for d in DIVERGENCES:
        s = s64.float().requires_grad_()
        loss = sparse_per_token_loss(s, teacher, y, mask, signal="topk", support="teacher", k=K, renorm="tail",
                                     divergence=d, beta=0.5)  # fmt: skip
        (grad,) = torch.autograd.grad(loss.sum(), s)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), d
        assert loss[0, 3] == 0 and grad[0, 3].abs().max() == 0, d  # an empty support: one slot, mass 1 each
        assert loss.min() > -1e-6, d
        # the confident row in float32 agrees with float64 (the student's tail is a logsumexp outside)
        log_q = torch.zeros(V, dtype=F64).index_copy(0, teacher.ids[0, 1], teacher.logprobs[0, 1].double())
        log_p = torch.log_softmax(s64[0, 1], -1)
        want = registry.tail_bucket_reference(log_p, log_q, teacher.ids[0, 1].tolist(), d, 0.5)
        torch.testing.assert_close(loss[0, 1].double(), want, rtol=1e-4, atol=1e-6, msg=d)


# --------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------


def test_config_accepts_it_on_topk_and_refuses_it_elsewhere_naming_what_works() -> None:
    cfg = load_config(
        None, ["--loss.renorm", "tail", "--loss.support", "teacher", "--loss.divergence", "jsd"]
    )
    assert (cfg.loss.renorm, cfg.loss.support, cfg.loss.divergence) == ("tail", "teacher", "jsd")
    for signal in ("full", "sampled"):
        with pytest.raises(ConfigError) as err:
            load_config(None, ["--loss.renorm", "tail", "--loss.signal", signal])
        assert f"renorm='tail' with signal='{signal}'" in str(err.value), str(err.value)
        assert "defined only for signal='topk'" in str(err.value) and "renorm='both'" in str(err.value)
    # a top-K teacher serves it on its own support only, and says so
    _, _, _, t, y, mask = _inputs()
    with pytest.raises(
        ConfigError, match="loss.support student needs teacher log-probs.*loss.support teacher"
    ):
        sparse_per_token_loss(torch.zeros(B, T, V), topk_from_logits(t, y, K), y, mask, signal="topk",
                              support="student", renorm="tail")  # fmt: skip
    assert "| `loss.renorm` | `tail` |" in registry.markdown_table()
