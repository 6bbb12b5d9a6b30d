"""Collapse alarms: the monitor on synthetic metric sequences, the config and bare-flag parsing, and real
short OPD runs on the lab zoo made to collapse on purpose (an absurd learning rate)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.config import AlarmConfig, TrainConfig, field_paths, load_config, parse_overrides
from opd.errors import ConfigError
from opd.train.alarms import NAN, SIGNALS, CollapseError, CollapseMonitor

# ----------------------------------------------------------------------------------------------------
# the monitor on synthetic sequences


def healthy(rng: random.Random) -> dict[str, float]:
    """One step of a healthy run: every signal with realistic step-to-step noise."""
    return {
        "loss": 0.3 + rng.gauss(0, 0.05),
        "grad_norm": abs(1.0 + rng.gauss(0, 0.3)),
        "entropy_student": 0.8 + rng.gauss(0, 0.05),
        "overlap_ratio": 0.8 + rng.gauss(0, 0.02),
        "response_len_mean": 500 + rng.gauss(0, 40),
        "truncation_rate": max(0.0, 0.05 + rng.gauss(0, 0.03)),
    }


def feed(mon: CollapseMonitor, rows: list[dict[str, float]], start: int = 1) -> list:
    alarms = []
    for i, row in enumerate(rows):
        alarms += mon.update(start + i, row)
    return alarms


def test_stable_noisy_run_never_alarms() -> None:
    rng = random.Random(0)
    mon = CollapseMonitor(AlarmConfig())
    # a slow healthy drift too: overlap rises and entropy falls over the run (paper finding 3)
    rows = []
    for s in range(300):
        m = healthy(rng)
        m["overlap_ratio"] += 0.15 * s / 300
        m["entropy_student"] -= 0.4 * s / 300
        rows.append(m)
    assert feed(mon, rows) == []
    assert not mon.collapsed and mon.streak == 0


def test_single_spike_warns_without_collapse() -> None:
    rng = random.Random(1)
    mon = CollapseMonitor(AlarmConfig(patience=3))
    feed(mon, [healthy(rng) for _ in range(20)])
    spike = {**healthy(rng), "entropy_student": 2.5}
    alarms = mon.update(21, spike)
    assert [a.signal for a in alarms] == ["entropy_student"]
    a = alarms[0]
    assert (
        a.step == 21
        and a.value == 2.5
        and a.threshold == pytest.approx(max(1.5 * a.baseline, a.baseline + 0.2))
    )
    assert "entropy" in a.message and mon.alarming and mon.streak == 1 and not mon.collapsed
    assert feed(mon, [healthy(rng) for _ in range(5)], start=22) == []
    assert mon.streak == 0 and not mon.collapsed and mon.reason is None


def test_entropy_spike_collapses_after_patience_steps() -> None:
    rng = random.Random(2)
    mon = CollapseMonitor(AlarmConfig(patience=3))
    feed(mon, [healthy(rng) for _ in range(10)])
    for step in (11, 12):
        assert mon.update(step, {**healthy(rng), "entropy_student": 3.0})
        assert not mon.collapsed
    assert mon.update(13, {**healthy(rng), "entropy_student": 3.0})
    assert (
        mon.collapsed
        and mon.declared
        and mon.collapse_step == 13
        and mon.collapse_signal == "entropy_student"
    )
    assert "step 13" in mon.reason and "since step 11" in mon.reason and "entropy_student" in mon.reason
    assert mon.update(14, {**healthy(rng), "entropy_student": 3.0}) and not mon.declared  # declared once
    assert mon.collapsed and mon.collapse_step == 13


def test_recovery_then_a_second_collapse_declares_again() -> None:
    mon = CollapseMonitor(AlarmConfig(warmup_steps=2, patience=2))
    feed(mon, [{"overlap_ratio": 0.8}] * 2)
    feed(mon, [{"overlap_ratio": 0.5}] * 2, start=3)
    assert mon.collapse_step == 4
    feed(mon, [{"overlap_ratio": 0.8}] * 3, start=5)
    assert mon.streak == 0 and mon.collapsed  # "has collapsed" stays true
    feed(mon, [{"overlap_ratio": 0.5}] * 2, start=8)
    assert mon.declared and mon.collapse_step == 9 and "since step 8" in mon.reason


@pytest.mark.parametrize(
    ("signal", "value"),
    [("overlap_ratio", 0.6), ("response_len_mean", 1500.0), ("truncation_rate", 0.5), ("grad_norm", 9.0)],
)
def test_each_signal_alarms(signal: str, value: float) -> None:
    rng = random.Random(3)
    mon = CollapseMonitor(AlarmConfig())
    feed(mon, [healthy(rng) for _ in range(10)])
    alarms = mon.update(11, {**healthy(rng), signal: value})
    assert [a.signal for a in alarms] == [signal]
    a = alarms[0]
    assert a.value == value and a.baseline is not None and a.threshold is not None
    assert SIGNALS[signal] in a.message


def test_overlap_drop_and_truncation_jump_are_absolute() -> None:
    def warmed() -> CollapseMonitor:
        mon = CollapseMonitor(AlarmConfig(warmup_steps=2, overlap_drop=0.1, truncation_jump=0.2))
        feed(mon, [{"overlap_ratio": 0.8, "truncation_rate": 0.1}] * 2)
        return mon

    assert warmed().update(3, {"overlap_ratio": 0.71, "truncation_rate": 0.29}) == []
    alarms = warmed().update(3, {"overlap_ratio": 0.69, "truncation_rate": 0.31})
    assert {a.signal: a.threshold for a in alarms} == pytest.approx(
        {"overlap_ratio": 0.7, "truncation_rate": 0.3}
    )


def test_near_zero_entropy_needs_the_absolute_floor() -> None:
    """A near-deterministic student (entropy ~0.003 nats) must not alarm on a 10x relative wobble."""
    mon = CollapseMonitor(AlarmConfig(warmup_steps=3))
    feed(mon, [{"entropy_student": e} for e in (0.003, 0.002, 0.004)])
    assert mon.update(4, {"entropy_student": 0.03}) == []
    assert [a.signal for a in mon.update(5, {"entropy_student": 0.5})] == ["entropy_student"]


def test_no_alarm_during_warmup_but_nan_alarms_at_once() -> None:
    mon = CollapseMonitor(AlarmConfig(warmup_steps=5, patience=2))
    assert mon.update(1, {"entropy_student": 0.5}) == []
    assert mon.update(2, {"entropy_student": 50.0}) == []  # still warming up
    alarms = mon.update(3, {"loss": math.nan, "grad_norm": 1.0, "entropy_student": 0.5})
    assert [a.signal for a in alarms] == [NAN]
    assert math.isnan(alarms[0].value) and alarms[0].baseline is None and "loss=nan" in alarms[0].message
    assert not mon.collapsed  # NaN counts toward the patience like every alarm
    assert [a.signal for a in mon.update(4, {"grad_norm": math.inf})] == [NAN]
    assert mon.collapsed and mon.collapse_signal == NAN
    # a NaN step never enters a baseline
    assert mon.baseline("entropy_student") == pytest.approx((0.5 + 50.0) / 2)


def test_patience_one_collapses_on_the_first_alarm() -> None:
    mon = CollapseMonitor(AlarmConfig(warmup_steps=1, patience=1))
    mon.update(1, {"grad_norm": 1.0})
    assert mon.update(2, {"grad_norm": 10.0}) and mon.collapsed


def test_baseline_is_not_dragged_by_a_slow_collapse() -> None:
    """Entropy creeping up 15% a step: once it alarms the baseline freezes, so it keeps alarming."""
    mon = CollapseMonitor(AlarmConfig(warmup_steps=5, ema=0.9, patience=3))
    feed(mon, [{"entropy_student": 1.0}] * 5)
    value, step, first_alarm, frozen = 1.0, 6, None, None
    for _ in range(30):
        value *= 1.15
        alarms = mon.update(step, {"entropy_student": value})
        if alarms and first_alarm is None:
            first_alarm, frozen = step, mon.baseline("entropy_student")
        if first_alarm is not None:
            assert alarms, f"the alarm stopped at step {step}: the baseline followed the collapse"
            assert mon.baseline("entropy_student") == frozen
        step += 1
    assert first_alarm is not None and mon.collapsed and mon.collapse_step == first_alarm + 2
    assert frozen < 1.3  # only the pre-alarm creep got in


def test_a_clean_step_after_alarms_updates_baselines_again() -> None:
    mon = CollapseMonitor(AlarmConfig(warmup_steps=1, ema=0.5))
    mon.update(1, {"grad_norm": 1.0})
    mon.update(2, {"grad_norm": 100.0})
    assert mon.baseline("grad_norm") == 1.0
    mon.update(3, {"grad_norm": 3.0})
    assert mon.baseline("grad_norm") == pytest.approx(2.0)


def test_missing_metrics_and_disabled_signals_are_skipped() -> None:
    mon = CollapseMonitor(AlarmConfig(warmup_steps=1, grad_norm_ratio=None))
    mon.update(1, {"grad_norm": 1.0, "overlap_ratio": 0.8})
    assert mon.update(2, {"grad_norm": 1000.0}) == []  # off; and the absent overlap is simply skipped
    off = CollapseMonitor(AlarmConfig(enabled=False))
    assert off.update(1, {"loss": math.nan}) == [] and not off.alarming and not off.collapsed


def test_state_dict_round_trip_keeps_baselines_and_streak() -> None:
    rng = random.Random(4)
    rows = [healthy(rng) for _ in range(12)] + [{**healthy(rng), "overlap_ratio": 0.3} for _ in range(4)]
    a = CollapseMonitor(AlarmConfig(patience=3))
    feed(a, rows[:13])  # 12 clean steps and the first alarming one
    state = json.loads(json.dumps(a.state_dict()))  # JSON-safe: it goes into the checkpoint's state.json
    b = CollapseMonitor(AlarmConfig(patience=3))
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    for step, row in enumerate(rows[13:], start=14):
        assert a.update(step, row) == b.update(step, row)
    assert b.collapsed and b.collapse_step == 15 and b.reason == a.reason


# ----------------------------------------------------------------------------------------------------
# configuration


def test_alarm_fields_are_options_with_descriptions() -> None:
    paths = field_paths()
    for name in AlarmConfig.model_fields:
        assert paths[f"alarms.{name}"], f"alarms.{name} has no description"
    assert paths["stop_on_collapse"]
    cfg = load_config(
        None, ["--alarms.patience", "2", "--alarms.grad_norm_ratio", "null", "--alarms.ema=0.95"]
    )
    assert cfg.alarms.patience == 2 and cfg.alarms.grad_norm_ratio is None and cfg.alarms.ema == 0.95
    with pytest.raises(ConfigError, match="alarms.entropy_ratio"):
        load_config(None, ["--alarms.entropy_ratio", "0.5"])


def test_bare_bool_flag_means_true() -> None:
    assert parse_overrides(["--stop-on-collapse"]) == {"stop_on_collapse": True}
    assert parse_overrides(["--stop-on-collapse", "--lr", "1"]) == {
        "stop_on_collapse": True,
        "optim": {"lr": 1},
    }
    assert parse_overrides(["--stop_on_collapse", "false"]) == {"stop_on_collapse": False}
    assert parse_overrides(["--stop-on-collapse=false"]) == {"stop_on_collapse": False}
    assert parse_overrides(["--stop-on-collapse", "true", "--k", "4"]) == {
        "stop_on_collapse": True,
        "loss": {"k": 4},
    }
    assert parse_overrides(["--tracking.wandb", "--alarms.enabled"]) == {
        "tracking": {"wandb": True},
        "alarms": {"enabled": True},
    }
    assert load_config(None, ["--stop-on-collapse"]).stop_on_collapse is True
    assert TrainConfig().stop_on_collapse is False
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--loss.k"])  # only bools may be bare
    with pytest.raises(ConfigError, match="unknown option"):
        parse_overrides(["--stop-on-colapse"])


def test_config_fields_command_lists_the_alarms() -> None:
    from typer.testing import CliRunner

    from opd.cli import app

    res = CliRunner().invoke(app, ["config", "fields"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "--alarms.patience" in res.output and "--stop_on_collapse" in res.output


# ----------------------------------------------------------------------------------------------------
# the trainer on the tiny random pair (conftest): NaN alarm lines, a NaN-driven collapse, resume


def _tiny_trainer(tiny_pair, run_dir: Path, resume: bool = False, **extra):
    from opd.train.trainer import OPDTrainer

    over = {
        "student": tiny_pair["student"], "teacher": tiny_pair["teacher"], "prompts": tiny_pair["prompts"],
        "run_dir": run_dir, "prompts_per_step": 2, "rollout.rollouts_per_prompt": 2, "rollout.max_new_tokens": 6,
        "optim.lr": 1e-3, "steps": 3, "checkpoint_every": 1, "tracking.tensorboard": False, "loss.k": 8,
        "diagnostics.k": 8, "alarms.warmup_steps": 2, "save_final": False,
    }  # fmt: skip
    over.update(extra)
    args = [x for k, v in over.items() for x in (f"--{k}", str(v))]
    t = OPDTrainer(load_config(None, args), resume=resume, log=lambda m: None)
    t.setup()
    return t


def _poison_teacher(t) -> None:
    with torch.no_grad():
        for p in t.teacher.model.parameters():
            p.fill_(float("nan"))


def test_nan_step_logs_an_alarm_line_before_stopping(tiny_pair, tmp_path: Path, one_thread) -> None:
    from opd.train.trainer import NonFiniteLossError

    t = _tiny_trainer(tiny_pair, tmp_path / "run")
    _poison_teacher(t)
    with pytest.raises(NonFiniteLossError):  # stop_on_nan (default) keeps its own error and exit code
        t.train()
    _, alarms = _rows(tmp_path / "run")
    assert [(a["step"], a["signal"]) for a in alarms] == [(1, NAN)]
    assert alarms[0]["value"] is None and "loss=nan" in alarms[0]["message"]  # JSON has no NaN: null


def test_repeated_nan_steps_are_a_collapse_without_stop_on_nan(tiny_pair, tmp_path: Path, one_thread) -> None:
    t = _tiny_trainer(
        tiny_pair,
        tmp_path / "run",
        stop_on_nan=False,
        stop_on_collapse=True,
        steps=5,
        **{"alarms.patience": 2},
    )
    t.start_step, t.total_steps = 0, 2
    t.train()  # two clean steps, checkpoints 1 and 2
    _poison_teacher(t)
    t.start_step, t.total_steps = 2, 5
    t.metrics = type(t.metrics)(t.run_dir, enabled=True, tensorboard=False, resume_step=2)
    with pytest.raises(CollapseError, match="step 4") as info:
        t.train()
    assert info.value.signal == NAN and info.value.step == 4  # NaN steps 3 and 4 (skipped, not stopped)
    # checkpoint 2 holds the weights step 3 ran on, and step 3 alarmed: the last good one is step 1's
    assert Path(info.value.checkpoint).name == "step_00000001"
    _, alarms = _rows(tmp_path / "run")
    assert [(a["step"], a["signal"], a["collapsed"]) for a in alarms] == [(3, NAN, False), (4, NAN, True)]


def test_resume_keeps_the_alarm_baselines(tiny_pair, tmp_path: Path, one_thread) -> None:
    t = _tiny_trainer(tiny_pair, tmp_path / "run")
    t.train()
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["alarms"] == t.monitor.state_dict()
    assert state["alarms"]["baselines"]["overlap_ratio"]["n"] == 3
    assert state["last_good_checkpoint"] == "step_00000002"
    r = _tiny_trainer(tiny_pair, tmp_path / "run", resume=True, steps=4)
    assert r.monitor.state_dict() == state["alarms"] and r.start_step == 3
    assert r.last_good_checkpoint == tmp_path / "run" / "checkpoints" / "step_00000002"
    r.train()
    assert r.monitor.state_dict()["baselines"]["overlap_ratio"]["n"] == 4


# ----------------------------------------------------------------------------------------------------
# end to end: a lab OPD run made to collapse with an absurd learning rate

ABSURD_LR = 1.0
"""Adam moves every weight by about lr per step: 1.0 wrecks the lab student within one update (measured:
overlap 0.72 -> 0.21, every response truncated, gradient norm x20-80), yet stays finite. (The lab
student's gradient norm is heavy-tailed even when healthy, e.g. a single x70 step at the lab's own lr,
which is why a lone spike only warns and why the assertions below allow the first alarm one step early.)"""
GOOD_STEPS = 2
"""Steps at the lab's own lr (3e-4) before the absurd one takes over; they form the baselines."""


def _zoo():
    import os
    import time

    from opd.errors import ModelError
    from opd.lab.runner import LabZoo

    for _ in range(60):  # a background `opd lab build` may be rewriting the shipped zoo: wait for it
        try:
            zoo = LabZoo.shipped(os.environ.get("OPD_LAB_ZOO") or None)
            for name in ("student", "teacher_novel"):
                if not (zoo.models[name] / "model.safetensors").is_file():
                    raise ModelError(f"{name} incomplete")
            return zoo
        except ModelError as exc:
            last = exc
            time.sleep(5)
    pytest.skip(f"lab zoo not built: {last}")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a busy small machine: one torch thread avoids OpenMP oversubscription, which made
    these steps 100x slower (0.07 s -> 10 s) next to another CPU-bound job on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lab_prompts(tmp_path_factory, one_thread) -> tuple[object, Path]:
    from opd.lab.experiments import PromptsSpec
    from opd.lab.runner import write_training_prompts

    zoo = _zoo()
    path = tmp_path_factory.mktemp("alarm_prompts") / "prompts.jsonl"
    write_training_prompts(PromptsSpec(mix={2: 0.5, 3: 0.5}, n=64), path, seed=0, exclude=zoo.heldout())
    return zoo, path


def _lab_overrides(zoo, prompts: Path, run_dir: Path, **extra) -> list[str]:
    from opd.lab.runner import LAB_DEFAULTS

    over = {
        "student": str(zoo.models["student"]), "teacher": str(zoo.models["teacher_novel"]),
        "prompts": str(prompts), "run_dir": str(run_dir), "template": LAB_DEFAULTS["data"]["template"],
        "loss.k": 4, "diagnostics.k": 4, "optim.lr": LAB_DEFAULTS["optim"]["lr"], "optim.weight_decay": 0.0,
        "prompts_per_step": 4, "rollout.rollouts_per_prompt": 2, "rollout.max_new_tokens": 48,
        "micro_batch_size": 64, "tracking.tensorboard": False, "startup_checks": False, "save_final": False,
        "checkpoint_every": 1, "keep_checkpoints": 3, "stop_on_nan": False,  # a NaN is a collapse signal too
        "alarms.warmup_steps": GOOD_STEPS, "alarms.patience": 2,
    }  # fmt: skip
    over.update(extra)
    out: list[str] = []
    for k, v in over.items():
        out += [f"--{k}", str(v)]
    return out


def _sabotage(trainer):
    """on_step hook: after GOOD_STEPS clean steps, the learning rate becomes absurd (the next update)."""

    def on_step(step: int, metrics: dict) -> None:
        if step == GOOD_STEPS:
            trainer.scheduler.base_lrs = [ABSURD_LR for _ in trainer.scheduler.base_lrs]
            for group in trainer.optimizer.param_groups:
                group["lr"] = ABSURD_LR

    return on_step


def _rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "kind" not in r], [r for r in rows if r.get("kind") == "alarm"]


def _ckpt_steps(run_dir: Path) -> list[int]:
    from opd.train.checkpoint import list_checkpoints

    return [s for s, _ in list_checkpoints(run_dir)]


def test_lab_run_with_absurd_lr_stops_on_collapse(lab_prompts, tmp_path: Path) -> None:
    from opd.train.trainer import OPDTrainer

    zoo, prompts = lab_prompts
    run = tmp_path / "run"
    cfg = load_config(None, _lab_overrides(zoo, prompts, run, steps=8) + ["--stop-on-collapse"])
    assert cfg.stop_on_collapse
    messages: list[str] = []
    t = OPDTrainer(cfg, log=messages.append)
    t.setup()
    with pytest.raises(CollapseError) as info:
        t.train(on_step=_sabotage(t))
    err = info.value
    steps, alarms = _rows(run)
    assert alarms, "no alarm line in metrics.jsonl"
    for a in alarms:
        assert {"step", "kind", "signal", "value", "baseline", "threshold", "message"} <= set(a)
        assert a["signal"] in (*SIGNALS, NAN)
    first_alarm = min(a["step"] for a in alarms)
    # the absurd update is taken at step GOOD_STEPS + 1; its weights are first measured one step later
    assert GOOD_STEPS + 1 <= first_alarm <= GOOD_STEPS + 2, alarms
    assert err.step == first_alarm + 1 and err.step == max(r["step"] for r in steps)  # patience 2, then stop
    assert err.signal in (*SIGNALS, NAN) and err.signal in str(err) and f"step {err.step}" in str(err)
    assert any(m.startswith("[yellow]alarm:[/]") for m in messages)
    # the reported checkpoint predates the damage and exists; nothing was saved after the alarms began
    assert err.checkpoint is not None and err.checkpoint in str(err)
    good = Path(err.checkpoint)
    assert good.is_dir() and int(good.name.split("_")[1]) == first_alarm - 2 <= GOOD_STEPS
    assert all(s < first_alarm for s in _ckpt_steps(run))
    saved = load_file(good / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_lab_run_with_absurd_lr_without_stop_completes_and_logs(lab_prompts, tmp_path: Path) -> None:
    from opd.train.trainer import OPDTrainer

    zoo, prompts = lab_prompts
    run = tmp_path / "run"
    cfg = load_config(None, _lab_overrides(zoo, prompts, run, steps=5))
    assert not cfg.stop_on_collapse
    messages: list[str] = []
    t = OPDTrainer(cfg, log=messages.append)
    t.setup()
    t.train(on_step=_sabotage(t))
    steps, alarms = _rows(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5] or any(a["signal"] == NAN for a in alarms)
    assert alarms and any(a["collapsed"] for a in alarms)
    assert sum(m.startswith("[red]collapse:[/]") for m in messages) == 1
    assert any("checkpoint of step" in m and "deferred" in m for m in messages)
    assert 5 in _ckpt_steps(run)  # the final step is always saved when the run goes on to the end
    state = json.loads((run / "checkpoints" / "step_00000005" / "state.json").read_text())
    assert state["alarms"]["collapsed"] and state["last_good_checkpoint"].startswith("step_")


def test_cli_train_exits_4_on_collapse(lab_prompts, tmp_path: Path) -> None:
    """Absurd from the first update: the collapse is caught, but no checkpoint predates the damage."""
    from typer.testing import CliRunner

    from opd.cli import app

    zoo, prompts = lab_prompts
    run = tmp_path / "run"
    args = _lab_overrides(zoo, prompts, run, steps=6, **{"optim.lr": ABSURD_LR, "alarms.warmup_steps": 1})
    res = CliRunner().invoke(app, ["train", *args, "--stop-on-collapse"], env={"COLUMNS": "400"})
    assert res.exit_code == 4, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("error:"))
    assert "training stopped on a collapse at step" in line and "last good checkpoint: none" in line
    _, alarms = _rows(run)
    assert alarms
