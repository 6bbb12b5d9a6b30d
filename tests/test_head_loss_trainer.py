"""`loss.from_hidden_states`: the trainer's loss from hidden states and head weights (opd.objectives.hidden).

The path must change memory only: the same loss, gradients, weights and metrics as the logits path on the
tiny pair, with no `[B, T, V]` logits in the student's or teacher's forward.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_trainer import _args as trainer_args

from opd.config import load_config
from opd.errors import ConfigError
from opd.models.tiny import save_tiny_pair
from opd.objectives.topk import topk_from_logits
from opd.teachers.hf import score_frozen
from opd.train.parts import check_heads, student_head
from opd.train.trainer import OPDTrainer

# metrics that measure the machine, not the maths
TIMING = {"tokens_per_s", "step_time_s", "time_rollout_s", "time_teacher_s", "time_update_s"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


def _args(pair, run_dir, **extra) -> list[str]:
    """test_trainer's settings, with no checkpoints or final model (only the in-memory weights are compared)."""
    settings = {
        "checkpoint_every": 100, "save_final": False,
        # Adam maps a gradient entry of ~1e-8 (tokens barely touched) to an lr-sized update through
        # g / (|g| + eps): with eps 1e-8 a float32 summation-order difference of 3e-10 in such an entry
        # moved a weight by 3e-6 after step 2. eps 1e-6 keeps that amplification below the tolerance.
        "optim.eps": 1e-6,
    }  # fmt: skip
    return trainer_args(pair, run_dir, **{**settings, **extra})


def _trainer(pair, run_dir, **extra) -> OPDTrainer:
    t = OPDTrainer(load_config(None, _args(pair, run_dir, **extra)), log=lambda m: None)
    t.setup()
    return t


def _params(t: OPDTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t._unwrapped().state_dict().items()}


class _TopKTeacher:
    """A top-K teacher (what the vLLM/HTTP backends return) made from the HF teacher's logits."""

    def __init__(self, model: torch.nn.Module, k: int):
        self.model, self.k = model, k

    def score_topk(self, rollout):
        return topk_from_logits(score_frozen(self.model, rollout), rollout.response_ids, self.k)


def _run(pair, run_dir, sparse_k: int | None = None, **extra) -> tuple[list[dict[str, float]], dict]:
    t = _trainer(pair, run_dir, **extra)
    if sparse_k is not None:
        t.teacher, t.sparse_teacher = _TopKTeacher(t.teacher.model, sparse_k), True
    hist = t.train()
    return hist, _params(t)


def _same_run(pair, tmp_path, sparse_k: int | None = None, **extra) -> None:
    ha, pa = _run(pair, tmp_path / "logits", sparse_k, **{"loss.from_hidden_states": "false", **extra})
    hb, pb = _run(pair, tmp_path / "hidden", sparse_k, **{"loss.from_hidden_states": "true", **extra})
    assert len(ha) == len(hb) == int(extra.get("steps", 2))
    for ma, mb in zip(ha, hb, strict=True):
        assert set(ma) == set(mb)
        for key in sorted(set(ma) - TIMING):
            assert mb[key] == pytest.approx(ma[key], rel=1e-4, abs=1e-6), key
        assert math.isclose(mb["loss"], ma["loss"], rel_tol=1e-5, abs_tol=1e-6)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    "extra",
    [
        {"loss.signal": "full"},
        {"loss.signal": "full", "loss.divergence": "jsd", "loss.beta": 0.3},
        {"loss.signal": "topk", "loss.support": "student"},
        {"loss.signal": "sampled"},
    ],
)
def test_same_losses_weights_and_metrics(pair, tmp_path, extra):
    _same_run(pair, tmp_path, **extra)


def test_gradient_accumulation(pair, tmp_path):
    _same_run(pair, tmp_path, micro_batch_size=3, **{"loss.signal": "topk"})


def test_step_in_backward(pair, tmp_path):
    _same_run(
        pair,
        tmp_path,
        **{"optim.in_backward": "true", "optim.max_grad_norm": "null", "rollout.batch_size": 4},
    )


def test_lora_not_on_the_head(pair, tmp_path):
    _same_run(pair, tmp_path, **{"student.lora.enabled": "true", "student.lora.r": 4, "loss.signal": "topk"})


def test_lora_on_the_head(pair, tmp_path):
    """A LoRA'd head is folded into W + s B A: the adapters on the head train as on the logits path."""
    extra = {"student.lora.enabled": "true", "student.lora.r": 4, "loss.signal": "full",
             "student.lora.target_modules": ".*(q_proj|v_proj|lm_head)"}  # fmt: skip
    t = _trainer(pair, tmp_path / "probe", steps=1, **{"loss.from_hidden_states": "true", **extra})
    head = t._unwrapped().get_output_embeddings()
    assert hasattr(head, "lora_A"), "the head must carry the adapter for this test to mean anything"
    a0 = head.lora_B["default"].weight.detach().clone()
    t.train()
    assert not torch.equal(head.lora_B["default"].weight.detach(), a0), "the head's adapter did not train"
    _same_run(pair, tmp_path, **extra)


def test_gradient_checkpointing(pair, tmp_path):
    _same_run(pair, tmp_path, **{"student.gradient_checkpointing": "true", "loss.signal": "topk"})


def test_tied_embeddings(pair, tmp_path):
    """A student whose head is its embedding matrix: one weight gets both gradients, as on the logits path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tied = tmp_path / "tied"
    model = AutoModelForCausalLM.from_pretrained(pair["student"])
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(tied)
    AutoTokenizer.from_pretrained(pair["student"]).save_pretrained(tied)
    _same_run({**pair, "student": tied}, tmp_path, **{"loss.signal": "full"})


@pytest.mark.parametrize(
    "extra", [{"loss.signal": "sampled"}, {"loss.signal": "topk", "loss.support": "teacher"}]
)
def test_top_k_teacher(pair, tmp_path, extra):
    _same_run(pair, tmp_path, sparse_k=8, **extra)


def test_no_logits_over_the_response(pair, tmp_path):
    """The LM heads of both models project one position per sequence in the training forward."""
    t = _trainer(
        pair, tmp_path / "run", steps=1, **{"loss.from_hidden_states": "true", "loss.signal": "full"}
    )
    shapes: list[tuple[str, tuple[int, ...]]] = []
    recording = [True]

    def hook(name):
        return lambda module, args, out: shapes.append((name, tuple(out.shape))) if recording[0] else None

    t._unwrapped().get_output_embeddings().register_forward_hook(hook("student"))
    t.teacher.model.get_output_embeddings().register_forward_hook(hook("teacher"))
    rollouts = t._rollouts

    def no_recording(*a, **kw):  # generation's own head calls are not the training forward
        recording[0] = False
        try:
            return rollouts(*a, **kw)
        finally:
            recording[0] = True

    t._rollouts = no_recording
    t.train()
    assert {name for name, _ in shapes} == {"student", "teacher"}
    for name, shape in shapes:
        assert len(shape) == 3 and shape[1] == 1, (name, shape)


@pytest.mark.slow
def test_fsdp_sharded_head(pair, tmp_path):
    """sharding fsdp: the LM head is a DTensor shard, gathered with a differentiable all-gather whose
    gradient is reduce-scattered and averaged like FSDP's own. 2 sharded processes give the 1-process
    weights, losses and gradient norms (the norm catches a gradient scale that Adam would hide)."""
    from safetensors.torch import load_file
    from test_trainer import _cli, _torchrun

    extra = {"optim.max_grad_norm": "null", "loss.from_hidden_states": "true", "loss.signal": "full"}
    one = _cli(trainer_args(pair, tmp_path / "one", steps=2, **extra))
    out, _ = one.communicate(timeout=600)
    assert one.returncode == 0, out
    two = _torchrun(trainer_args(pair, tmp_path / "fsdp", steps=2, sharding="fsdp", **extra))
    assert two.returncode == 0, two.stdout + two.stderr
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
    import json

    def metrics(d):
        return [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]

    for ma, mb in zip(metrics("one"), metrics("fsdp"), strict=True):
        assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-6)
        assert mb["grad_norm"] == pytest.approx(ma["grad_norm"], rel=1e-5)


def test_refusals(pair, tmp_path):
    with pytest.raises(ConfigError, match="LoRA'd LM head with dropout"):
        t = _trainer(pair, tmp_path / "y", **{"loss.from_hidden_states": "true", "student.lora.enabled": "true",
                                              "student.lora.target_modules": "lm_head", "student.lora.dropout": 0.1})  # fmt: skip
        t._unwrapped().train()  # the trainer keeps the student in eval mode; dropout acts only in train mode
        student_head(t._unwrapped())


def _engine_run(pair, run_dir, **extra) -> list[dict[str, float]]:
    """Rollouts carrying engine log-probs (as vLLM's do) and a generator with `sync`: the cross-check runs."""
    import dataclasses

    t = _trainer(pair, run_dir, **extra)
    rollouts = t._rollouts

    def with_engine(*a, **kw):
        out = []
        for r in rollouts(*a, **kw):
            g = torch.Generator().manual_seed(len(out))
            noise = torch.rand(r.response_ids.shape, generator=g).to(r.response_ids.device)
            out.append(dataclasses.replace(r, engine_logprobs=-1.0 - noise))
        return out

    t._rollouts = with_engine
    t.generator.sync = lambda model: 0.0
    return t.train()


def test_engine_logprob_cross_check(pair, tmp_path):
    a = _engine_run(pair, tmp_path / "a", steps=1, micro_batch_size=3, **{"loss.from_hidden_states": "false"})
    b = _engine_run(pair, tmp_path / "b", steps=1, micro_batch_size=3, **{"loss.from_hidden_states": "true"})
    for key in ("engine_logprob_delta_mean", "engine_logprob_delta_max"):
        assert key in a[0]
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-5), key


def test_autocast_projects_in_the_autocast_dtype(pair, tmp_path):
    """bf16 autocast: the chunked projection runs in bf16 like the model's own head under autocast. Step 1's
    loss (same weights) agrees to 1e-6 relative; a float32 projection differs by ~2e-4 on this pair (the
    head's bf16 rounding), so the tolerance tells the two apart. After an update, bf16 noise in tiny gradient
    entries moves a few Adam-normalised weights, hence the looser weight tolerance."""
    kw = {"steps": 2, "student.autocast": "bfloat16", "loss.signal": "full"}
    ha, pa = _run(pair, tmp_path / "a", **kw, **{"loss.from_hidden_states": "false"})
    hb, pb = _run(pair, tmp_path / "b", **kw, **{"loss.from_hidden_states": "true"})
    assert hb[0]["loss"] == pytest.approx(ha[0]["loss"], rel=1e-6)
    assert hb[1]["loss"] == pytest.approx(ha[1]["loss"], rel=1e-3)
    assert hb[0]["overlap_ratio"] == pytest.approx(ha[0]["overlap_ratio"], abs=1e-6)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=0, atol=2e-3, msg=k)


def test_a_model_that_transforms_its_logits_is_refused(pair, tmp_path):
    """A head whose logits are not hidden @ W.T (soft-capping, scaling, a custom head) would be trained on
    other numbers by the chunked path: the start-up probe refuses it, naming the way out."""
    from opd.generation.scoring import check_head_projection, head_weights

    t = _trainer(pair, tmp_path / "ok", steps=1)
    model = t._unwrapped()
    check_head_projection(model, *head_weights(model))  # the plain model passes
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: out / 4.0)  # Granite's logits_scaling
    try:
        with pytest.raises(ValueError, match="transforms its logits after the head"):
            check_head_projection(model, *head_weights(model))
        with pytest.raises(
            ConfigError, match=r"loss.from_hidden_states \(student\).*set loss.from_hidden_states false"
        ):
            check_heads(t._unwrapped(), None)
    finally:
        handle.remove()
