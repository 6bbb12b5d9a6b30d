"""A real full disk at every file a checkpoint writes (issue 21): a small tmpfs is filled so that the write
of one file in turn runs out of space, whichever library writes it (safetensors for the model, torch's zip
writer for optimizer/scheduler/RNG, plain files for the manifest and the completion marker). Each must end in
the same one-line StorageError naming the checkpoint, the free space and the last good checkpoint, with the
partial write removed and the previous checkpoint untouched. Needs root (mount); skipped elsewhere."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from opd.errors import StorageError
from opd.train import checkpoint as ckpt

PAGE = 4096
WRITES = (*ckpt.FILES, ckpt.MANIFEST, ckpt.COMPLETE)  # in the order save_checkpoint writes them


@pytest.fixture
def tmpfs(tmp_path: Path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()}); needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _objs() -> tuple:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 16))  # files of several pages
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _save(run: Path, step: int, objs: tuple) -> Path:
    model, opt, sched = objs
    return ckpt.save_checkpoint(run, step, model=model, optimizer=opt, scheduler=sched, state={"s": step})


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.parametrize("target", WRITES)
def test_a_full_disk_at_each_checkpoint_file_is_one_storage_error(tmpfs: Path, target: str) -> None:
    run = tmpfs / "run"
    objs = _objs()
    good = _save(run, 1, objs)
    pages = {name: max(1, math.ceil((good / name).stat().st_size / PAGE)) for name in WRITES}
    before = sum(pages[name] for name in WRITES[: WRITES.index(target)])
    room = (before + pages[target] - 1) * PAGE  # everything before `target` fits, `target` does not
    filler = tmpfs / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * (_free_bytes(tmpfs) - room))
    assert _free_bytes(tmpfs) == room

    with pytest.raises(StorageError) as info:
        _save(run, 2, objs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert f"could not write checkpoint {ckpt.checkpoint_path(run, 2)}" in msg, msg
    assert " free on " in msg and "needs about" in msg, msg
    assert f"last good checkpoint: {good}" in msg, msg
    root = ckpt.checkpoint_dir(run)
    assert sorted(p.name for p in root.iterdir()) == [good.name], "the partial write was left behind"
    assert ckpt.checkpoint_problem(good) is None

    filler.unlink()  # space again: the same save goes through
    assert ckpt.checkpoint_problem(_save(run, 2, objs)) is None
