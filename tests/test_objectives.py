"""Tests for opd.objectives.token against slow, loop-by-loop float64 references.

The references below deliberately share nothing with the implementation: Python loops over positions and
vocabulary entries, Python sets for supports, and autograd through scalar operations for reference
gradients. Each divergence's own formula is its registry entry's float64 reference (a loop over the
support, the JSD mixture built in probability space), so every registered divergence is checked here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from opd.objectives import registry
from opd.objectives.token import (
    DIVERGENCES,
    SIGNALS,
    SUPPORTS,
    per_token_loss,
    shared_vocab,
    signal_stats,
    token_loss,
    validate_objective,
)

F64 = torch.float64
K = 3


# --------------------------------------------------------------------------------------------------------
# Slow references
# --------------------------------------------------------------------------------------------------------


def ref_logsumexp(values: list[Tensor]) -> Tensor:
    m = max(float(v.detach()) for v in values)
    total = torch.zeros((), dtype=F64)
    for v in values:
        total = total + torch.exp(v - m)
    return torch.log(total) + m


def ref_log_probs(row: Tensor, ids: list[int]) -> dict[int, Tensor]:
    lse = ref_logsumexp([row[v] for v in ids])
    return {v: row[v] - lse for v in ids}


def ref_topk(row: Tensor, k: int) -> set[int]:
    order = sorted(range(row.shape[0]), key=lambda v: -float(row[v].detach()))
    return set(order[:k])


def ref_support(srow: Tensor, trow: Tensor, k: int, support: str) -> set[int]:
    sp, sq = ref_topk(srow, k), ref_topk(trow, k)
    return {
        "student": sp,
        "teacher": sq,
        "overlap": sp & sq,
        "non_overlap": sp ^ sq,
        "union": sp | sq,
    }[support]


def ref_divergence(logp: dict[int, Tensor], logq: dict[int, Tensor], divergence: str, beta: float) -> Tensor:
    """The registry entry's float64 reference (a plain loop over the support's entries)."""
    ids = list(logp)
    return registry.divergence(divergence).reference(
        torch.stack([logp[v] for v in ids]), torch.stack([logq[v] for v in ids]), beta
    )


def ref_token(srow: Tensor, trow: Tensor, y: int, cfg: dict) -> Tensor:
    vocab = list(range(srow.shape[0]))
    trow = trow.detach()
    signal = cfg["signal"]
    if signal == "sampled":
        logp_y = srow[y] - ref_logsumexp([srow[v] for v in vocab])
        logq_y = trow[y] - ref_logsumexp([trow[v] for v in vocab])
        reward = float(logq_y) - float(logp_y.detach())
        return -reward * logp_y
    if signal == "full":
        return ref_divergence(
            ref_log_probs(srow, vocab), ref_log_probs(trow, vocab), cfg["divergence"], cfg.get("beta", 0.5)
        )
    support = sorted(ref_support(srow, trow, cfg["k"], cfg["support"]))
    if not support:
        return torch.zeros((), dtype=F64)
    if cfg.get("renorm", "both") == "both":
        return ref_divergence(
            ref_log_probs(srow, support),
            ref_log_probs(trow, support),
            cfg["divergence"],
            cfg.get("beta", 0.5),
        )
    # released-code weighting
    lse_s = ref_logsumexp([srow[v] for v in vocab])
    lse_t = float(ref_logsumexp([trow[v] for v in vocab]))
    mass = sum(math.exp(float((srow[v] - lse_s).detach())) for v in support)
    loss = torch.zeros((), dtype=F64)
    for v in support:
        logp_live = srow[v] - lse_s
        lp, lq = float(logp_live.detach()), float(trow[v]) - lse_t
        weight = math.exp(lp) / mass
        loss = loss - weight * (lq - lp) * logp_live
    return loss


def ref_per_token(student: Tensor, teacher: Tensor, tokens: Tensor, mask: Tensor, cfg: dict) -> Tensor:
    rows = []
    for b in range(student.shape[0]):
        row = []
        for t in range(student.shape[1]):
            if bool(mask[b, t]):
                row.append(ref_token(student[b, t], teacher[b, t], int(tokens[b, t]), cfg))
            else:
                row.append(torch.zeros((), dtype=F64))
        rows.append(torch.stack(row))
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------


def make_inputs(
    batch: int, length: int, vocab: int, seed: int, teacher_vocab: int | None = None, scale: float = 2.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(batch, length, vocab, generator=gen, dtype=F64) * scale).requires_grad_()
    teacher = torch.randn(batch, length, teacher_vocab or vocab, generator=gen, dtype=F64) * scale
    tokens = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.rand(batch, length, generator=gen) < 0.7
    if batch >= 2:
        mask[-1] = False  # an all-False row
    mask[0, 0] = True
    return student, teacher, tokens, mask


def _cfg_id(cfg: dict) -> str:
    return "-".join(str(v) for v in cfg.values())


def valid_configs() -> list[dict]:
    configs: list[dict] = [{"signal": "sampled", "divergence": "reverse_kl"}]
    configs += [{"signal": "full", "divergence": d} for d in DIVERGENCES]
    configs += [
        {"signal": "topk", "divergence": d, "support": s, "renorm": "both"}
        for d in DIVERGENCES
        for s in SUPPORTS
    ]
    configs += [
        {"signal": "topk", "divergence": "reverse_kl", "support": s, "renorm": "weights"} for s in SUPPORTS
    ]
    return configs


CONFIGS = valid_configs()
SHAPES = [(2, 5, 9), (1, 1, 7), (3, 4, 13)]


def impl_kwargs(cfg: dict) -> dict:
    return {key: value for key, value in cfg.items() if key != "k"} | {"k": cfg.get("k", K)}


def check_against_reference(
    cfg: dict, shape: tuple[int, int, int], seed: int, chunk_size: int | None, atol: float = 1e-10
) -> None:
    cfg = {"k": K, **cfg}
    student, teacher, tokens, mask = make_inputs(*shape, seed=seed)
    weights = torch.rand(shape[:2], generator=torch.Generator().manual_seed(seed + 1), dtype=F64) + 0.5

    got = per_token_loss(student, teacher, tokens, mask, chunk_size=chunk_size, **impl_kwargs(cfg))
    (grad,) = torch.autograd.grad((got * weights).sum(), student)

    want = ref_per_token(student, teacher, tokens, mask, cfg)
    want_total = (want * weights).sum()
    want_grad = (
        torch.autograd.grad(want_total, student)[0] if want_total.requires_grad else torch.zeros_like(student)
    )
    assert got.shape == shape[:2]
    assert torch.all(got[~mask] == 0)
    torch.testing.assert_close(got, want.detach(), atol=atol, rtol=1e-9)
    torch.testing.assert_close(grad, want_grad, atol=atol, rtol=1e-9)
    assert torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------------------
# Values and gradients for every valid combination
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_matches_reference(cfg: dict, shape: tuple[int, int, int], chunk_size: int | None) -> None:
    check_against_reference(cfg, shape, seed=sum(shape) * 7 + len(_cfg_id(cfg)), chunk_size=chunk_size)


@pytest.mark.parametrize("beta", [0.0, 1e-3, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize(
    "base",
    [{"signal": "full"}, {"signal": "topk", "support": "union"}, {"signal": "topk", "support": "student"}],
)
def test_jsd_interior_matches_reference(base: dict, beta: float) -> None:
    cfg = {**base, "divergence": "jsd", "beta": beta}
    check_against_reference(cfg, (2, 4, 11), seed=3, chunk_size=3)


@pytest.mark.parametrize("signal,support", [("full", "student"), ("topk", "student"), ("topk", "overlap")])
def test_jsd_endpoints_are_exact_kls(signal: str, support: str) -> None:
    student, teacher, tokens, mask = make_inputs(2, 6, 10, seed=11)
    common = {"signal": signal, "support": support, "k": 4}
    jsd0 = per_token_loss(student, teacher, tokens, mask, divergence="jsd", beta=0.0, **common)
    fkl = per_token_loss(student, teacher, tokens, mask, divergence="forward_kl", **common)
    jsd1 = per_token_loss(student, teacher, tokens, mask, divergence="jsd", beta=1.0, **common)
    rkl = per_token_loss(student, teacher, tokens, mask, divergence="reverse_kl", **common)
    assert torch.equal(jsd0, fkl)
    assert torch.equal(jsd1, rkl)
    assert fkl.abs().sum() > 0 and rkl.abs().sum() > 0  # never a silent zero
    g0 = torch.autograd.grad(jsd0.sum(), student)[0]
    gf = torch.autograd.grad(fkl.sum(), student)[0]
    assert torch.equal(g0, gf)


# --------------------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        {"signal": "full", "divergence": "reverse_kl"},
        {"signal": "full", "divergence": "jsd", "beta": 0.3},
        {"signal": "full", "divergence": "tvd"},
        {"signal": "topk", "divergence": "forward_kl", "support": "non_overlap"},
        {"signal": "topk", "divergence": "reverse_kl", "support": "union", "renorm": "weights"},
        {"signal": "sampled", "divergence": "reverse_kl"},
    ],
    ids=_cfg_id,
)
def test_chunked_equals_unchunked(cfg: dict) -> None:
    student, teacher, tokens, mask = make_inputs(3, 7, 37, seed=5)
    weights = torch.rand(3, 7, dtype=F64, generator=torch.Generator().manual_seed(0))
    plain = per_token_loss(student, teacher, tokens, mask, chunk_size=None, k=5, **cfg)
    (plain_grad,) = torch.autograd.grad((plain * weights).sum(), student)
    n_rows = int(mask.sum())
    for chunk_size in [1, 2, 5, n_rows - 1, n_rows, 10_000]:
        got = per_token_loss(student, teacher, tokens, mask, chunk_size=chunk_size, k=5, **cfg)
        (grad,) = torch.autograd.grad((got * weights).sum(), student)
        torch.testing.assert_close(got, plain, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(grad, plain_grad, atol=1e-12, rtol=1e-12)


def test_chunked_float32_matches_float64_reference() -> None:
    student, teacher, tokens, mask = make_inputs(2, 5, 50, seed=8)
    s32 = student.detach().float().requires_grad_()
    got = token_loss(s32, teacher.float(), tokens, mask, signal="full", chunk_size=3)
    (grad,) = torch.autograd.grad(got, s32)
    assert got.dtype == torch.float32
    want = token_loss(student, teacher, tokens, mask, signal="full", chunk_size=None)
    (want_grad,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-6, rtol=1e-4)


def test_chunked_second_backward_raises_clearly() -> None:
    student, teacher, tokens, mask = make_inputs(2, 3, 8, seed=1)
    loss = token_loss(student, teacher, tokens, mask, signal="full", chunk_size=2)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


def test_no_grad_forward_matches() -> None:
    student, teacher, tokens, mask = make_inputs(2, 4, 9, seed=2)
    with torch.no_grad():
        a = per_token_loss(student, teacher, tokens, mask, signal="full", chunk_size=2)
    b = per_token_loss(student, teacher, tokens, mask, signal="full", chunk_size=2)
    assert not a.requires_grad
    torch.testing.assert_close(a, b.detach())


# --------------------------------------------------------------------------------------------------------
# Properties of the signals
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("support", ["student", "teacher", "union"])
def test_weights_gradient_is_truncated_reverse_kl_over_topk_mass(support: str) -> None:
    student, teacher, tokens, mask = make_inputs(2, 4, 10, seed=21)
    got = per_token_loss(
        student, teacher, tokens, mask, signal="topk", support=support, renorm="weights", k=4, chunk_size=3
    )
    (grad,) = torch.autograd.grad(got.sum(), student)
    want = torch.zeros_like(student)
    for b in range(2):
        for t in range(4):
            if not bool(mask[b, t]):
                continue
            srow, trow = student[b, t].detach(), teacher[b, t]
            p = [math.exp(float(srow[v] - ref_logsumexp(list(srow)))) for v in range(10)]
            logq = [float(trow[v] - ref_logsumexp(list(trow))) for v in range(10)]
            support_set = ref_support(srow, trow, 4, support)
            mass = sum(p[v] for v in support_set)
            for v in support_set:
                coeff = p[v] * (math.log(p[v]) - logq[v]) / mass
                for u in range(10):  # grad of log p(v) w.r.t. logit u is 1[u = v] - p(u)
                    want[b, t, u] += coeff * ((1.0 if u == v else 0.0) - p[u])
    torch.testing.assert_close(grad, want, atol=1e-10, rtol=1e-9)


def test_weights_with_whole_vocab_support_equals_full_reverse_kl_gradient() -> None:
    student, teacher, tokens, mask = make_inputs(2, 4, 6, seed=4)
    weights = per_token_loss(student, teacher, tokens, mask, signal="topk", renorm="weights", k=6)
    full = per_token_loss(student, teacher, tokens, mask, signal="full")
    g_w = torch.autograd.grad(weights.sum(), student)[0]
    g_f = torch.autograd.grad(full.sum(), student)[0]
    torch.testing.assert_close(g_w, g_f, atol=1e-12, rtol=1e-10)


def test_sampled_gradient_matches_full_reverse_kl_in_expectation() -> None:
    n_samples, length, vocab = 20_000, 3, 5
    gen = torch.Generator().manual_seed(123)
    base = torch.randn(1, length, vocab, generator=gen, dtype=F64).requires_grad_()
    teacher = torch.randn(1, length, vocab, generator=gen, dtype=F64)
    probs = torch.softmax(base.detach()[0], dim=-1)
    tokens = torch.multinomial(probs, n_samples, replacement=True, generator=gen).T.contiguous()
    mask = torch.ones(n_samples, length, dtype=torch.bool)
    sampled = per_token_loss(
        base.expand(n_samples, -1, -1), teacher.expand(n_samples, -1, -1), tokens, mask, signal="sampled"
    )
    (g_mc,) = torch.autograd.grad(sampled.sum() / n_samples, base)
    full = per_token_loss(base, teacher, None, mask[:1], signal="full")
    (g_exact,) = torch.autograd.grad(full.sum(), base)
    assert g_exact.abs().max() > 0.05  # the comparison is not trivially between zeros
    torch.testing.assert_close(g_mc, g_exact, atol=0.03, rtol=0.0)


def test_topk_k1_student_support_both_is_zero() -> None:
    student, teacher, tokens, mask = make_inputs(2, 4, 9, seed=6)
    loss = per_token_loss(student, teacher, tokens, mask, signal="topk", k=1)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert torch.all(loss == 0)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_at_least_vocab_equals_full(divergence: str) -> None:
    student, teacher, tokens, mask = make_inputs(2, 3, 7, seed=9)
    topk = per_token_loss(student, teacher, tokens, mask, signal="topk", k=50, divergence=divergence)
    full = per_token_loss(student, teacher, tokens, mask, signal="full", divergence=divergence)
    torch.testing.assert_close(topk, full, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_disjoint_topk_overlap_support_gives_zero_without_nan(
    divergence: str, chunk_size: int | None
) -> None:
    student = torch.zeros(1, 2, 6, dtype=F64)
    student[0, :, 0:2] = torch.tensor([5.0, 4.0], dtype=F64)
    teacher = torch.zeros(1, 2, 6, dtype=F64)
    teacher[0, :, 4:6] = torch.tensor([5.0, 4.0], dtype=F64)
    student = (student + torch.linspace(0, 0.1, 6, dtype=F64)).requires_grad_()
    mask = torch.ones(1, 2, dtype=torch.bool)
    kw = {"signal": "topk", "divergence": divergence, "k": 2, "chunk_size": chunk_size}
    overlap = per_token_loss(student, teacher, None, mask, support="overlap", **kw)
    (grad,) = torch.autograd.grad(overlap.sum(), student)
    assert torch.all(overlap == 0) and torch.all(grad == 0)
    non_overlap = per_token_loss(student, teacher, None, mask, support="non_overlap", **kw)
    (grad,) = torch.autograd.grad(non_overlap.sum(), student)
    assert torch.isfinite(non_overlap).all() and torch.isfinite(grad).all()
    assert non_overlap.abs().sum() > 0


def test_tiny_probabilities_stay_finite() -> None:
    student, teacher, tokens, mask = make_inputs(2, 4, 9, seed=12, scale=60.0)
    for cfg in CONFIGS:
        loss = token_loss(student.float(), teacher.float(), tokens, mask, **impl_kwargs(cfg))
        assert torch.isfinite(loss), cfg


# --------------------------------------------------------------------------------------------------------
# Vocabulary, dtypes, masks, teacher isolation
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS[:6] + CONFIGS[-2:], ids=_cfg_id)
def test_padded_teacher_vocab_equals_sliced(cfg: dict) -> None:
    student, teacher, tokens, mask = make_inputs(2, 4, 9, seed=13, teacher_vocab=12)
    teacher[..., 9:] = 50.0  # padded rows that would dominate if not sliced
    got = per_token_loss(student, teacher, tokens, mask, **impl_kwargs(cfg))
    want = per_token_loss(student, teacher[..., :9], tokens, mask, **impl_kwargs(cfg))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    g1 = torch.autograd.grad(got.sum(), student)[0]
    g2 = torch.autograd.grad(want.sum(), student)[0]
    torch.testing.assert_close(g1, g2, atol=0, rtol=0)


def test_explicit_vocab_size_slices_both() -> None:
    student, teacher, tokens, mask = make_inputs(2, 4, 11, seed=14, teacher_vocab=13)
    tokens = tokens.clamp_max(7)
    got = per_token_loss(student, teacher, tokens, mask, signal="full", vocab_size=8)
    want = per_token_loss(student[..., :8], teacher[..., :8], tokens, mask, signal="full")
    torch.testing.assert_close(got, want)
    (grad,) = torch.autograd.grad(got.sum(), student)
    assert torch.all(grad[..., 8:] == 0)
    with pytest.raises(ValueError, match="vocab_size"):
        per_token_loss(student, teacher, tokens, mask, signal="full", vocab_size=12)


def test_shared_vocab_defaults_to_min() -> None:
    s, t = shared_vocab(torch.zeros(1, 2, 5), torch.zeros(1, 2, 7))
    assert s.shape[-1] == t.shape[-1] == 5


@pytest.mark.parametrize("signal", SIGNALS)
def test_bf16_teacher_is_upcast(signal: str) -> None:
    student, teacher, tokens, mask = make_inputs(2, 4, 9, seed=15)
    s32 = student.detach().float().requires_grad_()
    t16 = teacher.to(torch.bfloat16)
    got = per_token_loss(s32, t16, tokens, mask, signal=signal)
    want = per_token_loss(s32, t16.float(), tokens, mask, signal=signal)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_bf16_student_gets_bf16_gradient() -> None:
    student, teacher, tokens, mask = make_inputs(2, 4, 9, seed=16)
    s16 = student.detach().to(torch.bfloat16).requires_grad_()
    loss = token_loss(s16, teacher.to(torch.bfloat16), tokens, mask, signal="full")
    loss.backward()
    assert loss.dtype == torch.float32
    assert s16.grad is not None and s16.grad.dtype == torch.bfloat16
    assert torch.isfinite(s16.grad.float()).all()


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("cfg", CONFIGS[:6] + CONFIGS[-1:], ids=_cfg_id)
def test_empty_mask_gives_zero_with_graph(cfg: dict, chunk_size: int | None) -> None:
    student, teacher, tokens, _ = make_inputs(2, 3, 8, seed=17)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = token_loss(student, teacher, tokens, mask, chunk_size=chunk_size, **impl_kwargs(cfg))
    assert loss.requires_grad
    assert float(loss.detach()) == 0.0
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.all(grad == 0)


def test_token_loss_is_mean_of_per_token_loss() -> None:
    student, teacher, tokens, mask = make_inputs(3, 5, 9, seed=18)
    per_token = per_token_loss(student, teacher, tokens, mask, signal="full")
    loss = token_loss(student, teacher, tokens, mask, signal="full")
    torch.testing.assert_close(loss, per_token.sum() / mask.sum())


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("cfg", CONFIGS[:6] + CONFIGS[-1:], ids=_cfg_id)
def test_no_gradient_into_teacher(cfg: dict, chunk_size: int | None) -> None:
    student, teacher, tokens, mask = make_inputs(2, 4, 9, seed=19)
    teacher.requires_grad_()
    loss = token_loss(student, teacher, tokens, mask, chunk_size=chunk_size, **impl_kwargs(cfg))
    g_student, g_teacher = torch.autograd.grad(loss, [student, teacher], allow_unused=True)
    assert g_teacher is None
    assert g_student is not None and g_student.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,match",
    [
        (("bogus", "reverse_kl", "student", "both", 0.5, 16), "signal"),
        (("topk", "bogus", "student", "both", 0.5, 16), "divergence"),
        (("topk", "reverse_kl", "bogus", "both", 0.5, 16), "support"),
        (("topk", "reverse_kl", "student", "bogus", 0.5, 16), "renorm"),
        (("sampled", "jsd", "student", "both", 0.5, 16), "sampled.*reverse_kl"),
        (("sampled", "forward_kl", "student", "both", 0.5, 16), "sampled.*reverse_kl"),
        (("topk", "jsd", "student", "weights", 0.5, 16), "weights.*renorm='both'"),
        (("full", "reverse_kl", "student", "weights", 0.5, 16), "weights"),
        (("sampled", "reverse_kl", "student", "weights", 0.5, 16), "weights"),
        (("full", "jsd", "student", "both", 1.5, 16), "beta"),
        (("full", "jsd", "student", "both", -0.1, 16), "beta"),
        (("full", "jsd", "student", "both", float("nan"), 16), "beta"),
        (("topk", "reverse_kl", "student", "both", 0.5, 0), "k="),
        (("topk", "reverse_kl", "student", "both", 0.5, 2.5), "k="),
    ],
)
def test_validate_objective_rejects(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_objective(*args)


def test_validate_objective_accepts_all_valid() -> None:
    for cfg in CONFIGS:
        validate_objective(
            cfg["signal"],
            cfg["divergence"],
            cfg.get("support", "student"),
            cfg.get("renorm", "both"),
            0.5,
            16,
        )
    validate_objective("full", "jsd", "student", "both", 0, 1)
    validate_objective("full", "jsd", "student", "both", 1, 1)


def test_token_loss_raises_validation_errors() -> None:
    student, teacher, tokens, mask = make_inputs(1, 2, 5, seed=0)
    with pytest.raises(ValueError, match="sampled"):
        token_loss(student, teacher, tokens, mask, signal="sampled", divergence="tvd")
    with pytest.raises(ValueError, match="weights"):
        token_loss(student, teacher, tokens, mask, signal="full", renorm="weights")
    with pytest.raises(ValueError, match="response_tokens"):
        token_loss(student, teacher, None, mask, signal="sampled")
    with pytest.raises(ValueError, match="chunk_size"):
        token_loss(student, teacher, tokens, mask, signal="full", chunk_size=0)
    with pytest.raises(ValueError, match="mask"):
        token_loss(student, teacher, tokens, mask[:, :1], signal="full")


# --------------------------------------------------------------------------------------------------------
# signal_stats
# --------------------------------------------------------------------------------------------------------


def ref_signal_stats(
    student: Tensor, teacher: Tensor, tokens: Tensor, mask: Tensor, signal: str, k: int, support: str
) -> dict[str, float]:
    rewards, best, best_pmq = [], -1.0, 0.0
    vocab = list(range(student.shape[-1]))
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not bool(mask[b, t]):
                continue
            srow, trow = student[b, t].detach(), teacher[b, t]
            lse_s, lse_t = float(ref_logsumexp(list(srow))), float(ref_logsumexp(list(trow)))
            logp = {v: float(srow[v]) - lse_s for v in vocab}
            logq = {v: float(trow[v]) - lse_t for v in vocab}
            y = int(tokens[b, t])
            rewards.append(logq[y] - logp[y])
            if signal == "sampled":
                slots = {y: rewards[-1]}
            else:
                chosen = ref_support(srow, trow, k, support if signal == "topk" else "student")
                mass = sum(math.exp(logp[v]) for v in chosen)
                slots = {v: math.exp(logp[v]) / mass * (logq[v] - logp[v]) for v in chosen}
            for v, adv in slots.items():
                if abs(adv) > best:
                    best, best_pmq = abs(adv), math.exp(logp[v]) - math.exp(logq[v])
    return {"reward_mean": sum(rewards) / len(rewards), "adv_max_abs": best, "p_minus_q_at_max_adv": best_pmq}


@pytest.mark.parametrize(
    "signal,support", [("sampled", "student"), ("topk", "student"), ("topk", "union"), ("full", "teacher")]
)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_signal_stats_matches_reference(signal: str, support: str, chunk_size: int | None) -> None:
    student, teacher, tokens, mask = make_inputs(3, 5, 11, seed=31)
    got = signal_stats(
        student, teacher, tokens, mask, signal=signal, k=4, support=support, chunk_size=chunk_size
    )
    want = ref_signal_stats(student, teacher, tokens, mask, signal, 4, support)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-10, rel=1e-9), key
    assert got["n_tokens"] == float(mask.sum())


def test_signal_stats_empty_mask() -> None:
    student, teacher, tokens, _ = make_inputs(2, 3, 7, seed=32)
    got = signal_stats(student, teacher, tokens, torch.zeros(2, 3, dtype=torch.bool), signal="topk")
    assert got == {"reward_mean": 0.0, "adv_max_abs": 0.0, "p_minus_q_at_max_adv": 0.0, "n_tokens": 0.0}
