"""Atomic checkpoints: everything a resume needs, or nothing at all.

A checkpoint is written into a hidden temporary directory, flushed to disk, and renamed into place;
rename is atomic on POSIX, so a SIGKILL at any moment leaves either the previous complete checkpoint or
the new complete one, never a half-written one that a resume would trust. Loading never unpickles
arbitrary objects: weights are safetensors and the rest goes through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from opd.errors import ConfigError

PREFIX = "step_"
COMPLETE = "state.json"  # written last inside the temporary directory


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives (complete or not yet written)."""
    return checkpoint_dir(run_dir) / f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first; temporary leftovers of a killed write are ignored."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(PREFIX) and (d / COMPLETE).is_file():
            try:
                found.append((int(d.name[len(PREFIX) :]), d))
            except ValueError:
                continue
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint written where more (or fewer) GPUs were visible restores the devices both have.
        for i, gpu_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, i)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int = 2,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write step `step` atomically. A sharded (FSDP) student passes its gathered full `model_state` and
    name-keyed `optimizer_state` (opd.sharding), which are written instead of `model`/`optimizer`'s."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if model_state is not None:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    else:
        save_model(model, str(tmp / "model.safetensors"))
    torch.save(
        optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt"
    )
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    with open(tmp / COMPLETE, "w") as fh:
        json.dump({**state, "step": step}, fh, indent=1)
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step after a resume: move the old one out of the way first
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in root.glob(".tmp-*"):
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    sharded: bool = False,
) -> dict[str, Any]:
    path = Path(path)
    state = json.loads((path / COMPLETE).read_text())
    was_sharded = state.get("sharding", "none") == "fsdp"
    if was_sharded != sharded:
        raise ConfigError(
            f"{path} was written by a run with sharding {'fsdp' if was_sharded else 'none'}; resume it with the "
            "same sharding setting (the optimizer state layouts differ)"
        )
    if sharded:
        from opd import sharding

        sharding.load_full_model_state(model, load_file(str(path / "model.safetensors")))
        if optimizer is not None:
            osd = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            sharding.load_full_optimizer_state(model, optimizer, osd)
    else:
        load_model(model, str(path / "model.safetensors"), strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(
                torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            )
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True, map_location="cpu"))
    return state
