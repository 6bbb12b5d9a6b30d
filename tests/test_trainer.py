"""End-to-end OPD on tiny real (randomly initialised) Hugging Face models built in the test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.config import load_config
from opd.models.tiny import save_tiny_pair
from opd.train.trainer import NonFiniteLossError, OPDTrainer

REQUIRED = [
    "loss", "grad_norm", "lr", "overlap_ratio", "overlap_token_advantage", "entropy_student", "entropy_teacher",
    "entropy_gap", "overlap_mass_student", "overlap_mass_teacher", "p_minus_q_at_max_adv", "response_len_mean",
    "response_len_max", "truncation_rate", "tokens_per_s", "step_time_s", "overlap_ratio/bin0",
]  # fmt: skip


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


def _args(pair, run_dir, **extra) -> list[str]:
    base = {
        "student": str(pair["student"]), "teacher": str(pair["teacher"]), "prompts": str(pair["prompts"]),
        "run_dir": str(run_dir), "prompts_per_step": 4, "micro_batch_size": 8, "rollout.rollouts_per_prompt": 2,
        "rollout.max_new_tokens": 8, "rollout.batch_size": 2, "optim.lr": 1e-3, "steps": 2,
        "checkpoint_every": 1, "tracking.tensorboard": False, "diagnostics.k": 8, "loss.k": 8,
    }  # fmt: skip
    base.update(extra)
    out = []
    for k, v in base.items():
        out += [f"--{k}", str(v)]
    return out


def _trainer(pair, run_dir, resume=False, **extra) -> OPDTrainer:
    cfg = load_config(None, _args(pair, run_dir, **extra))
    t = OPDTrainer(cfg, resume=resume, log=lambda m: None)
    t.setup()
    return t


def _params(t: OPDTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t._unwrapped().state_dict().items()}


@pytest.mark.parametrize(
    "extra",
    [
        {"loss.signal": "topk"},
        {"loss.signal": "topk", "loss.renorm": "weights", "loss.support": "overlap"},
        {"loss.signal": "sampled"},
        {"loss.signal": "full", "loss.divergence": "jsd", "loss.beta": 0.3},
    ],
)
def test_train_runs_and_logs(pair, tmp_path, extra):
    t = _trainer(pair, tmp_path / "run", **extra)
    before = _params(t)
    hist = t.train()
    assert len(hist) == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in REQUIRED:
        assert key in rows[0], key
    assert 0 < rows[0]["overlap_ratio"] <= 1
    after = _params(t)
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    for k, v in final.state_dict().items():
        torch.testing.assert_close(v, after[k])


def test_gradient_accumulation_gives_the_same_update(pair, tmp_path):
    """Micro-batches of 1 vs one micro-batch of all 8 sequences: same parameters after a step."""
    kw = {"steps": 1, "optim.max_grad_norm": "null", "loss.signal": "topk"}
    a = _trainer(pair, tmp_path / "a", micro_batch_size=1, **kw)
    a.train()
    b = _trainer(pair, tmp_path / "b", micro_batch_size=8, **kw)
    b.train()
    pa, pb = _params(a), _params(b)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-6, rtol=1e-5)
    # and the loss is the same token mean
    ra = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    rb = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-7)


def test_nan_stops_and_keeps_last_good_checkpoint(pair, tmp_path):
    t = _trainer(pair, tmp_path / "run", steps=4)
    t.start_step = 0
    t.total_steps = 1
    t.train()  # step 1 ok, checkpoint written
    with torch.no_grad():
        for p in t.teacher.model.parameters():
            p.fill_(float("nan"))
    t.start_step, t.total_steps = 1, 4
    t.metrics = type(t.metrics)(t.run_dir, enabled=True, tensorboard=False, resume_step=1)
    with pytest.raises(NonFiniteLossError, match="step_00000001"):
        t.train()
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_00000001" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_refuses_to_overwrite_a_run(pair, tmp_path):
    _trainer(pair, tmp_path / "run", steps=1).train()
    from opd.errors import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        _trainer(pair, tmp_path / "run", steps=1)


def test_lora_trains_and_saves_merged(pair, tmp_path):
    t = _trainer(pair, tmp_path / "run", steps=1, **{"student.lora.enabled": "true", "student.lora.r": 4})
    t.train()
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert not any("lora" in k for k in m.state_dict())


def _cli(args: list[str], **kw) -> subprocess.Popen:
    """`opd train ARGS` in the background, in its own session: a timeout kills the whole tree."""
    from multiproc import opd

    return opd(["train", *args], **kw)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(pair, tmp_path):
    extra = {"steps": 6, "checkpoint_every": 2}
    full = _cli(_args(pair, tmp_path / "full", **extra))
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out

    run = tmp_path / "killed"
    proc = _cli(_args(pair, run, **extra))
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _cli(["--resume", str(run)])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    la = [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in metrics.read_text().splitlines()]
    assert la == lb


@pytest.mark.slow
def test_two_processes_match_one(pair, tmp_path):
    """torchrun with 2 CPU ranks (gloo): same parameters after a step as 1 process, same global batch."""
    extra = {"steps": 1, "optim.max_grad_norm": "null"}
    one = _cli(_args(pair, tmp_path / "one", **extra))
    out1, _ = one.communicate(timeout=600)
    assert one.returncode == 0, out1
    two = _torchrun(_args(pair, tmp_path / "two", **extra))
    assert two.returncode == 0, two.stdout + two.stderr
    assert "on 2 process(es)" in two.stderr + two.stdout
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    m1 = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])
    m2 = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss", "overlap_ratio", "entropy_student", "response_tokens", "response_len_max"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-5), key


@pytest.mark.slow
def test_repeated_random_kills_then_resume_match_uninterrupted(pair, tmp_path):
    """SIGKILL at arbitrary moments (start-up, mid-step, mid-checkpoint), resume each time: same result."""
    import random

    from opd.train.checkpoint import latest_checkpoint

    extra = {"steps": 8, "checkpoint_every": 1}
    t0 = time.time()
    full = _cli(_args(pair, tmp_path / "full", **extra))
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out
    wall = time.time() - t0  # kill times are drawn across a whole run, start-up included
    run = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0

    def start() -> subprocess.Popen:
        return _cli(["--resume", str(run)] if latest_checkpoint(run) else _args(pair, run, **extra))

    # The first kill lands mid-run for sure: right after the first of 8 checkpoints appears (a random
    # delay scaled by the reference run's wall time let a run on a machine whose load dropped finish
    # first, in a CI run); later kills are random.
    proc = start()
    while proc.poll() is None and latest_checkpoint(run) is None:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        kills += 1
    for _ in range(10):
        proc = start()
        try:
            proc.wait(timeout=rng.uniform(0.3, 1.0) * wall)
            break
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kills += 1
    else:
        proc = start()
        proc.wait(timeout=600)
    assert proc.returncode == 0, proc.stdout.read()
    assert kills >= 1
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("plugin", ["FSDP", "DEEPSPEED"])
def test_accelerate_sharding_plugins_are_refused(pair, tmp_path, monkeypatch, plugin):
    """accelerate's FSDP/DeepSpeed plugins are not opd's sharded path (an accelerate-FSDP student failed at
    its first checkpoint on a GPU; on a CPU the config silently ran data parallel): refused up front, with
    the supported alternative named."""
    from opd.errors import ConfigError

    trainer = OPDTrainer(load_config(None, _args(pair, tmp_path / "plugin")), log=lambda m: None)
    monkeypatch.setenv(f"ACCELERATE_USE_{plugin}", "true")  # what `accelerate launch` sets for the plugin
    with pytest.raises(ConfigError, match=f"its {plugin} plugin.*--sharding fsdp"):
        trainer.setup()
    assert not (tmp_path / "plugin").exists()  # refused before anything was written


def test_precision_check_refuses_a_dtype_the_device_runs_slowly(pair, tmp_path, monkeypatch):
    """bf16 autocast on a CPU without bf16 instructions (measured: 1 vs 151 GFLOP/s) is refused before
    any model loads, naming the setting; precision_check warn goes ahead with a warning."""
    import opd.precision
    from opd.errors import ConfigError

    monkeypatch.setenv("OPD_PRECISION_PROBE", "1")
    monkeypatch.setattr(opd.precision, "matmul_rates", lambda *a, **k: {"float32": 151.0, "bfloat16": 1.0})
    loaded = []
    monkeypatch.setattr("opd.models.loading.load_model", lambda *a, **k: loaded.append(a) or None)
    cfg = load_config(None, _args(pair, tmp_path / "slow", **{"student.autocast": "bfloat16"}))
    with pytest.raises(
        ConfigError, match=r"student\.autocast=bfloat16.*151x slower.*set student\.autocast none"
    ):
        OPDTrainer(cfg, log=lambda m: None).setup()
    assert not loaded
    logs: list[str] = []
    cfg = load_config(
        None, _args(pair, tmp_path / "warn", **{"student.autocast": "bfloat16", "precision_check": "warn"})
    )
    with pytest.raises(AttributeError):  # past the check, into the (stubbed, None) models
        OPDTrainer(cfg, log=logs.append).setup()
    assert any("student.autocast=bfloat16" in m for m in logs)


def test_processes_that_did_not_join_a_group_are_refused(pair, tmp_path, monkeypatch):
    from opd.errors import ConfigError

    trainer = OPDTrainer(load_config(None, _args(pair, tmp_path / "lonely")), log=lambda m: None)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher started 2 processes; this one is alone (world 1)
    with pytest.raises(ConfigError, match="did not join one process group"):
        trainer.setup()


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    """`opd train ARGS` on 2 CPU ranks; on a timeout the whole tree (ranks included) is killed and the
    failure shows every rank's output (tests/multiproc.py)."""
    from multiproc import torchrun

    return torchrun(args)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_and_resume(pair, tmp_path):
    """sharding fsdp (torch FSDP2 on CPU/gloo): 2 sharded processes give the 1-process weights bit for bit,
    checkpoints hold the gathered full state, and a sharded resume continues exactly."""
    extra = {"optim.max_grad_norm": "null", "checkpoint_every": 1}
    one = _cli(_args(pair, tmp_path / "one", steps=3, **extra))
    out1, _ = one.communicate(timeout=600)
    assert one.returncode == 0, out1
    first = _torchrun(_args(pair, tmp_path / "fsdp", steps=2, sharding="fsdp", **extra))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "on 2 process(es)" in first.stderr + first.stdout
    ck = json.loads((tmp_path / "fsdp" / "checkpoints" / "step_00000002" / "state.json").read_text())
    assert ck["sharding"] == "fsdp"
    again = _torchrun(["--resume", str(tmp_path / "fsdp"), "--steps", "3"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in again.stdout + again.stderr
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    la = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert lb == pytest.approx(la, rel=1e-5)
    from transformers import AutoModelForCausalLM

    cfg = json.loads((tmp_path / "fsdp" / "final" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]  # not the dynamic FSDP class
    AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final")
    # the checkpoint layouts differ: a sharded checkpoint does not resume unsharded
    with pytest.raises(Exception, match="same sharding setting"):
        _trainer(pair, tmp_path / "fsdp", resume=True, steps=4, sharding="none")


def test_fsdp_refuses_what_it_cannot_do(pair, tmp_path):
    from opd.errors import ConfigError

    for extra, match in (
        ({"student.lora.enabled": True}, "lora"),
        ({"rollout.backend": "vllm"}, "rollout.backend vllm"),
        ({"eval.every": 2, "eval.prompts": str(pair["prompts"])}, "opd eval"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(None, _args(pair, tmp_path / "x", sharding="fsdp", **extra))


def test_lr_schedules():
    from opd.train.loop import lr_lambda

    const = lr_lambda("constant", 10, 0, 0.0)
    assert [const(s) for s in range(3)] == [1.0, 1.0, 1.0]
    warm = lr_lambda("warmup", 10, 4, 0.0)
    assert [warm(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = lr_lambda("cosine", 10, 2, 0.1)
    assert cos(0) == 0.5 and cos(2) == pytest.approx(1.0) and cos(10) == pytest.approx(0.1)
    assert cos(6) == pytest.approx(0.1 + 0.9 * 0.5)


def test_in_loop_evaluation_is_logged(pair, tmp_path):
    extra = {"steps": 3, "eval.prompts": str(pair["prompts"]), "eval.every": 2, "eval.samples": 2,
             "eval.max_new_tokens": 4, "eval.max_problems": 3, "eval.verifier": "exact"}  # fmt: skip
    t = _trainer(pair, tmp_path / "run", **extra)
    t.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 3]
    assert all("eval/avg@2" in r and "eval/pass@2" in r for r in evals)
    assert [r["step"] for r in rows if r.get("kind") != "eval"] == [1, 2, 3]


def test_vllm_backend_errors_are_clear(tiny_pair, tmp_path) -> None:
    """Without vLLM installed the error names the extra; with a GGUF/LoRA student it says what to do."""
    import importlib.util

    from opd.config import load_config
    from opd.errors import ConfigError
    from opd.train.trainer import OPDTrainer

    base = ["--student.path", str(tiny_pair["student"]), "--teacher.path", str(tiny_pair["teacher"]),
            "--data.prompts", str(tiny_pair["prompts"]), "--data.template", "raw", "--run_dir", str(tmp_path / "r"),
            "--steps", "1", "--rollout.backend", "vllm", "--tracking.tensorboard", "false"]  # fmt: skip
    lora = OPDTrainer(load_config(None, [*base, "--student.lora.enabled", "true"]))
    with pytest.raises(ConfigError, match="lora"):
        lora.setup()
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match=r"opd\[vllm"):
            OPDTrainer(load_config(None, base)).setup()


def test_bf16_autocast_keeps_fp32_master_weights_and_tracks_fp32(pair, tmp_path):
    """student.autocast bfloat16: compute in bf16, weights/grads/optimizer state in fp32; the first
    step's loss and diagnostics stay close to the fp32 run (same seeds, same rollouts up to bf16 noise)."""
    t32 = _trainer(pair, tmp_path / "fp32", steps=1, **{"rollout.temperature": 0.0})
    h32 = t32.train()
    t16 = _trainer(
        pair, tmp_path / "bf16", steps=1, **{"rollout.temperature": 0.0, "student.autocast": "bfloat16"}
    )
    h16 = t16.train()
    assert all(p.dtype == torch.float32 for p in t16._unwrapped().parameters())
    state = t16.optimizer.state_dict()["state"]
    assert state and all(v["exp_avg"].dtype == torch.float32 for v in state.values())
    assert h16[0]["loss"] == pytest.approx(h32[0]["loss"], rel=0.05)
    assert h16[0]["overlap_ratio"] == pytest.approx(h32[0]["overlap_ratio"], abs=0.05)
    with pytest.raises(Exception, match="autocast"):
        load_config(None, _args(pair, tmp_path / "x", **{"student.autocast": "int8"}))


_FAULT_INJECTOR = """
import os
if os.environ.get("RANK") == os.environ.get("OPD_TEST_FAIL_RANK"):
    import opd.train.trainer as t
    _orig = t.OPDTrainer.train_step
    _at = int(os.environ["OPD_TEST_FAIL_STEP"])
    def train_step(self, step):
        if step == _at:
            raise RuntimeError(f"injected failure on rank {os.environ['RANK']} at step {step}")
        return _orig(self, step)
    t.OPDTrainer.train_step = train_step
"""


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_failing_rank_makes_the_others_fail_fast(pair, tmp_path, rank):
    """One rank raises in step 2 (a `sitecustomize` injects it, no hook in opd): the whole torchrun job
    ends with the error within a minute, not after the collective timeout (set to 10 minutes here), and
    leaves no process behind."""
    import psutil
    from multiproc import opd_env, torchrun

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_FAULT_INJECTOR)
    env = opd_env(
        OPD_DIST_TIMEOUT="600", OPD_TEST_FAIL_RANK=str(rank), OPD_TEST_FAIL_STEP="2",
        PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    )  # fmt: skip
    t0 = time.time()
    result = torchrun(_args(pair, tmp_path / "run", steps=4), env=env, timeout=400)
    out = result.stdout + (result.stderr or "")
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert result.returncode != 0, out
    assert f"injected failure on rank {rank} at step 2" in out, out
    wait = time.time() - t0
    assert wait < 120, f"the job took {wait:.0f}s to end after one rank failed\n{out}"
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1]
    leftovers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path / "run") in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers, leftovers


def _snapshot(run: Path) -> dict[str, tuple[int, bytes]]:
    """(mtime_ns, bytes) of final/'s files, metrics.jsonl, samples.jsonl and config.yaml."""
    files = [
        *sorted((run / "final").rglob("*")),
        run / "metrics.jsonl",
        run / "samples.jsonl",
        run / "config.yaml",
    ]
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes()) for p in files if p.is_file()}


def test_resume_of_a_finished_run_says_so_and_changes_nothing(pair, tmp_path):
    """`opd train --resume RUN` on a run with every step done and final/ written: one line, exit 0, no
    file touched (not even final/ rewritten); raising --steps is the way on, and it trains on."""
    from typer.testing import CliRunner

    from opd.cli import app

    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", *_args(pair, run)], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    assert (run / "final" / "model.safetensors").is_file()
    before = _snapshot(run)
    time.sleep(0.05)  # a rewrite would show in the mtimes
    res = CliRunner().invoke(app, ["train", "--resume", str(run)], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    assert f"{run} already finished at step 2/2; nothing to do (final model: {run / 'final'})" in res.output
    assert "--steps" in res.output and "training" not in res.output
    assert _snapshot(run) == before
    # the knob the line names works: one more step, then the final model again
    res = CliRunner().invoke(app, ["train", "--resume", str(run), "--steps", "3"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_run_whose_final_model_is_missing_is_not_finished(pair, tmp_path):
    """All steps done but final/ absent (a disk filled while writing it): the resume must write it."""
    import shutil

    from opd.train.loop import finished_run

    run = tmp_path / "run"
    t = _trainer(pair, run)
    t.train()
    assert finished_run(run, steps=None, save_final=True, command="opd train") is not None
    assert finished_run(run, steps=3, save_final=True, command="opd train") is None
    shutil.rmtree(run / "final")
    assert finished_run(run, steps=None, save_final=True, command="opd train") is None
    line = finished_run(run, steps=None, save_final=False, command="opd train")
    assert line is not None and "save_final is off" in line
