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
from opd.objectives import token_loss
from opd.rollout import HFGenerator, Rollout, SamplingParams
from opd.scoring import response_logits
from opd.teacher import score_frozen

FIDELITY_TOL = 1e-5  # nats/token; teacher := student must give KL ~ 0 up to float noise


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


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


def determinism_check(teacher_model: torch.nn.Module, rollout: Rollout) -> CheckResult:
    """Two scorings of the same ids must agree; serverless teachers once disagreed by more than the signal."""
    a = score_frozen(teacher_model, rollout).float()
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
    """The paper's token-level metrics of the real pair at the student's states: a first look."""
    with torch.no_grad():
        s = response_logits(student, rollout)
    t = score_frozen(teacher, rollout).to(s.device)
    return token_diagnostics(s, t, rollout.response_mask.to(s.device), k=k, vocab_size=vocab_size)
