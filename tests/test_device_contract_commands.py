"""Every command path of the GPU issue, run on a GPU simulated on the CPU (tests/fake_cuda.py).

`tests/test_device_contract.py` guards the simulator, the pure pieces and the plain `OPDTrainer` step.
This file covers what is left of the issue's command list, each on the simulated cuda:0 and, where it
is cheap, compared with the same call on the CPU (the simulator computes on the CPU's kernels and RNG,
so the numbers agree up to the float32 rounding of a few composite ops, e.g. attention's math path):

1. `OPDTrainer` variants: LoRA, ``optim.in_backward``, gradient checkpointing, in-loop evaluation,
   collapse alarms, and a resume on the GPU from a checkpoint written on the CPU;
2. the SFT trainer (`opd.train.sft.SFTTrainer`);
3. the other commands' cores with ``device="cuda"``: `opd doctor`, `opd check`, `opd eval`,
   `opd generate`, `opd prompts select`, and the lab runner's `evaluate_path` / `teacher_pair_probe` on
   the shipped lab zoo.

The commands are run on a machine that *has* a GPU (`gpu_machine`): ``torch.cuda.is_available()`` is
True and ``device_count()`` is 1, so ``--device cuda`` and ``auto`` go through the real
`opd.device.resolve_device` to cuda, and every model `opd.models.loading.load_model` places lands on the
simulated device; the CUDA runtime calls such a machine makes (RNG state, synchronize) are host no-ops.

Not simulated: ``student.autocast`` (torch disables ``torch.autocast("cuda")`` when CUDA is not compiled
in, so a mixed-precision run would silently compute in float32 here; see the fake_cuda docstring), and
anything about real kernels, memory or asynchrony.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import opd.models.loading
from opd.config import load_config
from opd.train.trainer import OPDTrainer

sys.path.insert(0, str(Path(__file__).parent))
from fake_cuda import CUDA, cuda_runtime_stubs, fake_cuda, host, is_fake_cuda  # noqa: E402
from test_device_contract import StubAccelerator  # noqa: E402

CPU = torch.device("cpu")
TIMING = {"tokens_per_s", "step_time_s", "time_rollout_s", "time_teacher_s", "time_update_s", "seconds"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these tiny models gain nothing from more, and on a loaded 2-core machine the
    spinning OpenMP workers made the simulated runs several times slower (as `LabRunner.threads` notes).
    CPU and GPU runs share the setting, so their comparisons are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def gpu_machine() -> Iterator[torch.device]:
    """A machine with one (simulated) GPU: ``torch.cuda.is_available()`` True, one device, cuda:0 current,
    the CUDA runtime's RNG state (``get_rng_state_all``, saved in checkpoints) and ``synchronize`` as
    host no-ops (`fake_cuda.cuda_runtime_stubs`), and the simulated device active (yields cuda:0)."""
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: 1)
        mp.setattr(torch.cuda, "current_device", lambda: 0)
        mp.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(0, dtype=torch.uint8)])
        mp.setattr(torch.cuda, "set_rng_state_all", lambda new_states: None)
        with cuda_runtime_stubs(), fake_cuda() as device:
            yield device
    finally:
        mp.undo()


@pytest.fixture
def gpu():
    with gpu_machine() as device:
        yield device


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Where each model `opd.models.loading.load_model` returns lives ("cuda" for the simulated GPU, else the
    parameters' device type); commands import `load_model` at call time, so they all go through it."""
    seen: list[str] = []
    real = opd.models.loading.load_model

    def recording(spec: str, **kw: Any):
        model = real(spec, **kw)
        params = list(model.parameters())
        on_gpu = {is_fake_cuda(p) for p in params}
        assert len(on_gpu) == 1, "a model half on the GPU"
        seen.append("cuda" if on_gpu.pop() else params[0].device.type)
        return model

    monkeypatch.setattr(opd.models.loading, "load_model", recording)
    return seen


def _close(got: Any, want: Any, what: str = "", skip: set[str] = TIMING) -> None:
    """Nested results equal up to float32 rounding (timings and the device name excepted)."""
    if isinstance(want, dict):
        assert set(got) == set(want), f"{what}: keys {sorted(set(got) ^ set(want))}"
        for k in want:
            if k not in skip and k != "device":
                _close(got[k], want[k], f"{what}.{k}", skip)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, f"{what}[{i}]", skip)
    elif isinstance(want, float) and not isinstance(want, bool):
        if math.isnan(want):
            assert isinstance(got, float) and math.isnan(got), what
        else:
            assert got == pytest.approx(want, rel=1e-3, abs=1e-5), what
    else:
        assert got == want, what


# ----------------------------------------------------------------------------------------------------
# 0. The simulator gap these commands found


def test_deepcopy_of_a_model_on_the_simulated_gpu(gpu):
    """`copy.deepcopy` of a model on the GPU (peft's merge-on-save of a LoRA student deep-copies it) gives
    parameters on the device with the original's shapes, values, gradients and parameter-ness, sharing
    no memory with it. (torch's `Tensor.__deepcopy__` used to rebuild each wrapper as a 0-dim one, and
    the merge failed with "both arguments to matmul need to be at least 1D".)"""
    import copy

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(gpu)
    model[0].weight.grad = torch.ones(4, 3, device=gpu)
    twin = copy.deepcopy(model)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert is_fake_cuda(q) and isinstance(q, torch.nn.Parameter) and q.requires_grad, name
        assert q.shape == p.shape and torch.equal(host(q), host(p)) and q.data_ptr() != p.data_ptr(), name
    assert is_fake_cuda(twin[0].weight.grad) and torch.equal(host(twin[0].weight.grad), torch.ones(4, 3))
    x = torch.randn(2, 3, device=gpu)
    torch.testing.assert_close(host(twin(x)), host(model(x)), rtol=0, atol=0)
    with torch.no_grad():
        twin[0].weight.add_(1.0)
    assert not torch.equal(host(twin[0].weight), host(model[0].weight))


# ----------------------------------------------------------------------------------------------------
# 1. OPDTrainer variants


def _config(pair: dict[str, Path], run_dir: Path, **extra: Any):
    """2 steps of 2 prompts x 2 rollouts as ONE micro-batch, no clipping: the settings optim.in_backward
    requires (config.py `_in_backward`), so every variant but LoRA compares with one CPU baseline."""
    base = {
        "student": pair["student"], "teacher": pair["teacher"], "prompts": pair["prompts"],
        "run_dir": run_dir, "prompts_per_step": 2, "micro_batch_size": 4, "rollout.rollouts_per_prompt": 2,
        "rollout.max_new_tokens": 6, "rollout.batch_size": 2, "optim.lr": 1e-3, "optim.max_grad_norm": "null",
        "steps": 2, "checkpoint_every": 1, "tracking.tensorboard": False, "diagnostics.k": 8, "loss.k": 8,
        "diagnostics.position_bins": 2, "data.shuffle": False,
    }  # fmt: skip
    base.update(extra)
    return load_config(None, [x for k, v in base.items() for x in (f"--{k}", str(v))])


def _train(cfg: Any, device: torch.device, resume: bool = False) -> tuple[OPDTrainer, list[dict[str, float]]]:
    trainer = OPDTrainer(cfg, resume=resume, accelerator=StubAccelerator(device), log=lambda msg: None)
    trainer.setup()
    return trainer, trainer.train()


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_on_gpu(trainer: OPDTrainer) -> None:
    params = [p for p in trainer._unwrapped().parameters() if p.requires_grad]
    assert params and all(is_fake_cuda(p) for p in params), "the student left the GPU"
    for state in trainer.optimizer.state.values():
        assert all(is_fake_cuda(v) for k, v in state.items() if k != "step"), "optimizer state off the GPU"
    assert all(is_fake_cuda(p) for p in trainer.teacher.model.parameters()), "the teacher left the GPU"


def _same_steps(got: list[dict[str, float]], want: list[dict[str, float]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert all(math.isfinite(v) for v in g.values()), g
        _close(
            {k: v for k, v in g.items() if k not in TIMING}, {k: v for k, v in w.items() if k not in TIMING}
        )


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def cpu_run(tiny_pair, tmp_path_factory) -> tuple[list[dict[str, float]], Path]:
    """The CPU baseline of `_config`: its 2 steps' metrics and its run directory."""
    run = tmp_path_factory.mktemp("cpu_baseline")
    _, history = _train(_config(tiny_pair, run), CPU)
    return history, run


def test_gradient_checkpointing_on_the_simulated_gpu(tiny_pair, tmp_path, cpu_run):
    """student.gradient_checkpointing: every decoder layer recomputed in backward through
    torch.utils.checkpoint (which saves and restores the CUDA RNG state of its inputs' device) keeps the
    device contract, and gives the CPU run's metrics and weights (recomputation changes no math)."""
    with gpu_machine() as gpu:
        trainer, history = _train(
            _config(tiny_pair, tmp_path, **{"student.gradient_checkpointing": True}), gpu
        )
        _assert_on_gpu(trainer)
        assert all(getattr(layer, "_opd_checkpointed", False) for layer in trainer._unwrapped().model.layers)
    _same_steps(history, cpu_run[0])
    _same_weights(tmp_path / "final", cpu_run[1] / "final")


def test_optimizer_step_in_backward_on_the_simulated_gpu(tiny_pair, tmp_path, cpu_run):
    """optim.in_backward: AdamW steps each parameter in its post-accumulate-grad hook (gradient norms
    read back to the host one parameter at a time) on the GPU; same metrics and weights as the CPU run
    of the plain optimizer step. optim.fused false: fused AdamW creates its step counter with
    ``device=p.device`` inside the hook, where the simulator's device rewriting is not active (a backward
    hook runs without torch-function modes); fused AdamW is checked in tests/test_gpu_defaults.py."""
    with gpu_machine() as gpu:
        cfg = _config(tiny_pair, tmp_path, **{"optim.in_backward": True, "optim.fused": False})
        trainer, history = _train(cfg, gpu)
        _assert_on_gpu(trainer)
        assert trainer.in_backward is not None and trainer.in_backward.stepped > 0
    _same_steps(history, cpu_run[0])
    _same_weights(tmp_path / "final", cpu_run[1] / "final")


def test_in_loop_evaluation_on_the_simulated_gpu(tiny_pair, tmp_path, cpu_run):
    """eval.prompts + eval.every 1: the InLoopEvaluator samples and grades with the GPU student at
    steps 0, 1 and 2 between training steps; its step-0 metrics equal the same evaluation of the
    untrained student on the CPU, and the training metrics are the CPU baseline's."""
    from opd.evaluation.eval import InLoopEvaluator

    extra = {"eval.prompts": tiny_pair["prompts"], "eval.every": 1, "eval.samples": 2,
             "eval.max_new_tokens": 4, "eval.max_problems": 2, "eval.verifier": "exact"}  # fmt: skip
    cfg = _config(tiny_pair, tmp_path / "run", **extra)
    with gpu_machine() as gpu:
        trainer, history = _train(cfg, gpu)
        _assert_on_gpu(trainer)
    rows = _rows(tmp_path / "run")
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert all("eval/avg@2" in r and "eval/pass@2" in r for r in evals)
    _same_steps(history, cpu_run[0])

    student = opd.models.loading.load_model(str(tiny_pair["student"]))
    want = InLoopEvaluator(cfg.eval, cfg.data, trainer.tokenizer).run(student)
    _close({k: v for k, v in evals[0].items() if k.startswith("eval/")}, want)


def test_collapse_alarms_on_the_simulated_gpu(tiny_pair, tmp_path, cpu_run):
    """The collapse monitor reads the GPU run's host metrics: with hair-trigger thresholds (baseline
    after one step) step 2 raises alarms, logged as ``kind: alarm`` rows, and nothing leaves the device
    contract; the training metrics are the CPU baseline's."""
    extra = {"alarms.warmup_steps": 1, "alarms.entropy_ratio": 1.000001, "alarms.entropy_min_delta": 0.0,
             "alarms.overlap_drop": 1e-9, "alarms.length_ratio": 1.000001, "alarms.truncation_jump": 1e-9,
             "alarms.grad_norm_ratio": 1.000001}  # fmt: skip
    with gpu_machine() as gpu:
        trainer, history = _train(_config(tiny_pair, tmp_path, **extra), gpu)
        _assert_on_gpu(trainer)
    alarms = [r for r in _rows(tmp_path) if r.get("kind") == "alarm"]
    assert alarms and all(r["step"] == 2 for r in alarms), alarms
    assert trainer.monitor.alarming and not trainer.monitor.collapsed  # patience 3: a warning, not a collapse
    _same_steps(history, cpu_run[0])


def test_resume_on_the_simulated_gpu_from_a_cpu_checkpoint(tiny_pair, tmp_path, cpu_run):
    """Train step 1 on the CPU (checkpoint), resume on the GPU (``resume=True``) and run step 2: the
    checkpoint's host tensors are loaded into the GPU model and optimizer (AdamW state moved to the
    parameters' device), and step 2 and the final weights equal the uninterrupted CPU run's."""
    run = tmp_path / "run"
    _, first = _train(_config(tiny_pair, run, steps=1), CPU)
    _same_steps(first, cpu_run[0][:1])
    with gpu_machine() as gpu:
        trainer, history = _train(_config(tiny_pair, run), gpu, resume=True)
        assert trainer.start_step == 1
        _assert_on_gpu(trainer)
    _same_steps(history, cpu_run[0][1:])
    assert [r["step"] for r in _rows(run)] == [1, 2]
    _same_weights(run / "final", cpu_run[1] / "final")
    _same_weights(
        sorted((run / "checkpoints").iterdir())[-1], sorted((cpu_run[1] / "checkpoints").iterdir())[-1]
    )


def test_lora_student_on_the_simulated_gpu(tiny_pair, tmp_path):
    """student.lora.enabled: the peft-wrapped student trains its adapters on the GPU (the frozen base
    weights too live there), checkpoints its adapter state, and saves a merged final model (a deep copy
    of the GPU model merged and written to the host); metrics and merged weights equal a CPU run's."""
    extra = {"student.lora.enabled": True, "student.lora.r": 4, "student.lora.alpha": 8}
    with gpu_machine() as gpu:
        trainer, history = _train(_config(tiny_pair, tmp_path / "gpu", **extra), gpu)
        _assert_on_gpu(trainer)
        assert all(is_fake_cuda(p) for p in trainer._unwrapped().parameters())  # frozen base weights too
        assert all("lora_" in n for n, p in trainer._unwrapped().named_parameters() if p.requires_grad)
    _, cpu_history = _train(_config(tiny_pair, tmp_path / "cpu", **extra), CPU)
    _same_steps(history, cpu_history)
    _same_weights(tmp_path / "gpu" / "final", tmp_path / "cpu" / "final")
    assert not any("lora_" in k for k in load_file(tmp_path / "gpu" / "final" / "model.safetensors"))


# ----------------------------------------------------------------------------------------------------
# 2. SFT


def _sft_config(pair: dict[str, Path], data: Path, run_dir: Path):
    from opd.train.sft import SFTConfig

    return SFTConfig(
        model=str(pair["student"]), data=str(data), template="raw", run_dir=str(run_dir), steps=2,
        batch_size=4, micro_batch_size=2, shuffle=False, checkpoint_every=1, optim={"lr": 1e-3},
        tracking={"tensorboard": False},
    )  # fmt: skip


def test_sft_on_the_simulated_gpu(tiny_pair, tmp_path):
    """`opd sft`'s trainer with accelerate's device = cuda:0: collated host batches moved to the device,
    cross-entropy summed on it, two accumulated micro-batches, clipping, AdamW, checkpoints and the
    final save; metrics and weights equal a CPU run's."""
    from opd.train.sft import SFTTrainer

    records = [json.loads(x) for x in tiny_pair["prompts"].read_text().splitlines()[:8]]
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "response": r["answer"]}) + "\n" for r in records)
    )
    runs = {}
    for name in ("gpu", "cpu"):
        with gpu_machine() if name == "gpu" else contextlib.nullcontext(CPU) as device:
            cfg = _sft_config(tiny_pair, data, tmp_path / name)
            trainer = SFTTrainer(cfg, accelerator=StubAccelerator(device), log=lambda msg: None)
            trainer.setup()
            runs[name] = trainer.train()
            if name == "gpu":
                assert all(is_fake_cuda(p) for p in trainer._unwrapped().parameters())
                assert all(is_fake_cuda(v) for s in trainer.optimizer.state.values() for k, v in s.items()
                           if k != "step")  # fmt: skip
    assert len(runs["gpu"]) == 2 and runs["gpu"][0]["loss"] > 0
    _same_steps(runs["gpu"], runs["cpu"])
    _same_weights(tmp_path / "gpu" / "final", tmp_path / "cpu" / "final")


# ----------------------------------------------------------------------------------------------------
# 3. The other commands' cores with device="cuda"


def test_doctor_on_the_simulated_gpu(tiny_pair, tmp_path, loads):
    """`opd doctor --device cuda` (run_doctor): student rollouts, scoring by two teachers (diagnostic
    sums, sequence rewards, the teacher-pair metrics), teacher samples and teacher continuations of
    student prefixes, all on the GPU; the result equals the CPU run's."""
    from opd.evaluation.doctor import DoctorConfig, run_doctor

    student, teacher, prompts = (str(tiny_pair[k]) for k in ("student", "teacher", "prompts"))

    def cfg(device: str) -> DoctorConfig:
        return DoctorConfig(student=student, teachers=[teacher, student], prompts=prompts, templates=["raw"],
                            n_prompts=2, samples=2, teacher_samples=1, max_new_tokens=4, k=4,
                            continuation_rollouts=2, depths=[0.5], device=device)  # fmt: skip

    with gpu_machine():
        got = run_doctor(cfg("cuda"))
    assert loads == ["cuda"] * 3 and got["device"] == "cuda"
    want = run_doctor(cfg("cpu"))
    got["config"]["device"] = "cpu"
    _close(got, want)
    t = got["teachers"]["teacher"]["by_template"]["raw"]
    assert "continuation_advantage@0.5" in t and "reward_auroc" in t and got["pairs"]["raw"]


def test_check_on_the_simulated_gpu(tiny_pair, monkeypatch, loads):
    """`opd check --device cuda` (cli._check): self-test rollouts, the fidelity self-test, the teacher
    determinism check and the pair diagnostics on the GPU; every check passes with the CPU's numbers."""
    import opd.cli.check

    seen: list[Any] = []
    monkeypatch.setattr(opd.cli.check, "_print_results", lambda results: seen.append(results))
    # student, teacher, prompts, template, dtypes, max_new_tokens, n_prompts, k, trust_remote_code
    args = (str(tiny_pair["student"]), str(tiny_pair["teacher"]), tiny_pair["prompts"], "raw", "float32",
            "float32", 4, 2, 4, False)  # fmt: skip
    with gpu_machine():
        assert opd.cli.check._check(*args, "cuda")
    assert loads == ["cuda", "cuda"]
    assert opd.cli.check._check(*args, "cpu")
    got, want = seen
    assert [(r.name, r.ok) for r in got] == [(r.name, r.ok) for r in want]
    for g, w in zip(got, want, strict=True):
        _close(g.values, w.values, g.name)


def test_eval_command_on_the_simulated_gpu(tiny_pair, tmp_path, loads):
    """`opd eval --device cuda` (run_eval_command): sampling, grading and the per-model summaries with
    two models loaded on the GPU one after the other (memory released between them); the samples and
    summaries equal the CPU run's."""
    from rich.console import Console

    from opd.cli.eval import run_eval_command
    from opd.evaluation.eval import EvalCommandConfig

    def run(device: str, out: Path) -> dict[str, Any]:
        cfg = EvalCommandConfig(models=[str(tiny_pair["student"]), str(tiny_pair["teacher"])],
                                prompts=str(tiny_pair["prompts"]), max_problems=2, samples=2,
                                max_new_tokens=4, template="raw", verifier="exact", device=device,
                                out=str(out))  # fmt: skip
        return run_eval_command(cfg, Console(file=io.StringIO()))

    with gpu_machine():
        got = run("cuda", tmp_path / "gpu")
    assert loads == ["cuda", "cuda"]
    want = run("cpu", tmp_path / "cpu")
    _close(got, want)
    for name in ("student", "teacher"):
        assert json.loads((tmp_path / "gpu" / f"{name}.summary.json").read_text())["device"] == "cuda"
        samples = [(tmp_path / d / f"{name}.samples.jsonl").read_text() for d in ("gpu", "cpu")]
        assert samples[0] == samples[1]


def test_generate_on_the_simulated_gpu(tiny_pair, tmp_path, loads):
    """`opd generate --device cuda` (run_generate): batched sampling on the GPU, decoding and filtering
    on the host; the written rows equal the CPU run's."""
    from opd.recipes.generate import GenerateConfig, OutputPaths, read_complete_lines, run_generate

    def run(device: str, out: Path) -> list[dict[str, Any]]:
        cfg = GenerateConfig(model=str(tiny_pair["teacher"]), prompts=str(tiny_pair["prompts"]), out=str(out),
                             max_new_tokens=4, batch_size=2, max_prompts=3, samples=2,
                             device=device)  # fmt: skip
        run_generate(cfg, log=lambda msg: None)
        paths = OutputPaths.for_out(out)
        return read_complete_lines(paths.out) + read_complete_lines(paths.rejected)

    with gpu_machine():
        got = run("cuda", tmp_path / "gpu.jsonl")
    assert loads == ["cuda"]
    want = run("cpu", tmp_path / "cpu.jsonl")
    assert len(got) == 6 and got == want


def test_prompts_select_on_the_simulated_gpu(tiny_pair, tmp_path, loads):
    """`opd prompts select --device cuda` (cli_prompts._select -> prompts.score_records): student
    rollouts, student and teacher scoring, token diagnostics and sequence rewards per prompt on the GPU;
    the scores and the selection equal the CPU run's."""
    from opd.cli.prompts import _select
    from opd.recipes.prompts import SelectConfig

    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(tiny_pair["prompts"].read_text().splitlines()[:4]) + "\n")

    def run(device: str, out: Path) -> list[dict[str, Any]]:
        _select(SelectConfig(student=str(tiny_pair["student"]), teacher=str(tiny_pair["teacher"]),
                             candidates=str(pool), n=2, mix=0.0, rollouts=2, max_new_tokens=4, k=4,
                             template="raw", out=str(out), device=device))  # fmt: skip
        return [json.loads(x) for x in out.with_name(out.stem + ".scores.jsonl").read_text().splitlines()]

    with gpu_machine():
        got = run("cuda", tmp_path / "gpu.jsonl")
    assert loads == ["cuda", "cuda"]
    want = run("cpu", tmp_path / "cpu.jsonl")
    assert len(got) == 4 and all("overlap_ratio" in r for r in got)
    _close(got, want)
    assert (tmp_path / "gpu.jsonl").read_text().count("\n") == 2


def test_lab_runner_on_the_simulated_gpu(tmp_path, loads):
    """The lab runner's own model work on the shipped zoo with ``device="cuda"``: `evaluate_path`
    (held-out accuracy and pattern rates, greedy sampling of the zoo student; the gap level only, for
    time) and `teacher_pair_probe` (a student rollout scored by three models); both equal the CPU run's."""
    from opd.lab.runner import EvalSettings, LabRunner, LabZoo, teacher_pair_probe

    shipped = LabZoo.shipped()
    zoo = dataclasses.replace(shipped, eval_files={shipped.gap_level: shipped.eval_files[shipped.gap_level]})
    settings = EvalSettings(n_problems=2, batch_size=2, in_loop_every=0)
    student, a, b = (str(zoo.models[n]) for n in ("student", "teacher_novel", "teacher_big"))
    files = [zoo.eval_files[zoo.gap_level]]
    got: dict[str, Any] = {}
    want: dict[str, Any] = {}
    for device, res in (("cuda", got), ("cpu", want)):
        with gpu_machine() if device == "cuda" else contextlib.nullcontext():
            runner = LabRunner(zoo=zoo, out_root=tmp_path / device, eval=settings, device=device)
            assert runner.compute_device.type == device
            res["levels"] = runner.evaluate_path(student)
            res["probe"] = teacher_pair_probe(student, a, b, files=files, n=1, device=device)
    assert loads == ["cuda"] * 4 + ["cpu"] * 4
    assert set(got["levels"]) == {str(zoo.gap_level)} and got["probe"]["tokens"] > 0
    _close(got, want)


def test_the_machine_is_restored():
    """Guard on the guard: outside `gpu_machine` CUDA is unavailable again and nothing is simulated."""
    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
    assert type(torch.zeros(1)) is torch.Tensor and CUDA.type == "cuda"
    assert host(torch.ones(1)).device == CPU
