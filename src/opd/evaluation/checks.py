"""Start-up checks: is this student/teacher pair fit to be distilled at all?

Run before training (and alone as `opd check`), because the failures they catch do not crash: a
mismatched tokenizer, a renderer difference or a scoring path that shifts positions all produce a
perfectly finite loss that trains toward the wrong target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opd.data import PromptRecord, option_names
from opd.diagnostics import token_diagnostics
from opd.generation.rollout import HFGenerator, Rollout, SamplingParams
from opd.generation.scoring import response_logits
from opd.objectives.token import token_loss
from opd.teachers.hf import score_frozen

FIDELITY_TOL = 1e-5  # nats/token; teacher := student must give KL ~ 0 up to float noise
# Findings worth a warning that do not make a pair unfit: a template quirk can be worked around.
SOFT_CHECKS = ("template/EOS", "rendered prompt")
# How `opd check` spells the prompt settings its hints name (`--prompts`, `--template`).
CHECK_OPTIONS = option_names("--", dashes=True)
# Prompts for the self-test when the user gives no prompt file: any text exercises the scoring paths.
BUILTIN_PROMPTS = ("What is 12 + 30?", "Name a prime number larger than 10.")


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
                      max_new_tokens: int = 16, seed: int = 0, vocab_size: int | None = None) -> Rollout:  # fmt: skip
    gen = HFGenerator(model, pad_id=pad_id, stop_ids=stop_ids, vocab_size=vocab_size)
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


# --------------------------------------------------------------------------------------------------
# All checks of a pair, as `opd check` runs them


def checks_passed(results: Sequence[CheckResult]) -> bool:
    """Whether the pair is fit to distil: warnings (`SOFT_CHECKS`) are reported but never fail it."""
    return all(r.ok for r in results if r.name not in SOFT_CHECKS)


def _quiet(message: str) -> None:
    pass


def _no_status(message: str) -> AbstractContextManager[Any]:
    return nullcontext()


def _no_prompt_shown(text: str, template: str) -> None:
    pass


def run_checks(
    student: str, teacher: str, *, prompts: str | Path | None = None, template: str = "chat",
    student_dtype: str = "float32", teacher_dtype: str = "float32", max_new_tokens: int = 16,
    n_prompts: int = 2, k: int = 16, trust_remote_code: bool = False, device: str = "auto",
    log: Callable[[str], None] = _quiet, status: Callable[[str], AbstractContextManager[Any]] = _no_status,
    show_prompt: Callable[[str, str], None] = _no_prompt_shown,
) -> list[CheckResult]:  # fmt: skip
    """Every start-up check of the pair, in the order `opd check` reports them; `checks_passed` judges.

    Tokenizers are compared before any weights are read: a mismatch is returned at once as the single
    failed "tokenizers" result, since nothing else means anything across two vocabularies and loading
    both models to learn that takes minutes. A missing or damaged file raises instead (an error, not a
    finding). Nothing is printed here, so the CLI and a notebook can present it each their own way:
    `log` gets progress lines, `status` wraps each slow stage (a spinner), and `show_prompt` gets the
    first prompt as the student's tokenizer renders it under `template`, for a human to eyeball.
    """
    import time

    from opd.data import encode_prompts, render_prompt, uses_chat
    from opd.device import resolve_device
    from opd.errors import TokenizerMismatchError
    from opd.generation.sampling import stop_ids_for
    from opd.models.loading import load_pair, load_pair_tokenizers, special_tokens_report

    target = resolve_device(device)  # before any loading: `--device cuda` without CUDA fails here
    records = _check_prompts(prompts, n_prompts)  # a bad prompt file fails before minutes of loading
    t0 = time.perf_counter()
    try:
        toks = load_pair_tokenizers(
            student, teacher, student_trust_remote_code=trust_remote_code,
            teacher_trust_remote_code=trust_remote_code,
        )  # fmt: skip
    except TokenizerMismatchError as exc:  # a finding; a missing or damaged file is an error
        return [CheckResult("tokenizers", False, str(exc))]
    s_tok, t_tok, rep = toks.student, toks.teacher, toks.report
    rep = rep if isinstance(rep, dict) else {}
    results = [CheckResult("tokenizers", True, "identical vocabularies", rep)]
    with status("loading models..."):
        pair = load_pair(student, teacher, student_dtype=student_dtype, teacher_dtype=teacher_dtype,
                         device=target, student_trust_remote_code=trust_remote_code,
                         teacher_trust_remote_code=trust_remote_code, tokenizers=toks)  # fmt: skip
    s_model, t_model, vocab = pair.student, pair.teacher, pair.vocab_size
    log(f"models loaded on {target} in {time.perf_counter() - t0:.1f}s")
    results.append(
        CheckResult("vocabulary", True, f"shared real vocabulary {vocab}; padded rows are sliced away")
    )
    s_rep, t_rep = special_tokens_report(s_tok, s_model), special_tokens_report(t_tok, t_model)
    results.append(CheckResult("special tokens", True, f"student {s_rep} | teacher {t_rep}"))
    results += [CheckResult("template/EOS", False, w) for w in rep.get("warnings", [])]

    texts = [render_prompt(r, s_tok, template=template, options=CHECK_OPTIONS) for r in records]
    show_prompt(texts[0], template)
    if (differs := _teacher_rendering(records[0], t_tok, template, texts[0])) is not None:
        results.append(differs)
    ids = encode_prompts(texts, s_tok, max_prompt_tokens=100_000, sources=[r.source for r in records],
                         add_special_tokens=not uses_chat(template))  # fmt: skip
    with status("self-test rollouts and scoring..."):
        roll = self_test_rollout(s_model, ids, pad_id=s_tok.pad_token_id, stop_ids=stop_ids_for(s_tok, s_model),
                                 max_new_tokens=max_new_tokens, vocab_size=vocab)  # fmt: skip
        results.append(fidelity_self_test(s_model, roll, vocab_size=vocab, k=k))
        results.append(determinism_check(t_model, roll))
        diag = pair_diagnostics(s_model, t_model, roll, vocab_size=vocab, k=k)
    results.append(CheckResult("pair metrics (informational)", True,
                               ", ".join(f"{k_}={v:.4g}" for k_, v in diag.items() if "/" not in k_), diag))  # fmt: skip
    return results


def _check_prompts(prompts: str | Path | None, n: int) -> list[PromptRecord]:
    """The first `n` prompts of the file, else built-in ones: the self-test needs some text either way."""
    from opd.data import load_prompts

    if prompts:
        return load_prompts(prompts, options=CHECK_OPTIONS)[:n]
    return [
        PromptRecord(text=t, messages=None, answer=None, source=f"builtin:{i}", raw={})
        for i, t in enumerate(BUILTIN_PROMPTS[:n])
    ]


def _teacher_rendering(
    record: PromptRecord, tokenizer: Any, template: str, student_text: str
) -> CheckResult | None:
    """A warning when the teacher's tokenizer renders the prompt unlike the student's, else None.

    The teacher scores the student's ids, so a different rendering is only a hint that the teacher was
    trained on other-looking prompts; a template the teacher cannot render at all is no finding either.
    """
    from opd.data import render_prompt
    from opd.errors import OpdError

    try:
        t_text = render_prompt(record, tokenizer, template=template)
    except OpdError:
        return None
    if t_text == student_text:
        return None
    return CheckResult(
        "rendered prompt", False, f"the teacher's tokenizer renders the prompt differently: {t_text!r}"
    )


@torch.no_grad()
def engine_fidelity(teacher: Any, rollout: Rollout, *, vocab_size: int, reference: str, dtype: str,
                    trust_remote_code: bool = False) -> dict[str, Any]:  # fmt: skip
    """An engine teacher (``score_topk``: vLLM, a server) against transformers on the same rollouts.

    Scores twice with the engine (determinism) and once with the HF model at `reference` in `dtype` (the
    reference precision; bfloat16 halves this one-off load), on `rollout`'s device; returns
    `opd.objectives.topk.topk_fidelity`'s numbers (mean/max |Δ log-prob|, determinism, ``ok``)."""
    from opd.models.loading import freeze_teacher, load_model
    from opd.objectives.topk import topk_fidelity

    device = rollout.response_ids.device
    first, again = (teacher.score_topk(rollout).restrict(vocab_size).to(device) for _ in range(2))
    ref = load_model(reference, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    logits = score_frozen(freeze_teacher(ref), rollout)[..., :vocab_size]
    del ref
    return topk_fidelity(first, logits, rollout.response_mask, again=again)


def check_engine_teacher(teacher: Any, model: torch.nn.Module, prompt_ids: list[list[int]], tc: Any, *, acc: Any,
                         run_dir: Path, vocab_size: int, pad_id: int, stop_ids: list[int], max_new_tokens: int,
                         seed: int, log: Callable[[str], Any], n_prompts: int = 2,
                         max_tokens: int = 32) -> dict[str, Any] | None:  # fmt: skip
    """A run's start-up check of an engine teacher (vLLM, a server): `engine_fidelity` on a few rollouts of
    the student `model`, scored on the main process (every process samples them: a sharded student needs
    them all for a forward), written to RUN_DIR/teacher_fidelity.json, with a warning above
    `opd.objectives.topk.FIDELITY_WARN_MEAN`. None for an HF teacher, with ``teacher.fidelity_check`` off,
    or without a local ``teacher.path`` (`tc`: the run's TeacherConfig)."""
    import json

    from opd.device import place
    from opd.files import atomic_write_text, json_safe
    from opd.objectives.topk import FIDELITY_WARN_MEAN

    if not teacher.scored_by_engine or not tc.fidelity_check:
        return None
    if not tc.path:
        log("teacher fidelity check skipped: set teacher.path to a local copy of the served model")
        acc.wait_for_everyone()
        return None
    roll = self_test_rollout(model, prompt_ids[:n_prompts], pad_id=pad_id, stop_ids=stop_ids,
                             max_new_tokens=min(max_tokens, max_new_tokens), seed=seed, vocab_size=vocab_size)  # fmt: skip
    result = None
    if acc.is_main_process:
        result = engine_fidelity(teacher, place(roll, acc.device), vocab_size=vocab_size, reference=tc.path,
                                 dtype=tc.dtype, trust_remote_code=tc.trust_remote_code)  # fmt: skip
        atomic_write_text(
            run_dir / "teacher_fidelity.json", json.dumps(json_safe(result), indent=1, allow_nan=False)
        )
        line = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k != "ok")
        if result["ok"]:
            log(f"[green]ok[/] teacher fidelity ({tc.backend} vs HF {tc.dtype}): {line}")
        else:
            log(
                f"[yellow]warning:[/] teacher fidelity ({tc.backend} vs HF {tc.dtype}): {line}; a mean |Δ log-prob| "
                f"above {FIDELITY_WARN_MEAN} or non-deterministic scores mean the engine is not grading with the "
                "teacher you think (dtype, quantisation, model revision)"
            )
    acc.wait_for_everyone()
    return result
