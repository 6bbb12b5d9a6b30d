"""Start-up checks: is this student/teacher pair fit to be distilled at all?

Run before training (and alone as `opd check`), because the failures they catch do not crash: a
mismatched tokenizer, a renderer difference or a scoring path that shifts positions all produce a
perfectly finite loss that trains toward the wrong target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from opd.diagnostics import token_diagnostics
from opd.generation.rollout import HFGenerator, Rollout, SamplingParams
from opd.generation.scoring import response_logits
from opd.objectives.token import token_loss
from opd.teachers.hf import score_frozen

FIDELITY_TOL = 1e-5  # nats/token; teacher := student must give KL ~ 0 up to float noise


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


def nonfinite_positions(
    logits: torch.Tensor, mask: torch.Tensor, vocab_size: int | None = None
) -> tuple[int, int, tuple[int, int] | None]:
    """(response positions with a NaN/inf logit, response positions, first bad (row, position)).

    A model that overflows (fp16 weights, a broken checkpoint) gives NaN or inf logits; every metric
    computed from them is NaN or silently clamped (entropy 0), so the checks look for them first and
    name them, instead of reporting a nondeterministic teacher or a collapsed distribution.
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    m = mask.to(logits.device).bool()
    bad = ~torch.isfinite(logits).all(dim=-1) & m
    n_bad = int(bad.sum())
    first = None
    if n_bad:
        row, pos = (int(v) for v in bad.nonzero()[0])
        first = (row, pos)
    return n_bad, int(m.sum()), first


def _nonfinite_result(who: str, logits: torch.Tensor, mask: torch.Tensor,
                      vocab_size: int | None) -> CheckResult | None:  # fmt: skip
    """A failed CheckResult when `who`'s logits are not finite on some response position, else None."""
    n_bad, n, first = nonfinite_positions(logits, mask, vocab_size)
    if not n_bad:
        return None
    assert first is not None
    row, pos = first
    kind = "NaN" if torch.isnan(logits[row, pos]).any() else "inf"
    dtype_hint = (f"load it in float32 (--{who}-dtype float32): {str(logits.dtype).replace('torch.', '')} "
                  "may overflow, or " if logits.dtype in (torch.float16, torch.bfloat16) else "")  # fmt: skip
    return CheckResult(
        f"{who} logits finite",
        False,
        f"{who} produces non-finite logits on {n_bad} of {n} response positions (first: {kind} at rollout "
        f"{row}, response token {pos}); {dtype_hint}check the {who} checkpoint (re-download or re-convert it)",
        {"nonfinite_positions": n_bad, "response_positions": n},
    )


def self_test_rollout(model: torch.nn.Module, prompts: list[list[int]], *, pad_id: int, stop_ids: list[int],
                      max_new_tokens: int = 16, seed: int = 0) -> Rollout:  # fmt: skip
    gen = HFGenerator(model, pad_id=pad_id, stop_ids=stop_ids)
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens)
    return gen.generate(prompts, params, 1, seed, list(range(len(prompts))))


def fidelity_self_test(
    model: torch.nn.Module, rollout: Rollout, *, vocab_size: int | None = None, k: int = 16
) -> CheckResult:
    """Score the student's rollouts with the student as its own teacher, through the teacher path.

    Every signal must be ~0 and the overlap ratio exactly 1; anything else means the training-side and
    teacher-side forward passes see different positions, masks, dtypes or vocabularies.
    """
    with torch.no_grad():
        s = response_logits(model, rollout)
    t = score_frozen(model, rollout).to(s.device)
    # The rollout may live elsewhere than the logits (a CPU-built rollout, a model on the GPU): masks and
    # ids go where the logits are, never the other way round.
    mask = rollout.response_mask.to(s.device)
    tokens = rollout.response_ids.to(s.device)
    if (bad := _nonfinite_result("student", s, mask, vocab_size)) is not None:
        bad.name = "teacher-fidelity self-test"
        return bad
    values: dict[str, Any] = {
        "max_abs_logit_diff": float((s.float() - t.float()).abs().max()) if mask.any() else 0.0
    }
    variants = {
        "sampled": {"signal": "sampled"},
        "topk_both": {"signal": "topk", "renorm": "both"},
        "topk_weights": {"signal": "topk", "renorm": "weights"},
        "full_reverse_kl": {"signal": "full"},
        "full_jsd": {"signal": "full", "divergence": "jsd"},
    }
    for name, kw in variants.items():
        with torch.no_grad():
            values[f"loss_{name}"] = float(token_loss(s, t, tokens, mask, k=k, vocab_size=vocab_size, **kw))
    diag = token_diagnostics(s, t, mask, k=k, vocab_size=vocab_size)
    values["overlap_ratio"] = diag.get("overlap_ratio", float("nan"))
    worst = max(abs(v) for n, v in values.items() if n.startswith("loss_"))
    ok = worst < FIDELITY_TOL and abs(values["overlap_ratio"] - 1.0) < 1e-9
    detail = (
        f"teacher := student: max |signal| = {worst:.2e} (tolerance {FIDELITY_TOL:g}), "
        f"overlap ratio = {values['overlap_ratio']:.4f}"
    )
    return CheckResult("teacher-fidelity self-test", ok, detail, values)


def determinism_check(
    teacher_model: torch.nn.Module, rollout: Rollout, vocab_size: int | None = None
) -> CheckResult:
    """Two scorings of the same ids must agree; serverless teachers once disagreed by more than the signal.

    NaN/inf logits are reported as such first ("teacher logits finite"): NaN never equals NaN, so they
    would otherwise read as a nondeterministic teacher.
    """
    a = score_frozen(teacher_model, rollout).float()
    if (bad := _nonfinite_result("teacher", a, rollout.response_mask, vocab_size)) is not None:
        return bad
    b = score_frozen(teacher_model, rollout).float()
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    return CheckResult(
        "teacher determinism",
        diff == 0.0,
        f"max |logit difference| between two scorings = {diff:.3g}",
        {"max_diff": diff},
    )


def pair_diagnostics(student: torch.nn.Module, teacher: torch.nn.Module, rollout: Rollout, *,
                     vocab_size: int, k: int = 16) -> dict[str, float]:  # fmt: skip
    """The paper's token-level metrics of the real pair at the student's states: a first look.

    Positions where either model's logits are not finite are left out and counted
    (``nonfinite_positions``); with none left the metrics are NaN, never a misleading 0.
    """
    with torch.no_grad():
        s = response_logits(student, rollout)
    t = score_frozen(teacher, rollout).to(s.device)
    mask = rollout.response_mask.to(s.device)
    sv, tv = (x[..., :vocab_size] if vocab_size is not None else x for x in (s, t))
    finite = torch.isfinite(sv).all(dim=-1) & torch.isfinite(tv).all(dim=-1)
    n_bad = int((mask.bool() & ~finite).sum())
    if not n_bad:
        return token_diagnostics(s, t, mask, k=k, vocab_size=vocab_size)
    keep = mask.bool() & finite
    if not keep.any():
        return {"nonfinite_positions": float(n_bad), "response_positions": float(mask.bool().sum())}
    clean = torch.where(finite[..., None], s, 0.0), torch.where(finite[..., None], t, 0.0)
    diag = token_diagnostics(*clean, keep.to(mask.dtype), k=k, vocab_size=vocab_size)
    return {**diag, "nonfinite_positions": float(n_bad)}
