"""Tests for opd.diagnostics against slow, loop-by-loop float64 references (plain Python floats and sets)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from opd.diagnostics import (
    BINNED_METRICS,
    diagnostic_sums,
    finalize,
    merge_sums,
    sequence_mean_reward,
    token_diagnostics,
)

F64 = torch.float64


# --------------------------------------------------------------------------------------------------------
# Slow reference
# --------------------------------------------------------------------------------------------------------


def ref_log_probs(row: Tensor) -> list[float]:
    values = [float(x) for x in row]
    m = max(values)
    lse = math.log(sum(math.exp(x - m) for x in values)) + m
    return [x - lse for x in values]


def ref_topk(row: Tensor, k: int) -> set[int]:
    return set(sorted(range(row.shape[0]), key=lambda v: -float(row[v]))[:k])


def ref_position(srow: Tensor, trow: Tensor, k: int) -> dict[str, float | None]:
    logp, logq = ref_log_probs(srow), ref_log_probs(trow)
    p, q = [math.exp(x) for x in logp], [math.exp(x) for x in logq]
    vocab = range(len(p))
    h_p = -sum(p[v] * logp[v] for v in vocab if p[v] > 0)
    h_q = -sum(q[v] * logq[v] for v in vocab if q[v] > 0)
    kk = min(k, len(p))
    overlap = ref_topk(srow, kk) & ref_topk(trow, kk)
    mass_p = sum(p[v] for v in overlap)
    mass_q = sum(q[v] for v in overlap)
    adv = None
    if overlap:
        total = 0.0
        for v in overlap:
            pt, qt = p[v] / mass_p, q[v] / mass_q
            total += pt * (math.log(qt) - math.log(pt))
        adv = total / len(overlap)
    return {
        "overlap_ratio": len(overlap) / kk,
        "overlap_token_advantage": adv,
        "entropy_student": h_p,
        "entropy_teacher": h_q,
        "entropy_gap": abs(h_q - h_p),
        "overlap_mass_student": mass_p,
        "overlap_mass_teacher": mass_q,
        "reverse_kl": sum(p[v] * (logp[v] - logq[v]) for v in vocab),
        "forward_kl": sum(q[v] * (logq[v] - logp[v]) for v in vocab),
    }


def ref_diagnostics(
    student: Tensor, teacher: Tensor, mask: Tensor, k: int, bins: int = 0, bin_len: int = 1
) -> dict[str, float]:
    per_metric: dict[str, list[float]] = {}
    per_bin: dict[str, list[float]] = {}
    n_tokens = 0
    empty = 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not bool(mask[b, t]):
                continue
            n_tokens += 1
            values = ref_position(student[b, t], teacher[b, t], k)
            if values["overlap_token_advantage"] is None:
                empty += 1
            for name, value in values.items():
                if value is not None:
                    per_metric.setdefault(name, []).append(value)
            if bins:
                which = min(bins - 1, t * bins // bin_len)
                for name in BINNED_METRICS:
                    per_bin.setdefault(f"{name}/bin{which}", []).append(values[name])
    out = {name: sum(vals) / len(vals) for name, vals in per_metric.items()}
    out.update({name: sum(vals) / len(vals) for name, vals in per_bin.items()})
    out["n_tokens"] = float(n_tokens)
    if n_tokens:
        out["overlap_empty_frac"] = empty / n_tokens
    return out


def make_inputs(
    batch: int, length: int, vocab: int, seed: int, teacher_vocab: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=gen, dtype=F64) * 2
    teacher = torch.randn(batch, length, teacher_vocab or vocab, generator=gen, dtype=F64) * 2
    tokens = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.rand(batch, length, generator=gen) < 0.75
    if batch >= 2:
        mask[-1] = False
    mask[0, 0] = True
    return student, teacher, tokens, mask


def assert_dicts_close(got: dict[str, float], want: dict[str, float], tol: float = 1e-10) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=tol, rel=tol), key


# --------------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
@pytest.mark.parametrize("shape,k", [((2, 6, 9), 3), ((1, 1, 7), 2), ((3, 5, 17), 4), ((2, 3, 5), 8)])
def test_token_diagnostics_matches_reference(
    shape: tuple[int, int, int], k: int, chunk_size: int | None
) -> None:
    student, teacher, _, mask = make_inputs(*shape, seed=sum(shape) + k)
    got = token_diagnostics(student, teacher, mask, k=k, chunk_size=chunk_size)
    want = ref_diagnostics(student, teacher, mask, k)
    assert_dicts_close(got, want)
    for key in [
        "overlap_ratio",
        "entropy_student",
        "entropy_teacher",
        "entropy_gap",
        "overlap_mass_student",
        "overlap_mass_teacher",
        "reverse_kl",
        "forward_kl",
        "overlap_empty_frac",
        "n_tokens",
    ]:
        assert key in got


def test_some_positions_have_empty_overlap_and_are_excluded_from_advantage() -> None:
    student, teacher, _, mask = make_inputs(4, 8, 30, seed=3)
    teacher = student + 0.7 * teacher  # correlated, so some overlaps are empty and some are not
    got = token_diagnostics(student, teacher, mask, k=2)
    want = ref_diagnostics(student, teacher, mask, 2)
    assert 0 < got["overlap_empty_frac"] < 1  # the fixture really exercises both cases
    assert_dicts_close(got, want)
    assert got["overlap_token_advantage"] <= 0


def test_all_overlaps_empty_omits_advantage() -> None:
    student = torch.zeros(1, 2, 6, dtype=F64)
    teacher = torch.zeros(1, 2, 6, dtype=F64)
    student[..., 0] = 5.0
    teacher[..., 5] = 5.0
    got = token_diagnostics(student, teacher, torch.ones(1, 2, dtype=torch.bool), k=1)
    assert "overlap_token_advantage" not in got
    assert got["overlap_empty_frac"] == 1.0
    assert got["overlap_ratio"] == 0.0
    assert got["overlap_mass_student"] == 0.0  # empty overlap counts as zero mass
    assert all(math.isfinite(v) for v in got.values())


def test_teacher_equal_student() -> None:
    student, _, _, mask = make_inputs(2, 5, 13, seed=4)
    got = token_diagnostics(student, student.clone(), mask, k=4)
    assert got["overlap_ratio"] == 1.0
    assert got["overlap_empty_frac"] == 0.0
    assert got["entropy_gap"] == pytest.approx(0.0, abs=1e-12)
    assert got["reverse_kl"] == pytest.approx(0.0, abs=1e-12)
    assert got["forward_kl"] == pytest.approx(0.0, abs=1e-12)
    assert got["overlap_token_advantage"] == pytest.approx(0.0, abs=1e-12)
    assert got["overlap_mass_student"] == pytest.approx(got["overlap_mass_teacher"], abs=1e-12)


def test_same_topk_set_in_different_order() -> None:
    student, _, _, mask = make_inputs(2, 4, 10, seed=5)
    teacher = student.clone()
    k = 4
    for b in range(2):
        for t in range(4):
            top = student[b, t].topk(k).indices
            teacher[b, t, top] = student[b, t, top.flip(0)]  # same set, reversed order
    got = token_diagnostics(student, teacher, mask, k=k)
    want = ref_diagnostics(student, teacher, mask, k)
    assert_dicts_close(got, want)
    assert got["overlap_ratio"] == 1.0
    assert got["overlap_token_advantage"] < 0
    assert got["entropy_gap"] == pytest.approx(0.0, abs=1e-12)  # a permutation keeps the entropy
    assert got["overlap_mass_student"] == pytest.approx(got["overlap_mass_teacher"], abs=1e-12)


def test_empty_mask_reports_only_token_count() -> None:
    student, teacher, _, _ = make_inputs(2, 3, 7, seed=6)
    got = token_diagnostics(
        student, teacher, torch.zeros(2, 3, dtype=torch.bool), k=3, position_bins=2, bin_len=3
    )
    assert got == {"n_tokens": 0.0}


def test_padded_teacher_vocab_and_bf16() -> None:
    student, teacher, _, mask = make_inputs(2, 4, 9, seed=7, teacher_vocab=12)
    teacher[..., 9:] = 40.0
    got = token_diagnostics(student, teacher, mask, k=3)
    want = token_diagnostics(student, teacher[..., :9], mask, k=3)
    assert_dicts_close(got, want, tol=0)
    sliced = token_diagnostics(student, teacher, mask, k=3, vocab_size=7)
    assert_dicts_close(sliced, ref_diagnostics(student[..., :7], teacher[..., :7], mask, 3))
    bf = token_diagnostics(student.float(), teacher.to(torch.bfloat16), mask, k=3)
    up = token_diagnostics(student.float(), teacher.to(torch.bfloat16).float(), mask, k=3)
    assert_dicts_close(bf, up, tol=0)


def test_float32_close_to_float64() -> None:
    student, teacher, _, mask = make_inputs(2, 6, 40, seed=8)
    got = token_diagnostics(student.float(), teacher.float(), mask, k=5, chunk_size=3)
    want = token_diagnostics(student, teacher, mask, k=5)
    assert_dicts_close(got, want, tol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Sums, bins, merging
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bins,bin_len", [(3, 7), (4, 5), (1, 7), (5, 3)])
def test_position_bins_match_reference_and_add_up(bins: int, bin_len: int) -> None:
    student, teacher, _, mask = make_inputs(3, 7, 11, seed=9)
    sums = diagnostic_sums(student, teacher, mask, k=3, chunk_size=4, position_bins=bins, bin_len=bin_len)
    for name in BINNED_METRICS:
        total = sum(float(sums[f"{name}/bin{i}__sum"]) for i in range(bins))
        assert total == pytest.approx(float(sums[f"{name}__sum"]), abs=1e-10)
    assert sum(float(sums[f"tokens/bin{i}__count"]) for i in range(bins)) == float(sums["tokens__count"])
    got = finalize(sums)
    want = ref_diagnostics(student, teacher, mask, 3, bins=bins, bin_len=bin_len)
    assert_dicts_close(got, want)


def test_bins_without_tokens_are_omitted() -> None:
    student, teacher, _, _ = make_inputs(1, 6, 8, seed=10)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, :2] = True
    got = token_diagnostics(student, teacher, mask, k=2, position_bins=3, bin_len=6)
    assert "overlap_ratio/bin0" in got
    assert "overlap_ratio/bin1" not in got and "reverse_kl/bin2" not in got


def test_sum_keys_are_fixed_and_float64() -> None:
    student, teacher, _, mask = make_inputs(2, 4, 8, seed=11)
    full = diagnostic_sums(student.float(), teacher.float(), mask, k=2, position_bins=2, bin_len=4)
    empty = diagnostic_sums(
        student.float(), teacher.float(), torch.zeros_like(mask), k=2, position_bins=2, bin_len=4
    )
    assert set(full) == set(empty)
    assert all(v.dtype == F64 and v.dim() == 0 for v in full.values())


def test_merge_of_halves_equals_whole() -> None:
    student, teacher, _, mask = make_inputs(4, 6, 12, seed=12)
    mask[-1, 2] = True
    kw = {"k": 3, "position_bins": 3, "bin_len": 6}
    whole = diagnostic_sums(student, teacher, mask, **kw)
    first = diagnostic_sums(student[:2], teacher[:2], mask[:2], **kw)
    second = diagnostic_sums(student[2:], teacher[2:], mask[2:], **kw)
    merged = merge_sums(first, second)
    assert set(merged) == set(whole)
    for key in whole:
        torch.testing.assert_close(merged[key], whole[key], atol=1e-12, rtol=1e-12)
    assert_dicts_close(finalize(merged), finalize(whole), tol=1e-12)
    # inputs are not mutated
    assert float(first["tokens__count"]) == float(mask[:2].sum())


def test_merge_sums_missing_keys_count_as_zero() -> None:
    a = {"tokens__count": torch.tensor(2.0, dtype=F64), "reverse_kl__sum": torch.tensor(1.0, dtype=F64)}
    b = {"tokens__count": torch.tensor(2.0, dtype=F64)}
    assert finalize(merge_sums(a, b))["reverse_kl"] == pytest.approx(0.25)


def test_validation_errors() -> None:
    student, teacher, _, mask = make_inputs(1, 3, 5, seed=13)
    with pytest.raises(ValueError, match="bin_len"):
        diagnostic_sums(student, teacher, mask, position_bins=2)
    with pytest.raises(ValueError, match="k="):
        diagnostic_sums(student, teacher, mask, k=0)
    with pytest.raises(ValueError, match="unknown"):
        finalize({"bogus__sum": torch.tensor(1.0)})


# --------------------------------------------------------------------------------------------------------
# Sequence-mean reward
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_sequence_mean_reward_matches_reference(chunk_size: int | None) -> None:
    student, teacher, tokens, mask = make_inputs(3, 6, 9, seed=14, teacher_vocab=11)
    got = sequence_mean_reward(student, teacher, tokens, mask, chunk_size=chunk_size)
    want = []
    for b in range(3):
        rewards = []
        for t in range(6):
            if bool(mask[b, t]):
                y = int(tokens[b, t])
                rewards.append(ref_log_probs(teacher[b, t, :9])[y] - ref_log_probs(student[b, t])[y])
        want.append(sum(rewards) / len(rewards) if rewards else 0.0)
    assert got.shape == (3,)
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), atol=1e-12, rtol=1e-10)
    assert got[-1] == 0.0  # all-False row
