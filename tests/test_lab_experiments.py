"""Lab experiments: the registry is well-formed, the runner writes result files from real OPD runs
(tiny random models under the zoo's names, so these tests need no zoo), finished runs are reused,
and a short lab OPD run on a weakened student improves it (shipped zoo; skipped when it is absent)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_zoo

from opd.config import LossConfig, TrainConfig
from opd.lab.experiments import EXPERIMENTS, STATUSES, ExperimentData, stat
from opd.lab.runner import EvalSettings, LabRunner, LabZoo, build_train_config, draw_problems
from opd.lab.world import LEVELS, eval_problems

# ----------------------------------------------------------------------------------------------------
# registry


def test_registry_is_well_formed() -> None:
    assert {"thinking_patterns", "novelty_vs_scale", "reverse_distillation", "mechanism", "k_sweep",
            "cold_start", "aligned_prompts", "long_horizon"} <= set(EXPERIMENTS)  # fmt: skip
    claim_ids: set[str] = set()
    for name, spec in EXPERIMENTS.items():
        assert spec.name == name and spec.title and spec.description
        assert spec.arms and spec.claims and callable(spec.verdict)
        assert len({a.name for a in spec.arms}) == len(spec.arms), f"{name}: duplicate arm names"
        assert len(spec.seeds) >= 3 and spec.steps >= 1
        for c in spec.claims:
            assert c.id not in claim_ids
            claim_ids.add(c.id)
        for arm in spec.arms:
            for model in (arm.student, arm.teacher):
                assert model.startswith("lab:") and model[4:] in (
                    "student", "teacher_novel", "teacher_big", "teacher_incompatible"
                )  # fmt: skip
            LossConfig.model_validate({**LossConfig().model_dump(), **arm.loss})
            assert set(arm.prompts.mix) <= set(LEVELS)
            assert arm.prepare in (None, "cold_start")
            cfg = build_train_config(
                spec, arm, seed=0, steps=spec.steps, student_path="s", teacher_path="t", prompts=Path("p.jsonl"),
                run_dir=Path("r"), eval_file=Path("e.jsonl"), eval_settings=EvalSettings(),
            )  # fmt: skip
            assert isinstance(cfg, TrainConfig)
            assert cfg.data.template == "raw" and cfg.diagnostics.k == 4 and cfg.steps == spec.steps
        # with no results every claim is "not run", one verdict per claim
        verdicts = spec.verdict(ExperimentData(spec=spec, arms={}, runs={}))
        assert [v.claim.id for v in verdicts] == [c.id for c in spec.claims]
        assert {v.status for v in verdicts} == {"not run"}
        assert all(v.status in STATUSES for v in verdicts)
    assert stat([1.0]).fmt() == "1.000" and stat([0.5, 0.7]).fmt(pct=True) == "60.0 ± 14.1"


def test_experiments_module_reexports_the_split_modules() -> None:
    """`opd.lab.experiments` is kept for importers after the split: every name it exports is the very
    object of the module that now holds it, and the registry's verdicts come from `opd.lab.verdicts`."""
    from opd.lab import experiments, registry, specs, stats, verdicts

    homes = (registry, specs, stats, verdicts)
    for name in experiments.__all__:
        owners = [m for m in homes if name in getattr(m, "__all__", ())]
        assert len(owners) == 1, f"{name} should live in exactly one lab module, found {owners}"
        assert getattr(experiments, name) is getattr(owners[0], name)
    assert all(spec.verdict.__module__ == "opd.lab.verdicts" for spec in registry.EXPERIMENTS.values())


def test_training_prompts_exclude_heldout() -> None:
    held = {p.prompt for lv in LEVELS for p in eval_problems(lv)}
    probs = draw_problems({2: 0.5, 4: 0.5}, 300, seed=3, exclude=held)
    assert len(probs) == 300 and not {p.prompt for p in probs} & held
    assert {p.level for p in probs} == {2, 4}
    assert len({p.prompt for p in probs}) == 300


# ----------------------------------------------------------------------------------------------------
# runner on tiny random models (no zoo needed)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> LabZoo:
    """Four random lab-tokenizer models under the zoo's names and small held-out files."""
    return make_tiny_zoo(tmp_path_factory.mktemp("tinyzoo"), problems_per_level=12)


def _tiny_spec(name: str, steps: int = 2):
    spec = EXPERIMENTS[name]
    small = {
        "prompts_per_step": 4,
        "rollout": {"rollouts_per_prompt": 2, "max_new_tokens": 12, "batch_size": 4},
    }
    arms = tuple(dataclasses.replace(a, prompts=dataclasses.replace(a.prompts, n=32)) for a in spec.arms)
    return dataclasses.replace(spec, steps=steps, seeds=(0,), common={**spec.common, **small}, arms=arms)


def test_runner_writes_results_summary_and_reuses_runs(tiny_zoo: LabZoo, tmp_path: Path) -> None:
    ev = EvalSettings(n_problems=6, in_loop_every=1, in_loop_problems=4, batch_size=16)
    runner = LabRunner(zoo=tiny_zoo, out_root=tmp_path, eval=ev)
    spec = _tiny_spec("thinking_patterns")
    summary = runner.run_experiment(spec)
    for arm in ("compatible", "incompatible"):
        res = json.loads((tmp_path / spec.name / arm / "seed0" / "result.json").read_text())
        assert res["experiment"] == spec.name and res["arm"] == arm and res["seed"] == 0
        assert [r["step"] for r in res["metrics"]] == [1, 2]
        assert {
            "overlap_ratio",
            "overlap_mass_student",
            "overlap_mass_teacher",
            "entropy_gap",
            "loss",
        } <= set(res["metrics"][0])
        assert [r["step"] for r in res["eval_curve"]] == [0, 1, 2]
        assert set(res["accuracy"]["before"]) == {str(lv) for lv in LEVELS}
        assert set(res["accuracy"]["after"]["4"]) >= {"acc", "format_A", "format_B", "truncated"}
        assert res["config"]["loss"]["k"] == 4 and res["config"]["data"]["template"] == "raw"
        assert res["wall_time_s"] > 0 and res["fingerprint"]
        assert not (tmp_path / spec.name / arm / "seed0" / "opd" / "checkpoints").exists()
    assert summary["status"] == "complete" and len(summary["verdicts"]) == 3
    assert (tmp_path / spec.name / "summary.json").is_file()

    # experiment 2's novel arm is experiment 1's compatible arm: copied, not trained again
    spec2 = _tiny_spec("novelty_vs_scale")
    runner.run_experiment(spec2, arms=["novel"])
    novel = json.loads((tmp_path / spec2.name / "novel" / "seed0" / "result.json").read_text())
    assert novel["reused_from"] == "thinking_patterns/compatible/seed0"
    assert novel["arm"] == "novel" and novel["experiment"] == spec2.name

    # a rerun finds the finished result and does not train
    before = (tmp_path / spec.name / "compatible" / "seed0" / "result.json").stat().st_mtime_ns
    runner.run_experiment(spec)
    assert (tmp_path / spec.name / "compatible" / "seed0" / "result.json").stat().st_mtime_ns == before


def test_probe_and_prepared_arms_run(tiny_zoo: LabZoo, tmp_path: Path) -> None:
    """The special machinery of experiments 3, 6 and 7 runs end to end (1 step, tiny models)."""
    ev = EvalSettings(n_problems=4, in_loop_every=0, batch_size=16)
    runner = LabRunner(zoo=tiny_zoo, out_root=tmp_path, eval=ev)
    spec3 = dataclasses.replace(_tiny_spec("reverse_distillation", steps=1),
                                probe_args={**EXPERIMENTS["reverse_distillation"].probe_args, "n": 4})  # fmt: skip
    s3 = runner.run_experiment(spec3, arms=["toward_pre_rl"])
    probe = json.loads((tmp_path / spec3.name / "probe.json").read_text())
    assert probe["kl_between_teachers"] >= 0 and 0 <= probe["overlap_ratio_teachers"] <= 1
    assert s3["probe"]["kl_student_to_pre_rl"] == probe["kl_student_to_pre_rl"]

    spec6 = _tiny_spec("cold_start", steps=1)
    arm = spec6.arm("cold_start")
    args = {**arm.prepare_args, "n_prompts": 16, "steps": 2, "batch_size": 4, "filters": []}  # random teacher
    arm = dataclasses.replace(arm, prepare_args=args)
    spec6 = dataclasses.replace(spec6, arms=(arm,))
    runner.run_experiment(spec6)
    res = json.loads((tmp_path / spec6.name / "cold_start" / "seed0" / "result.json").read_text())
    assert res["prepare"]["kind"] == "cold_start" and res["prepare"]["teacher_responses"] == 16
    assert "origin" in res["accuracy"]

    spec7 = _tiny_spec("aligned_prompts", steps=1)
    arms = tuple(
        dataclasses.replace(a, prompts=dataclasses.replace(a.prompts, n=16, n_pool=24)) for a in spec7.arms
    )
    spec7 = dataclasses.replace(spec7, arms=arms)
    runner.run_experiment(spec7, arms=["teacher_prompts", "top_scored"])
    for name in ("teacher_prompts", "top_scored"):
        res = json.loads((tmp_path / spec7.name / name / "seed0" / "result.json").read_text())
        assert res["prompts"]["n"] == 16 and res["prompts"]["kind"] == "aligned"


def test_doctor_experiment_runs_the_doctor_and_judges_it(tiny_zoo: LabZoo, tmp_path: Path) -> None:
    """Experiment 9: the doctor probe runs `run_doctor`, and the verdict compares it with the OPD runs."""
    from opd.lab.experiments import ExperimentData, stat, verdict_doctor

    ev = EvalSettings(n_problems=4, in_loop_every=0, batch_size=16)
    runner = LabRunner(zoo=tiny_zoo, out_root=tmp_path, eval=ev)
    spec = dataclasses.replace(_tiny_spec("doctor", steps=1),
                               probe_args={**EXPERIMENTS["doctor"].probe_args, "n_prompts": 4, "max_new_tokens": 12})  # fmt: skip
    summary = runner.run_experiment(spec)
    probe = json.loads((tmp_path / "doctor" / "probe.json").read_text())
    assert set(probe["teachers"]) == {"teacher_novel", "teacher_big", "teacher_incompatible"}
    assert (tmp_path / "doctor" / "doctor" / "report.md").is_file()
    assert summary["verdicts"][0]["claim_id"] == "9a" and summary["verdicts"][0]["status"] in (
        "reproduced", "partly", "not reproduced")  # fmt: skip

    # the judgement itself, on hand-made numbers: "go" must go with a run that worked, anything else not
    def data(codes: dict[str, str], recovery: dict[str, float]) -> ExperimentData:
        arms = {a: {"gap_delta": stat([r * 0.5]), "gap_recovery": stat([r])} for a, r in recovery.items()}
        runs = {a: [{}] for a in recovery}
        teachers = {f"teacher_{a}": {"verdict": {"code": c}} for a, c in codes.items()}
        return ExperimentData(spec=EXPERIMENTS["doctor"], arms=arms, runs=runs, probe={"teachers": teachers})

    rec = {"novel": 0.8, "big": 0.1, "incompatible": -0.2}
    good = data({"novel": "go", "big": "no_gain", "incompatible": "incompatible"}, rec)
    assert verdict_doctor(good)[0].status == "reproduced"
    bad = data({"novel": "go", "big": "go", "incompatible": "go"}, rec)
    v = verdict_doctor(bad)[0]
    assert v.status == "partly" and v.result.count("MISMATCH") == 2


# ----------------------------------------------------------------------------------------------------
# a short lab OPD run must improve a weakened student (fails if the trainer stops learning)


WEAKEN_SCALE = 0.4
"""Noise that takes teacher_novel from ~100% to ~40% on levels 2-3 (greedy, 60 problems each)."""
LEARN_STEPS = 25
"""OPD steps at the lab's default lr (3e-4): measured 39% -> 92% in 30 steps, reverse KL 0.8 -> 0.03."""


def _shipped_zoo() -> LabZoo:
    import os

    from opd.errors import ModelError

    try:
        return LabZoo.shipped(os.environ.get("OPD_LAB_ZOO") or None)
    except ModelError as exc:
        pytest.skip(f"lab zoo not built: {exc}")


def _weakened_copy(src: Path, dst: Path, *, scale: float, seed: int = 0) -> Path:
    """teacher_novel with Gaussian noise (`scale` x each matrix's own std) on every weight matrix."""
    from opd.models.loading import load_model, load_tokenizer

    model = load_model(str(src))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    model.save_pretrained(dst)
    load_tokenizer(str(src)).save_pretrained(dst)
    return dst


def test_short_lab_opd_run_improves_weakened_student(tmp_path: Path) -> None:
    from opd.lab.experiments import ArmSpec, PromptsSpec

    zoo = _shipped_zoo()
    weak = _weakened_copy(zoo.models["teacher_novel"], tmp_path / "weak", scale=WEAKEN_SCALE)
    levels = (2, 3)
    test_zoo = LabZoo(models={**zoo.models, "student": weak}, eval_files={lv: zoo.eval_files[lv] for lv in levels},
                      gap_level=3)  # fmt: skip
    spec = dataclasses.replace(
        EXPERIMENTS["thinking_patterns"], name="weakened", steps=LEARN_STEPS, seeds=(0,),
        arms=(ArmSpec("repair", "lab:student", "lab:teacher_novel", prompts=PromptsSpec(mix={2: 0.5, 3: 0.5}, n=512)),),
    )  # fmt: skip
    runner = LabRunner(
        zoo=test_zoo, out_root=tmp_path / "runs", eval=EvalSettings(n_problems=60, in_loop_every=0)
    )
    runner.run_experiment(spec)
    res = json.loads((tmp_path / "runs" / "weakened" / "repair" / "seed0" / "result.json").read_text())
    before = sum(res["accuracy"]["before"][str(lv)]["acc"] for lv in levels) / len(levels)
    after = sum(res["accuracy"]["after"][str(lv)]["acc"] for lv in levels) / len(levels)
    kl = [r["reverse_kl"] for r in res["metrics"]]
    assert after >= before + 0.15, f"OPD did not repair the weakened student: {before:.3f} -> {after:.3f}"
    assert sum(kl[-3:]) / 3 < 0.5 * sum(kl[:3]) / 3, f"reverse KL did not fall: {kl[:3]} ... {kl[-3:]}"
