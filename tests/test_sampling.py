from __future__ import annotations

from opd.generation.rollout import SamplingParams
from opd.generation.sampling import sample_responses
from opd.models.tiny import build_tiny_model, build_tiny_tokenizer


def test_samples_are_keyed_by_prompt_index_so_subsets_reproduce():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=5)
    prompts = [tok(p)["input_ids"] for p in ("1+2=", "33+4=", "7+7=", "10+1=")]
    params = SamplingParams(max_new_tokens=6)
    full = sample_responses(model, tok, prompts, n=2, params=params, batch_size=2, seed=3)
    assert [(s.prompt_index, s.sample_index) for s in full] == [(i, j) for i in range(4) for j in range(2)]
    # a resumed job that only needs prompts 2 and 3 draws the same samples for them
    part = sample_responses(model, tok, prompts[2:], n=2, params=params, batch_size=2, seed=3, indices=[2, 3])
    assert [s.token_ids for s in part] == [s.token_ids for s in full[4:]]
    for s in full:
        assert s.truncated == (tok.eos_token_id not in s.token_ids)
        assert "<eos>" not in s.text
