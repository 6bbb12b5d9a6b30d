"""The skeleton OPD (`opd.train.trainer`) and SFT (`opd.train.sft`) training share.

Both loops are "N optimizer steps over a resumable data cursor, checkpointed atomically, stoppable by a
signal, on one process or many"; the parts of that which do not depend on what a step computes live here
once: the optimizer and lr schedule, the refusal to overwrite a run, resuming from the newest whole
checkpoint, the metrics sink, the agreed stop after a signal, and the multi-process timeout and teardown.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Protocol

import torch

from opd.config import OptimConfig, TrackingConfig
from opd.device import reduce_sum
from opd.errors import ConfigError, InterruptedRun, OpdError, StorageError
from opd.train import checkpoint as ckpt
from opd.train.tracking import MetricsLogger

# ----------------------------------------------------------------------------------------------------
# set-up


def check_launch(acc: Any) -> None:
    """Catch launches that silently do something else than asked (measured with accelerate 1.x): N
    processes that did not join one group each train alone on the whole batch; accelerate's own
    FSDP/DeepSpeed plugins wrap the model in ways opd's checkpoints cannot save (on a GPU the first
    checkpoint of an accelerate-FSDP run failed; on a CPU the config silently runs data parallel)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and acc.num_processes == 1:
        raise ConfigError(
            f"{launched} processes were launched but they did not join one process group (accelerate "
            f"chose {acc.distributed_type.value}), so each would train alone; on a machine without GPUs "
            "launch with torchrun or `accelerate launch --multi_gpu` (see README, multi-process runs)"
        )
    plugins = [
        n for n in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{n}", "").lower() == "true"
    ]
    if plugins:
        raise ConfigError(
            f"the accelerate launch config asks for its {plugins[0]} plugin, which opd does not support "
            "(its wrapped student cannot be checkpointed by opd); shard the student with opd's own FSDP2 "
            "instead: `--sharding fsdp`, launched with torchrun or `accelerate launch --config_file "
            "configs/accelerate/ddp.yaml` (see README, multi-process runs)"
        )


# ----------------------------------------------------------------------------------------------------
# the update


class NonFiniteLossError(OpdError):
    """Raised when a step produced NaN/inf; the optimizer step is not taken.

    `metrics` holds the offending loss and gradient norm (for the collapse monitor's ``nan`` alarm).
    """

    def __init__(self, message: str, metrics: dict[str, float] | None = None, weights_damaged: bool = False):
        super().__init__(message)
        self.metrics = metrics or {}
        # optim.in_backward: some parameters were already stepped when the bad gradient appeared, so the
        # in-memory weights are no longer those of any step and training must stop (stop_on_nan or not).
        self.weights_damaged = weights_damaged


def grad_norm(acc: Any, params: list[torch.Tensor], max_norm: float | None) -> float:
    """The pre-clip global gradient norm of plain (unsharded) parameters under accelerate, clipping on the
    way when `max_norm` is set (accelerate unscales and reduces as it must)."""
    if max_norm is not None:
        return float(acc.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm() if grads else torch.zeros(()))


def lr_lambda(schedule: str, total_steps: int, warmup: int, min_ratio: float):
    """Multiplier of the base lr at optimizer step s (0-based), for LambdaLR."""

    def fn(s: int) -> float:
        if warmup > 0 and s < warmup and schedule in ("warmup", "cosine"):
            return (s + 1) / warmup
        if schedule == "cosine":
            span = max(1, total_steps - warmup)
            progress = min(1.0, (s - warmup) / span)
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return fn


def fused_adamw(params: Iterable[torch.Tensor], allowed: bool = True) -> bool:
    """Whether AdamW takes its fused kernel (`optim.fused`): every parameter a floating-point tensor on a
    CUDA device. One kernel launch updates them all, where torch's default (foreach) launches several per
    group of tensors; the update is the same up to rounding. Elsewhere (CPU, a mixed placement) torch's
    default is kept: the CPU is not what this setting is for, and its results stay those of every earlier run."""
    params = list(params)
    return allowed and bool(params) and all(p.device.type == "cuda" and p.is_floating_point() for p in params)


def build_optimizer(
    params: Iterable[torch.nn.Parameter], optim: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused on CUDA: `fused_adamw`) and its lr schedule. The scheduler is never given to
    accelerate's prepare(), which would step it once per process."""
    params = list(params)
    fused = {"fused": True} if fused_adamw(params, optim.fused) else {}
    optimizer = torch.optim.AdamW(
        params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay, **fused
    )
    warmup = optim.warmup_steps or round(optim.warmup_ratio * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(optim.schedule, total_steps, warmup, optim.min_lr_ratio)
    )
    return optimizer, schedule


LOCK_FILE = ".opd-run.lock"
_HELD: dict[Path, list[int]] = {}  # run directories this process holds: [fd, holders]


def lock_run_dir(run_dir: Path, command: str) -> Path:
    """Make this process the one writer of `run_dir` (call on the main process only); returns the key
    for `unlock_run_dir`.

    A second trainer on the same directory (`opd train --resume RUN` while RUN trains, or two runs
    started together) used to run beside the first and leave one run's config and metrics next to the
    other's checkpoints. The lock is an exclusive `flock` on RUN_DIR/.opd-run.lock: the kernel releases
    it when the holding process ends, however it ends (SIGKILL included), so a lock left by a killed
    run is free again without anyone deciding it is stale. The file names the holder (pid, host,
    command, start time) for the refusal. Taking the lock again in the same process (a library user
    resuming in-process) shares it. Needs a filesystem with working `flock` (local disks do; some
    network filesystems ignore it, and then no second writer is detected).
    """
    key = Path(run_dir).resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock, as before
        return key
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode("utf-8", "replace")
        os.close(fd)
        try:
            h = json.loads(holder)
            who = f"pid {h['pid']} on {h['host']} ({h['command']}, started {h['started']})"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        raise ConfigError(
            f"{run_dir} is in use by {who}: one run directory takes one trainer at a time. Wait for it to "
            f"finish (or stop it), then `{command} --resume {run_dir}`; or choose another run_dir "
            "(nothing was written)"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }).encode())  # fmt: skip
    _HELD[key] = [fd, 1]
    return key


def unlock_run_dir(key: Path | None) -> None:
    """Let go of a `lock_run_dir` lock (the last holder in this process releases it); None: nothing."""
    if key is None or key not in _HELD:
        return
    _HELD[key][1] -= 1
    if _HELD[key][1] <= 0:
        fd = _HELD.pop(key)[0]
        os.close(fd)  # closing the only descriptor releases the flock


def refuse_to_overwrite(run_dir: Path, command: str) -> None:
    """A new run into a directory that holds checkpoints would mix two runs' files: refuse, nothing written."""
    if ckpt.list_checkpoints(run_dir):
        raise ConfigError(
            f"{run_dir} already holds checkpoints: resume it with `{command} --resume {run_dir}` "
            "or choose another run_dir (nothing was overwritten)"
        )


def finished_run(run_dir: Path, *, steps: int | None, save_final: bool, command: str) -> str | None:
    """The one line a `--resume` of a run with nothing left to do prints instead of training, or None.

    Finished: the newest checkpoint is whole and at the run's total (`steps` when given, else the total
    its state.json recorded), and RUN_DIR/final is there (unless `save_final` is off). Decided from the
    files alone, before any model loads, so such a resume changes nothing on disk (no rewritten final/,
    config.yaml or metrics.jsonl). A run whose final model is missing is not finished: the resume writes it.
    """
    import json

    found = ckpt.list_checkpoints(run_dir)
    if not found:
        return None
    step, path = found[-1]
    if ckpt.checkpoint_problem(path, load=False) is not None:
        return None  # the resume skips it and says why
    try:
        recorded = json.loads((path / ckpt.COMPLETE).read_text(encoding="utf-8")).get("total_steps")
    except (OSError, ValueError, AttributeError):
        return None
    total = steps if steps is not None else recorded
    if not isinstance(total, int) or step < total:
        return None
    final = run_dir / "final"
    if save_final and not final.is_dir():
        return None
    where = f"final model: {final}" if final.is_dir() else f"save_final is off; last checkpoint: {path}"
    return (f"{run_dir} already finished at step {step}/{total}; nothing to do ({where}). To train further, "
            f"raise --steps: `{command} --resume {run_dir} --steps {2 * step}`")  # fmt: skip


def resumable_checkpoint(run_dir: Path, log: Callable[[str], Any]) -> Path:
    """The newest whole checkpoint, after setting each newer damaged one aside (`ckpt.set_aside`) and
    logging where it now is.

    A run killed while a disk filled, or a checkpoint cut short by a copy, must not end a resume with
    a safetensors/torch traceback when the checkpoint before it is complete (opd.train.checkpoint). The
    damaged one is renamed, not left as step_N: the resumed run writes step N again and would replace
    it. Only the main process (global rank 0) renames; the others skip the same checkpoints, since
    whether one is damaged depends on its files alone (one being renamed under them reads as missing)."""
    import torch.distributed as dist

    path, skipped = ckpt.resumable_checkpoint(run_dir)
    main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    for bad, why in skipped:
        if main:
            kept = ckpt.set_aside(bad)
            log(f"[yellow]warning:[/] skipped damaged checkpoint {bad}: {why}; moved to {kept} (kept, not used; "
                "the steps after the checkpoint resumed from are trained again)")  # fmt: skip
    return path


def open_metrics(run_dir: Path, tracking: TrackingConfig, *, main: bool, config: dict[str, Any],
                 resume_step: int | None) -> MetricsLogger:  # fmt: skip
    """The run's metrics sink (metrics.jsonl cut back to `resume_step`, TensorBoard, W&B): main process only."""
    return MetricsLogger(
        run_dir, enabled=main, tensorboard=tracking.tensorboard, wandb=tracking.wandb,
        wandb_project=tracking.wandb_project, run_name=tracking.run_name, config=config, resume_step=resume_step,
    )  # fmt: skip


def write_final_model(acc: Any, run_dir: Path, write: Callable[[Path], None], need: int,
                      last_checkpoint: Path | None, command: str) -> Path:  # fmt: skip
    """RUN_DIR/final from `write` (called on the main process only, into a temporary directory swapped
    into place when complete); a refused write (disk full, ...) raises StorageError on every process,
    naming the free space needed and how `command --resume` writes it again. `need`: bytes, roughly."""
    out = run_dir / "final"
    error = None
    if acc.is_main_process:
        last = last_checkpoint or ckpt.latest_checkpoint(run_dir)
        try:
            ckpt.save_model_dir(out, write, need=need, last_good=str(last) if last is not None else "none")
        except StorageError as exc:
            hint = f"`{command} --resume {run_dir}` writes it again" if last is not None else "rerun"
            error = StorageError(f"{exc}; free space, then {hint}")
    ckpt.raise_if_write_failed(acc, error)
    acc.wait_for_everyone()
    return out


def save_step(acc: Any, run_dir: Path, step: int, *, model: torch.nn.Module, optimizer: Any, scheduler: Any,
              state: dict[str, Any], keep: int, command: str, sharded: bool = False) -> Path:  # fmt: skip
    """Checkpoint `step` (`opd.train.checkpoint.save_checkpoint`, main process) with the loop's own `state`;
    a refused write (disk full, ...) raises StorageError on every process, naming the path, the free space,
    the size needed and `command --resume`. `sharded`: gather the FSDP2 shards first (every process takes
    part). Returns the checkpoint's path on every process."""
    model_state = optimizer_state = None
    if sharded:  # gathering the shards is collective
        from opd.train.sharding import full_model_state, full_optimizer_state

        model_state, optimizer_state = full_model_state(model), full_optimizer_state(model, optimizer)
    path = error = None
    if acc.is_main_process:
        try:
            path = ckpt.save_checkpoint(
                run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, state=state, keep=keep,
                model_state=model_state, optimizer_state=optimizer_state,
            )  # fmt: skip
        except StorageError as exc:
            error = StorageError(f"{exc}; free space, then resume with `{command} --resume {run_dir}`")
    ckpt.raise_if_write_failed(acc, error)
    acc.wait_for_everyone()
    return path or ckpt.checkpoint_path(run_dir, step)


def save_final_model(acc: Any, run_dir: Path, model: torch.nn.Module, tokenizer: Any, *,
                     last_checkpoint: Path | None, command: str, sharded: bool = False,
                     architecture: str | None = None, merge_lora: bool = False) -> Path:  # fmt: skip
    """`model` and `tokenizer` as a Hugging Face model in RUN_DIR/final (`write_final_model`: swapped in only
    when complete). `sharded`: gather the FSDP2 shards (collective) and write the `architecture` class name
    back into config.json; `merge_lora`: merge the LoRA adapters into a copy first."""
    full = None
    if sharded:
        from opd.train.sharding import full_model_state

        full = full_model_state(model)
    if acc.is_main_process and merge_lora:
        import copy

        model = copy.deepcopy(model).merge_and_unload()

    def write(tmp: Path) -> None:
        if full is not None:
            from opd.train.sharding import restore_architecture

            model.save_pretrained(tmp, safe_serialization=True, state_dict=full)
            restore_architecture(tmp, architecture or type(model).__name__)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    need = ckpt.state_nbytes(full if full is not None else model.state_dict()) if acc.is_main_process else 0
    return write_final_model(acc, run_dir, write, need, last_checkpoint, command)


# ----------------------------------------------------------------------------------------------------
# the loop


class Steps(Protocol):
    """What `run_steps` drives: OPD's and SFT's trainers each say what one step is and when to save."""

    acc: Any
    cfg: Any  # the run's config; its dist_timeout_s (if it has one) times the collectives
    start_step: int
    total_steps: int
    log: Callable[[str], Any]

    def run_step(self, step: int) -> dict[str, float] | None:
        """Train step `step` and log its metrics; None when the step was skipped (no metrics)."""

    def checkpoint_due(self, step: int, metrics: dict[str, float]) -> bool:
        """After the step's own bookkeeping (evaluation, alarms): checkpoint it now?"""

    def save(self, step: int) -> Any: ...

    def save_final(self) -> Any: ...


def run_steps(loop: Steps, *, hint: str, save_final: bool,
              on_step: Callable[[int, dict[str, float]], Any] | None = None) -> list[dict[str, float]]:  # fmt: skip
    """Steps start_step+1 .. total_steps, then the final model; returns the metrics of the steps run.

    SIGINT/SIGTERM let the current step finish; then every process stops after the same step (the
    request is all-reduced at step boundaries, so no rank is left waiting in a collective), that step is
    checkpointed unless it already is, and `InterruptedRun` (exit 130) names `hint`, the command that
    continues. A second signal exits at once (the atomic checkpoints already on disk stay usable). A
    request during the last step still writes the final model: the run is complete.
    """
    from opd.progress import StopRequests

    apply_dist_timeout(loop.acc, getattr(loop.cfg, "dist_timeout_s", None))
    history: list[dict[str, float]] = []
    saved = loop.start_step  # the last step whose checkpoint is on disk (0: none)
    with StopRequests(loop.log, lambda: f"resume from the last checkpoint with: {hint}") as stop:
        for step in range(loop.start_step + 1, loop.total_steps + 1):
            if stop_agreed(loop.acc, stop):
                stop_after(step - 1, saved, hint, loop.save)
            metrics = loop.run_step(step)
            if metrics is None:
                continue
            history.append(metrics)
            if on_step is not None:
                on_step(step, metrics)
            if loop.checkpoint_due(step, metrics):
                loop.save(step)
                saved = step
        if save_final:
            loop.save_final()
    return history


# ----------------------------------------------------------------------------------------------------
# stopping on a signal


def stop_after(done: int, saved: int, hint: str, save: Callable[[int], Any]) -> None:
    """Every process agreed to stop after step `done`: checkpoint it unless it is on disk, then raise
    `InterruptedRun` (exit 130) naming the command that continues the run."""
    if done == 0:
        raise InterruptedRun(
            "interrupted before the first step finished; nothing to resume: rerun the same command"
        )
    if saved != done:
        save(done)
    raise InterruptedRun(f"interrupted after step {done}; resume with: {hint}")


# ----------------------------------------------------------------------------------------------------
# multi-process runs: fail fast, agree on a stop, end in order

DIST_TIMEOUT_ENV = "OPD_DIST_TIMEOUT"
CPU_DIST_TIMEOUT_S = 600.0
GPU_DIST_TIMEOUT_S = 3600.0


def dist_timeout_s(acc: Any, setting: float | None = None) -> float | None:
    """Seconds a collective may wait for the other processes before this one fails (None: torch's own).

    ``OPD_DIST_TIMEOUT`` (seconds; 0 or less: torch's default) wins, then `setting` (the config's
    ``dist_timeout_s``), then the default of the device: 10 minutes on CPU (gloo, instead of torch's 30, so
    a rank that hangs leaves the others failing within minutes; a rank that dies ends the job within
    seconds either way, torchrun stops the rest), 60 minutes on a GPU (NCCL). The group's timeout covers
    the whole run, not raised around phases: every wait for the main process alone (in-loop evaluation,
    the engine teacher's fidelity reference, a checkpoint or the final model written) is at a barrier
    whose length opd cannot bound (problems x samples x tokens, disk speed), and several of those
    barriers are outside the loop (`evaluate` at step 0, the start-up checks). torch's NCCL default of
    10 minutes killed the waiting ranks; an hour outlasts a paper-sized evaluation with HF generate.
    """
    raw = os.environ.get(DIST_TIMEOUT_ENV)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(
                f"{DIST_TIMEOUT_ENV}={raw!r} is not a number of seconds; unset it to use dist_timeout_s"
            ) from None
        return value if value > 0 else None
    if setting is not None:
        return float(setting)
    return CPU_DIST_TIMEOUT_S if acc.device.type == "cpu" else GPU_DIST_TIMEOUT_S


def apply_dist_timeout(acc: Any, setting: float | None) -> None:
    """Put `dist_timeout_s(acc, setting)` on the default process group (no-op for one process).

    `setting`: the run config's ``dist_timeout_s`` (None: the device's default)."""
    import torch.distributed as dist

    seconds = dist_timeout_s(acc, setting)
    if seconds is None or acc.num_processes <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    from datetime import timedelta

    try:
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(timedelta(seconds=seconds))
    except (ImportError, AttributeError, RuntimeError, ValueError):  # a torch without it: keep its default
        pass


# ----------------------------------------------------------------------------------------------------
# the CUDA caching allocator and what a run chose for its device

ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
# Every variable torch reads its allocator settings from (PYTORCH_ALLOC_CONF first, torch >= 2.9): any of
# them set means the user chose, and opd leaves the allocator alone.
ALLOC_CONF_ENVS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"
_allocator: dict[str, Any] = {}  # what `configure_cuda_allocator` decided in this process


def allocator_choice(*, cuda: bool, allowed: bool, engine_in_process: bool, cuda_started: bool,
                     environ: Mapping[str, str]) -> tuple[str | None, str]:  # fmt: skip
    """(the value to give PYTORCH_CUDA_ALLOC_CONF, or None to leave it; why) for a training process.

    expandable_segments:True lets the caching allocator grow a segment in place instead of reserving new
    blocks, so memory freed by one step's long rollouts is reused by the next step's differently shaped
    ones instead of fragmenting (the OOM hint torch itself prints). Only on CUDA, only when the user set
    no allocator variable (`environ`), only before CUDA starts (the allocator reads it once), and never
    with a vLLM engine in the process (`engine_in_process`): vLLM's memory pool and its sleep mode refuse
    expandable segments, and the engine's memory is accounted as a share of the GPU."""
    if not allowed:
        return None, "expandable_segments false"
    if not cuda:
        return None, "no CUDA device: the CUDA allocator is not used"
    user = [name for name in ALLOC_CONF_ENVS if environ.get(name)]
    if user:
        return None, f"{user[0]} is set ({environ[user[0]]!r}): left as the user chose"
    if engine_in_process:
        return None, "a vLLM engine shares the process (rollout.backend or teacher.backend vllm)"
    if cuda_started:
        return None, "CUDA had already started in this process: the allocator's settings are fixed"
    return EXPANDABLE_SEGMENTS, f"set by opd (expandable_segments true, {ALLOC_CONF_ENV} was unset)"


def configure_cuda_allocator(*, allowed: bool, engine_in_process: bool,
                             environ: MutableMapping[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Apply `allocator_choice` for this process (call before anything touches CUDA: `opd train` does at
    its start, before the accelerator); returns and remembers the choice for RUN_DIR/device.json. The
    variable is inherited by the processes this one starts."""
    env = os.environ if environ is None else environ
    value, why = allocator_choice(
        cuda=torch.cuda.is_available(), allowed=allowed, engine_in_process=engine_in_process,
        cuda_started=torch.cuda.is_initialized(), environ=env,
    )  # fmt: skip
    if value is not None:
        env[ALLOC_CONF_ENV] = value
    choice = {"set_by_opd": value is not None, "why": why}
    if environ is None:
        _allocator.clear()
        _allocator.update(choice)
    return choice


def device_choices(
    acc: Any, *, tf32: dict[str, Any], optimizer: Any, dist_timeout: float | None
) -> dict[str, Any]:
    """What the run chose for speed on its device, for RUN_DIR/device.json: the TF32 choice
    (`opd.precision.apply_tf32`), whether AdamW is fused, the CUDA allocator's settings (and whether opd
    set them) and the collective timeout (`dist_timeout` is the config's ``dist_timeout_s``)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    env = {name: os.environ[name] for name in ALLOC_CONF_ENVS if name in os.environ}
    allocator = dict(_allocator) or {"set_by_opd": False, "why": "not configured by opd in this process"}
    return {
        "device": str(acc.device),
        "processes": int(acc.num_processes),
        "tf32": tf32,
        "fused_adamw": bool(inner.defaults.get("fused")),
        "cuda_allocator": {"env": env, **allocator},
        "dist_timeout_s": dist_timeout_s(acc, dist_timeout) if acc.num_processes > 1 else None,
    }


def stop_agreed(acc: Any, stop: Any) -> bool:
    """Whether any process got a stop request (one all-reduce per step on several processes): all of
    them then stop after the same step, so none waits in a collective the others never join."""
    requested = stop.requested is not None
    if acc.num_processes <= 1:
        return requested
    flag = torch.tensor(float(requested), dtype=torch.float64, device=acc.device)
    return float(reduce_sum(acc, flag)) > 0


def release_distributed(acc: Any, owner: Any, attr: str, *, ok: bool, destroy: bool = True) -> None:
    """Replace ``owner.<attr>`` (a DDP-wrapped model) by the bare model, drop accelerate's references,
    collect the freed Reducer, barrier (only when ``ok``: after an error on one process the others may
    never arrive), then destroy the default process group (unless ``destroy`` is false)."""
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    model = getattr(owner, attr, None)
    if model is not None:
        setattr(owner, attr, acc.unwrap_model(model))
    for name in ("_models", "_optimizers", "_schedulers", "_dataloaders"):
        held = getattr(acc, name, None)
        if isinstance(held, list):
            held.clear()
    del model
    gc.collect()
    if ok:
        dist.barrier()
    if destroy:
        dist.destroy_process_group()
