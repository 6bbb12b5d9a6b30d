"""`opd cold-start`: the wiring of the three stages, end to end on the tiny pair, and a rerun that skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from opd.config import load_config
from opd.errors import ConfigError
from opd.recipes.cold_start import ColdStartConfig, run_cold_start, stage_configs, stage_paths

ROOT = Path(__file__).resolve().parents[1]


def _prompts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": t, "answer": "0"}) + "\n" for t in texts))
    return path


def test_stage_wiring():
    cfg = ColdStartConfig.model_validate({
        "work_dir": "w", "sft_prompts": "a.jsonl", "opd_prompts": "b.jsonl",
        "generate": {"template": "chat:boxed"},
        "opd": {"student": {"path": "S"}, "teacher": {"path": "T"}},
    })  # fmt: skip
    gen, sft, opd = stage_configs(cfg)
    assert (gen.model, gen.prompts, gen.out) == ("T", "a.jsonl", str(Path("w/teacher.jsonl")))
    assert (sft.model, sft.data, sft.run_dir) == ("S", gen.out, str(Path("w/sft")))
    assert sft.template == "chat"  # generated messages already hold the boxed prompt
    assert (opd.student.path, opd.teacher.path) == (str(Path("w/sft/final")), "T")
    assert (opd.data.prompts, opd.run_dir) == (str(Path("w/opd_prompts.jsonl")), str(Path("w/opd")))
    cfg.generate.template = "dapo"
    assert stage_configs(cfg)[1].template == "dapo"  # non-chat generation: same template, prompt/response
    with pytest.raises(ConfigError, match="opd_prompts"):
        stage_configs(
            ColdStartConfig(opd={"student": {"path": "S"}, "teacher": {"path": "T"}}, sft_prompts="a")
        )


def test_tiny_recipe_config_is_valid():
    cfg = load_config(ROOT / "configs" / "cold_start_tiny.yaml", model=ColdStartConfig, aliases={})
    assert cfg.dedup.threshold == 0.6 and cfg.generate.filters == ["repetition"]
    stage_configs(cfg)


def test_cold_start_end_to_end_then_rerun_skips_everything(tiny_pair, tmp_path):
    from typer.testing import CliRunner

    from opd.cli import app

    sft_prompts = _prompts(tmp_path / "sft.jsonl", [f"{a}+{a}=" for a in range(6)])
    # two held-out prompts repeat SFT prompts (one only up to spacing/case): both must be dropped
    opd_prompts = _prompts(tmp_path / "opd.jsonl", ["1+1=", " 2+2= ", "7*3=", "9-4=", "8*8=", "5-1="])
    work = tmp_path / "work"
    recipe = {
        "work_dir": str(work), "sft_prompts": str(sft_prompts), "opd_prompts": str(opd_prompts),
        "dedup": {"use_embeddings": False},
        "generate": {"model": str(tiny_pair["teacher"]), "max_new_tokens": 8, "batch_size": 3, "filters": "none"},
        "sft": {"model": str(tiny_pair["student"]), "batch_size": 3, "micro_batch_size": 3, "epochs": 1,
                "optim": {"lr": 1e-3}, "tracking": {"tensorboard": False}},
        "opd": {"rollout": {"rollouts_per_prompt": 2, "max_new_tokens": 6, "batch_size": 2},
                "loss": {"k": 4}, "diagnostics": {"k": 4}, "prompts_per_step": 2, "micro_batch_size": 4,
                "steps": 2, "checkpoint_every": 1, "tracking": {"tensorboard": False}},
    }  # fmt: skip
    config = tmp_path / "cold.yaml"
    config.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["cold-start", "--config", str(config), "--opd.optim.lr", "1e-3"])
    assert result.exit_code == 0, result.output
    p = stage_paths(work)
    teacher = [json.loads(x) for x in p["teacher"].read_text().splitlines()]
    assert len(teacher) == 6 and all(r["messages"][-1]["role"] == "assistant" for r in teacher)
    assert len((p["sft_dir"] / "metrics.jsonl").read_text().splitlines()) == 2  # 6 examples / batch 3
    held_out = [json.loads(x)["prompt"] for x in p["opd_prompts"].read_text().splitlines()]
    assert held_out == ["7*3=", "9-4=", "8*8=", "5-1="]
    removed = [json.loads(x) for x in p["opd_removed"].read_text().splitlines()]
    assert [r["reason"] for r in removed] == ["exact", "exact"]
    opd_cfg = yaml.safe_load((p["opd_dir"] / "config.yaml").read_text())
    assert opd_cfg["student"]["path"] == str(p["sft_final"]) and opd_cfg["optim"]["lr"] == 1e-3
    assert (p["opd_dir"] / "final" / "model.safetensors").is_file()
    assert all(p[f"done_{s}"].is_file() for s in ("generate", "sft", "opd"))

    logs: list[str] = []
    cfg = load_config(config, model=ColdStartConfig, aliases={})
    before = {f: f.stat().st_mtime_ns for f in work.rglob("*") if f.is_file()}
    run_cold_start(cfg, log=logs.append)
    assert [x for x in logs if x.startswith("stage")] == [
        f"stage 1/3 generate: skipped, {p['teacher']} exists",
        f"stage 2/3 sft: skipped, {p['sft_final']} exists",
        f"stage 3/3 opd: skipped, {p['opd_dir'] / 'final'} exists",
    ]
    changed = [f for f, t in before.items() if f.stat().st_mtime_ns != t and f.name != "cold_start.yaml"]
    assert changed == []

    # an interrupted last stage (no DONE marker) continues from its checkpoints instead of starting over
    p["done_opd"].unlink()
    logs.clear()
    run_cold_start(cfg, log=logs.append)
    assert any("already de-duplicated" in x for x in logs)
    steps = [json.loads(x)["step"] for x in (p["opd_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and p["done_opd"].is_file()
