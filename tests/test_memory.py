"""Memory-saving paths against the plain ones: optim.in_backward and vocabulary-aware loss chunks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd.config import LossConfig, load_config
from opd.errors import ConfigError
from opd.objectives.token import DEFAULT_CHUNK_ELEMENTS, chunk_rows, per_token_loss
from opd.train.trainer import NonFiniteLossError, OPDTrainer


def _args(pair, run_dir, **extra) -> list[str]:
    base = {
        "student": str(pair["student"]), "teacher": str(pair["teacher"]), "prompts": str(pair["prompts"]),
        "run_dir": str(run_dir), "prompts_per_step": 4, "micro_batch_size": 8, "rollout.rollouts_per_prompt": 2,
        "rollout.max_new_tokens": 8, "rollout.batch_size": 4, "optim.lr": 1e-3, "steps": 2,
        "checkpoint_every": 1, "tracking.tensorboard": False, "diagnostics.k": 8, "loss.k": 8,
        "optim.max_grad_norm": "null", "optim.weight_decay": 0.01,
    }  # fmt: skip
    base.update(extra)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def _trainer(pair, run_dir, resume=False, **extra) -> OPDTrainer:
    t = OPDTrainer(load_config(None, _args(pair, run_dir, **extra)), resume=resume, log=lambda m: None)
    t.setup()
    return t


def _params(t: OPDTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t._unwrapped().state_dict().items()}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "extra",
    [
        {"loss.signal": "topk"},
        {"loss.signal": "full"},
        {"loss.signal": "sampled", "student.autocast": "bfloat16", "student.gradient_checkpointing": True},
        {"student.lora.enabled": True, "optim.lr": 1e-2},
    ],
    ids=["topk", "full", "sampled-autocast-ckpt", "lora"],
)
def test_in_backward_equals_the_plain_step_bit_for_bit(tiny_pair, tmp_path, extra):
    plain = _trainer(tiny_pair, tmp_path / "plain", **extra)
    plain.train()
    fused = _trainer(tiny_pair, tmp_path / "fused", **{**extra, "optim.in_backward": True})
    counts: list[int] = []
    inner = fused.optimizer.step

    def counting_step(*a, **k):  # every in-backward step must see exactly one live gradient
        counts.append(sum(p.grad is not None for p in fused._unwrapped().parameters()))
        return inner(*a, **k)

    fused.optimizer.step = counting_step
    fused.train()
    n_params = sum(1 for p in fused._unwrapped().parameters() if p.requires_grad)
    assert counts == [1] * (2 * n_params)
    a, b = _params(plain), _params(fused)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = plain.optimizer.state_dict()["state"], fused.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) == n_params
    for i in sa:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)
    ma, mb = _metrics(tmp_path / "plain"), _metrics(tmp_path / "fused")
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["loss"] == rb["loss"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-6)
    assert all(p.grad is None for p in fused._unwrapped().parameters())


def test_in_backward_checkpoints_are_interchangeable_with_plain_ones(tiny_pair, tmp_path):
    """Same optimizer state format: a plain run resumed with in_backward equals an in_backward run."""
    ref = _trainer(tiny_pair, tmp_path / "ref", **{"optim.in_backward": True})
    ref.train()
    first = _trainer(tiny_pair, tmp_path / "mix", steps=2)
    first.total_steps = 1
    first.train()
    resumed = _trainer(tiny_pair, tmp_path / "mix", resume=True, **{"optim.in_backward": True})
    assert resumed.start_step == 1
    resumed.train()
    a, b = _params(ref), _params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"optim.max_grad_norm": 1.0}, "optim.max_grad_norm null"),
        ({"micro_batch_size": 4}, "micro_batch_size >= 8"),
        ({"rollout.batch_size": 2}, "rollout.batch_size >= 4"),
        ({"sharding": "fsdp"}, "sharding fsdp"),
    ],
)
def test_in_backward_refuses_what_it_cannot_do(tiny_pair, tmp_path, extra, words):
    with pytest.raises(ConfigError, match="in_backward") as info:
        load_config(None, _args(tiny_pair, tmp_path, **{"optim.in_backward": True, **extra}))
    assert words in str(info.value)


def test_in_backward_refuses_several_processes():
    from opd.train.memory import install_step_in_backward

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="one process"):
        install_step_in_backward(model, torch.optim.AdamW(model.parameters()), processes=2)


def test_in_backward_non_finite_loss_steps_nothing(tiny_pair, tmp_path):
    t = _trainer(tiny_pair, tmp_path / "run", **{"optim.in_backward": True})
    with torch.no_grad():
        for p in t.teacher.model.parameters():
            p.fill_(float("nan"))
    before = _params(t)
    with pytest.raises(NonFiniteLossError, match="no parameter was stepped") as info:
        t.train_step(1)
    assert not info.value.weights_damaged
    after = _params(t)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert t.optimizer.state_dict()["state"] == {}


def test_in_backward_non_finite_gradient_stops_even_when_told_to_skip(tiny_pair, tmp_path):
    t = _trainer(tiny_pair, tmp_path / "run", stop_on_nan=False, **{"optim.in_backward": True})
    first = next(p for p in t._unwrapped().parameters() if p.requires_grad)
    first.register_hook(lambda g: g * float("inf"))  # runs before the gradient is accumulated
    with pytest.raises(NonFiniteLossError, match="weights in memory are damaged") as info:
        t.train()
    assert info.value.weights_damaged
    assert all(p.grad is None for p in t._unwrapped().parameters())


def test_chunk_rows_bounds_rows_times_vocabulary():
    assert chunk_rows(151_936, 2048, 2**25) == 220
    assert chunk_rows(151_936) == 220  # the defaults: 2048 rows, DEFAULT_CHUNK_ELEMENTS
    assert chunk_rows(100, 2048, 2**25) == 2048
    assert chunk_rows(151_936, None, 2**25) == 220
    assert chunk_rows(151_936, 64, None) == 64
    assert chunk_rows(10, None, None) is None
    assert chunk_rows(10, 8, 5) == 1  # never zero rows
    with pytest.raises(ValueError):
        chunk_rows(10, 0, 2**25)
    with pytest.raises(ValueError):
        chunk_rows(10, 8, 0)
    assert LossConfig().chunk_max_elements == DEFAULT_CHUNK_ELEMENTS
    assert LossConfig().chunk_size == 2048


def test_vocabulary_capped_chunks_give_the_unchunked_loss_and_gradient():
    torch.manual_seed(0)
    b, t, v = 3, 7, 50
    s = torch.randn(b, t, v, dtype=torch.float64, requires_grad=True)
    q = torch.randn(b, t, v, dtype=torch.float64)
    tokens = torch.randint(0, v, (b, t))
    mask = torch.rand(b, t) > 0.2
    rows = chunk_rows(v, 2048, 4 * v)
    assert rows == 4
    for signal in ("full", "topk"):
        ref = per_token_loss(s, q, tokens, mask, signal=signal, k=5, chunk_size=None)
        (g_ref,) = torch.autograd.grad(ref.sum(), s)
        got = per_token_loss(s, q, tokens, mask, signal=signal, k=5, chunk_size=rows)
        (g_got,) = torch.autograd.grad(got.sum(), s)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-12, atol=1e-12)


def test_trainer_uses_vocabulary_capped_chunks(tiny_pair, tmp_path):
    t = _trainer(tiny_pair, tmp_path / "run", **{"loss.chunk_max_elements": 300})
    assert t.chunk_rows == max(1, 300 // t.vocab_size)
    t.train()  # every chunked path (loss, diagnostics, signal stats) runs with a few rows per chunk
    assert len(_metrics(tmp_path / "run")) == 2


@pytest.mark.parametrize(
    "extra",
    [{}, {"student.autocast": "bfloat16"}, {"student.lora.enabled": True, "optim.lr": 1e-2}],
    ids=["fp32", "bf16-autocast", "lora"],
)
def test_gradient_checkpointing_gives_the_same_training(tiny_pair, tmp_path, extra):
    plain = _trainer(tiny_pair, tmp_path / "plain", **extra)
    plain.train()
    ckpt = _trainer(tiny_pair, tmp_path / "ckpt", **{"student.gradient_checkpointing": True, **extra})
    ckpt.train()
    a, b = _params(plain), _params(ckpt)
    assert a.keys() == b.keys()  # the wrapped layers keep their state_dict names
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    for ra, rb in zip(_metrics(tmp_path / "plain"), _metrics(tmp_path / "ckpt"), strict=True):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"]


def _saved_bytes(t: OPDTrainer) -> int:
    """Bytes the autograd graph keeps from one student forward (what backward will need)."""
    from opd.generation.scoring import response_logits

    r = t.generator.generate([t.prompt_ids[0], t.prompt_ids[1]], t.sampling, n=2, seed=0, prompt_index=[0, 1])
    total = 0

    def pack(x: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        response_logits(t.student, r).sum().backward()
    t.optimizer.zero_grad(set_to_none=True)
    return total


def test_gradient_checkpointing_keeps_far_fewer_activations(tiny_pair, tmp_path):
    plain = _saved_bytes(_trainer(tiny_pair, tmp_path / "a"))
    ckpt = _saved_bytes(_trainer(tiny_pair, tmp_path / "b", **{"student.gradient_checkpointing": True}))
    assert ckpt < 0.5 * plain, (ckpt, plain)


@pytest.mark.slow
def test_gradient_checkpointing_under_fsdp_matches_one_plain_process(tiny_pair, tmp_path):
    """FSDP2 unshards a layer's weights for its backward; the recomputed forward runs inside that window."""
    import sys

    from multiproc import run as run_one  # a timeout kills the whole process tree, ranks included
    from multiproc import torchrun
    from safetensors.torch import load_file

    same = {"steps": 2, "rollout.batch_size": 2}  # one generate call per process's prompts, as on 2 processes
    one_args = _args(tiny_pair, tmp_path / "one", **same)
    one = run_one([sys.executable, "-m", "opd.cli", "train", *one_args])
    assert one.returncode == 0, one.stdout + one.stderr
    args = _args(
        tiny_pair, tmp_path / "fsdp", sharding="fsdp", **{"student.gradient_checkpointing": True, **same}
    )
    run = torchrun(args)
    assert run.returncode == 0, run.stdout + run.stderr
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
