"""Ids in a model's padded head rows (rows past the tokenizer's vocabulary) are never sampled.

Checkpoints pad their LM head (Qwen2.5: 151,936 rows for 151,665 tokens). A sampled padded id was an
IndexError in the vocabulary-sliced scoring on a CPU and a device-side assert (a poisoned CUDA context) on a
GPU. The adversarial model here has a residual component that is the same at every position (embedding
column 0) and padded head rows aligned with it, so an unmasked sampler picks a padded id at almost every
step (their logits are ~280 against < 1 for every real token).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd.generation.rollout import HFGenerator, PaddedRowsMask, SamplingParams, tokenizer_vocab_size
from opd.generation.sampling import sample_responses
from opd.models.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_pair


def _padded_student(tok, *, huge: bool) -> torch.nn.Module:
    """A tiny student whose head is padded to 128 rows (the tokenizer has 103 tokens); `huge`: the padded
    rows' logits dominate every position. Real rows are the same with or without `huge`."""
    n = len(tok)
    model = build_tiny_model(tok, hidden=32, layers=2, vocab_pad_to=64, seed=0)
    assert model.lm_head.weight.shape[0] > n
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0  # a constant direction in the residual stream
        if huge:
            model.lm_head.weight[n:] = 0.0
            model.lm_head.weight[n:, 0] = 50.0
    return model.eval()


def _prompts(tok) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in ("12+30=", "7+5=", "100+23=", "9=")]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_the_mask_writes_only_the_padded_columns_in_place() -> None:
    scores = torch.randn(3, 10)
    before = scores.clone()
    out = PaddedRowsMask(7)(torch.zeros(3, 1, dtype=torch.long), scores)
    assert out is scores  # in place: no new [B, V] tensor per decoding step
    assert torch.equal(out[:, :7], before[:, :7]) and torch.isneginf(out[:, 7:]).all()
    same = torch.randn(2, 5)
    assert torch.equal(PaddedRowsMask(5)(None, same.clone()), same)  # no padded rows: untouched


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, max_new_tokens=12),
        SamplingParams(temperature=0.0, max_new_tokens=12),  # greedy
        SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=12),  # warpers after the mask
    ],
    ids=["sampled", "greedy", "top-k-top-p"],
)
def test_hf_generator_never_samples_padded_rows(tok, params: SamplingParams) -> None:
    n = tokenizer_vocab_size(tok)
    model = _padded_student(tok, huge=True)
    stops = [tok.eos_token_id]
    # the control: unmasked, this model emits padded ids (what the mask must prevent)
    raw = HFGenerator(model, pad_id=tok.pad_token_id, stop_ids=stops).generate(
        _prompts(tok), params, 2, 0, [0, 1, 2, 3]
    )
    assert (raw.response_ids[raw.response_mask] >= n).any()
    gen = HFGenerator(model, pad_id=tok.pad_token_id, stop_ids=stops, vocab_size=n)
    roll = gen.generate(_prompts(tok), params, 2, 0, [0, 1, 2, 3])
    assert int(roll.response_ids.max()) < n and int(roll.prompt_ids.max()) < n


def test_masked_sampling_is_the_policy_over_the_real_tokens(tok) -> None:
    """What the padded rows hold cannot change the rollouts: the same seed gives bitwise the same samples
    from a model whose padded rows are huge as from one whose padded rows are ordinary."""
    n = tokenizer_vocab_size(tok)
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    rolls = [
        HFGenerator(_padded_student(tok, huge=h), pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id],
                    vocab_size=n).generate(_prompts(tok), params, 3, 1234, [0, 1, 2, 3])
        for h in (False, True)
    ]  # fmt: skip
    assert torch.equal(rolls[0].response_ids, rolls[1].response_ids)
    assert torch.equal(rolls[0].response_mask, rolls[1].response_mask)


def test_the_mask_on_the_simulated_gpu_adds_no_host_sync(tok) -> None:
    """On cuda:0 (tests/fake_cuda.py) the masked generator gives the CPU's rollouts, with no padded id, and
    the mask adds no device -> host transfer to the decoding loop (a slice write, no per-step host read)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from fake_cuda import count_host_transfers, cuda_runtime_stubs, fake_cuda, host

    n = tokenizer_vocab_size(tok)
    params = SamplingParams(temperature=1.0, max_new_tokens=10)
    cpu = HFGenerator(_padded_student(tok, huge=True), pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id],
                      vocab_size=n).generate(_prompts(tok), params, 2, 7, [0, 1, 2, 3])  # fmt: skip
    counts, rolls = {}, {}
    with cuda_runtime_stubs(), fake_cuda() as gpu:
        plain = _padded_student(tok, huge=False).to(gpu)
        for vocab in (None, n):
            gen = HFGenerator(plain, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id], vocab_size=vocab)
            with count_host_transfers() as transfers:
                rolls[vocab] = host(gen.generate(_prompts(tok), params, 2, 7, [0, 1, 2, 3]).response_ids)
            counts[vocab] = transfers.count
        model = _padded_student(tok, huge=True).to(gpu)
        sampled = HFGenerator(
            model, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id], vocab_size=n
        ).generate(_prompts(tok), params, 2, 7, [0, 1, 2, 3])
        assert sampled.response_ids.device.type == "cuda"
        ids = host(sampled.response_ids)
    assert int(ids.max()) < n and torch.equal(ids, cpu.response_ids)
    assert rolls[None].shape == rolls[n].shape and counts[n] == counts[None], counts  # same decoding steps


def test_sample_responses_masks_by_the_tokenizer(tok) -> None:
    """eval, generate and the lab's sampling go through sample_responses, which reads the tokenizer's size."""
    model = _padded_student(tok, huge=True)
    out = sample_responses(
        model, tok, _prompts(tok), n=2, params=SamplingParams(max_new_tokens=10), batch_size=2
    )
    assert len(out) == 8 and all(t < len(tok) for s in out for t in s.token_ids)


def test_a_stop_id_in_the_padded_rows_is_refused(tok) -> None:
    model = _padded_student(tok, huge=False)
    with pytest.raises(ValueError, match=r"stop ids \[120\].*rollout\.stop_token_ids"):
        HFGenerator(model, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id, 120], vocab_size=len(tok))


@pytest.fixture(scope="module")
def padded_students(tmp_path_factory, tok) -> dict[str, Path]:
    """The tiny pair's padded teacher and prompts, with two students that differ only in their padded rows."""
    paths = save_tiny_pair(tmp_path_factory.mktemp("padded"))
    for name, huge in (("plain", False), ("huge", True)):
        path = paths["student"].parent / f"student_{name}"
        _padded_student(tok, huge=huge).save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    return paths


def _train(paths: dict[str, Path], student: str, run_dir: Path, **extra: str) -> tuple[list[dict], dict]:
    from opd.config import load_config
    from opd.train.trainer import OPDTrainer

    args = {
        "student.path": str(paths[student]), "teacher.path": str(paths["teacher"]), "data.prompts": str(paths["prompts"]),
        "data.template": "raw", "run_dir": str(run_dir), "steps": "2", "prompts_per_step": "4",
        "rollout.rollouts_per_prompt": "2", "rollout.max_new_tokens": "8", "rollout.batch_size": "4",
        "micro_batch_size": "8", "diagnostics.k": "8", "loss.k": "8", "tracking.tensorboard": "false",
        "save_final": "false", **extra,
    }  # fmt: skip
    cfg = load_config(None, [x for k, v in args.items() for x in (f"--{k}", v)])
    trainer = OPDTrainer(cfg, log=lambda m: None)
    trainer.setup()
    hist = trainer.train()
    state = {k: v.detach().clone() for k, v in trainer._unwrapped().state_dict().items()}
    return hist, state


@pytest.mark.parametrize("extra", [{}, {"loss.from_hidden_states": "false", "loss.signal": "full"}],
                         ids=["hidden-topk", "logits-full"])  # fmt: skip
def test_training_is_blind_to_the_padded_rows(padded_students, tmp_path, extra) -> None:
    """Two training runs whose students differ only in their padded head rows: the same rollouts, loss,
    diagnostics and updated real weights (before the fix, the huge-row run sampled padded ids and crashed)."""
    n = len(build_tiny_tokenizer())
    (ha, sa), (hb, sb) = (_train(padded_students, s, tmp_path / s, **extra) for s in ("plain", "huge"))
    assert len(ha) == len(hb) == 2
    for ra, rb in zip(ha, hb, strict=True):
        keys = [k for k in ra if isinstance(ra[k], float) and not k.endswith("_s")]  # all but timings
        assert {
            "loss",
            "grad_norm",
            "entropy_student",
            "overlap_ratio",
            "reverse_kl",
            "response_tokens",
        } <= set(keys)
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-9, nan_ok=True), k
    for k in sa:
        a, b = (sa[k][:n], sb[k][:n]) if k == "lm_head.weight" else (sa[k], sb[k])
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    samples = [json.loads(x) for x in (tmp_path / "huge" / "samples.jsonl").read_text().splitlines()]
    assert samples  # the rollouts the run logged decode to real tokens
