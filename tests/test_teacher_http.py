"""The HTTP teacher client (`teacher.backend: http`) against a real loopback server speaking vLLM's
protocol (tests/reference_teacher_server.py), and the trainer on top of it: exact agreement with the
in-process HF teacher, spreading over servers, retries, fail-over, clear errors, and a step that fails on
a dead server being redone by `--resume` with nothing lost. The vLLM stage runs the same client against
a real `opd serve-teacher` server (tests/test_vllm_backend.py)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch

from opd.config import load_config
from opd.errors import ConfigError, TokenizerMismatchError
from opd.generation.rollout import HFGenerator, SamplingParams
from opd.models.loading import load_model, load_tokenizer
from opd.models.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_pair
from opd.objectives.topk import topk_from_logits
from opd.teachers.hf import score_frozen
from opd.teachers.http import HTTPTeacher, TeacherUnavailableError, parse_prompt_logprobs
from opd.train.trainer import OPDTrainer

sys.path.insert(0, str(Path(__file__).parent))
from reference_teacher_server import ReferenceTeacherServer  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """The tiny pair plus an UNPADDED teacher (`teacher_np`): a padded one spreads probability over rows
    past the tokenizer, which the engine normalises over and the HF path slices away."""
    paths = save_tiny_pair(tmp_path_factory.mktemp("http_pair"))
    tok = build_tiny_tokenizer()
    paths["teacher_np"] = paths["student"].parent / "teacher_np"
    build_tiny_model(tok, hidden=48, layers=2, seed=7).save_pretrained(paths["teacher_np"])
    tok.save_pretrained(paths["teacher_np"])
    return paths


@pytest.fixture(scope="module")
def server(pair):
    srv = ReferenceTeacherServer(load_model(str(pair["teacher_np"])), load_tokenizer(str(pair["teacher_np"])))
    yield srv
    srv.stop()


@pytest.fixture
def fresh(server):
    server.fail_next = 0
    return server


def _free_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: connection refused


def _rollout(pair, n_new: int = 10):
    tok = load_tokenizer(str(pair["student"]))
    model = load_model(str(pair["student"]))
    gen = HFGenerator(model, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id])
    prompts = [tok(t)["input_ids"] for t in ("12+30=", "7+5=", "100+23=")]
    return gen.generate(prompts, SamplingParams(max_new_tokens=n_new), 2, 0, [0, 1, 2]), tok


def test_parse_prompt_logprobs_protocol() -> None:
    plp = [None, {"5": {"logprob": -0.1, "rank": 1, "decoded_token": "a"}},
           {"7": {"logprob": -0.5, "rank": 1}, "9": {"logprob": -3.0, "rank": 4}}]  # fmt: skip
    assert parse_prompt_logprobs(plp, 1, 2) == [{5: (1, -0.1)}, {7: (1, -0.5), 9: (4, -3.0)}]
    with pytest.raises(Exception, match="prompt_logprobs for 3 positions, expected at least 4"):
        parse_prompt_logprobs(plp, 1, 3)
    with pytest.raises(Exception, match="no log-probs at position 0"):
        parse_prompt_logprobs(plp, 0, 1)


def test_scores_equal_the_hf_teacher(pair, fresh) -> None:
    roll, _ = _rollout(pair)
    teacher = HTTPTeacher([fresh.url], k=8, sequences_per_request=2)
    assert teacher.model == "ref-teacher" and teacher.max_model_len() == 512
    got = teacher.score_topk(roll)
    ref = topk_from_logits(score_frozen(load_model(str(pair["teacher_np"])), roll), roll.response_ids, 8)
    m = roll.response_mask
    torch.testing.assert_close(got.logprobs[m].double(), ref.logprobs[m].double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        got.token_logprob[m].double(), ref.token_logprob[m].double(), atol=1e-5, rtol=0
    )
    assert torch.equal(got.ids[m], ref.ids[m])
    assert fresh.completions >= 3  # 6 sequences, 2 per request


def test_requests_spread_over_servers(pair) -> None:
    model, tok = load_model(str(pair["teacher_np"])), load_tokenizer(str(pair["teacher_np"]))
    a, b = ReferenceTeacherServer(model, tok), ReferenceTeacherServer(model, tok)
    try:
        roll, _ = _rollout(pair)
        HTTPTeacher([a.url, b.url], k=4, sequences_per_request=1).score_topk(roll)
        assert a.completions > 0 and b.completions > 0 and a.completions + b.completions == 6
    finally:
        a.stop()
        b.stop()


def test_retries_with_backoff_then_succeeds(pair, fresh) -> None:
    roll, _ = _rollout(pair, 4)
    teacher = HTTPTeacher([fresh.url], k=4, backoff_s=0.01, retries=3, sequences_per_request=6)
    fresh.fail_next = 2  # two 503s, then answers
    top = teacher.score_topk(roll)
    assert teacher.retried == 2 and torch.isfinite(top.token_logprob[roll.response_mask]).all()


def test_fails_over_from_a_dead_server(pair, fresh) -> None:
    roll, _ = _rollout(pair, 4)
    teacher = HTTPTeacher([fresh.url, _free_port_url()], k=4, backoff_s=0.01, sequences_per_request=1)
    top = teacher.score_topk(roll)  # half the requests start at the dead URL and move on
    assert teacher.retried >= 1 and torch.isfinite(top.token_logprob[roll.response_mask]).all()


def test_all_servers_down_is_a_clear_error(pair) -> None:
    dead = _free_port_url()
    with pytest.raises(TeacherUnavailableError, match=r"failed 3 tries of /v1/models.*opd serve-teacher"):
        HTTPTeacher([dead], k=4, retries=2, backoff_s=0.01)


def test_client_errors_are_not_retried(pair, fresh) -> None:
    roll, _ = _rollout(pair, 4)
    teacher = HTTPTeacher([fresh.url], k=40, backoff_s=0.01)  # the server allows 20
    with pytest.raises(ConfigError, match="refused the request.*400.*max_logprobs"):
        teacher.score_topk(roll)
    assert teacher.retried == 0


def test_tokenizer_mismatch_is_refused(pair, fresh) -> None:
    from transformers import AutoTokenizer

    teacher = HTTPTeacher([fresh.url], k=4)
    teacher.check_tokenizer(load_tokenizer(str(pair["student"])), ["12+30=42"])
    other = load_tokenizer(str(pair["student"]))
    assert isinstance(other, type(AutoTokenizer.from_pretrained(str(pair["student"]))))
    other.backend_tokenizer.post_processor = None
    shuffled = {v: k for k, v in other.get_vocab().items()}
    fake = type(
        "Tok", (), {"__call__": lambda self, t, **kw: {"input_ids": [shuffled.__len__() - 1] * len(t)}}
    )()
    with pytest.raises(TokenizerMismatchError, match="must share a tokenizer"):
        teacher.check_tokenizer(fake, ["12+30=42"])


# ----------------------------------------------------------------------------------------------------
# the trainer on an HTTP teacher


def _args(pair, run_dir, **extra) -> list[str]:
    base = {
        "student": str(pair["student"]), "teacher": str(pair["teacher_np"]), "prompts": str(pair["prompts"]),
        "run_dir": str(run_dir), "prompts_per_step": 4, "micro_batch_size": 4, "rollout.rollouts_per_prompt": 2,
        "rollout.max_new_tokens": 8, "rollout.batch_size": 2, "optim.lr": 1e-3, "steps": 2,
        "checkpoint_every": 1, "tracking.tensorboard": False, "diagnostics.k": 8, "loss.k": 8,
        "diagnostics.position_bins": 0, "data.shuffle": False,
    }  # fmt: skip
    base.update(extra)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def _http(url: str, **extra) -> dict:
    return {"teacher.backend": "http", "teacher.urls": f"[{url}]", "teacher.top_k": 8, "teacher.backoff_s": 0.01,
            "teacher.retries": 1, "loss.support": "teacher", **extra}  # fmt: skip


def _train(pair, run_dir, resume=False, **extra) -> tuple[OPDTrainer, list[dict]]:
    t = OPDTrainer(load_config(None, _args(pair, run_dir, **extra)), resume=resume, log=lambda m: None)
    t.setup()
    return t, t.train()


@pytest.mark.parametrize(
    "objective",
    [
        {"loss.signal": "sampled"},
        {"loss.signal": "topk", "loss.support": "teacher"},
        {"loss.signal": "topk", "loss.support": "teacher", "loss.renorm": "weights"},
        {"loss.signal": "topk", "loss.support": "teacher", "loss.divergence": "jsd"},
    ],
)
def test_http_teacher_trains_like_the_hf_teacher(pair, fresh, tmp_path, objective) -> None:
    """Same seeds, same teacher weights: the top-K path gives the dense path's loss, gradient (hence
    weights) and overlap metrics, because these objectives only read the teacher's top-k."""
    t_hf, h_hf = _train(pair, tmp_path / "hf", **objective)
    t_http, h_http = _train(pair, tmp_path / "http", **{**_http(fresh.url), **objective})
    for a, b in zip(h_hf, h_http, strict=True):
        for key in ("loss", "reward_mean", "overlap_ratio", "overlap_mass_student", "overlap_mass_teacher",
                    "overlap_token_advantage", "entropy_student", "adv_max_abs", "grad_norm"):  # fmt: skip
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        assert "entropy_teacher" in a and "entropy_teacher" not in b  # needs the full distribution
    pa, pb = t_hf._unwrapped().state_dict(), t_http._unwrapped().state_dict()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-4, rtol=1e-3)  # Adam magnifies float noise


def test_dead_teacher_checkpoints_and_resume_redoes_the_step(pair, fresh, tmp_path) -> None:
    """The server dies during step 3: the error is clear, step 2 is checkpointed, and `--resume`
    replays step 3 with the same prompts, ending where an uninterrupted run ends."""
    _, full = _train(pair, tmp_path / "full", steps=4, checkpoint_every=10, **_http(fresh.url))
    run = tmp_path / "broken"
    t = OPDTrainer(load_config(None, _args(pair, run, steps=4, checkpoint_every=10, **_http(fresh.url))),
                   log=lambda m: None)  # fmt: skip
    t.setup()
    real = t.teacher.score_topk
    calls = {"n": 0}

    def dies_at_step_3(roll):
        calls["n"] += 1
        if calls["n"] == 5:  # 2 rollout chunks per step: the first scoring of step 3
            fresh.fail_next = 10**6  # the server now answers 503 to everything
        return real(roll)

    t.teacher.score_topk = dies_at_step_3
    try:
        with pytest.raises(TeacherUnavailableError) as info:
            t.train()
    finally:
        fresh.fail_next = 0
    msg = str(info.value)
    assert "step 3 was not taken" in msg and "holds step 2" in msg and f"--resume {run}" in msg, msg
    resumed, rest = _train(pair, run, resume=True, steps=4, checkpoint_every=10, **_http(fresh.url))
    assert resumed.start_step == 2
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    for a, b in zip(full[2:], rest, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert calls["n"] == 5


def test_fidelity_check_writes_a_report(pair, fresh, tmp_path) -> None:
    t = OPDTrainer(load_config(None, _args(pair, tmp_path / "f", **_http(fresh.url))), log=lambda m: None)
    t.setup()
    res = t.teacher_fidelity()
    assert res is not None and res["ok"] == 1.0 and res["top_mean_abs_delta"] < 1e-5
    assert res["deterministic"] == 1.0 and res["top1_agreement"] == 1.0
    assert json.loads((tmp_path / "f" / "teacher_fidelity.json").read_text()) == res


def test_fidelity_check_flags_a_different_teacher(pair, fresh, tmp_path) -> None:
    """teacher.path names another model than the server's: the check warns (it does not refuse)."""
    logs: list[str] = []
    cfg = load_config(
        None, _args(pair, tmp_path / "g", **_http(fresh.url), **{"teacher.path": str(pair["student"])})
    )
    t = OPDTrainer(cfg, log=logs.append)
    t.setup()
    res = t.teacher_fidelity()
    assert res is not None and res["ok"] == 0.0
    assert any("warning" in m and "teacher fidelity" in m for m in logs)


def test_http_teacher_without_urls_or_with_a_dense_objective_is_refused() -> None:
    with pytest.raises(ConfigError, match="teacher.urls"):
        load_config(None, ["--student", "s", "--prompts", "p", "--teacher.backend", "http",
                           "--loss.support", "teacher", "--diagnostics.k", "16"]).require_paths()  # fmt: skip
    with pytest.raises(
        ConfigError, match="loss.signal full needs the teacher's full distribution.*loss.signal sampled"
    ):
        load_config(None, ["--teacher.backend", "http", "--loss.signal", "full"])
    with pytest.raises(ConfigError, match="loss.support union needs teacher log-probs"):
        load_config(None, ["--teacher.backend", "vllm", "--loss.support", "union"])
    with pytest.raises(ConfigError, match="loss.k 32 > the teacher's top-K 20"):
        load_config(None, ["--teacher.backend", "vllm", "--loss.support", "teacher", "--loss.k", "32"])
    with pytest.raises(ConfigError, match="diagnostics.k 32 > teacher.top_k 20"):
        load_config(None, ["--teacher.backend", "vllm", "--loss.support", "teacher", "--diagnostics.k", "32"])
    cfg = load_config(
        None, ["--teacher.backend", "http", "--loss.signal", "sampled", "--teacher.urls", "[http://h:1]"]
    )
    assert cfg.teacher.urls == ["http://h:1"]


def test_cpu_offloaded_teacher_gives_the_same_step(pair, tmp_path) -> None:
    _, a = _train(pair, tmp_path / "dev", steps=1)
    _, b = _train(pair, tmp_path / "off", steps=1, **{"teacher.placement": "cpu_offload"})
    for key in ("loss", "overlap_ratio", "entropy_teacher", "grad_norm"):
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-6), key
