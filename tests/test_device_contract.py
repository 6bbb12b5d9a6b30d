"""The device contract (opd.device), checked on a GPU simulated on the CPU (tests/fake_cuda.py).

opd's first training step on a real H200 crashed stacking CPU and CUDA scalars, a bug no CPU test could
see. Here every tensor that would live on the GPU is a `FakeCudaTensor` (``device == cuda:0``, values
computed on the CPU) and every operator mixing it with CPU tensors is judged by real CUDA's rules, so such
mix-ups fail in CPU-only CI exactly where they would fail on a GPU.

1. the simulator itself: it raises where CUDA raises (the crash above, cat/stack, matmul, indexing a
   CPU tensor...), allows what CUDA allows (a 0-dim CPU scalar in a pointwise op, CPU indices, copies),
   and autograd and optimizers work through it;
2. the pure pieces (objectives, diagnostics, top-K teacher losses, rollout helpers) on all-CUDA inputs:
   outputs on CUDA, no error forward or backward, values equal to the same call on CPU tensors;
3. whole training steps (setup + 2 steps + checkpoint + final save) of `OPDTrainer` on the simulated
   GPU with an HF teacher (full and top-k signals, compared with a CPU run) and with a top-K teacher
   that returns its scores on the host, as the vLLM/HTTP teachers do.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.utils import DistributedType

from opd.config import load_config
from opd.device import host as device_host
from opd.device import place
from opd.diagnostics import diagnostic_sums, token_diagnostics
from opd.generation.rollout import Rollout, response_mask_from_ids
from opd.objectives.registry import DIVERGENCES, SUPPORTS
from opd.objectives.token import per_token_loss, signal_stats, token_loss
from opd.objectives.topk import (
    TeacherTopK,
    sparse_diagnostic_sums,
    sparse_per_token_loss,
    sparse_signal_stats,
    topk_from_logits,
)
from opd.teachers.hf import score_frozen
from opd.train.trainer import OPDTrainer

sys.path.insert(0, str(Path(__file__).parent))
from fake_cuda import CUDA, FakeCudaTensor, cuda_runtime_stubs, fake_cuda, host, is_fake_cuda, to_fake_cuda  # noqa: E402

SAME_DEVICE = "Expected all tensors to be on the same device"


@pytest.fixture
def gpu():
    """The simulated cuda:0 (yields its torch.device), plus host no-ops for the CUDA runtime calls the
    code under test makes around it: ``torch.random.fork_rng(devices=[cuda])`` in the HF rollout
    generator reads and restores the CUDA generator (``torch.cuda.get_rng_state``/``set_rng_state``),
    and ``torch.cuda.synchronize`` (see `fake_cuda.cuda_runtime_stubs`)."""
    with cuda_runtime_stubs(), fake_cuda() as device:
        yield device


# ----------------------------------------------------------------------------------------------------
# 1. The simulator


def test_the_crash_of_the_first_gpu_step_raises(gpu):
    """The exact expression that crashed train_step on an H200 (two CUDA sums stacked with a CPU count)
    raises here too; its fix (bring the statistics to the host first) runs."""
    lengths = torch.tensor([3.0, 5.0, 8.0], device=gpu)
    trunc = torch.tensor([0.0, 1.0, 0.0], device=gpu)
    with pytest.raises(RuntimeError, match=SAME_DEVICE):
        torch.stack([lengths.sum(), trunc.sum(), torch.tensor(float(len(lengths)))])
    with pytest.raises(RuntimeError, match=SAME_DEVICE):  # 0-dim or not, cat/stack never take CPU tensors
        torch.cat([lengths, torch.zeros(1)])
    fixed = torch.stack([lengths.sum().cpu(), trunc.sum().cpu(), torch.tensor(float(len(lengths)))])
    assert type(fixed) is torch.Tensor and fixed.tolist() == [16.0, 1.0, 3.0]


def test_what_cuda_allows_and_refuses(gpu):
    """A 0-dim CPU tensor may be READ by a pointwise op (one per op; `where` takes several); writing
    into a CPU tensor, non-scalar CPU tensors, and non-pointwise ops (matmul, gather, index a CPU
    tensor with CUDA indices, index_put of CPU values) raise, as on CUDA."""
    x = torch.arange(6.0, device=gpu).reshape(2, 3)
    mask = x > 2
    two = torch.tensor(2.0)
    assert (x * two).device == CUDA and torch.equal(host(x * two), torch.arange(6.0).reshape(2, 3) * 2)
    assert (x + 1).device == CUDA and (two - x).device == CUDA
    assert torch.where(mask, x, torch.tensor(0.0)).device == CUDA
    assert torch.where(mask, torch.tensor(1.0), torch.tensor(0.0)).device == CUDA
    assert x.masked_fill(mask, torch.tensor(-1.0)).device == CUDA
    assert x.clamp(min=torch.tensor(1.0)).device == CUDA
    acc = torch.zeros((), dtype=torch.float64, device=gpu)
    acc += torch.tensor(1.5, dtype=torch.float64)  # a CUDA accumulator may add a CPU scalar
    assert float(acc) == 1.5

    host_acc = torch.zeros(())
    with pytest.raises(RuntimeError, match=SAME_DEVICE):
        host_acc += x.sum()  # ... but a CPU accumulator may not take a CUDA value
    with pytest.raises(RuntimeError, match=SAME_DEVICE):
        x * torch.ones(3)
    with pytest.raises(RuntimeError, match="too many CPU scalars"):
        torch.addcmul(x, torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(RuntimeError, match=SAME_DEVICE):
        x @ torch.ones(3, 2)
    with pytest.raises(RuntimeError, match=SAME_DEVICE):
        x.gather(-1, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="indices should be either on cpu or on the same device"):
        torch.ones(4)[torch.tensor([0, 1], device=gpu)]
    with pytest.raises(RuntimeError, match=SAME_DEVICE):
        x[torch.tensor([0, 1]), torch.tensor([1, 2])] = torch.tensor([5.0, 6.0])
    with pytest.raises(RuntimeError, match="expected self and mask to be on the same device"):
        x.masked_fill(torch.ones(2, 3, dtype=torch.bool), 0.0)

    # CPU index tensors into a CUDA tensor are moved to the device by ATen; a 0-dim CPU value is fine
    assert x[torch.tensor([1])].device == CUDA
    x[torch.tensor([0]), torch.tensor([0])] = torch.tensor(9.0)
    assert float(x[0, 0]) == 9.0


def test_host_and_device_moves(gpu):
    """Factories follow their device argument, moves wrap and unwrap, host reads (.item(), float(),
    .tolist()) work, copy_ crosses devices, and nonzero works on CUDA tensors (FakeTensorMode's does
    not on a CPU-only build)."""
    assert type(torch.zeros(3)) is torch.Tensor  # no device: the host
    for t in (torch.zeros(2, device="cuda"), torch.full((2,), 1.0, device=gpu), torch.arange(3, device=gpu),
              torch.empty(2, device="cuda:0"), torch.randn(2, device=gpu), torch.tensor([1, 2], device="cuda"),
              torch.ones(2).to("cuda"), torch.ones(2).cuda(), torch.ones(2).to(gpu)):  # fmt: skip
        assert is_fake_cuda(t) and t.device == CUDA and t.is_cuda
    y = torch.tensor([[0.0, 2.0], [3.0, 0.0]], device=gpu)
    for back in (y.cpu(), y.to("cpu"), y.detach().cpu()):
        assert type(back) is torch.Tensor and back.device.type == "cpu"
    assert y.tolist() == [[0.0, 2.0], [3.0, 0.0]] and float(y.sum()) == 5.0 and y[1, 0].item() == 3.0
    assert int(y.bool().sum()) == 2 and bool(y.any())
    nz = y.nonzero()
    assert nz.device == CUDA and nz.tolist() == [[0, 1], [1, 0]]
    dst = torch.zeros(2, 2)
    dst.copy_(y)  # device -> host
    y.copy_(torch.ones(2, 2))  # host -> device
    assert dst.tolist() == [[0.0, 2.0], [3.0, 0.0]] and y.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert not torch.cuda.is_available()
    with pytest.raises(TypeError, match="cuda:0 device type tensor to numpy"):
        y.numpy()


def test_autograd_and_optimizer_through_fake_cuda(gpu):
    """Gradients flow through fake CUDA tensors (backward ops obey the same rules), come back as CUDA
    tensors, and a module moved with `.to("cuda")` trains under AdamW exactly like its CPU twin."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cpu_model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
        gpu_model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
        x = torch.randn(4, 5)
    gpu_model.load_state_dict(cpu_model.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (cpu_model, gpu_model)]
    gpu_model.to("cuda")  # in place: the optimizer built before holds the same (now CUDA) parameters
    assert all(is_fake_cuda(p) and isinstance(p, torch.nn.Parameter) for p in gpu_model.parameters())
    for model, opt, inp in ((cpu_model, opts[0], x), (gpu_model, opts[1], x.to(gpu))):
        for _ in range(2):
            loss = model(inp).log_softmax(-1)[:, 0].sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    g = torch.linspace(-1.0, 1.0, 3, requires_grad=True)
    gg = to_fake_cuda(g)  # a leaf on the GPU
    assert gg.is_leaf and gg.requires_grad
    (gg.exp() * torch.tensor(2.0)).sum().backward()
    assert is_fake_cuda(gg.grad) and torch.equal(host(gg.grad), 2 * g.detach().exp())
    for (name, p_cpu), p_gpu in zip(cpu_model.named_parameters(), gpu_model.parameters(), strict=True):
        assert torch.equal(host(p_gpu), p_cpu.detach()), name
        assert all(is_fake_cuda(v) for v in opts[1].state[p_gpu].values() if v.dim() > 0)


# ----------------------------------------------------------------------------------------------------
# 2. The pure pieces on all-CUDA inputs: outputs on CUDA, equal to the CPU call, forward and backward

B, T, V, VT = 3, 6, 24, 32  # the teacher's logits are padded past the shared vocabulary (VT > V)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    return {
        "s": torch.randn(B, T, V, generator=g) * 2,
        "t": torch.randn(B, T, VT, generator=g) * 2,
        "y": torch.randint(0, V, (B, T), generator=g),
        "mask": mask,
    }


def _on_gpu(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(CUDA) for k, v in x.items()}


def _assert_same(gpu_value: Any, cpu_value: Any, what: str = "") -> None:
    """A CUDA result equal to the CPU one (the simulator computes on the same CPU kernels)."""
    if isinstance(cpu_value, dict):
        assert gpu_value.keys() == cpu_value.keys(), what
        for k in cpu_value:
            _assert_same(gpu_value[k], cpu_value[k], f"{what}[{k}]")
    elif isinstance(cpu_value, (tuple, list)):
        assert len(gpu_value) == len(cpu_value), what
        for i, (g, c) in enumerate(zip(gpu_value, cpu_value, strict=True)):
            _assert_same(g, c, f"{what}[{i}]")
    elif isinstance(cpu_value, torch.Tensor):
        assert is_fake_cuda(gpu_value) and gpu_value.device == CUDA, f"{what} is not on CUDA"
        torch.testing.assert_close(host(gpu_value), cpu_value, rtol=0, atol=0, msg=what)
    else:
        assert gpu_value == cpu_value, what


LOSSES = [
    {"signal": "sampled"},
    *({"signal": "topk", "support": s} for s in SUPPORTS),
    {"signal": "topk", "support": "student", "renorm": "weights"},
    {"signal": "topk", "support": "union", "renorm": "weights"},
    {"signal": "topk", "support": "student", "divergence": "jsd", "beta": 0.3},
    *({"signal": "full", "divergence": d} for d in DIVERGENCES),
]


@pytest.mark.parametrize("chunk_size", [2048, 4, None], ids=["one-chunk", "chunks", "no-chunking"])
@pytest.mark.parametrize("kw", LOSSES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_per_token_loss_and_token_loss_on_cuda(gpu, kw, chunk_size):
    """`per_token_loss` / `token_loss` on CUDA inputs: CUDA outputs and student gradients, equal to
    the CPU call (chunked autograd.Function, several chunks, and the plain autograd path)."""
    x = _inputs()
    kw = {"k": 5, "vocab_size": V, "chunk_size": chunk_size, **kw}
    results = []
    for inp in (x, _on_gpu(x)):
        s = inp["s"].clone().requires_grad_(True)
        per_tok = per_token_loss(s, inp["t"], inp["y"], inp["mask"], **kw)
        per_tok.sum().backward()
        s2 = inp["s"].clone().requires_grad_(True)
        mean = token_loss(s2, inp["t"], inp["y"], inp["mask"], **kw)
        mean.backward()
        results.append((per_tok.detach(), s.grad, mean.detach(), s2.grad))
    for name, gpu_v, cpu_v in zip(("per_token", "grad", "token_loss", "token_loss grad"), results[1], results[0],
                                  strict=True):  # fmt: skip
        _assert_same(gpu_v, cpu_v, name)
    assert float(results[0][2]) != 0.0


@pytest.mark.parametrize("signal", ["sampled", "topk", "full"])
def test_signal_stats_on_cuda(gpu, signal):
    """`signal_stats` accumulates on the inputs' device and returns host floats equal to the CPU call."""
    x = _inputs(1)
    kw = {"signal": signal, "k": 5, "vocab_size": V, "chunk_size": 4}
    cpu = signal_stats(x["s"], x["t"], x["y"], x["mask"], **kw)
    g = _on_gpu(x)
    assert signal_stats(g["s"], g["t"], g["y"], g["mask"], **kw) == cpu


def test_diagnostics_on_cuda(gpu):
    """`diagnostic_sums` (with position bins, several chunks) keeps its sums on CUDA; `token_diagnostics`
    gives host floats; both equal the CPU call."""
    x = _inputs(2)
    kw = {"k": 5, "vocab_size": V, "chunk_size": 4, "position_bins": 3, "bin_len": T}
    g = _on_gpu(x)
    _assert_same(
        diagnostic_sums(g["s"], g["t"], g["mask"], **kw), diagnostic_sums(x["s"], x["t"], x["mask"], **kw)
    )
    assert token_diagnostics(g["s"], g["t"], g["mask"], **kw) == token_diagnostics(
        x["s"], x["t"], x["mask"], **kw
    )


SPARSE = [
    {"signal": "sampled"},
    {"signal": "topk", "support": "teacher"},
    {"signal": "topk", "support": "teacher", "renorm": "weights"},
    {"signal": "topk", "support": "teacher", "divergence": "jsd", "beta": 0.3},
]


def _topk(x: dict[str, torch.Tensor], k: int = 8) -> TeacherTopK:
    return topk_from_logits(x["t"][..., :V], x["y"], k)


@pytest.mark.parametrize("kw", SPARSE, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_sparse_loss_on_cuda(gpu, kw):
    """`topk_from_logits` and `sparse_per_token_loss` on CUDA: CUDA scores, loss and gradient, equal
    to the CPU call."""
    x = _inputs(3)
    results = []
    for inp in (x, _on_gpu(x)):
        top = _topk(inp)
        s = inp["s"].clone().requires_grad_(True)
        loss = sparse_per_token_loss(s, top, inp["y"], inp["mask"], k=5, vocab_size=V, **kw)
        loss.sum().backward()
        results.append((top.ids, top.logprobs, top.token_logprob, loss.detach(), s.grad))
    for name, gpu_v, cpu_v in zip(("ids", "logprobs", "token_logprob", "loss", "grad"), results[1], results[0],
                                  strict=True):  # fmt: skip
        _assert_same(gpu_v, cpu_v, name)


@pytest.mark.parametrize("signal", ["sampled", "topk"])
def test_sparse_signal_stats_on_cuda(gpu, signal):
    """`sparse_signal_stats` on CUDA inputs returns the CPU call's host floats."""
    x = _inputs(4)
    g = _on_gpu(x)
    kw = {"signal": signal, "k": 5, "vocab_size": V, "chunk_size": 4}
    assert sparse_signal_stats(g["s"], _topk(g), g["y"], g["mask"], **kw) == sparse_signal_stats(
        x["s"], _topk(x), x["y"], x["mask"], **kw
    )


def test_sparse_diagnostic_sums_on_cuda(gpu):
    """`sparse_diagnostic_sums` on CUDA inputs: sums on CUDA (the trainer stacks them with the dense
    path's), equal to the CPU call. Its accumulators must be created on the inputs' device: adding CUDA
    values into CPU scalars in place raises on a GPU."""
    x = _inputs(5)
    g = _on_gpu(x)
    kw = {"k": 5, "vocab_size": V, "chunk_size": 4}
    _assert_same(sparse_diagnostic_sums(g["s"], _topk(g), g["mask"], **kw),
                 sparse_diagnostic_sums(x["s"], _topk(x), x["mask"], **kw))  # fmt: skip


def _rollout() -> Rollout:
    prompts = torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9], [4, 5, 6, 7], [0, 0, 0, 9]])
    response = torch.tensor([[11, 12, 2, 0, 0], [13, 2, 0, 0, 0], [14, 15, 16, 17, 18], [19, 2, 0, 0, 0]])
    rmask, truncated = response_mask_from_ids(response, [2])
    r = Rollout(prompt_ids=prompts, prompt_mask=prompts != 0, response_ids=response, response_mask=rmask,
                truncated=truncated, prompt_index=[0, 1, 2, 3])  # fmt: skip
    return r


def test_rollout_helpers_on_cuda(gpu):
    """`opd.device.place` of a rollout, `response_mask_from_ids` (stop ids become a tensor on the
    response's device), `Rollout.sequences`, `.select` (trims padding columns with nonzero + host reads)
    and `.lengths` on CUDA rollouts; `opd.device.host` brings values back as CPU float64."""
    cpu = _rollout()
    response = cpu.response_ids.to(gpu)
    _assert_same(response_mask_from_ids(response, [2, 3]), response_mask_from_ids(cpu.response_ids, [2, 3]))
    roll = place(cpu, gpu)  # how the trainer moves rollouts (opd.device)
    assert place(roll, gpu) is roll  # already there: not moved again
    _assert_same(roll.sequences(), cpu.sequences(), "sequences")
    _assert_same(roll.lengths, cpu.lengths, "lengths")
    for rows in (slice(0, 2), slice(1, 2), slice(3, 4), slice(0, 4)):
        got, want = roll.select(rows), cpu.select(rows)
        for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "truncated"):
            _assert_same(getattr(got, f), getattr(want, f), f"select({rows}).{f}")
        assert got.prompt_index == want.prompt_index
    back = device_host(roll.lengths)
    assert (
        type(back) is torch.Tensor and back.dtype == torch.float64 and back.tolist() == [3.0, 2.0, 5.0, 2.0]
    )


# ----------------------------------------------------------------------------------------------------
# 3. Whole training steps on the simulated GPU


class StubAccelerator:
    """What OPDTrainer uses of accelerate's Accelerator, for one process on `device` (no collectives:
    with one process the trainer never reduces or gathers)."""

    num_processes = 1
    process_index = 0
    is_main_process = True
    distributed_type = DistributedType.NO

    def __init__(self, device: torch.device):
        self.device = device

    def prepare(self, *objs: Any) -> Any:
        # accelerate moves the model to its device in place; the optimizer keeps its parameter objects
        out = tuple(o.to(self.device) if isinstance(o, torch.nn.Module) else o for o in objs)
        return out if len(out) > 1 else out[0]

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, model: torch.nn.Module) -> Any:
        return contextlib.nullcontext()

    def clip_grad_norm_(self, params: Any, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("one process: nothing to reduce")

    gather = reduce

    def wait_for_everyone(self) -> None:
        pass

    def print(self, *args: Any) -> None:
        pass


def _config(pair: dict[str, Path], run_dir: Path, **extra: Any):
    base = {
        "student": pair["student"], "teacher": pair["teacher"], "prompts": pair["prompts"], "run_dir": run_dir,
        "prompts_per_step": 2, "micro_batch_size": 2, "rollout.rollouts_per_prompt": 2,
        "rollout.max_new_tokens": 6, "rollout.batch_size": 2, "optim.lr": 1e-3, "steps": 2,
        "checkpoint_every": 1, "tracking.tensorboard": False, "diagnostics.k": 8, "loss.k": 8,
        "diagnostics.position_bins": 2, "data.shuffle": False,
    }  # fmt: skip
    base.update(extra)
    return load_config(None, [x for k, v in base.items() for x in (f"--{k}", str(v))])


def _train(cfg, device: torch.device, teacher: Any = None) -> tuple[OPDTrainer, list[dict[str, float]]]:
    # teacher: an engine teacher without the engine (see FakeTopKTeacher)
    trainer = OPDTrainer(cfg, accelerator=StubAccelerator(device), log=lambda msg: None, teacher=teacher)
    trainer.setup()
    return trainer, trainer.train()


def _assert_trained_on_gpu(trainer: OPDTrainer, history: list[dict[str, float]], run_dir: Path) -> None:
    assert len(history) == 2
    for row in history:
        bad = {k: v for k, v in row.items() if not math.isfinite(v)}
        assert not bad, bad
    params = list(trainer._unwrapped().parameters())
    assert all(is_fake_cuda(p) for p in params), "the student left the GPU"
    for state in trainer.optimizer.state.values():
        assert all(is_fake_cuda(v) for k, v in state.items() if k != "step"), "optimizer state off the GPU"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (run_dir / "final" / "model.safetensors").exists()
    saved = sorted((run_dir / "checkpoints").iterdir())
    assert saved, "no checkpoint written"
    from safetensors.torch import load_file

    weights = load_file(saved[-1] / "model.safetensors")  # written from the GPU tensors, read on the host
    live = {k: host(v) for k, v in trainer._unwrapped().state_dict().items()}
    for k, v in weights.items():
        assert torch.equal(v, live[k]), k
    optim = torch.load(saved[-1] / "optimizer.pt", weights_only=True, map_location="cpu")
    assert optim["state"], "empty optimizer state"


@pytest.mark.parametrize(
    "objective",
    [{"loss.signal": "full", "loss.divergence": "jsd", "loss.beta": 0.3}, {"loss.signal": "topk"}],
    ids=["full-jsd", "topk"],
)
def test_training_steps_on_the_simulated_gpu(tiny_pair, tmp_path, objective):
    """THE guard for the H200 crash: setup + 2 training steps (HF rollouts under `generate`, HF teacher on
    the GPU, loss, backward, clipping, AdamW, diagnostics, metrics, checkpoint, final save) with the
    student and teacher on cuda:0. Any CPU/GPU mix the step makes raises here as it would on a GPU; the
    metrics equal a CPU run's (the simulator computes on the same kernels and the same RNG)."""
    with cuda_runtime_stubs(), fake_cuda() as gpu:
        trainer, history = _train(_config(tiny_pair, tmp_path / "gpu", **objective), gpu)
        _assert_trained_on_gpu(trainer, history, tmp_path / "gpu")
        assert all(is_fake_cuda(p) for p in trainer.teacher.model.parameters())
    assert history[0]["response_tokens"] > 0 and 0 < history[0]["overlap_ratio"] <= 1

    # The same run on the CPU: equal up to float32 rounding (the simulated device takes other kernels for
    # a few composite ops, e.g. attention's math path instead of the CPU's fused one; the worst metric,
    # entropy_gap, a difference of two entropies, moves by ~1e-4 relative), with the same rollouts.
    _, cpu_history = _train(_config(tiny_pair, tmp_path / "cpu", **objective), torch.device("cpu"))
    timing = ("tokens_per_s", "step_time_s", "time_rollout_s", "time_teacher_s", "time_update_s")
    for got, want in zip(history, cpu_history, strict=True):
        assert got.keys() == want.keys()
        for key in want.keys() - set(timing):
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-6), key


class FakeTopKTeacher:
    """An engine (vLLM/HTTP) teacher without the engine: `score_topk` reads the rollout back to the host
    and returns a `TeacherTopK` of CPU tensors, as `HTTPTeacher` and `VLLMTeacher` do; the trainer must
    place it on the compute device itself."""

    def __init__(self, model: torch.nn.Module, k: int):
        self.model = model.eval().requires_grad_(False)
        self.k = k
        self.calls = 0

    def score_topk(self, rollout: Rollout) -> TeacherTopK:
        self.calls += 1
        cpu = Rollout(**{f: host(getattr(rollout, f)) for f in ("prompt_ids", "prompt_mask", "response_ids",
                                                                "response_mask", "truncated")},
                      prompt_index=list(rollout.prompt_index))  # fmt: skip
        logits = score_frozen(self.model, cpu)
        return topk_from_logits(logits, cpu.response_ids, self.k)


@pytest.mark.parametrize("signal", ["sampled", "topk"])
def test_training_steps_with_a_topk_teacher_on_the_simulated_gpu(tiny_pair, tmp_path, gpu, signal):
    """2 training steps on the simulated GPU with a top-K teacher whose scores arrive on the host (as
    from vLLM or an HTTP server): scores placed on the device, sparse loss, sparse diagnostics and
    signal statistics all keep the device contract."""
    from opd.models.loading import load_model

    teacher = FakeTopKTeacher(load_model(str(tiny_pair["teacher"])), k=8)
    extra = {"teacher.backend": "http", "teacher.urls": "[http://fake-teacher:1]", "teacher.top_k": 8,
             "loss.signal": signal, "loss.support": "teacher"}  # fmt: skip
    trainer, history = _train(_config(tiny_pair, tmp_path / "run", **extra), gpu, teacher=teacher)
    assert teacher.calls >= 2
    _assert_trained_on_gpu(trainer, history, tmp_path / "run")
    assert "overlap_ratio" in history[0] and "entropy_teacher" not in history[0]


def test_nothing_is_simulated_outside_the_context():
    """Guard on the guard: outside `fake_cuda()` nothing is simulated and CUDA stays unavailable, so a
    test cannot pass by accident on a real-looking device."""
    assert not torch.cuda.is_available()
    assert type(torch.zeros(2)) is torch.Tensor
    t = FakeCudaTensor(torch.ones(2))
    assert t.device == CUDA and torch.equal(host(t), torch.ones(2))
