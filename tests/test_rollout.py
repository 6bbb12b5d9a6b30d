"""Rollouts come from exactly the policy being trained, and are scored at the positions they were sampled."""

from __future__ import annotations

import torch

from opd.generation.rollout import HFGenerator, SamplingParams, chunk_seed, response_mask_from_ids
from opd.generation.scoring import response_logits
from opd.models.tiny import build_tiny_model, build_tiny_tokenizer


def _setup():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, hidden=32, layers=2, seed=3)
    gen = HFGenerator(model, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id])
    return tok, model, gen


def test_response_mask_keeps_eos_even_when_pad_is_eos():
    eos = 2
    resp = torch.tensor([[5, 6, eos, eos, eos], [5, 6, 7, 8, 9], [eos, 2, 2, 2, 2]])
    mask, trunc = response_mask_from_ids(resp, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert trunc.tolist() == [False, True, False]


def test_model_generation_config_does_not_leak_into_sampling():
    """Qwen-style generation_config (top_k, repetition_penalty, low temperature) must not change the policy."""
    tok, model, gen = _setup()
    model.generation_config.top_k = 1
    model.generation_config.temperature = 0.01
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.do_sample = False
    model.generation_config.min_p = 0.999
    model.generation_config.suppress_tokens = list(range(4, 60))
    prompt = tok("12+3=")["input_ids"]
    roll = gen.generate([prompt], SamplingParams(max_new_tokens=8), n=16, seed=1, prompt_index=[0])
    distinct = {tuple(r.tolist()) for r in roll.response_ids}
    assert len(distinct) > 8, "top_k=1 / min_p / greedy leaked from generation_config: rollouts are identical"
    assert ((roll.response_ids >= 4) & (roll.response_ids < 60)).any(), "suppress_tokens leaked"


def test_sampling_is_seeded_and_batch_layout_is_consistent():
    tok, model, gen = _setup()
    prompts = [tok("1+1=")["input_ids"], tok("123+456=")["input_ids"]]
    a = gen.generate(prompts, SamplingParams(max_new_tokens=6), n=2, seed=7, prompt_index=[0, 1])
    b = gen.generate(prompts, SamplingParams(max_new_tokens=6), n=2, seed=7, prompt_index=[0, 1])
    assert torch.equal(a.response_ids, b.response_ids)
    assert a.prompt_index == [0, 0, 1, 1]
    assert chunk_seed(0, 1, 0) != chunk_seed(0, 1, 2) != chunk_seed(0, 2, 0)


def test_left_padded_scoring_matches_unpadded_scoring():
    """Position ids must count from the first real token, or padding shifts every response position."""
    tok, model, gen = _setup()
    prompts = [tok("7=")["input_ids"], tok("12345+67890=")["input_ids"]]
    roll = gen.generate(prompts, SamplingParams(max_new_tokens=6), n=1, seed=0, prompt_index=[0, 1])
    with torch.no_grad():
        batched = response_logits(model, roll)
        for i in range(2):
            alone = response_logits(model, roll.select(slice(i, i + 1)))
            T = alone.shape[1]
            m = roll.response_mask[i, :T]
            torch.testing.assert_close(batched[i, :T][m], alone[0][m], atol=1e-5, rtol=1e-5)


def test_scoring_reproduces_generation_logprobs():
    """The teacher-forced forward sees the same distribution that sampled each token."""
    tok, model, _ = _setup()
    prompts = [tok("3+4=")["input_ids"], tok("100+200=")["input_ids"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    attn = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, max_new_tokens=5,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)  # fmt: skip
    gen_logits = torch.stack(out.logits, dim=1)
    from opd.generation.rollout import Rollout, response_mask_from_ids

    resp = out.sequences[:, width:]
    mask, trunc = response_mask_from_ids(resp, [tok.eos_token_id])
    roll = Rollout(ids, attn.bool(), resp, mask, trunc, [0, 1])
    with torch.no_grad():
        scored = response_logits(model, roll)
    torch.testing.assert_close(scored[mask], gen_logits[mask], atol=1e-4, rtol=1e-4)
