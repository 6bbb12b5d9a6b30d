"""One device rule for every model-running command (`opd.device.resolve_device`).

For each command: `--device cpu` runs and places every model it loads on the CPU through
`load_model(..., device=...)`, and `--device cuda` on a machine without CUDA stops with exit code 2 and a
one-line message naming the setting, before any model is loaded or any output written. CUDA is switched
off by monkeypatching, so these tests mean the same on a GPU machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import opd.models.loading
from opd.cli import app
from opd.errors import ConfigError

runner = CliRunner()
CPU = torch.device("cpu")
NO_CUDA = "device 'cuda': CUDA is not available"


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def loads(monkeypatch) -> list[Any]:
    """The `device` argument of every `opd.models.loading.load_model` call (commands import it at call time)."""
    seen: list[Any] = []
    real = opd.models.loading.load_model

    def recording(spec, **kw):
        seen.append(kw.get("device"))
        model = real(spec, **kw)
        assert next(model.parameters()).device == CPU
        return model

    monkeypatch.setattr(opd.models.loading, "load_model", recording)
    return seen


def _refused(res, what: str = NO_CUDA) -> None:
    assert res.exit_code == 2, res.output
    assert what in res.output and "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit)


# ----------------------------------------------------------------------------------------------------
# load_model: the one place a command's model is moved


def test_load_model_places_the_model_once(tiny_pair):
    path = str(tiny_pair["student"])
    assert next(opd.models.loading.load_model(path, device="cpu").parameters()).device == CPU
    meta = opd.models.loading.load_model(path, device="meta")  # any non-CUDA device: proves the move happens
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert next(opd.models.loading.load_model(path).parameters()).device == CPU  # None: stays where it loaded


def test_load_model_refuses_cuda_before_loading(no_cuda, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(opd.models.loading.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ConfigError, match=NO_CUDA):
        opd.models.loading.load_model("/nonexistent/model", device="cuda")


# ----------------------------------------------------------------------------------------------------
# opd check


def test_check_on_cpu_and_refused_cuda(tiny_pair, no_cuda, loads):
    args = ["check", "--student", str(tiny_pair["student"]), "--teacher", str(tiny_pair["teacher"]),
            "--max-new-tokens", "4", "--k", "4"]  # fmt: skip
    res = runner.invoke(app, [*args, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert loads == [CPU, CPU] and "models loaded on cpu" in res.output
    loads.clear()
    _refused(runner.invoke(app, [*args, "--device", "cuda"]))
    assert loads == []


# ----------------------------------------------------------------------------------------------------
# opd doctor


def _doctor_args(tiny_pair, out: Path) -> list[str]:
    return ["doctor", "--student", str(tiny_pair["student"]), "--teacher", str(tiny_pair["teacher"]),
            "--prompts", str(tiny_pair["prompts"]), "--template", "raw", "--n-prompts", "2", "--samples", "1",
            "--teacher-samples", "0", "--max-new-tokens", "3", "--k", "4", "--continuation-rollouts", "0",
            "--out", str(out), "--no-plots"]  # fmt: skip


def test_doctor_on_cpu_and_refused_cuda(tiny_pair, tmp_path, no_cuda, loads):
    res = runner.invoke(app, [*_doctor_args(tiny_pair, tmp_path / "doc"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert loads == [CPU, CPU]
    data = json.loads((tmp_path / "doc" / "doctor.json").read_text())
    assert data["device"] == "cpu" and data["config"]["device"] == "cpu"
    loads.clear()
    _refused(runner.invoke(app, [*_doctor_args(tiny_pair, tmp_path / "doc2"), "--device", "cuda"]))
    assert loads == [] and not (tmp_path / "doc2").exists()


def test_doctor_device_auto_resolves_through_the_rule(tiny_pair, tmp_path, loads):
    from opd.device import resolve_device
    from opd.evaluation.doctor import DoctorConfig, run_doctor

    cfg = DoctorConfig(student=str(tiny_pair["student"]), teachers=[str(tiny_pair["teacher"])],
                       prompts=str(tiny_pair["prompts"]), templates=["raw"], n_prompts=1, samples=1,
                       teacher_samples=0, max_new_tokens=2, k=4, continuation_rollouts=0)  # fmt: skip
    if resolve_device("auto").type != "cpu":
        pytest.skip("the recorder checks CPU placement; auto is a GPU here")
    res = run_doctor(cfg)
    assert cfg.device == "auto" and loads == [resolve_device("auto")] * 2 and res["device"] == "cpu"


# ----------------------------------------------------------------------------------------------------
# opd eval


def _eval_args(tiny_pair, out: Path) -> list[str]:
    return ["eval", "--model", str(tiny_pair["student"]), "--prompts", str(tiny_pair["prompts"]),
            "--max-problems", "2", "--samples", "1", "--max-new-tokens", "3", "--template", "raw",
            "--verifier", "exact", "--out", str(out)]  # fmt: skip


def test_eval_on_cpu_and_refused_cuda(tiny_pair, tmp_path, no_cuda, loads):
    res = runner.invoke(app, [*_eval_args(tiny_pair, tmp_path / "ev"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert loads == [CPU]
    assert json.loads((tmp_path / "ev" / "student.summary.json").read_text())["device"] == "cpu"
    loads.clear()
    _refused(runner.invoke(app, [*_eval_args(tiny_pair, tmp_path / "ev2"), "--device", "cuda"]))
    assert loads == [] and not (tmp_path / "ev2").exists()
    cfg = tmp_path / "eval.yaml"  # the YAML key goes through the same rule
    cfg.write_text("device: cuda:0\n")
    _refused(runner.invoke(app, [*_eval_args(tiny_pair, tmp_path / "ev3"), "--config", str(cfg)]),
             "device 'cuda:0': CUDA is not available")  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# opd generate


def _generate_args(tiny_pair, out: Path) -> list[str]:
    return ["generate", "--model", str(tiny_pair["teacher"]), "--prompts", str(tiny_pair["prompts"]),
            "--out", str(out), "--max-new-tokens", "3", "--batch-size", "2", "--max_prompts", "2",
            "--filters", "none"]  # fmt: skip


def test_generate_on_cpu_and_refused_cuda(tiny_pair, tmp_path, no_cuda, loads):
    from opd.recipes.generate import OutputPaths, read_complete_lines

    out = tmp_path / "t.jsonl"
    res = runner.invoke(app, [*_generate_args(tiny_pair, out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert loads == [CPU] and len(read_complete_lines(out)) == 2
    # The device is where, not what: finishing the job elsewhere (here: auto) is a resume, not a refusal.
    assert "device" not in json.loads(OutputPaths.for_out(out).meta.read_text())
    res = runner.invoke(app, _generate_args(tiny_pair, out))
    assert res.exit_code == 0, res.output
    loads.clear()
    fresh = tmp_path / "u.jsonl"
    _refused(runner.invoke(app, [*_generate_args(tiny_pair, fresh), "--device", "cuda"]))
    assert loads == [] and not OutputPaths.for_out(fresh).meta.exists()


# ----------------------------------------------------------------------------------------------------
# opd prompts select / dedup


def test_prompts_select_on_cpu_and_refused_cuda(tiny_pair, tmp_path, no_cuda, loads):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(tiny_pair["prompts"].read_text().splitlines()[:3]) + "\n")

    def args(out: Path) -> list[str]:
        return ["prompts", "select", "--student", str(tiny_pair["student"]), "--teacher", str(tiny_pair["teacher"]),
                "--candidates", str(pool), "--n", "2", "--mix", "0", "--rollouts", "1", "--max-new-tokens", "3",
                "--k", "4", "--out", str(out)]  # fmt: skip

    res = runner.invoke(app, [*args(tmp_path / "sel.jsonl"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert loads == [CPU, CPU] and len((tmp_path / "sel.jsonl").read_text().splitlines()) == 2
    loads.clear()
    _refused(runner.invoke(app, [*args(tmp_path / "sel2.jsonl"), "--device", "cuda"]))
    assert loads == [] and not (tmp_path / "sel2.jsonl").exists()


def test_prompts_dedup_embedder_device(tmp_path, no_cuda, monkeypatch):
    from opd.recipes.prompts import DedupConfig, Embedder, get_embedder

    assert DedupConfig().device == "cpu"  # the embedding model's own default: small, same cosines everywhere
    a = tmp_path / "a.jsonl"
    a.write_text('{"prompt": "1+1="}\n')
    b = tmp_path / "b.jsonl"
    b.write_text('{"prompt": "2+2="}\n')

    def never(*args, **kw):
        raise AssertionError("the embedding model was loaded before the device was checked")

    monkeypatch.setattr(Embedder, "__init__", never)
    _refused(runner.invoke(app, ["prompts", "dedup", str(a), "--against", str(b), "--device", "cuda"]))
    assert not (tmp_path / "a.dedup.jsonl").exists()
    with pytest.raises(ConfigError, match=NO_CUDA):
        get_embedder("cuda")
    # exact-only de-duplication loads no model, so the device is not consulted
    res = runner.invoke(
        app, ["prompts", "dedup", str(a), "--against", str(b), "--no-embeddings", "--device", "cuda"]
    )
    assert res.exit_code == 0, res.output


# ----------------------------------------------------------------------------------------------------
# opd cold-start


@pytest.mark.parametrize("setting", ["generate.device", "dedup.device"])
def test_cold_start_refuses_cuda_before_any_stage(tiny_pair, tmp_path, no_cuda, loads, setting):
    work = tmp_path / "work"
    args = ["cold-start", "--work_dir", str(work), "--generate.model", str(tiny_pair["teacher"]),
            "--sft.model", str(tiny_pair["student"]), "--sft_prompts", str(tiny_pair["prompts"]),
            "--opd_prompts", str(tiny_pair["prompts"]), f"--{setting}", "cuda"]  # fmt: skip
    _refused(runner.invoke(app, args), f"{setting}: {NO_CUDA}")
    assert loads == [] and not work.exists()


def test_cold_start_device_fields_default():
    from opd.recipes.cold_start import ColdStartConfig

    cfg = ColdStartConfig()
    assert cfg.generate.device == "auto" and cfg.dedup.device == "cpu"


# ----------------------------------------------------------------------------------------------------
# the lab: run / demo and the runner's own loads


def test_lab_commands_refuse_cuda_before_the_zoo(tmp_path, no_cuda):
    missing = tmp_path / "no-zoo"
    _refused(
        runner.invoke(app, ["lab", "run", "thinking_patterns", "--zoo", str(missing), "--device", "cuda"])
    )
    _refused(
        runner.invoke(app, ["demo", "--zoo", str(missing), "--runs", str(tmp_path / "r"), "--device", "cuda"])
    )
    assert not missing.exists() and not (tmp_path / "r").exists()
    res = runner.invoke(app, ["lab", "run", "thinking_patterns", "--zoo", str(missing), "--device", "cpu"])
    assert res.exit_code == 2 and "no lab zoo" in res.output  # cpu passes the device check


def test_lab_runner_places_its_own_loads(tiny_pair, tmp_path, no_cuda, loads):
    from opd.lab.runner import LabRunner, LabZoo, teacher_pair_probe

    zoo = LabZoo(models={}, eval_files={})
    with pytest.raises(ConfigError, match=NO_CUDA):
        LabRunner(zoo=zoo, out_root=tmp_path, device="cuda")
    assert LabRunner(zoo=zoo, out_root=tmp_path, device="cpu").compute_device == CPU
    s, t = str(tiny_pair["student"]), str(tiny_pair["teacher"])
    res = teacher_pair_probe(s, t, s, files=[tiny_pair["prompts"]], n=2, device="cpu")
    assert loads == [CPU] * 3 and res["kl_between_teachers"] > 0.0 and res["rollouts"] == 2
