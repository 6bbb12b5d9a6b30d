"""`opd sft`'s memory levers: the chunked cross-entropy from hidden states (no [B, S, V] logits), activation
checkpointing, bf16 autocast and micro_batch_tokens, each against the plain path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from opd.config import load_config
from opd.errors import ConfigError
from opd.models.loading import load_model
from opd.objectives.cross_entropy import head_ce_sum
from opd.train.memory import enable_activation_checkpointing
from opd.train.sft import (
    IGNORE,
    SFT_ALIASES,
    SFTConfig,
    SFTTrainer,
    check_sft_head,
    collate,
    plan_micro_batches,
    token_ce_sum,
)

# --------------------------------------------------------------------------------------------------------
# head_ce_sum, the pure function: float64 reference on random inputs


def _reference(h, w, b, targets, mask, vocab_size=None):
    logits = h @ w.T + (b if b is not None else 0.0)
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("chunk_size", "max_elements"), [(1, None), (3, None), (None, None), (2048, 40)])
def test_head_ce_sum_equals_cross_entropy_of_full_logits_in_float64(bias, chunk_size, max_elements):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 9, 6, 13
    h = torch.randn(B, T, H, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[0, 0] = True
    targets_masked = torch.where(mask, targets, torch.full_like(targets, 10**6))  # ignored where not masked
    got = head_ce_sum(h, w, b, targets_masked, mask, chunk_size=chunk_size, max_chunk_elements=max_elements)
    leaves = [x for x in (h, w, b) if x is not None]
    got_grads = torch.autograd.grad(got * 1.7, leaves)
    want = _reference(h, w, b, targets, mask)
    want_grads = torch.autograd.grad(want * 1.7, leaves)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, e in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_head_ce_sum_keeps_the_first_vocab_rows_and_takes_no_grad_mode():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 4, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 8, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    got = head_ce_sum(h, w, None, targets, mask, vocab_size=8, chunk_size=3)
    want = _reference(h, w, None, targets, mask, vocab_size=8)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gh, gw = torch.autograd.grad(got, [h, w])
    eh, ew = torch.autograd.grad(want, [h, w])
    torch.testing.assert_close(gh, eh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, ew, rtol=1e-12, atol=1e-12)
    assert float(gw[8:].abs().sum()) == 0.0  # padded head rows get no gradient
    with torch.no_grad():
        torch.testing.assert_close(head_ce_sum(h, w, None, targets, mask, vocab_size=8), want.detach())


def test_head_ce_sum_shape_and_dtype_errors_say_what_is_wrong():
    h, w, y, m = (
        torch.zeros(2, 3, 4),
        torch.zeros(5, 4),
        torch.zeros(2, 3, dtype=torch.long),
        torch.ones(2, 3),
    )
    with pytest.raises(ValueError, match=r"need h \[B, T, H\] and w \[V, H\]"):
        head_ce_sum(h, torch.zeros(5, 3), None, y, m)
    with pytest.raises(ValueError, match=r"b must be \[V\] = \[5\]"):
        head_ce_sum(h, w, torch.zeros(4), y, m)
    with pytest.raises(ValueError, match=r"mask and targets must be \[B, T\]"):
        head_ce_sum(h, w, None, y[:, :2], m)
    with pytest.raises(ValueError, match="integer dtype"):
        head_ce_sum(h, w, None, y.float(), m)


def test_head_ce_sum_in_bfloat16_projection_is_close_to_the_bf16_head():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 16, 32, generator=g, requires_grad=True)
    w = (0.2 * torch.randn(50, 32, generator=g)).requires_grad_()
    targets = torch.randint(0, 50, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.bool)
    got = head_ce_sum(h, w, None, targets, mask, project_dtype=torch.bfloat16, chunk_size=5)
    logits = (
        h.to(torch.bfloat16) @ w.to(torch.bfloat16).T
    ).float()  # what a bf16 head under autocast returns
    want = torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    (gw,) = torch.autograd.grad(got, [w])
    assert gw.dtype == torch.float32 and torch.isfinite(gw).all()


# --------------------------------------------------------------------------------------------------------
# token_ce_sum on a tiny model: chunked == plain, checkpointing == plain (dropout included)


def _batch(tokenizer_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n, ctx in ((11, 4), (7, 3), (14, 6)):
        ids = torch.randint(3, tokenizer_len, (n,), generator=g).tolist()
        examples.append(type("E", (), {"input_ids": ids, "labels": [IGNORE] * ctx + ids[ctx:]})())
    return collate(examples, pad_id=0)


def _loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    loss = token_ce_sum(model, batch, **kw)
    loss.backward()
    return loss.detach(), {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }


def test_chunked_sft_loss_equals_the_plain_one_values_and_gradients(tiny_pair):
    model = load_model(str(tiny_pair["student"]), dtype="float32").train()
    batch = _batch(model.config.vocab_size)
    plain, plain_grads = _loss_and_grads(model, batch, from_hidden_states=False)
    chunked, chunked_grads = _loss_and_grads(model, batch, from_hidden_states=True)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    assert chunked_grads.keys() == plain_grads.keys() and "lm_head.weight" in chunked_grads
    for name in plain_grads:
        torch.testing.assert_close(chunked_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7)


def test_checkpointing_keeps_loss_gradients_and_dropout_in_train_mode(tiny_pair):
    """SFT trains in train mode; the recomputed layers replay the RNG state, so dropout masks match."""
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, attention_dropout=0.5)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).train()
    batch = _batch(40, seed=3)
    results = []
    for checkpointed in (False, True):
        if checkpointed:
            assert enable_activation_checkpointing(model) == 2
        torch.manual_seed(123)
        results.append(_loss_and_grads(model, batch, from_hidden_states=True))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.manual_seed(124)  # another dropout draw gives another loss: dropout is live in this test
    assert not torch.allclose(_loss_and_grads(model, batch, from_hidden_states=True)[0], loss_a)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)


def test_a_head_that_is_not_a_projection_is_refused_naming_the_setting(tiny_pair):
    model = load_model(str(tiny_pair["student"]), dtype="float32")
    check_sft_head(model)  # a plain linear head passes
    model.lm_head.register_forward_hook(lambda _m, _a, out: out * 2.0)  # logit scaling after the head
    with pytest.raises(ConfigError, match="opd sft from_hidden_states: .*--from_hidden_states false"):
        check_sft_head(model)


# --------------------------------------------------------------------------------------------------------
# whole runs


def _data(path: Path) -> Path:
    rows = [{"prompt": f"{i}+{i}=", "response": "x" * (2 + 5 * i) + str(2 * i)} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(
    tiny_pair, data: Path, run_dir: Path, **kw
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    base = {"model": str(tiny_pair["student"]), "data": str(data), "run_dir": str(run_dir), "template": "raw",
            "batch_size": 6, "micro_batch_size": 2, "steps": 3, "shuffle": False, "save_final": False,
            "optim": {"lr": 1e-2, "schedule": "constant"}, "tracking": {"tensorboard": False}}  # fmt: skip
    base.update(kw)
    trainer = SFTTrainer(SFTConfig.model_validate(base), log=lambda m: None)
    trainer.setup()
    history = trainer.train()
    return history, {k: v.detach().clone() for k, v in trainer._unwrapped().state_dict().items()}


def test_a_run_with_checkpointing_and_hidden_states_matches_the_plain_run(tiny_pair, tmp_path):
    data = _data(tmp_path / "d.jsonl")
    plain, plain_w = _run(tiny_pair, data, tmp_path / "plain", from_hidden_states=False)
    lean, lean_w = _run(tiny_pair, data, tmp_path / "lean", from_hidden_states=True, gradient_checkpointing=True,
                        micro_batch_tokens=40)  # fmt: skip
    for a, b in zip(plain, lean, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for (
        k
    ) in plain_w:  # Adam divides by sqrt(v): a 1e-7 gradient difference on a near-zero entry moves it 1e-6
        torch.testing.assert_close(lean_w[k], plain_w[k], rtol=1e-4, atol=1e-5)


def test_a_bf16_autocast_run_trains_close_to_fp32(tiny_pair, tmp_path):
    data = _data(tmp_path / "d.jsonl")
    fp32, _ = _run(tiny_pair, data, tmp_path / "fp32", steps=4)
    bf16, weights = _run(tiny_pair, data, tmp_path / "bf16", steps=4, autocast="bfloat16",
                         gradient_checkpointing=True, precision_check="off")  # fmt: skip
    assert all(w.dtype == torch.float32 for w in weights.values())  # master weights stay fp32
    for a, b in zip(fp32, bf16, strict=True):
        assert torch.isfinite(torch.tensor([b["loss"], b["grad_norm"]])).all()
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-2)
    assert bf16[-1]["loss"] < bf16[0]["loss"]


# --------------------------------------------------------------------------------------------------------
# micro_batch_tokens and the config


def test_plan_micro_batches_packs_under_both_caps():
    lengths = [5, 30, 8, 12, 30, 3]
    assert plan_micro_batches(lengths, 4, None) == [[0, 1, 2, 3], [4, 5]]  # draw order, count only
    plan = plan_micro_batches(lengths, 4, 40)
    assert sorted(i for g in plan for i in g) == list(range(6))
    for g in plan:
        assert len(g) <= 4 and (len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 40)
    assert plan[:2] == [[1], [4]]  # 30 + 30 padded would be 60 tokens: alone each
    assert plan_micro_batches([50, 2], 4, 10) == [[0], [1]]  # longer than the budget: runs alone
    with pytest.raises(ValueError, match="max_tokens"):
        plan_micro_batches(lengths, 4, 0)


def test_the_new_settings_are_cli_options_with_descriptions_and_fp16_is_refused():
    args = ["--autocast", "bfloat16", "--gradient_checkpointing", "true", "--from_hidden_states", "false",
            "--micro_batch_tokens", "4096"]  # fmt: skip
    cfg = load_config(None, args, model=SFTConfig, aliases=SFT_ALIASES, command="sft")
    assert (cfg.autocast, cfg.gradient_checkpointing, cfg.from_hidden_states, cfg.micro_batch_tokens) == (
        "bfloat16", True, False, 4096,
    )  # fmt: skip
    default = SFTConfig()
    assert (default.autocast, default.gradient_checkpointing, default.from_hidden_states) == (
        "none",
        False,
        True,
    )
    for name in ("autocast", "gradient_checkpointing", "from_hidden_states", "micro_batch_tokens"):
        assert len(SFTConfig.model_fields[name].description or "") > 40
    with pytest.raises(ValidationError, match="autocast float16 is not supported.*--autocast bfloat16"):
        SFTConfig(autocast="float16")


def test_the_precision_check_probes_the_autocast_dtype(tiny_pair, tmp_path, monkeypatch):
    import opd.train.sft as sft

    seen = []
    monkeypatch.setattr(sft, "check_dtypes", lambda device, choices, **kw: seen.append(dict(choices)) or [])
    _run(tiny_pair, _data(tmp_path / "d.jsonl"), tmp_path / "run", steps=1, autocast="bfloat16")
    assert seen == [{"dtype": "float32", "autocast": "bfloat16"}]
