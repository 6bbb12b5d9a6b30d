from __future__ import annotations

import torch

from opd.train import checkpoint as ckpt


def _objs(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_roundtrip_and_pruning(tmp_path):
    model, opt, sched = _objs(0)
    for step in (1, 2, 3):
        rng_at_save = torch.get_rng_state()
        ckpt.save_checkpoint(
            tmp_path, step, model=model, optimizer=opt, scheduler=sched, state={"cursor": {"a": step}}, keep=2
        )
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    m2, o2, s2 = _objs(1)
    torch.manual_seed(123)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), model=m2, optimizer=o2, scheduler=s2)
    assert state["step"] == 3 and state["cursor"] == {"a": 3}
    for a, b in zip(model.state_dict().values(), m2.state_dict().values(), strict=False):
        assert torch.equal(a, b)
    assert torch.equal(o2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert s2.last_epoch == sched.last_epoch
    assert torch.equal(torch.get_rng_state(), rng_at_save)  # RNG restored to the saved state


def test_half_written_checkpoint_is_ignored(tmp_path):
    model, opt, sched = _objs(0)
    ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, state={})
    # A kill during the next save leaves a temp dir, or a dir without its state.json: neither counts.
    (tmp_path / "checkpoints" / ".tmp-step_00000002-999").mkdir()
    broken = tmp_path / "checkpoints" / "step_00000003"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"garbage")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"


def test_resaving_same_step_replaces_it(tmp_path):
    model, opt, sched = _objs(0)
    ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, state={"v": 1})
    ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, state={"v": 2})
    import json

    assert json.loads((tmp_path / "checkpoints" / "step_00000001" / "state.json").read_text())["v"] == 2
