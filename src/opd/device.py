"""Where tensors live: one device contract for every command, enforced here.

opd had never run on a GPU until a user tried: the first training step crashed stacking a CPU count with
GPU lengths, and the step-time split booked the teacher's asynchronous forward as update time. The rules
below are what every command follows; the helpers in this module are the only places that move data
between the host and the compute device.

- **Compute device** (`resolve_device`): the device a command's models run on. ``auto`` is the
  process's own GPU (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU; the trainer and SFT use
  accelerate's device, which follows the same rule.
- **Rollouts** (`opd.generation.rollout.Rollout`) and **top-K teacher scores** (`opd.objectives.topk.TeacherTopK`) are
  moved to the compute device once, by the trainer, right after they are produced (`place`): generators
  and engines may return them anywhere (vLLM and HTTP teachers build them on the CPU). Everything
  downstream (scoring, losses, diagnostics) takes them as they are and never moves them again.
- **Model outputs** (logits, per-token losses, diagnostic sums of a step) stay on the compute device:
  the pure functions create their accumulators on their inputs' device, so a step does not wait for the
  host once per micro-batch.
- **Step statistics and metrics** are host (CPU) float64: `host` brings a device tensor back, `reduce_sum`
  takes host or device tensors, reduces across processes on the compute device (NCCL needs it there)
  and returns host float64. Nothing mixes a host tensor into device arithmetic.
- **Checkpoints** are written from wherever the tensors live (safetensors and torch.save copy to the
  host) and read onto the CPU (``map_location="cpu"``), then copied into the model and optimizer, which
  already live on the compute device.
- **Timers** (`clock`) synchronize the device first, so a phase is charged for the kernels it launched
  rather than for those of the phase before it; they stand at phase boundaries only. Inside a phase's
  loop (the HF teacher's forward of each micro-batch) a `DeviceTimer` times sections with CUDA events,
  which the device records in its own queue: nothing waits until the total is read, after the loop.
- **Host syncs** (`.item()`, `float()`, ``nonzero``, a copy to the host) stay out of the loops of a step:
  the loss, diagnostic and signal sums are added to on the device chunk by chunk and read back once per
  step (tests/test_host_syncs.py counts them on the simulated GPU).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import torch

__all__ = ["DeviceTimer", "clock", "host", "place", "reduce_sum", "resolve_device", "synchronize"]

T = TypeVar("T")


def resolve_device(setting: str | torch.device | None = "auto") -> torch.device:
    """The compute device a command runs its models on.

    ``auto`` (or None) picks this process's GPU when CUDA is available (``LOCAL_RANK`` under torchrun /
    accelerate, so N processes do not all land on GPU 0), else the CPU. An explicit ``cuda`` on a machine
    without CUDA is refused here with the setting named, instead of failing deep inside a forward pass.
    """
    from opd.errors import ConfigError

    if isinstance(setting, torch.device):
        return setting
    name = (setting or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {setting!r} is not a device name (auto, cpu, cuda, cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {setting!r}: CUDA is not available on this machine; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {setting!r}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0..)"
            )
    return device


def synchronize(device: torch.device | str) -> None:
    """Wait for the kernels queued on `device` (a no-op on the CPU, where ops run synchronously)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def clock(device: torch.device | str) -> float:
    """`time.perf_counter()` after the device's queued work finished: a phase boundary."""
    synchronize(device)
    return time.perf_counter()


class DeviceTimer:
    """Seconds the device spends on sections of a loop, without a synchronization per section.

    On a CUDA device each `section` records a start and an end event in the device's queue; `seconds` waits
    for the last end event once and sums the elapsed times, so it belongs at the next phase boundary. Kernels
    queued before a section are not charged to it (the start event runs after them). On the CPU, where
    operators run synchronously, sections are timed with `time.perf_counter`; on other devices (MPS) each
    section is bracketed with `clock`."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._events = self.device.type == "cuda" and torch.cuda.is_available()
        self._pairs: list[tuple[Any, Any]] = []
        self._host = 0.0

    @contextlib.contextmanager
    def section(self) -> Iterator[None]:
        if self._events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pairs.append((start, end))
            return
        queued = self.device.type not in ("cpu", "cuda")  # MPS: asynchronous, without events here
        t0 = clock(self.device) if queued else time.perf_counter()
        try:
            yield
        finally:
            self._host += (clock(self.device) if queued else time.perf_counter()) - t0

    def seconds(self) -> float:
        """The sections' total so far; on CUDA this waits for the last section's end (one synchronization)."""
        if not self._pairs:
            return self._host
        self._pairs[-1][1].synchronize()
        return self._host + sum(start.elapsed_time(end) for start, end in self._pairs) / 1000.0


def host(t: torch.Tensor) -> torch.Tensor:
    """A detached float64 copy on the CPU: the form of every step statistic and metric."""
    return t.detach().to(device="cpu", dtype=torch.float64)


def place(obj: T, device: torch.device | str) -> T:
    """`obj` (a Rollout, a TeacherTopK, or anything with ``.to(device)``) on `device`; a no-op when it is
    already there. The trainer calls it once per rollout chunk and teacher answer."""
    mover: Any = getattr(obj, "to", None)
    if mover is None:
        raise TypeError(f"cannot place a {type(obj).__name__} on a device")
    return mover(torch.device(device))


def reduce_sum(acc: Any, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A step statistic reduced over `acc`'s processes (an accelerate `Accelerator` or anything with
    ``num_processes``, ``device`` and ``reduce``), as host float64: the collective runs on the compute
    device (NCCL needs it there) and the result comes back."""
    if acc.num_processes == 1:
        return host(t)
    return host(acc.reduce(t.to(acc.device, torch.float64), reduction=op))
