"""Atomic checkpoints: everything a resume needs, or nothing at all.

A checkpoint is written into a hidden temporary directory, flushed to disk, and renamed into place;
rename is atomic on POSIX, so a SIGKILL at any moment leaves either the previous complete checkpoint or
the new complete one, never a half-written one that a resume would trust. Loading never unpickles
arbitrary objects: weights are safetensors and the rest goes through `torch.load(weights_only=True)`.

A complete-looking checkpoint can still be damaged afterwards (a copy cut short, a file deleted, a disk that
lied about the flush), so every write is re-read before the rename and a resume checks each candidate,
newest first, and falls back to the newest one that is whole. A write that fails (disk full, quota,
read-only filesystem, ...) removes its temporary directory and raises `StorageError` naming the path, the
free space, the size of the state and the last complete checkpoint, instead of a library traceback.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from opd.errors import ConfigError, StorageError
from opd.files import fsync_dir

PREFIX = "step_"
COMPLETE = "state.json"  # written last inside the temporary directory
MANIFEST = "manifest.json"  # sizes of the files below, written just before COMPLETE
FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")  # what a resume loads
# A damaged checkpoint set aside at resume: damaged-step_00000003-20250101T120000Z, outside the `step_*`
# names that listing, rotation and resume look at (`set_aside`).
DAMAGED = "damaged-"
# Words of the RuntimeErrors torch/safetensors raise when the OS refused a write (torch's C++ stream says
# "basic_ios::clear: iostream error" or "file write failed", its zip writer "[enforce fail at
# inline_container.cc:...] . unexpected pos N vs M" when a short write leaves the archive behind where it
# should be; never ENOSPC): anything else is a real bug.
_WRITE_FAILURE_WORDS = (
    "iostream error", "basic_ios", "file write failed", "pytorchstreamwriter", "no space left", "disk quota",
    "read-only file system", "permission denied", "input/output error", "os error", "ioerror",
    "inline_container", "unexpected pos",
)  # fmt: skip


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


def human_bytes(n: float) -> str:
    """`1.5 GB`: sizes in error messages are read by people deciding what to delete."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # unreachable; keeps type checkers content


def state_nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict, each storage once: about what writing it needs."""
    seen: set[tuple[int, int]] = set()

    def walk(o: Any) -> int:
        if isinstance(o, torch.Tensor):
            if o.device.type == "meta":
                return 0
            try:
                key = (o.untyped_storage().data_ptr(), o.untyped_storage().nbytes())
            except (RuntimeError, NotImplementedError):  # a tensor subclass without one storage
                key = (id(o), 0)
            if key in seen:
                return 0
            seen.add(key)
            return o.numel() * o.element_size()
        if isinstance(o, dict):
            return sum(walk(v) for v in o.values())
        if isinstance(o, (list, tuple)):
            return sum(walk(v) for v in o)
        return 0

    return walk(obj)


def is_write_failure(exc: BaseException) -> bool:
    """True for the errors a refused write produces: any OSError (ENOSPC, EDQUOT, EROFS, EACCES, ...)
    and the RuntimeError/SafetensorError that torch and safetensors turn them into."""
    if isinstance(exc, OSError):
        return True
    if isinstance(exc, (RuntimeError, SafetensorError)):
        text = str(exc).lower()
        return any(w in text for w in _WRITE_FAILURE_WORDS)
    return False


def _reason(exc: BaseException) -> str:
    """An exception as a short phrase: `No space left on device [ENOSPC]`, or its first 200 characters."""
    if isinstance(exc, OSError) and exc.strerror:
        name = errno.errorcode.get(exc.errno or 0, "")
        return f"{exc.strerror}{f' [{name}]' if name else ''}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text if len(text) <= 200 else text[:197] + "..."
    # torch's C++ streams lose the errno ("basic_ios::clear: iostream error"): say what it means
    return f"the write failed ({text})" if isinstance(exc, (RuntimeError, SafetensorError)) else text


def free_space(path: Path) -> tuple[Path, int | None]:
    """Free bytes on the filesystem holding `path` (its nearest existing ancestor), None if unknown."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return probe, shutil.disk_usage(probe).free
    except OSError:
        return probe, None


def storage_error(
    what: str, path: Path, exc: BaseException, need: int | None, last_good: str
) -> StorageError:
    """The one-line StorageError for a failed write of `what` at `path` (temporary files already gone)."""
    probe, free = free_space(path)
    space = f"{human_bytes(free)} free on {probe}" if free is not None else f"free space on {probe} unknown"
    needs = f", the {what} needs about {human_bytes(need)}" if need else ""
    return StorageError(
        f"could not write {what} {path}: {_reason(exc)}; {space}{needs}; the partial write was removed; "
        f"last good checkpoint: {last_good}"
    )


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


def _safetensors_problem(f: Path) -> str | None:
    """Parse the header and check the file holds exactly the bytes it announces (truncation shows)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes, not even a header)"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"is truncated ({size} bytes, its header alone announces {n})"
        try:
            header = json.loads(fh.read(n))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            return "has an unreadable header"
    expected = 8 + n + end
    if size < expected:
        return f"is truncated ({size} of {expected} bytes)"
    if size > expected:
        return f"is damaged ({size - expected} bytes more than its header announces)"
    return None


def _torch_file_problem(f: Path, load: bool) -> str | None:
    """A torch.save file is a zip whose directory sits at its end, so truncation breaks the directory;
    with `load`, the contents must also unpickle under weights_only=True (mmap: no copy of the tensors)."""
    size = f.stat().st_size
    try:
        with zipfile.ZipFile(f) as z:
            if any(i.header_offset + i.compress_size > size for i in z.infolist()):
                return f"is truncated ({size} bytes)"
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"is truncated or damaged ({size} bytes; {_reason(exc)})"
    if not load:
        return None
    try:
        torch.load(f, weights_only=True, map_location="cpu", mmap=True)
    except Exception:
        try:  # mmap is an optimisation; only a plain load failing says the file is damaged
            torch.load(f, weights_only=True, map_location="cpu")
        except Exception as exc:
            return f"cannot be loaded ({_reason(exc)})"
    return None


def checkpoint_problem(path: str | Path, *, load: bool = True) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it is whole.

    Checks, without touching any model: state.json parses, every file a resume loads is present with the
    size recorded in manifest.json (older checkpoints have none), safetensors headers parse and match the
    file size, torch files are complete archives and (``load``) unpickle with weights_only=True.
    """
    path = Path(path)
    try:
        int(json.loads((path / COMPLETE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{COMPLETE} is unreadable ({_reason(exc)})"
    sizes: dict[str, Any] = {}
    if (path / MANIFEST).is_file():
        try:
            sizes = {k: int(v["size"]) for k, v in json.loads((path / MANIFEST).read_text())["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"{MANIFEST} is unreadable ({_reason(exc)})"
    for name in FILES:
        try:
            problem = _file_problem(path / name, sizes.get(name), load)
        except OSError as exc:  # unreadable, or set aside by the main process while another one checks it
            problem = f"cannot be read ({_reason(exc)})"
        if problem is not None:
            return f"{name} {problem}"
    return None


def _file_problem(f: Path, want: int | None, load: bool) -> str | None:
    """Why one file of a checkpoint cannot be resumed from (`want`: its size in the manifest), or None."""
    if not f.is_file():
        return "is missing"
    size = f.stat().st_size
    if want is not None and size != want:
        return f"is {'truncated' if size < want else 'damaged'} ({size} bytes, {want} were written)"
    return _safetensors_problem(f) if f.name.endswith(".safetensors") else _torch_file_problem(f, load)


def last_whole_checkpoint(run_dir: str | Path) -> str:
    """The newest checkpoint that passes the structural checks, as text for a message ("none" if none)."""
    for _, path in reversed(list_checkpoints(run_dir)):
        if checkpoint_problem(path, load=False) is None:
            return str(path)
    return "none"


def resumable_checkpoint(run_dir: str | Path) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest whole checkpoint of `run_dir` and the newer ones skipped, each with why.

    A damaged checkpoint is never deleted (it may be all a user has of those steps) and not moved here;
    a training resume (`opd.train.loop.resumable_checkpoint`) sets it aside (`set_aside`) before the
    resumed run writes a fresh one of that step. Raises ConfigError, one line listing every checkpoint and
    its problem, when none is whole; nothing is moved then.
    """
    ckpts = list_checkpoints(run_dir)
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(ckpts):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    root = checkpoint_dir(run_dir)
    if not skipped:
        raise ConfigError(f"--resume {run_dir}: no complete checkpoint found in {root}")
    why = "; ".join(f"{p.name}: {problem}" for p, problem in skipped)
    raise ConfigError(
        f"--resume {run_dir}: no usable checkpoint in {root} ({why}); they were left untouched: restore one "
        "from a copy or start a new run_dir"
    )


def set_aside(path: Path) -> Path:
    """Rename the damaged checkpoint `path` to ``damaged-<name>-<UTC time>`` beside it (``-2``, ``-3`` ...
    when taken) and return the new path.

    Left as ``step_N``, it would be replaced by the resumed run's fresh checkpoint of step N (or pruned by
    keep-last-N rotation once older than the kept ones); under its new name nothing opd writes or prunes
    touches it. Raises StorageError, before any training, when the rename is refused.
    """
    base = path.with_name(f"{DAMAGED}{path.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    dest, i = base, 2
    while dest.exists():  # os.rename would replace an empty directory of that name
        dest, i = base.with_name(f"{base.name}-{i}"), i + 1
    try:
        os.rename(path, dest)
        fsync_dir(path.parent)
    except OSError as exc:
        raise StorageError(
            f"could not set the damaged checkpoint {path} aside as {dest}: {_reason(exc)}; the resumed run "
            "would overwrite it when it writes that step again: move or copy it elsewhere, then resume again"
        ) from exc
    return dest


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
    name-keyed `optimizer_state` (opd.train.sharding), which are written instead of `model`/`optimizer`'s.

    The files are re-read (headers, archive directories, sizes) before the rename, so a checkpoint that
    becomes visible is one a resume accepts. A refused write raises StorageError after removing the
    temporary directory; the previous checkpoints are untouched, since rotation only runs after success.
    """
    root = checkpoint_dir(run_dir)
    final = checkpoint_path(run_dir, step)
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    osd = optimizer_state if optimizer_state is not None else optimizer.state_dict()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if model_state is not None:
            save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        else:
            save_model(model, str(tmp / "model.safetensors"))
        torch.save(osd, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        sizes = {name: {"size": (tmp / name).stat().st_size} for name in FILES}
        with open(tmp / MANIFEST, "w") as fh:
            json.dump({"files": sizes}, fh, indent=1)
        with open(tmp / COMPLETE, "w") as fh:
            json.dump({**state, "step": step}, fh, indent=1)
        _fsync_tree(tmp)
        # Re-read what was written: a filesystem that accepted short writes must not yield a checkpoint.
        problem = checkpoint_problem(tmp, load=False)
        if problem is not None:
            raise OSError(f"the written checkpoint does not read back: {problem}")
        # re-saving a step after a resume: the old one is moved out of the way first
        _swap_into_place(tmp, final, root / f".old-{final.name}-{os.getpid()}")
        fsync_dir(root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_failure(exc):
            raise
        weights = model_state if model_state is not None else model.state_dict()
        need = state_nbytes(weights) + state_nbytes(osd)
        raise storage_error("checkpoint", final, exc, need, last_whole_checkpoint(run_dir)) from exc
    # Rotation counts back from the step just written: a newer one on disk is a damaged leftover that a
    # resume skipped, and it must not push the fresh checkpoint (or the ones before it) out.
    older = [path for s, path in list_checkpoints(run_dir) if s < step]
    for path in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in root.glob(".tmp-*"):
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def _swap_into_place(tmp: Path, dest: Path, old: Path) -> None:
    """Rename `tmp` to `dest`; an existing `dest` is parked at `old` and restored if the rename fails, so
    `dest` is always either the previous or the new directory."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    if old.exists():
        shutil.rmtree(old)
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_model_dir(
    out: str | Path, write: Callable[[Path], Any], *, need: int | None = None, last_good: str = "none"
) -> Path:
    """Write a model directory (`write(tmp)`: save_pretrained and friends) next to `out`, re-read its
    safetensors headers, then swap it into place, so `out` is always either the old or the new model.

    A refused write (disk full, ...) removes the temporary directory, keeps any previous `out`, and raises
    StorageError naming `out`, the free space, `need` (bytes, roughly) and `last_good`.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    old = out.with_name(f".{out.name}.old")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        write(tmp)
        for f in sorted(tmp.glob("*.safetensors")):
            problem = _safetensors_problem(f)
            if problem is not None:
                raise OSError(f"the written model does not read back: {f.name} {problem}")
        _fsync_tree(tmp)
        _swap_into_place(tmp, out, old)
        fsync_dir(out.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_failure(exc):
            raise
        raise storage_error("final model", out, exc, need, last_good) from exc
    return out


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
        from opd.train import sharding

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


def raise_if_write_failed(acc: Any, error: StorageError | None) -> None:
    """Only the main process writes; with several processes they agree on its failure (one all-reduce)
    so the others stop too instead of waiting for it forever in the next collective."""
    if acc.num_processes > 1:
        from opd.device import reduce_sum

        flag = torch.tensor(float(error is not None), device=acc.device)
        if float(reduce_sum(acc, flag)) and error is None:
            error = StorageError("the main process failed to write to disk (its message says why)")
    if error is not None:
        raise error
