"""GPU-speed defaults of a training run, decided on the CPU (issue 23, items 5, 9 and 13).

- TF32 (`tf32`, `opd.precision.apply_tf32`): the CUDA backends' flags on a CUDA device, nothing elsewhere;
- fused AdamW (`optim.fused`, `opd.train.loop.fused_adamw` / `build_optimizer`), built and stepped on the
  simulated GPU (`tests/fake_cuda.py`);
- ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (`expandable_segments`,
  `opd.train.loop.allocator_choice` / `configure_cuda_allocator`), set by `opd train` before its accelerator;
- the collective timeout (`dist_timeout_s`, `opd.train.loop.dist_timeout_s` / `apply_dist_timeout`);
- every choice recorded in RUN_DIR/device.json (a whole set-up on the simulated GPU and on the CPU).
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opd.config import TrainConfig, load_config
from opd.errors import ConfigError
from opd.precision import apply_tf32
from opd.train import loop
from opd.train.loop import (
    ALLOC_CONF_ENV,
    ALLOC_CONF_ENVS,
    EXPANDABLE_SEGMENTS,
    allocator_choice,
    apply_dist_timeout,
    build_optimizer,
    configure_cuda_allocator,
    dist_timeout_s,
    fused_adamw,
)
from opd.train.tracking import write_run_files

sys.path.insert(0, str(Path(__file__).parent))
from fake_cuda import fake_cuda, host, is_fake_cuda  # noqa: E402

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tf32_flags():
    """Restore the process-wide TF32 flags a test sets (torch's defaults otherwise leak into later tests)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------------
# TF32


def test_tf32_turns_the_cuda_flags_on_and_off_for_a_cuda_device(tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = False
    got = apply_tf32(CUDA, True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"  # what the precision probe's machine key reads
    assert got["applied"] and got["asked"] and got["cuda_matmul_allow_tf32"] and got["cudnn_allow_tf32"]
    assert got["float32_matmul_precision"] == "high"
    off = apply_tf32("cuda", False)  # tf32 false also undoes what an earlier run in the process set
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert off == {**off, "asked": False, "applied": False, "float32_matmul_precision": "highest"}


def test_tf32_leaves_cpu_matmuls_alone(tf32_flags):
    """Not `torch.set_float32_matmul_precision("high")`: that also puts oneDNN's CPU matmuls in TF32."""
    mkldnn = torch.backends.mkldnn.matmul.fp32_precision
    apply_tf32(CUDA, True)
    assert torch.backends.mkldnn.matmul.fp32_precision == mkldnn
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    got = apply_tf32(CPU, True)  # a CPU run changes no flag at all
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert got["applied"] is False and "cpu device" in got["why"]


def test_the_speed_settings_are_config_fields_with_descriptions():
    cfg = TrainConfig()
    assert cfg.tf32 and cfg.expandable_segments and cfg.optim.fused and cfg.dist_timeout_s is None
    for name in ("tf32", "expandable_segments", "dist_timeout_s"):
        described = TrainConfig.model_fields[name].description
        assert "CUDA" in described or "GPU" in described
    assert "CUDA only" in type(cfg.optim).model_fields["fused"].description
    args = ["--tf32", "false", "--expandable_segments", "false", "--optim.fused", "false"]
    cfg = load_config(None, [*args, "--dist_timeout_s", "7200"])
    assert not (cfg.tf32 or cfg.expandable_segments or cfg.optim.fused) and cfg.dist_timeout_s == 7200
    with pytest.raises(ConfigError, match="dist_timeout_s"):
        load_config(None, ["--dist_timeout_s", "0"])


@pytest.mark.parametrize(
    "name", ["paper_qwen3_1p7b.yaml", "paper_deepseek_1p5b.yaml", "paper_qwen3_1p7b_remote_teacher.yaml"]
)
def test_gpu_recipes_compute_in_bf16_on_fp32_master_weights(name):
    cfg = load_config(ROOT / "configs" / name)
    assert (cfg.student.dtype, cfg.student.autocast, cfg.teacher.dtype) == ("float32", "bfloat16", "bfloat16")
    assert cfg.tf32 and cfg.optim.fused


# ----------------------------------------------------------------------------------------------------
# fused AdamW


def test_fused_adamw_only_when_every_parameter_is_a_float_on_cuda():
    with fake_cuda():
        gpu = [torch.nn.Parameter(torch.zeros(3, device="cuda")) for _ in range(2)]
        half = torch.nn.Parameter(torch.zeros(3, device="cuda", dtype=torch.bfloat16))
        ints = torch.zeros(3, device="cuda", dtype=torch.long)
        assert fused_adamw(gpu) and fused_adamw([*gpu, half])
        assert not fused_adamw(gpu, allowed=False)  # optim.fused false
        assert not fused_adamw([*gpu, torch.nn.Parameter(torch.zeros(3))])  # one parameter on the CPU
        assert not fused_adamw([*gpu, ints])
    assert not fused_adamw([torch.nn.Parameter(torch.zeros(3))])  # the CPU keeps torch's default
    assert not fused_adamw([])


def _steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    for _ in range(3):
        model(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_build_optimizer_fuses_adamw_on_the_simulated_gpu_with_the_cpu_update(tmp_path):
    """The fused kernel is what runs on a GPU and takes the same steps as the CPU's default AdamW; the
    optimizer state it keeps (the step count on the device) saves and loads like any other."""
    cfg = TrainConfig().optim.model_copy(update={"lr": 1e-2, "weight_decay": 0.1})
    torch.manual_seed(0)
    cpu = torch.nn.Linear(4, 3)
    gpu = torch.nn.Linear(4, 3)
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(5, 4)
    plain, _ = build_optimizer(cpu.parameters(), cfg, total_steps=3)
    assert not plain.defaults["fused"]
    _steps(cpu, plain, x)
    with fake_cuda():
        gpu.to("cuda")
        fused, _ = build_optimizer(gpu.parameters(), cfg, total_steps=3)
        assert fused.defaults["fused"] is True
        _steps(gpu, fused, x.to("cuda"))
        assert is_fake_cuda(fused.state[gpu.weight]["step"])
        torch.save(fused.state_dict(), tmp_path / "optimizer.pt")
        weight = host(gpu.weight.detach())
        unfused, _ = build_optimizer(gpu.parameters(), cfg.model_copy(update={"fused": False}), total_steps=3)
        assert not unfused.defaults["fused"]
    torch.testing.assert_close(weight, cpu.weight.detach(), rtol=1e-6, atol=1e-7)
    state = torch.load(tmp_path / "optimizer.pt", weights_only=True, map_location="cpu")
    again, _ = build_optimizer(cpu.parameters(), cfg, total_steps=3)
    again.load_state_dict(state)  # a GPU run's optimizer resumes where fused AdamW left it
    assert float(again.state[cpu.weight]["step"]) == 3.0


# ----------------------------------------------------------------------------------------------------
# the CUDA caching allocator


def _choice(**kw):
    base = {"cuda": True, "allowed": True, "engine_in_process": False, "cuda_started": False, "environ": {}}
    return allocator_choice(**{**base, **kw})


def test_expandable_segments_only_on_cuda_unset_and_without_a_vllm_engine():
    assert _choice() == (EXPANDABLE_SEGMENTS, _choice()[1])
    assert "was unset" in _choice()[1]
    for kw, why in [
        ({"allowed": False}, "expandable_segments false"),
        ({"cuda": False}, "no CUDA"),
        ({"engine_in_process": True}, "vLLM engine"),
        ({"cuda_started": True}, "already started"),
        ({"environ": {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}}, "PYTORCH_CUDA_ALLOC_CONF is set"),
        ({"environ": {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}}, "PYTORCH_ALLOC_CONF is set"),
    ]:
        value, reason = _choice(**kw)
        assert value is None and why in reason, (kw, reason)
    assert _choice(environ={"PYTORCH_CUDA_ALLOC_CONF": ""})[0] == EXPANDABLE_SEGMENTS  # empty = unset


def test_configure_cuda_allocator_writes_the_variable_only_when_it_decides_to(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    env: dict[str, str] = {}
    assert configure_cuda_allocator(allowed=True, engine_in_process=False, environ=env)["set_by_opd"]
    assert env == {ALLOC_CONF_ENV: EXPANDABLE_SEGMENTS}
    env = {ALLOC_CONF_ENV: "garbage_collection_threshold:0.6"}
    assert not configure_cuda_allocator(allowed=True, engine_in_process=False, environ=env)["set_by_opd"]
    assert env == {ALLOC_CONF_ENV: "garbage_collection_threshold:0.6"}
    env = {}
    assert not configure_cuda_allocator(allowed=True, engine_in_process=True, environ=env)["set_by_opd"]
    assert env == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this CPU machine as it is
    assert not configure_cuda_allocator(allowed=True, engine_in_process=False, environ=env)["set_by_opd"]


class _Built(Exception):
    pass


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_opd_train_sets_the_allocator_before_its_accelerator_exists(monkeypatch, tmp_path, backend):
    """`run_training` decides before `OPDTrainer` (and so accelerate, which starts CUDA) is built."""
    from opd.train import run

    for name in ALLOC_CONF_ENVS:
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)  # restored (unset) after the test
    monkeypatch.setattr(loop, "_allocator", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    seen: dict[str, str | None] = {}

    def trainer(cfg, **kw):
        seen["env"] = __import__("os").environ.get(ALLOC_CONF_ENV)
        raise _Built

    monkeypatch.setattr(run, "OPDTrainer", trainer)
    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg.rollout.backend = backend
    with pytest.raises(_Built):
        run.run_training(cfg, resume=False)
    assert seen["env"] == (EXPANDABLE_SEGMENTS if backend == "hf" else None)
    assert loop._allocator["set_by_opd"] is (backend == "hf")


# ----------------------------------------------------------------------------------------------------
# the collective timeout


def _acc(device: torch.device, processes: int = 2) -> SimpleNamespace:
    return SimpleNamespace(device=device, num_processes=processes)


def test_dist_timeout_defaults_setting_and_environment(monkeypatch):
    monkeypatch.delenv(loop.DIST_TIMEOUT_ENV, raising=False)
    assert dist_timeout_s(_acc(CPU)) == 600.0  # gloo: a hung rank fails the others within minutes
    assert dist_timeout_s(_acc(CUDA)) == 3600.0  # NCCL: outlasts rank 0's evaluation and checkpoint writes
    assert dist_timeout_s(_acc(CUDA), 7200.0) == dist_timeout_s(_acc(CPU), 7200.0) == 7200.0
    monkeypatch.setenv(loop.DIST_TIMEOUT_ENV, "120")  # OPD_DIST_TIMEOUT overrides the setting
    assert dist_timeout_s(_acc(CUDA), 7200.0) == 120.0
    monkeypatch.setenv(loop.DIST_TIMEOUT_ENV, "0")  # 0: torch's own default
    assert dist_timeout_s(_acc(CUDA), 7200.0) is None
    monkeypatch.setenv(loop.DIST_TIMEOUT_ENV, "ten minutes")
    with pytest.raises(ConfigError, match="OPD_DIST_TIMEOUT='ten minutes' is not a number"):
        dist_timeout_s(_acc(CPU))


def test_apply_dist_timeout_sets_the_process_groups_timeout(monkeypatch, tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    monkeypatch.delenv(loop.DIST_TIMEOUT_ENV, raising=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        gloo = dist.distributed_c10d._get_default_group()._get_backend(CPU)
        apply_dist_timeout(_acc(CPU), 1234.0)  # as with several processes
        assert gloo.options._timeout == timedelta(seconds=1234)
        apply_dist_timeout(_acc(CPU), None)
        assert gloo.options._timeout == timedelta(seconds=600)
        apply_dist_timeout(_acc(CPU, processes=1), 99.0)  # one process: nothing to time
        assert gloo.options._timeout == timedelta(seconds=600)
    finally:
        dist.destroy_process_group()


def test_run_steps_times_the_collectives_with_the_runs_setting(monkeypatch):
    got = []
    monkeypatch.setattr(loop, "apply_dist_timeout", lambda acc, setting: got.append(setting))
    steps = SimpleNamespace(acc=_acc(CPU, 1), cfg=TrainConfig(dist_timeout_s=5400), start_step=0, total_steps=0,
                            log=lambda msg: None)  # fmt: skip
    assert loop.run_steps(steps, hint="-", save_final=False) == []
    steps.cfg = SimpleNamespace()  # a command config without the field: the device's default
    loop.run_steps(steps, hint="-", save_final=False)
    assert got == [5400, None]


# ----------------------------------------------------------------------------------------------------
# RUN_DIR/device.json


def test_write_run_files_writes_device_json(tmp_path):
    chosen = {"tf32": {"applied": True}, "fused_adamw": True}
    write_run_files(tmp_path, "x: 1\n", [], None, device=chosen)
    assert json.loads((tmp_path / "device.json").read_text()) == chosen
    write_run_files(tmp_path / "b", "x: 1\n", [], None)
    assert not (tmp_path / "b" / "device.json").exists()


def _setup(tiny_pair: dict, run_dir: Path, device: torch.device):
    from test_device_contract import StubAccelerator

    from opd.train.trainer import OPDTrainer

    cfg = load_config(None, ["--student", str(tiny_pair["student"]), "--teacher", str(tiny_pair["teacher"]),
                             "--prompts", str(tiny_pair["prompts"]), "--run_dir", str(run_dir),
                             "--tracking.tensorboard", "false", "--prompts_per_step", "2"])  # fmt: skip
    trainer = OPDTrainer(cfg, accelerator=StubAccelerator(device), log=lambda msg: None)
    trainer.setup()
    trainer.metrics.close()
    loop.unlock_run_dir(trainer.run_lock)
    return trainer, json.loads((run_dir / "device.json").read_text())


def test_a_simulated_gpu_run_records_tf32_and_fused_adamw(tiny_pair, tmp_path, tf32_flags, monkeypatch):
    from test_device_contract_commands import gpu_machine

    monkeypatch.setattr(loop, "_allocator", {})
    with gpu_machine():
        trainer, device = _setup(tiny_pair, tmp_path / "gpu", CUDA)
        assert trainer.optimizer.defaults["fused"] is True
        params = [p for p in trainer.student.parameters() if p.requires_grad]
        assert all(is_fake_cuda(p) for p in params)
    assert device["device"] == "cuda:0" and device["fused_adamw"] is True
    assert device["tf32"]["applied"] and device["tf32"]["cuda_matmul_allow_tf32"]
    assert device["cuda_allocator"]["set_by_opd"] is False and device["dist_timeout_s"] is None  # one process


def test_a_cpu_run_records_that_it_changed_nothing(tiny_pair, tmp_path, tf32_flags):
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    trainer, device = _setup(tiny_pair, tmp_path / "cpu", CPU)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    assert not trainer.optimizer.defaults["fused"]
    assert device["device"] == "cpu" and device["fused_adamw"] is False and device["tf32"]["applied"] is False
