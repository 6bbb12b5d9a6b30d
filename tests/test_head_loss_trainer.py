"""`loss.from_hidden_states`: the trainer's loss from hidden states and head weights (opd.head_loss).

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
from opd.teacher import score_frozen
from opd.teacher_topk import topk_from_logits
from opd.tiny import save_tiny_pair
from opd.trainer import OPDTrainer

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
    ha, pa = _run(pair, tmp_path / "logits", sparse_k, **extra)
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


def test_refusals(pair, tmp_path):
    with pytest.raises(Exception, match="loss.from_hidden_states with sharding fsdp"):
        load_config(None, _args(pair, tmp_path / "x", sharding="fsdp", **{"loss.from_hidden_states": "true"}))
    with pytest.raises(Exception, match="loss.from_hidden_states with teacher.placement cpu_offload"):
        load_config(
            None,
            _args(
                pair,
                tmp_path / "x",
                **{"loss.from_hidden_states": "true", "teacher.placement": "cpu_offload"},
            ),
        )
    with pytest.raises(ConfigError, match="loss.from_hidden_states with a LoRA on the LM head"):
        _trainer(pair, tmp_path / "y", **{"loss.from_hidden_states": "true", "student.lora.enabled": "true",
                                          "student.lora.target_modules": "lm_head"})  # fmt: skip


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
    a = _engine_run(pair, tmp_path / "a", steps=1, micro_batch_size=3)
    b = _engine_run(pair, tmp_path / "b", steps=1, micro_batch_size=3, **{"loss.from_hidden_states": "true"})
    for key in ("engine_logprob_delta_mean", "engine_logprob_delta_max"):
        assert key in a[0]
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-5), key


def test_autocast_runs(pair, tmp_path):
    """bf16 autocast: hidden states are cast to the head weight's dtype; the loss stays close."""
    kw = {"steps": 1, "student.autocast": "bfloat16"}
    a = _trainer(pair, tmp_path / "a", **kw).train()
    b = _trainer(pair, tmp_path / "b", **kw, **{"loss.from_hidden_states": "true"}).train()
    assert math.isfinite(b[0]["loss"])
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=0.05, abs=1e-3)
