"""The hidden-state loss equals the explicit-logits reference (float64, values and gradients)."""

from __future__ import annotations

import pytest
import torch

from opd.objectives.hidden import head_loss_sum
from opd.objectives.token import DIVERGENCES, SUPPORTS, per_token_loss, token_loss
from opd.objectives.topk import sparse_per_token_loss, topk_from_logits

B, T, H, H_T, V, V_T = 2, 5, 6, 4, 11, 13
ATOL = 1e-10


def _inputs(seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    h = torch.randn(B, T, H, generator=g, dtype=f64)
    w = torch.randn(V, H, generator=g, dtype=f64)
    b = torch.randn(V, generator=g, dtype=f64) if bias else None
    h_t = torch.randn(B, T, H_T, generator=g, dtype=f64)
    w_t = torch.randn(V_T, H_T, generator=g, dtype=f64) * 1.5  # padded teacher head: 13 rows, 11 real
    b_t = torch.randn(V_T, generator=g, dtype=f64) if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[0, 0] = mask[1, -1] = False  # some prompt/padding rows, always
    mask[0, 1] = mask[1, 2] = True
    return h, w, b, h_t, w_t, b_t, y, mask


def _logits(h, w, b):
    out = h @ w.T
    return out if b is None else out + b


def _leaves(h, w, b):
    return [x.clone().requires_grad_(True) if x is not None else None for x in (h, w, b)]


def _grads(leaves):
    return [x.grad if x is not None else None for x in leaves]


def _assert_close(got, ref):
    for a, r in zip(got, ref, strict=True):
        if r is None:
            assert a is None
        else:
            assert a is not None and torch.allclose(a, r, atol=ATOL, rtol=0), (a - r).abs().max()


DENSE_CASES = [{"signal": "sampled"}]
DENSE_CASES += [
    {"signal": "topk", "support": sup, "renorm": "both", "divergence": "reverse_kl", "k": 3}
    for sup in SUPPORTS
]
DENSE_CASES += [
    {"signal": "topk", "support": sup, "renorm": "weights", "divergence": "reverse_kl", "k": 3}
    for sup in SUPPORTS
]
DENSE_CASES += [
    {"signal": "topk", "support": "union", "renorm": "both", "divergence": d, "k": 3, "beta": 0.3}
    for d in DIVERGENCES
    if d != "reverse_kl"  # reverse_kl on every support just above
]
DENSE_CASES += [{"signal": "full", "divergence": d, "beta": 0.3} for d in DIVERGENCES]


def _case_id(c: dict) -> str:
    return "-".join(str(v) for v in c.values())


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("case", DENSE_CASES, ids=_case_id)
def test_dense_teacher_equals_explicit_logits(case: dict, bias: bool) -> None:
    h, w, b, h_t, w_t, b_t, y, mask = _inputs(DENSE_CASES.index(case), bias)
    ref_leaves = _leaves(h, w, b)
    t_logits = _logits(h_t, w_t, b_t)
    ref = per_token_loss(_logits(*ref_leaves), t_logits, y, mask, chunk_size=None, vocab_size=V, **case).sum()
    ref.backward()
    ref_grads = _grads(ref_leaves)
    mean = token_loss(_logits(h, w, b), t_logits, y, mask, vocab_size=V, **case)
    assert torch.allclose(mean * mask.sum(), ref.detach(), atol=ATOL, rtol=0)

    for chunk in (1, 3, None):
        leaves = _leaves(h, w, b)
        got = head_loss_sum(*leaves, h_t, y, mask, w_teacher=w_t, b_teacher=b_t, vocab_size=V,
                            chunk_size=chunk, **case)  # fmt: skip
        assert got.dim() == 0 and got.dtype == torch.float64
        assert torch.allclose(got, ref.detach(), atol=ATOL, rtol=0)
        got.backward()
        _assert_close(_grads(leaves), ref_grads)
        assert torch.all(leaves[0].grad[~mask] == 0)


SPARSE_CASES = [
    {"signal": "sampled"},
    {"signal": "topk", "support": "teacher", "renorm": "both", "k": 3},
    {"signal": "topk", "support": "teacher", "renorm": "weights", "k": 3},
]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("case", SPARSE_CASES, ids=_case_id)
def test_topk_teacher_equals_sparse_reference(case: dict, bias: bool) -> None:
    h, w, b, h_t, w_t, b_t, y, mask = _inputs(7, bias)
    w_pad = torch.cat([w, torch.randn(2, H, dtype=torch.float64)])  # padded student head, vocab_size=V
    b_pad = torch.cat([b, torch.randn(2, dtype=torch.float64)]) if b is not None else None
    top = topk_from_logits(_logits(h_t, w_t, b_t)[..., :V], y, 4)
    ref_leaves = _leaves(h, w_pad, b_pad)
    ref = sparse_per_token_loss(_logits(*ref_leaves), top, y, mask, vocab_size=V, **case).sum()
    ref.backward()
    ref_grads = _grads(ref_leaves)
    for chunk in (1, 3, None):
        leaves = _leaves(h, w_pad, b_pad)
        got = head_loss_sum(*leaves, top, y, mask, vocab_size=V, chunk_size=chunk, **case)
        assert torch.allclose(got, ref.detach(), atol=ATOL, rtol=0)
        got.backward()
        _assert_close(_grads(leaves), ref_grads)
        assert torch.all(leaves[1].grad[V:] == 0)  # padded head rows are never used


def test_prompt_rows_never_reach_the_head() -> None:
    h, w, b, h_t, w_t, b_t, y, mask = _inputs(3, True)
    h = h.masked_fill(~mask.unsqueeze(-1), float("nan"))
    h_t = h_t.masked_fill(~mask.unsqueeze(-1), float("nan"))
    leaves = _leaves(h, w, b)
    got = head_loss_sum(*leaves, h_t, y, mask, w_teacher=w_t, b_teacher=b_t, vocab_size=V,
                        signal="full", divergence="jsd", chunk_size=2)  # fmt: skip
    assert torch.isfinite(got)
    got.backward()
    assert all(torch.isfinite(g).all() for g in _grads(leaves))
    assert torch.all(leaves[0].grad[~mask] == 0)


def test_zero_scaled_loss_gives_zero_grads() -> None:
    h, w, b, h_t, w_t, b_t, y, mask = _inputs(4, True)
    leaves = _leaves(h, w, b)
    got = head_loss_sum(*leaves, h_t, y, mask, w_teacher=w_t, vocab_size=V, signal="topk", k=3, chunk_size=3)
    assert got.item() != 0
    (got * 0).backward()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in _grads(leaves))


def test_scaled_loss_scales_grads_and_empty_mask_is_zero() -> None:
    h, w, b, h_t, w_t, b_t, y, mask = _inputs(5, False)
    a = _leaves(h, w, b)
    head_loss_sum(*a, h_t, y, mask, w_teacher=w_t, vocab_size=V, signal="sampled").backward()
    c = _leaves(h, w, b)
    (2.5 * head_loss_sum(*c, h_t, y, mask, w_teacher=w_t, vocab_size=V, signal="sampled")).backward()
    _assert_close([c[0].grad, c[1].grad], [2.5 * a[0].grad, 2.5 * a[1].grad])

    e = _leaves(h, w, b)
    empty = torch.zeros_like(mask)
    got = head_loss_sum(*e, h_t, y, empty, w_teacher=w_t, vocab_size=V, signal="full")
    assert got.item() == 0.0
    got.backward()
    assert torch.equal(e[0].grad, torch.zeros_like(h)) and torch.equal(e[1].grad, torch.zeros_like(w))


def test_no_grad_and_frozen_head() -> None:
    h, w, b, h_t, w_t, b_t, y, mask = _inputs(6, True)
    ref = per_token_loss(_logits(h, w, b), _logits(h_t, w_t, b_t), y, mask, signal="full", vocab_size=V).sum()
    with torch.no_grad():
        got = head_loss_sum(*_leaves(h, w, b), h_t, y, mask, w_teacher=w_t, b_teacher=b_t, vocab_size=V,
                            signal="full")  # fmt: skip
    assert not got.requires_grad and torch.allclose(got, ref, atol=ATOL, rtol=0)
    hh = h.clone().requires_grad_(True)  # head frozen: only the hidden states get gradient
    head_loss_sum(
        hh, w, b, h_t, y, mask, w_teacher=w_t, b_teacher=b_t, vocab_size=V, signal="full"
    ).backward()
    assert hh.grad is not None and w.grad is None


def test_float32_inputs_give_float32_grads() -> None:
    h, w, b, h_t, w_t, b_t, y, mask = (x.float() if x is not None and x.is_floating_point() else x
                                        for x in _inputs(8, True))  # fmt: skip
    leaves = _leaves(h, w, b)
    got = head_loss_sum(*leaves, h_t, y, mask, w_teacher=w_t, b_teacher=b_t, vocab_size=V, signal="full")
    assert got.dtype == torch.float32
    got.backward()
    assert all(g.dtype == torch.float32 for g in _grads(leaves))


def test_invalid_inputs_are_refused() -> None:
    h, w, b, h_t, w_t, b_t, y, mask = _inputs(9, False)
    with pytest.raises(ValueError, match="w_teacher"):
        head_loss_sum(h, w, b, h_t, y, mask, signal="full")
    with pytest.raises(ValueError, match="vocab_size"):
        head_loss_sum(h, w, b, h_t, y, mask, w_teacher=w_t, signal="full", vocab_size=12)
    with pytest.raises(ValueError, match="sampled"):
        head_loss_sum(h, w, b, h_t, None, mask, w_teacher=w_t, signal="sampled")
    with pytest.raises(ValueError, match="signal='sampled'"):
        head_loss_sum(h, w, b, h_t, y, mask, w_teacher=w_t, signal="sampled", divergence="tvd")


def test_project_dtype_projects_the_student_in_that_dtype() -> None:
    """project_dtype (the trainer passes the autocast dtype) runs the student's head in that dtype, as the
    model's own head would under autocast; the loss maths stays in the inputs' float64 and gradients come
    back in the leaves' dtypes."""
    h, w, b, h_t, w_t, b_t, y, mask = _inputs(7, True)
    kw = dict(signal="full", divergence="reverse_kl")
    ref_leaves = _leaves(h, w, b)
    rh, rw, rb = ref_leaves
    s_logits = (rh.float() @ rw.float().T + rb.float()).double()  # the head in float32, the loss in float64
    ref = per_token_loss(s_logits, _logits(h_t, w_t, b_t), y, mask, **kw).sum()
    ref.backward()
    leaves = _leaves(h, w, b)
    got = head_loss_sum(
        *leaves, h_t, y, mask, w_teacher=w_t, b_teacher=b_t, project_dtype=torch.float32, **kw
    )
    got.backward()
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)
    for a, r in zip(_grads(leaves), _grads(ref_leaves), strict=True):
        assert a.dtype == torch.float64 and torch.allclose(a, r, atol=1e-5, rtol=0), (a - r).abs().max()
    exact = head_loss_sum(h, w, b, h_t, y, mask, w_teacher=w_t, b_teacher=b_t, **kw)
    assert abs(float(exact) - float(got.detach())) > 1e-9  # the float32 head really ran (float64 differs)
