"""opd's own scoring server (`opd serve-teacher --engine hf`, opd.teachers.hf_server) as a real process on
loopback, and its client (`teacher.backend http` with `teacher.payload hidden | ids`): the trainer's step
equals the in-process HF teacher's for every objective the payload serves, plus model info, API key,
oversized requests, refusals and the wire framing."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request

import pytest
import torch

from opd.config import load_config
from opd.errors import ConfigError
from opd.generation.rollout import HFGenerator, SamplingParams
from opd.models.loading import load_model, load_tokenizer
from opd.models.tiny import save_tiny_pair
from opd.teachers import wire
from opd.teachers.hf import HFTeacher
from opd.teachers.http import API_KEY_ENV
from opd.teachers.remote import ScoringServerTeacher, load_head
from opd.teachers.server import ServeTeacherConfig, build_server
from opd.train.trainer import OPDTrainer

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(
        tmp_path_factory.mktemp("srv_pair")
    )  # the teacher's head is padded: 128 rows, 103 ids


@pytest.fixture(scope="module")
def server(pair, tmp_path_factory):
    """One float32 server for the module, with an API key (clients read it from the environment)."""
    old = os.environ.get(API_KEY_ENV)
    os.environ[API_KEY_ENV] = KEY
    cfg = ServeTeacherConfig(model=str(pair["teacher"]), engine="hf", dtype="float32", device="cpu",
                             port=_free_port(), max_request_tokens=2000, max_batch_tokens=64,
                             log_file=str(tmp_path_factory.mktemp("srv_log") / "server.log"))  # fmt: skip
    srv = build_server(cfg)
    srv.start()
    try:
        srv.wait_ready(120)
        yield srv
    finally:
        srv.stop()
        if old is None:
            os.environ.pop(API_KEY_ENV, None)
        else:
            os.environ[API_KEY_ENV] = old


def _get(url: str, key: str | None = KEY, body: dict | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _rollout(pair, n_new: int = 10):
    tok = load_tokenizer(str(pair["student"]))
    gen = HFGenerator(load_model(str(pair["student"])), pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id])
    prompts = [tok(t)["input_ids"] for t in ("12+30=", "7+5=", "100+23=")]
    return gen.generate(prompts, SamplingParams(max_new_tokens=n_new), 2, 0, [0, 1, 2])


# ----------------------------------------------------------------------------------------------------
# the wire framing and the endpoints


def test_wire_round_trip_is_exact() -> None:
    ts = {"a": torch.randn(3, 5), "b": torch.randn(2, 4).to(torch.bfloat16), "c": torch.arange(6).int(),
          "e": torch.zeros((0, 7))}  # fmt: skip
    header, got = wire.decode(wire.encode({"x": 1}, ts))
    assert header == {"x": 1}
    for k, t in ts.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    with pytest.raises(wire.WireError, match="torn"):
        wire.decode(wire.encode({}, ts)[:-3])
    with pytest.raises(wire.WireError, match="not an opd tensor message"):
        wire.decode(b'{"json": 1}')


def test_model_info_health_and_api_key(pair, server) -> None:
    assert _get(server.url + "/health", key=None)[0] == 200  # health needs no key
    code, body = _get(server.url + "/v1/model_info", key=None)
    assert code == 401 and API_KEY_ENV in body.decode()
    assert _get(server.url + "/v1/model_info", key="wrong")[0] == 401
    code, body = _get(server.url + "/v1/model_info")
    info = json.loads(body)
    assert (
        code == 200 and info["dtype"] == "float32" and info["hidden_size"] == 48 and info["head_rows"] == 128
    )
    assert info["tokenizer_size"] == 103 and set(info["payloads"]) == {"hidden", "ids", "topk"}
    assert info["tokenizer_sha256"] == wire.tokenizer_digest(load_tokenizer(str(pair["student"])))
    w, b = load_head(str(pair["teacher"]), dtype=torch.float32)  # only the head's tensors are read
    assert info["head_sha256"] == wire.tensor_digest(w, b, dtype=torch.float32)


def test_oversized_request_is_refused_with_what_to_change(pair, server) -> None:
    body = {"payload": "hidden", "sequences": [[5] * 900, [6] * 900, [7] * 900], "starts": [1, 1, 1]}
    code, text = _get(server.url + "/v1/score", body=body)
    assert code == 413 and "--max-request-tokens 2000" in text.decode()
    assert "teacher.sequences_per_request" in text.decode()
    roll = _rollout(pair)
    t = ScoringServerTeacher([server.url], payload="ids", device=torch.device("cpu"), vocab_size=103, k=8,
                             sequences_per_request=6)  # fmt: skip
    t.score_rollout(roll)  # fits
    big = ScoringServerTeacher([server.url], payload="ids", device=torch.device("cpu"), vocab_size=103, k=8)
    big.client.sequences_per_request = 200
    import opd.generation.vllm as gv

    seqs = gv.response_requests(roll)
    assert (
        sum(len(p) + len(r) for p, r in zip(*seqs, strict=True)) < 2000
    )  # the real one fits; a made-up one:
    with pytest.raises(ConfigError, match=r"refused the request.*413.*max-request-tokens"):
        big._ask([[5] * 1500, [6] * 1500], [1, 1])
    assert big.client.retried == 0  # a 4xx is not retried


def test_vllm_protocol_is_served_too(pair, server) -> None:
    """`teacher.payload topk`: today's HTTPTeacher speaks to the hf engine unchanged."""
    from opd.teachers.http import HTTPTeacher

    roll = _rollout(pair, 4)
    top = HTTPTeacher([server.url], k=5).score_topk(roll)
    m = roll.response_mask.bool()
    assert torch.isfinite(top.token_logprob[m]).all() and torch.isfinite(top.logprobs[m]).all()


def test_hidden_states_equal_the_in_process_teacher(pair, server) -> None:
    roll = _rollout(pair)
    ref = HFTeacher(load_model(str(pair["teacher"])), hidden_states=True).hidden(roll)
    t = ScoringServerTeacher([server.url], payload="hidden", device=torch.device("cpu"), vocab_size=103,
                             sequences_per_request=4)  # from the server: no teacher.path  # fmt: skip
    got = t.score_step([roll]).target(0, slice(None), roll)
    m = roll.response_mask.bool()
    torch.testing.assert_close(got.hidden[m], ref.hidden[m], atol=1e-5, rtol=1e-5)
    assert torch.equal(got.weight, ref.weight) and got.bias is None and ref.bias is None


def test_a_head_of_another_model_is_refused(pair, server) -> None:
    with pytest.raises(ConfigError, match="not the served model's.*teacher.path"):
        ScoringServerTeacher([server.url], payload="hidden", device=torch.device("cpu"), vocab_size=103,
                             head_path=str(pair["student"]))  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# the trainer on the server teacher vs the in-process HF teacher


def _args(pair, run_dir, **extra) -> list[str]:
    base = {
        "student": str(pair["student"]), "teacher": str(pair["teacher"]), "prompts": str(pair["prompts"]),
        "run_dir": str(run_dir), "prompts_per_step": 4, "micro_batch_size": 4, "rollout.rollouts_per_prompt": 2,
        "rollout.max_new_tokens": 8, "rollout.batch_size": 2, "optim.lr": 1e-3, "steps": 1,
        "checkpoint_every": 1, "tracking.tensorboard": False, "diagnostics.k": 8, "loss.k": 8,
        "diagnostics.position_bins": 0, "data.shuffle": False,
    }  # fmt: skip
    base.update(extra)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def _row(pair, run_dir, **extra) -> dict:
    t = OPDTrainer(load_config(None, _args(pair, run_dir, **extra)), log=lambda m: None)
    t.setup()
    return t.train()[0]


def _remote(url: str, payload: str, **extra) -> dict:
    return {"teacher.backend": "http", "teacher.urls": f"[{url}]", "teacher.payload": payload, "teacher.top_k": 8,
            "teacher.retries": 1, "teacher.backoff_s": 0.01, **extra}  # fmt: skip


def _same_metrics(hf: dict, remote: dict, rel: float, absolute: float) -> None:
    clocks = ("step_time_s", "tokens_per_s")
    keys = [k for k, v in hf.items() if isinstance(v, (int, float)) and not k.startswith("time_")
            and k not in clocks]  # fmt: skip
    assert "loss" in keys and "grad_norm" in keys
    for k in keys:
        assert k in remote, k
        assert remote[k] == pytest.approx(hf[k], rel=rel, abs=absolute), k


HIDDEN_OBJECTIVES = [
    {"loss.signal": "full", "loss.divergence": "reverse_kl"},
    {"loss.signal": "full", "loss.divergence": "forward_kl"},
    {"loss.signal": "topk", "loss.support": "student"},
    {"loss.signal": "topk", "loss.support": "union", "loss.divergence": "jsd"},
    {"loss.signal": "topk", "loss.support": "overlap", "loss.renorm": "weights"},
    {"loss.signal": "topk", "loss.support": "non_overlap", "loss.divergence": "tvd"},
    {"loss.signal": "topk", "loss.support": "teacher"},
    {"loss.signal": "sampled"},
    {"loss.signal": "full", "loss.from_hidden_states": False},  # dense logits projected by the client
]


@pytest.mark.parametrize("objective", HIDDEN_OBJECTIVES, ids=lambda o: "-".join(map(str, o.values())))
def test_hidden_payload_trains_like_the_hf_teacher(pair, server, tmp_path, objective) -> None:
    """Every metric of step 1 (loss, grad norm, entropies, overlap, signal statistics) within float32
    tolerance: the objective receives the same hidden states and the same head."""
    hf = _row(pair, tmp_path / "hf", **objective)
    remote = _row(pair, tmp_path / "srv", **_remote(server.url, "hidden"), **objective)
    _same_metrics(hf, remote, rel=1e-4, absolute=1e-6)
    assert "entropy_teacher" in remote  # a full-distribution metric: a top-K teacher cannot give it


def test_hidden_payload_with_the_head_from_teacher_path_and_bf16_on_the_wire(pair, server, tmp_path) -> None:
    """The head read from teacher.path is checked against the server's hash; bfloat16 hidden states on the
    wire (float32 server) keep step 1 within 2% of the in-process teacher (stated bound)."""
    hf = _row(pair, tmp_path / "hf")
    remote = _row(
        pair, tmp_path / "bf", **_remote(server.url, "hidden", **{"teacher.payload_dtype": "bfloat16"})
    )
    _same_metrics(hf, remote, rel=2e-2, absolute=2e-3)


@pytest.mark.parametrize(
    "objective",
    [{"loss.signal": "sampled"}, {"loss.signal": "topk", "loss.support": "teacher"},
     {"loss.signal": "topk", "loss.support": "teacher", "loss.renorm": "weights"},
     {"loss.signal": "topk", "loss.support": "teacher", "loss.divergence": "jsd"}],
    ids=lambda o: "-".join(map(str, o.values())),
)  # fmt: skip
def test_ids_payload_trains_like_the_hf_teacher(pair, server, tmp_path, objective) -> None:
    """Log-probs from the full distribution over the shared vocabulary, even with the teacher's padded head
    (a vLLM server normalises over the padded rows too)."""
    hf = _row(pair, tmp_path / "hf", **objective)
    remote = _row(pair, tmp_path / "ids", **_remote(server.url, "ids"), **objective)
    full_only = {"entropy_teacher", "entropy_gap", "forward_kl", "reverse_kl"}  # as with any top-K teacher
    assert set(hf) - set(remote) <= full_only, set(hf) - set(remote)
    _same_metrics({k: v for k, v in hf.items() if k in remote}, remote, rel=1e-4, absolute=1e-6)


def test_a_combination_the_payload_cannot_serve_names_payload_hidden() -> None:
    base = ["--teacher.backend", "http", "--teacher.urls", "[http://h:1]", "--teacher.payload", "ids"]
    with pytest.raises(ConfigError, match=r"teacher.payload ids: loss.signal full.*teacher.payload hidden"):
        load_config(None, [*base, "--loss.signal", "full"])
    with pytest.raises(ConfigError, match=r"loss.support student.*teacher.payload hidden"):
        load_config(None, [*base, "--loss.support", "student"])
    cfg = load_config(None, [*base[:-1], "hidden", "--loss.signal", "full", "--diagnostics.k", "64"])
    assert cfg.teacher.payload == "hidden"


def test_payload_hidden_against_a_vllm_style_server_says_what_to_start(pair) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from reference_teacher_server import ReferenceTeacherServer

    srv = ReferenceTeacherServer(load_model(str(pair["teacher"])), load_tokenizer(str(pair["teacher"])))
    try:
        with pytest.raises(ConfigError, match=r"--engine hf.*payload topk"):
            ScoringServerTeacher([srv.url], payload="hidden", device=torch.device("cpu"), vocab_size=103,
                                 retries=0)  # fmt: skip
    finally:
        srv.stop()


def test_serve_teacher_engine_hf_command_and_refusals(pair) -> None:
    from opd.teachers.server import hf_server_command

    cfg = ServeTeacherConfig(model=str(pair["teacher"]), engine="hf", dtype="float32", device_map="auto")
    cmd = hf_server_command(cfg)
    assert cmd[1:3] == ["-m", "opd.teachers.hf_server"] and cmd[cmd.index("--device-map") + 1] == "auto"
    assert build_server(cfg).engine == "hf"
    with pytest.raises(ConfigError, match="float32 or bfloat16, not --dtype float16"):
        build_server(ServeTeacherConfig(model=str(pair["teacher"]), engine="hf", dtype="float16"))
    with pytest.raises(ConfigError, match="go to vLLM; --engine hf takes none"):
        build_server(ServeTeacherConfig(model=str(pair["teacher"]), engine="hf", vllm_args=["--x"]))
