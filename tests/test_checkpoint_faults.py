"""Checkpoint faults end in one clear line and lose nothing.

A damaged newest checkpoint (truncated weights, a missing or truncated optimizer state) must not stop a
resume when an older checkpoint is whole: the resume names what it skipped and continues exactly as an
uninterrupted run. A write the disk refuses (ENOSPC, or the RuntimeError torch turns it into) must raise
StorageError naming the path and the free space, leave no temporary directory, and keep the previous
checkpoint. Settings opd clamps on the user's behalf are warned about and recorded in the run directory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from opd import files
from opd.config import load_config
from opd.errors import ConfigError, StorageError
from opd.models.tiny import save_tiny_pair
from opd.train import checkpoint as ckpt
from opd.train.sft import SFTConfig, SFTTrainer
from opd.train.trainer import OPDTrainer

# --------------------------------------------------------------------------------------------------------
# helpers


def _objs(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _save(run: Path, step: int, objs: tuple) -> Path:
    model, opt, sched = objs
    return ckpt.save_checkpoint(run, step, model=model, optimizer=opt, scheduler=sched, state={"s": step})


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGES = {
    "truncated_model": lambda d: _truncate(d / "model.safetensors"),
    "missing_optimizer": lambda d: (d / "optimizer.pt").unlink(),
    "truncated_optimizer": lambda d: _truncate(d / "optimizer.pt"),
}
REASONS = {
    "truncated_model": "model.safetensors is truncated",
    "missing_optimizer": "optimizer.pt is missing",
    "truncated_optimizer": "optimizer.pt is truncated",
}


def _args(pair: dict[str, Path], run_dir: Path, **extra: Any) -> list[str]:
    base = {
        "student": str(pair["student"]), "teacher": str(pair["teacher"]), "prompts": str(pair["prompts"]),
        "run_dir": str(run_dir), "prompts_per_step": 4, "micro_batch_size": 8, "rollout.rollouts_per_prompt": 2,
        "rollout.max_new_tokens": 8, "rollout.batch_size": 2, "optim.lr": 1e-3, "steps": 3,
        "checkpoint_every": 1, "tracking.tensorboard": False, "diagnostics.k": 8, "loss.k": 8,
        "startup_checks": False,
    }  # fmt: skip
    base.update(extra)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def _trainer(
    cfg_args: list[str], logs: list[str], *, resume: bool = False, config: Path | None = None
) -> OPDTrainer:
    t = OPDTrainer(load_config(config, cfg_args), resume=resume, log=logs.append)
    t.setup()
    return t


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and r.get("kind", "train") == "train"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def base_run(pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 3-step run: checkpoints of steps 2 and 3 (keep_checkpoints=2) and final/."""
    run = tmp_path_factory.mktemp("base") / "run"
    _trainer(_args(pair, run), []).train()
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 3]
    return run


# --------------------------------------------------------------------------------------------------------
# damaged checkpoints: the checkpoint module


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path, damage: str) -> None:
    objs = _objs(0)
    _save(tmp_path, 1, objs)
    newest = _save(tmp_path, 2, objs)
    assert ckpt.checkpoint_problem(newest) is None
    DAMAGES[damage](newest)
    path, skipped = ckpt.resumable_checkpoint(tmp_path)
    assert path.name == "step_00000001"
    assert [(p.name, REASONS[damage] in why) for p, why in skipped] == [("step_00000002", True)]
    assert newest.is_dir(), "a damaged checkpoint is never deleted"
    # and the fallback loads cleanly
    m2, o2, s2 = _objs(1)
    assert ckpt.load_checkpoint(path, model=m2, optimizer=o2, scheduler=s2)["step"] == 1


def test_damage_is_found_without_a_manifest(tmp_path: Path) -> None:
    """Checkpoints written before manifests existed are still checked from the files' own structure."""
    objs = _objs(0)
    a, b = _save(tmp_path, 1, objs), _save(tmp_path, 2, objs)
    for d in (a, b):
        (d / ckpt.MANIFEST).unlink()
    _truncate(a / "model.safetensors", 0.9)
    _truncate(b / "optimizer.pt", 0.9)
    assert "model.safetensors is truncated" in ckpt.checkpoint_problem(a)
    assert "optimizer.pt is truncated" in ckpt.checkpoint_problem(b)


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path: Path) -> None:
    objs = _objs(0)
    a, b = _save(tmp_path, 1, objs), _save(tmp_path, 2, objs)
    (a / "optimizer.pt").unlink()
    _truncate(b / "model.safetensors")
    with pytest.raises(ConfigError) as info:
        ckpt.resumable_checkpoint(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "no usable checkpoint" in msg
    assert (
        "step_00000002: model.safetensors is truncated" in msg
        and "step_00000001: optimizer.pt is missing" in msg
    )
    assert a.is_dir() and b.is_dir()


def test_rotation_never_evicts_the_fresh_checkpoint_for_a_damaged_newer_one(tmp_path: Path) -> None:
    objs = _objs(0)
    model, opt, sched = objs
    _save(tmp_path, 1, objs)
    damaged = _save(tmp_path, 4, objs)
    (damaged / "optimizer.pt").unlink()
    ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, state={}, keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4]
    assert ckpt.resumable_checkpoint(tmp_path)[0].name == "step_00000002"


# --------------------------------------------------------------------------------------------------------
# damaged checkpoints: `opd train --resume`


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_falls_back_and_matches_the_uninterrupted_run(
    pair: dict[str, Path], base_run: Path, tmp_path: Path, damage: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    want_final = load_file(base_run / "final" / "model.safetensors")
    want_losses = _losses(base_run)
    newest = ckpt.checkpoint_path(run, 3)
    DAMAGES[damage](newest)
    shutil.rmtree(run / "final")

    logs: list[str] = []
    t = _trainer(["--run_dir", str(run)], logs, resume=True, config=run / "config.yaml")
    skipped = [m for m in logs if "skipped damaged checkpoint" in m]
    assert len(skipped) == 1 and "step_00000003" in skipped[0] and REASONS[damage] in skipped[0], logs
    assert any("resumed from" in m and "step_00000002" in m for m in logs), logs
    assert t.start_step == 2
    aside = list(ckpt.checkpoint_dir(run).glob(ckpt.DAMAGED + "step_00000003-*"))
    assert not newest.exists() and len(aside) == 1, "the damaged checkpoint is set aside under another name"
    t.train()

    got = load_file(run / "final" / "model.safetensors")
    for k in want_final:
        torch.testing.assert_close(got[k], want_final[k], atol=0, rtol=0)
    assert _losses(run) == want_losses
    assert ckpt.checkpoint_problem(ckpt.checkpoint_path(run, 3)) is None  # step 3 rewritten whole


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "opd.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_cli_resume_with_every_checkpoint_damaged_is_one_line_exit_2(base_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    _truncate(ckpt.checkpoint_path(run, 3) / "optimizer.pt")
    (ckpt.checkpoint_path(run, 2) / "model.safetensors").unlink()
    res = _cli(["train", "--resume", str(run)])
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Traceback" not in out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no usable checkpoint" in errors[0], out
    assert "step_00000003: optimizer.pt is truncated" in errors[0]
    assert "step_00000002: model.safetensors is missing" in errors[0]


# --------------------------------------------------------------------------------------------------------
# disk full while writing


WRITE_FAILURES = {
    "ENOSPC": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "iostream": lambda: RuntimeError("basic_ios::clear: iostream error"),
    "file_write_failed": lambda: RuntimeError(
        "[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/0: "
        "file write failed"
    ),
}


def _failing_torch_save(monkeypatch: pytest.MonkeyPatch, exc: BaseException, target: str = "optimizer.pt"):
    """torch.save that writes half a file for `target` and then fails, as a full disk does mid-write."""
    real = torch.save

    def fake(obj: Any, f: Any, *a: Any, **kw: Any) -> None:
        if Path(f).name == target:
            Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 64)
            raise exc
        real(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", fake)


@pytest.mark.parametrize("failure", list(WRITE_FAILURES))
def test_disk_full_during_a_checkpoint_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    objs = _objs(0)
    _save(tmp_path, 1, objs)
    good = _save(tmp_path, 2, objs)
    _failing_torch_save(monkeypatch, WRITE_FAILURES[failure]())
    with pytest.raises(StorageError) as info:
        _save(tmp_path, 3, objs)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(ckpt.checkpoint_path(tmp_path, 3)) in msg
    assert " free on " in msg and "needs about" in msg
    assert f"last good checkpoint: {good}" in msg
    if failure == "ENOSPC":
        assert "No space left on device [ENOSPC]" in msg
    root = ckpt.checkpoint_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"], "temp dir left"
    assert ckpt.checkpoint_problem(good) is None and ckpt.checkpoint_problem(root / "step_00000001") is None


def test_a_real_bug_during_a_write_is_not_called_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objs = _objs(0)
    _failing_torch_save(monkeypatch, RuntimeError("some unrelated bug"))
    with pytest.raises(RuntimeError, match="unrelated bug"):
        _save(tmp_path, 1, objs)
    assert not list(ckpt.checkpoint_dir(tmp_path).iterdir())  # but the temporary directory is still removed


def test_atomic_write_text_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "config.yaml"
    target.write_text("old\n")

    def refuse(*a: Any, **kw: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", refuse)
    with pytest.raises(OSError):
        files.atomic_write_text(target, "new\n")
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"] and target.read_text() == "old\n"


def test_trainer_save_and_save_final_on_a_full_disk(
    pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    t = _trainer(_args(pair, run, steps=2), [])
    t.train()
    good = ckpt.checkpoint_path(run, 2)
    final_before = load_file(run / "final" / "model.safetensors")

    with monkeypatch.context() as m:
        _failing_torch_save(m, WRITE_FAILURES["file_write_failed"]())
        with pytest.raises(StorageError) as info:
            t.save(3)
    msg = str(info.value)
    assert (
        str(ckpt.checkpoint_path(run, 3)) in msg
        and " free on " in msg
        and f"last good checkpoint: {good}" in msg
    )
    assert f"opd train --resume {run}" in msg
    assert not list(ckpt.checkpoint_dir(run).glob(".tmp-*")) and ckpt.checkpoint_problem(good) is None
    assert t.last_checkpoint == good

    model = t._unwrapped()

    def full_disk(path: Any, *a: Any, **kw: Any) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(model, "save_pretrained", full_disk)
    with pytest.raises(StorageError) as info:
        t.save_final()
    msg = str(info.value)
    assert f"could not write final model {run / 'final'}: No space left on device [ENOSPC]" in msg
    assert " free on " in msg and "needs about" in msg and str(good) in msg and "--resume" in msg
    assert not (run / ".final.tmp").exists()
    kept = load_file(run / "final" / "model.safetensors")  # the previous final model is untouched
    assert all(torch.equal(kept[k], final_before[k]) for k in final_before)


def test_sft_resume_falls_back_and_saves_report_a_full_disk(
    pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "response": f"{i + 1}"}) + "\n" for i in range(8))
    )
    base = {"model": str(pair["student"]), "data": str(data), "run_dir": str(tmp_path / "sft"), "batch_size": 4,
            "micro_batch_size": 4, "steps": 3, "checkpoint_every": 1, "tracking": {"tensorboard": False},
            "save_final": False}  # fmt: skip
    t = SFTTrainer(SFTConfig.model_validate(base), log=lambda m: None)
    t.setup()
    t.train()
    want = {k: v.clone() for k, v in t._unwrapped().state_dict().items()}
    run = tmp_path / "sft"
    _truncate(ckpt.checkpoint_path(run, 3) / "model.safetensors")

    logs: list[str] = []
    r = SFTTrainer(SFTConfig.model_validate(base), resume=True, log=logs.append)
    r.setup()
    assert r.start_step == 2 and any("skipped damaged checkpoint" in m and "step_00000003" in m for m in logs)
    r.train()
    got = r._unwrapped().state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)

    _failing_torch_save(monkeypatch, WRITE_FAILURES["ENOSPC"]())
    with pytest.raises(StorageError, match=r"No space left on device \[ENOSPC\].*opd sft --resume"):
        r.save(4)
    assert not list(ckpt.checkpoint_dir(run).glob(".tmp-*"))


# --------------------------------------------------------------------------------------------------------
# settings opd changes on the user's behalf


def test_top_k_larger_than_the_vocabulary_is_warned_and_recorded(
    pair: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    logs: list[str] = []
    t = _trainer(_args(pair, run, **{"loss.k": 500, "diagnostics.k": 600}), logs)
    vocab = t.vocab_size
    assert vocab < 500
    warned = [m for m in logs if "warning" in m and "shared vocabulary" in m]
    assert any("loss.k=500" in m and f"using loss.k={vocab}" in m for m in warned), logs
    assert any("diagnostics.k=600" in m and f"using diagnostics.k={vocab}" in m for m in warned), logs
    recorded = json.loads((run / "adjustments.json").read_text())["adjustments"]
    assert {(a["setting"], a["asked"], a["used"]) for a in recorded} == {
        ("loss.k", 500, vocab),
        ("diagnostics.k", 600, vocab),
    }


def test_settings_used_as_asked_record_nothing(pair: dict[str, Path], tmp_path: Path) -> None:
    logs: list[str] = []
    t = _trainer(_args(pair, tmp_path / "run", **{"loss.signal": "sampled", "loss.k": 500}), logs)
    assert t.adjustments == []  # a sampled-token loss takes no top-k: nothing was changed
    assert not (tmp_path / "run" / "adjustments.json").exists()
    assert not [m for m in logs if "shared vocabulary" in m]


def test_metrics_append_on_a_full_disk_is_one_line(tmp_path):
    """metrics.jsonl is appended every step: a full disk there is a StorageError naming the file and the
    free space, not an OSError traceback."""
    import errno

    from opd.errors import StorageError
    from opd.train.tracking import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    logger._fh = Full()
    with pytest.raises(StorageError, match=r"metrics\.jsonl: No space left on device \[28\]; .* MB free"):
        logger.log(1, {"loss": 1.0})
