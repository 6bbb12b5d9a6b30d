"""Host syncs of a training step, counted on the GPU simulated on the CPU (tests/fake_cuda.py).

Every device -> host transfer (``.item()``, ``float()``, ``nonzero``, ``.cpu()``, ``.tolist()`` ...) makes the
host wait for the GPU's queue. The loss and metrics chunk loop used to do several per chunk (``nonzero`` in
the diagnostics, ``float()`` in the signal statistics, host compares in the step statistics), so a step paid
for every chunk; `optim.in_backward` read every parameter's gradient norm; the HF teacher's timer
synchronized around every micro-batch. Here the transfers of whole steps are counted:

1. the count of a step does not depend on the number of chunks (the loss phase reads the device once per
   micro-batch, for its masked positions, and the rest only at phase boundaries), for a dense HF teacher,
   a top-K teacher and the plain logits path;
2. the loss and statistics code reads the device once per micro-batch, whatever the micro-batch count;
3. `optim.in_backward` reads nothing inside backward and once after it, and still refuses a non-finite
   gradient (every parameter stepped: the weights are declared damaged);
4. `topk_from_prompt_logprobs` reads the rollout once, not once per token; `DeviceTimer` waits once;
5. ``loss.chunk_max_elements: auto`` gives larger chunks on a GPU than on the CPU.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from opd.device import DeviceTimer
from opd.diagnostics import StepStats, StepStatsSettings, diagnostic_sums, finalize
from opd.models.loading import load_model
from opd.objectives.token import (
    CPU_CHUNK_ELEMENTS,
    GPU_CHUNK_ELEMENTS,
    chunk_elements,
    chunk_rows,
    signal_stats,
)
from opd.objectives.topk import (
    sparse_diagnostic_sums,
    sparse_signal_stats,
    topk_from_logits,
    topk_from_prompt_logprobs,
)
from opd.train.loop import NonFiniteLossError
from opd.train.memory import install_step_in_backward
from opd.train.trainer import OPDTrainer

sys.path.insert(0, str(Path(__file__).parent))
from fake_cuda import HostTransfers, count_host_transfers, cuda_runtime_stubs, fake_cuda, to_fake_cuda  # noqa: E402
from test_device_contract import FakeTopKTeacher, StubAccelerator, _config  # noqa: E402

# the loss and statistics code, whose transfers must not depend on the number of chunks or micro-batches
LOSS_CODE = ("/src/opd/objectives/", "/src/opd/diagnostics.py", "/src/opd/train/memory.py")


def _ours(counted: HostTransfers) -> int:
    return sum(n for where, n in counted.where.items() if any(part in where for part in LOSS_CODE))


class _Step:
    """One training step's device -> host transfers: the whole step and its loss/backward phase."""

    def __init__(self, pair: dict[str, Path], run_dir: Path, teacher_k: int | None = None, **extra: Any):
        teacher = None
        if (
            teacher_k is not None
        ):  # an engine teacher (its scores arrive on the host), see test_device_contract
            teacher = FakeTopKTeacher(load_model(str(pair["teacher"])), k=teacher_k)
            extra = {"teacher.backend": "http", "teacher.urls": "[http://fake-teacher:1]",
                     "teacher.top_k": teacher_k, "loss.support": "teacher", **extra}  # fmt: skip
        with cuda_runtime_stubs(), fake_cuda() as gpu:
            trainer = OPDTrainer(_config(pair, run_dir, **extra), accelerator=StubAccelerator(gpu),
                                 log=lambda msg: None, teacher=teacher)  # fmt: skip
            trainer.setup()
            self.chunks = 0
            self.micro_batches = 0
            start, inner = StepStats.start, trainer._loss_and_backward

            def counting_start(stats: StepStats, mb: Any, target: Any) -> Any:
                self.micro_batches += 1
                on_chunk = start(stats, mb, target)

                def counted(*args: Any) -> None:
                    self.chunks += 1
                    on_chunk(*args)

                return counted

            def loss_phase(*args: Any, **kwargs: Any) -> Any:
                with count_host_transfers() as self.loss:
                    return inner(*args, **kwargs)

            trainer._loss_and_backward = loss_phase
            StepStats.start = counting_start  # type: ignore[method-assign]
            try:
                with count_host_transfers() as self.step:
                    self.metrics = trainer.train_step(1).metrics
            finally:
                StepStats.start = start  # type: ignore[method-assign]
            self.trainer = trainer


@pytest.fixture(scope="module")
def step(tiny_pair, tmp_path_factory):
    """`step(**settings)`: one training step's transfers under those settings, each run once per module."""
    runs: dict[str, _Step] = {}

    def run(**settings: Any) -> _Step:
        key = repr(sorted(settings.items()))
        if key not in runs:
            runs[key] = _Step(tiny_pair, tmp_path_factory.mktemp("run"), **settings)
        return runs[key]

    return run


def _outside_the_loss(counted: HostTransfers) -> dict[str, int]:
    """The loss phase's transfers that are neither the loss code's nor the step's token count (opd.device.host)
    nor `Rollout.select`'s trimming nor transformers' attention-mask checks: none are expected."""
    known = (*LOSS_CODE, "/src/opd/generation/rollout.py", "/transformers/", "/src/opd/device.py")
    return {where: n for where, n in counted.where.items() if not any(part in where for part in known)}


@pytest.mark.parametrize(
    ("variant", "per_micro_batch"),
    [({}, 1), ({"teacher_k": 8, "loss.signal": "topk"}, 1), ({"loss.from_hidden_states": False}, 2)],
    ids=["hf-teacher", "topk-teacher", "logits-path"],
)
def test_a_steps_host_transfers_do_not_grow_with_the_chunks(step, variant, per_micro_batch):
    """One micro-batch of 4 rollouts, cut into chunks of 2 rows (`loss.chunk_max_elements` 300 at this
    vocabulary) or taken as one chunk ("auto" on a GPU): the same transfers, and the loss and statistics
    code reads only the micro-batch's masked positions (once; twice on the logits path: the loss and the
    metrics walk the logits separately). Before this change the hf-teacher step made 54 transfers with one
    chunk and 204 with chunks of 2 rows (its loss phase 28 and 178); now 40 and 40 (12 and 12)."""
    one = step(micro_batch_size=4, **variant)
    many = step(micro_batch_size=4, **variant, **{"loss.chunk_max_elements": 300})
    assert one.micro_batches == many.micro_batches == 1
    assert one.chunks == 1 and many.chunks >= 4, (one.chunks, many.chunks)
    assert many.step.count == one.step.count, f"one chunk:\n{one.step}\n{many.chunks} chunks:\n{many.step}"
    assert many.loss.count == one.loss.count, f"one chunk:\n{one.loss}\n{many.chunks} chunks:\n{many.loss}"
    assert _ours(many.loss) == _ours(one.loss) == per_micro_batch, many.loss
    assert not _outside_the_loss(many.loss), many.loss
    for key, value in one.metrics.items():  # and the same step, to float32 rounding (other matmul shapes)
        if not key.startswith(("time_", "step_time", "tokens_per_s")):
            assert many.metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key


@pytest.mark.parametrize(
    "variant", [{}, {"teacher_k": 8, "loss.signal": "topk"}], ids=["hf-teacher", "topk-teacher"]
)
def test_the_loss_code_reads_the_device_once_per_micro_batch(step, variant):
    """1 vs 4 micro-batches: the loss and statistics read only each micro-batch's masked positions. The
    other per-micro-batch transfers are outside the loss: `Rollout.select`'s column trimming and
    transformers' attention-mask checks in the student's and teacher's forwards. (With a top-K teacher the
    4 trimmed micro-batches are narrower than its scores: `nonfinite_target_positions` used to fail there.)"""
    one = step(micro_batch_size=4, **variant)
    four = step(micro_batch_size=1, **variant)
    assert (one.micro_batches, four.micro_batches) == (1, 4)
    assert (_ours(one.loss), _ours(four.loss)) == (1, 4), four.loss
    assert _ours(four.step) - _ours(one.step) == 3
    assert not _outside_the_loss(four.loss), four.loss


# ----------------------------------------------------------------------------------------------------
# The step statistics: device accumulators, the same values as the whole-batch functions


def _batch(seed: int = 0, b: int = 3, t: int = 7, v: int = 40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "s": torch.randn(b, t, v, generator=g, dtype=torch.float64),
        "q": torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2,
        "y": torch.randint(0, v, (b, t), generator=g),
        "mask": torch.rand(b, t, generator=g) > 0.25,
    }


@pytest.fixture
def gpu_free_cpu():
    """Guard: these tests run on the CPU build with CUDA simulated, never on a real one."""
    assert not torch.cuda.is_available()


class _MB:
    def __init__(self, x: dict[str, torch.Tensor]):
        self.response_mask, self.response_ids, self.engine_logprobs = x["mask"], x["y"], None


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "topk"])
def test_step_stats_chunks_equal_the_whole_batch_and_stay_on_the_device(gpu_free_cpu, sparse):
    """StepStats fed chunk by chunk (as `head_loss_sum`'s on_chunk does) gives the whole-batch diagnostics
    and signal statistics in float64, and its callbacks read nothing back from the simulated GPU."""
    x = _batch()
    v = x["s"].shape[-1]
    target: Any = topk_from_logits(x["q"], x["y"], 8) if sparse else x["q"]
    signal, support = ("topk", "teacher") if sparse else ("topk", "student")
    st = StepStatsSettings(vocab_size=v, diagnostics_k=5, position_bins=0 if sparse else 3, bin_len=7,
                           signal=signal, loss_k=5, support=support, chunk_rows=2)  # fmt: skip
    if sparse:
        want = sparse_diagnostic_sums(x["s"], target, x["mask"], k=5)
        want_sig = sparse_signal_stats(x["s"], target, x["y"], x["mask"], signal=signal, k=5)
    else:
        want = diagnostic_sums(x["s"], x["q"], x["mask"], k=5, position_bins=3, bin_len=7)
        want_sig = signal_stats(x["s"], x["q"], x["y"], x["mask"], signal=signal, k=5, support=support)
    with cuda_runtime_stubs(), fake_cuda() as gpu:
        gx = to_fake_cuda(x)
        gtarget = target.to(gpu) if sparse else gx["q"]
        stats = StepStats(st, gpu)
        with count_host_transfers() as counted:
            on_chunk = stats.start(_MB(gx), gtarget)
        assert counted.count == 0, counted
        b_idx, t_idx = gx["mask"].nonzero(as_tuple=True)
        with count_host_transfers() as counted:
            for a in range(0, int(b_idx.numel()), 2):
                bi, ti = b_idx[a : a + 2], t_idx[a : a + 2]
                rows = gtarget.select((bi, ti)) if sparse else gtarget[bi, ti]
                on_chunk(gx["s"][bi, ti], rows, bi, ti)
        assert counted.count == 0, counted
        got = {key: float(value) for key, value in stats.sums.items()}
        reward_sum, best_adv = stats.reward_sum, stats.best_adv
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), rel=1e-12, abs=1e-12), key
    assert finalize(stats.sums).keys() == finalize(want).keys()
    n = want_sig["n_tokens"]
    assert reward_sum / n == pytest.approx(want_sig["reward_mean"], rel=1e-12)
    assert float(best_adv[0]) == pytest.approx(want_sig["adv_max_abs"], rel=1e-12)
    assert float(best_adv[1]) == pytest.approx(want_sig["p_minus_q_at_max_adv"], rel=1e-12, abs=1e-15)


def test_whole_batch_statistics_read_the_device_once_per_call():
    """`signal_stats` / `sparse_signal_stats` / the diagnostic sums: one ``nonzero`` per call and one copy of
    the results, however many chunks (they used to read back 3-4 values per chunk)."""
    x = _batch(1, b=4, t=9)
    topk = topk_from_logits(x["q"], x["y"], 8)
    with cuda_runtime_stubs(), fake_cuda() as gpu:
        g = to_fake_cuda(x)
        gt = topk.to(gpu)
        counts = {}
        for chunk in (1, 3, None):
            with count_host_transfers() as c:
                signal_stats(g["s"], g["q"], g["y"], g["mask"], signal="topk", k=5, chunk_size=chunk)
                sparse_signal_stats(g["s"], gt, g["y"], g["mask"], signal="topk", k=5, chunk_size=chunk)
                diagnostic_sums(g["s"], g["q"], g["mask"], k=5, chunk_size=chunk, position_bins=2, bin_len=9)
                sparse_diagnostic_sums(g["s"], gt, g["mask"], k=5, chunk_size=chunk)
            counts[chunk] = c.count
    assert counts == {1: 6, 3: 6, None: 6}, counts  # 4 nonzero + 2 result copies


# ----------------------------------------------------------------------------------------------------
# optim.in_backward


def _model_and_loss(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    return model, torch.randn(4, 6)


def test_in_backward_reads_nothing_inside_backward_and_once_after(gpu_free_cpu):
    """The hooks keep every gradient norm on the device; `grad_norm` reads them once; the norm and the
    weights equal the plain AdamW step's."""
    ref, x = _model_and_loss()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    ref(x).square().sum().backward()
    want_norm = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in ref.parameters()))
    opt.step()
    with cuda_runtime_stubs(), fake_cuda():
        model, _ = _model_and_loss()
        to_fake_cuda(model)
        gx = to_fake_cuda(x)
        fused = torch.optim.AdamW(model.parameters(), lr=0.1)
        state = install_step_in_backward(model, fused, processes=1)
        state.arm()
        loss = model(gx).square().sum()
        with count_host_transfers() as inside:
            loss.backward()
        state.armed = False
        with count_host_transfers() as after:
            norm = state.grad_norm(1, 0.0, fused)
        weights = [p.detach().elem.clone() for p in model.parameters()]
    assert inside.count == 0, inside
    assert after.count == 1, after
    assert state.stepped == 4
    assert norm == pytest.approx(want_norm, rel=1e-6)
    for a, b in zip(weights, ref.parameters(), strict=True):
        assert torch.equal(a, b.detach())


def test_in_backward_non_finite_gradient_steps_everything_and_names_the_first_bad_parameter():
    """A non-finite gradient is found after backward (no per-parameter read): every parameter was stepped by
    then, so the weights are declared damaged, and the error names the first bad parameter in backward
    order."""
    model, x = _model_and_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = install_step_in_backward(model, opt, processes=1)
    model[0].weight.register_hook(lambda g: g * float("inf"))
    model[0].bias.register_hook(lambda g: g * float("nan"))
    steps = []
    inner = opt.step
    opt.step = lambda *a, **k: (steps.append(1), inner(*a, **k))[1]  # type: ignore[method-assign]
    state.arm()
    model(x).square().sum().backward()
    state.armed = False
    assert len(steps) == 4 and state.stepped == 4  # the bad parameters too
    with pytest.raises(NonFiniteLossError, match="weights in memory are damaged") as info:
        state.grad_norm(3, 1.5, opt)
    assert info.value.weights_damaged
    assert set(state.names[2:]) == {"0.weight", "0.bias"}  # the first layer is reached last in backward
    bad = state.names[2]
    assert f"non-finite gradient in {bad} at step 3" in str(info.value)
    assert not math.isfinite(float(model[0].weight.detach().sum()))
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# Engine scores, timers, chunk sizes


def test_topk_from_prompt_logprobs_reads_the_rollout_once(gpu_free_cpu):
    rows = [
        [{5: (1, -0.1), 7: (2, -2.0)}, {3: (1, -0.5), 5: (3, -3.0), 9: (2, -1.0)}],
        [{7: (1, -0.2), 2: (2, -1.9)}],
    ]
    response = torch.tensor([[5, 5], [7, 0]])
    want = topk_from_prompt_logprobs(rows, response, 2)
    with cuda_runtime_stubs(), fake_cuda():
        on_gpu = to_fake_cuda(response)
        with count_host_transfers() as counted:
            got = topk_from_prompt_logprobs(rows, on_gpu, 2)
    assert counted.count == 1, counted
    assert torch.equal(got.ids, want.ids) and torch.equal(got.logprobs, want.logprobs)
    assert torch.equal(got.token_logprob, want.token_logprob) and got.ids.device.type == "cpu"


class _FakeEvent:
    """A host stand-in for torch.cuda.Event: records the time; counts the host's waits."""

    waits = 0

    def __init__(self, enable_timing: bool = False):
        assert enable_timing
        self.t: float | None = None

    def record(self) -> None:
        import time

        self.t = time.perf_counter()

    def synchronize(self) -> None:
        _FakeEvent.waits += 1

    def elapsed_time(self, end: _FakeEvent) -> float:
        assert self.t is not None and end.t is not None
        return (end.t - self.t) * 1000.0


def test_device_timer_waits_once_on_cuda(monkeypatch):
    import time

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: pytest.fail("a sync inside the loop"))
    _FakeEvent.waits = 0
    timer = DeviceTimer("cuda")
    for _ in range(3):
        with timer.section():
            time.sleep(0.01)
        time.sleep(0.01)  # not charged
    assert _FakeEvent.waits == 0
    total = timer.seconds()
    assert _FakeEvent.waits == 1
    assert 0.03 <= total < 0.06


def test_device_timer_on_the_cpu():
    import time

    timer = DeviceTimer("cpu")
    assert timer.seconds() == 0.0
    with timer.section():
        time.sleep(0.01)
    assert 0.01 <= timer.seconds() < 0.05


def test_chunk_elements_by_device():
    assert chunk_elements("auto", "cpu") == chunk_elements("auto") == CPU_CHUNK_ELEMENTS == 2**25
    assert chunk_elements("auto", torch.device("cuda", 0)) == GPU_CHUNK_ELEMENTS == 2**28
    assert chunk_elements(300, "cuda") == 300 and chunk_elements(None, "cuda") is None
    assert chunk_rows(151_936, 2048, "auto", "cpu") == 220
    assert chunk_rows(151_936, 2048, "auto", "cuda") == 1766
    assert chunk_rows(151_936, None, "auto", "cuda") == 1766
    with pytest.raises(ValueError, match="max_elements"):
        chunk_elements(0, "cpu")
    with pytest.raises(ValueError, match="max_elements"):
        chunk_elements("big", "cpu")  # type: ignore[arg-type]


def test_auto_chunks_are_resolved_by_the_run_device(tiny_pair, tmp_path):
    """The trainer resolves "auto" by its device and keeps the number it used (the Objective); an explicit
    number is used as given on every device."""
    from opd.config import load_config

    with cuda_runtime_stubs(), fake_cuda() as gpu:
        t = OPDTrainer(
            _config(tiny_pair, tmp_path / "gpu"), accelerator=StubAccelerator(gpu), log=lambda m: None
        )
        t.setup()
        assert t.cfg.loss.chunk_max_elements == "auto"
        assert t.objective.chunk_max_elements == GPU_CHUNK_ELEMENTS
        assert t.chunk_rows == min(2048, GPU_CHUNK_ELEMENTS // t.vocab_size)
    cpu = OPDTrainer(_config(tiny_pair, tmp_path / "cpu", **{"loss.chunk_max_elements": 300}),
                     accelerator=StubAccelerator(torch.device("cpu")), log=lambda m: None)  # fmt: skip
    cpu.setup()
    assert cpu.objective.chunk_max_elements == 300 and cpu.chunk_rows == max(1, 300 // cpu.vocab_size)
    cfg = load_config(None, ["--loss.chunk_max_elements", "auto"])
    assert cfg.loss.chunk_max_elements == "auto"
    from opd.errors import ConfigError

    with pytest.raises(ConfigError, match="loss.chunk_max_elements"):
        load_config(None, ["--loss.chunk_max_elements", "0"])
