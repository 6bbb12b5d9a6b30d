"""Settings a model brings: `lab:` models get the lab's verifier and template in every command unless the
user sets one (`opd.models.loading.model_defaults`, the `opd.model_defaults` entry point; the core never
imports the lab)."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd.config import load_config
from opd.models.loading import apply_model_defaults, model_defaults, shared_model_defaults

LAB = {"verifier": "opd.lab.world:LabVerifier", "template": "raw"}


@pytest.fixture(autouse=True)
def _zoo() -> None:
    from opd.errors import ModelError
    from opd.lab.zoo import zoo_path

    try:
        zoo_path("student")
    except ModelError as exc:
        pytest.skip(f"lab zoo not built: {exc}")


def test_lab_models_bring_the_lab_verifier_and_template_through_the_entry_point(tmp_path):
    from importlib.metadata import entry_points

    from opd.lab.world import LabVerifier
    from opd.lab.zoo import zoo_defaults

    assert [ep.value for ep in entry_points(group="opd.model_defaults") if ep.name == "lab"] == [
        "opd.lab.zoo:zoo_defaults"
    ]
    assert model_defaults("lab:student") == LAB == zoo_defaults("teacher_big")
    module, _, attr = LAB["verifier"].partition(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is LabVerifier  # the spec names a real class
    assert model_defaults(str(tmp_path)) == {} and model_defaults("Qwen/Qwen3-1.7B") == {}
    assert model_defaults("nosuchscheme:x") == {}  # a scheme without defaults brings none


def test_a_default_is_taken_only_when_every_model_brings_it():
    assert shared_model_defaults(["lab:student", "lab:teacher_novel"]) == (
        LAB,
        ["lab:student", "lab:teacher_novel"],
    )
    assert shared_model_defaults(["lab:student", "Qwen/Qwen3-1.7B"]) == (
        {},
        [],
    )  # one grader cannot suit both
    assert shared_model_defaults(["lab:student", ""]) == (LAB, ["lab:student"])  # unset specs do not count


def test_train_config_takes_them_where_the_user_set_nothing(tmp_path):
    from opd.config import TrainConfig

    base = ["--student.path", "lab:student", "--teacher.path", "lab:teacher_novel"]
    fields = {"template": "data.template", "verifier": "eval.verifier"}
    said: list[str] = []
    cfg = apply_model_defaults(
        load_config(None, base), ["lab:student", "lab:teacher_novel"], fields, said.append
    )
    assert (cfg.data.template, cfg.eval.verifier) == ("raw", LAB["verifier"])
    assert said == ["lab:student (and 1 more): using template raw and verifier opd.lab.world:LabVerifier (the "
                    "defaults of lab: models; set --data.template / --eval.verifier to override)"]  # fmt: skip
    # explicit settings win, on the command line and in YAML, even when they equal the built-in default
    said.clear()
    cfg = apply_model_defaults(
        load_config(None, [*base, "--data.template", "chat"]), ["lab:student"], fields, said.append
    )
    assert (cfg.data.template, cfg.eval.verifier) == ("chat", LAB["verifier"])
    assert said == ["lab:student: using verifier opd.lab.world:LabVerifier (the defaults of lab: models; set "
                    "--eval.verifier to override)"]  # fmt: skip
    yml = tmp_path / "c.yaml"
    yml.write_text("data:\n  template: chat\neval:\n  verifier: math\n")
    said.clear()
    cfg = apply_model_defaults(load_config(yml, base), ["lab:student"], fields, said.append)
    assert (cfg.data.template, cfg.eval.verifier, said) == ("chat", "math", [])
    # not for other models, and the given config is never changed
    plain = load_config(None, ["--student.path", str(tmp_path)])
    assert apply_model_defaults(plain, [str(tmp_path)], fields, said.append) is plain and said == []
    assert TrainConfig().data.template == "chat"


def test_every_command_config_gets_them(tmp_path):
    """sft, generate, prompts select and eval read the defaults through the same function as train and
    doctor; each entry point applies it (run_training, sft_with_progress, run_generate, run_selection,
    run_eval_command, run_doctor)."""
    import inspect

    from opd.cli.eval import run_eval_command
    from opd.evaluation.doctor import run_doctor
    from opd.evaluation.eval import EvalCommandConfig
    from opd.recipes.generate import GenerateConfig, run_generate
    from opd.recipes.prompts import SelectConfig, run_selection
    from opd.train.run import run_training
    from opd.train.sft import SFTConfig, sft_with_progress

    for fn in (run_training, sft_with_progress, run_generate, run_selection, run_eval_command, run_doctor):
        assert "apply_model_defaults(" in inspect.getsource(fn), fn.__name__
    sft = apply_model_defaults(SFTConfig(model="lab:student"), ["lab:student"], {"template": "template"})
    assert sft.template == "raw"
    gen = apply_model_defaults(GenerateConfig(model="lab:teacher_novel"), ["lab:teacher_novel"],
                               {"verifier": "verifier", "template": "template"})  # fmt: skip
    assert (gen.template, gen.verifier) == ("raw", LAB["verifier"])
    sel = apply_model_defaults(SelectConfig(student="lab:student", teacher="lab:teacher_novel", template="chat"),
                               ["lab:student", "lab:teacher_novel"], {"template": "template"})  # fmt: skip
    assert sel.template == "chat"  # given explicitly
    ev = apply_model_defaults(EvalCommandConfig(models=["lab:student"], verifier="exact"), ["lab:student"],
                              {"verifier": "verifier", "template": "template"})  # fmt: skip
    assert (ev.verifier, ev.template) == ("exact", "raw")


def test_sft_on_a_lab_student_trains_with_the_lab_template(tmp_path):
    """The whole `opd sft` path: the line is printed and the run's config.yaml records template raw."""
    import json

    import yaml
    from typer.testing import CliRunner

    from opd.cli import app

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{a}+{a}=", "response": f"{2 * a}"}) + "\n" for a in range(10, 14))
    )
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["sft", "--model", "lab:student", "--data", str(data), "--run_dir", str(run),
                                   "--batch_size", "4", "--micro_batch_size", "4", "--steps", "1",
                                   "--save_final", "false", "--tracking.tensorboard", "false"],
                             env={"COLUMNS": "400"})  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (
        "lab:student: using template raw (the defaults of lab: models; set --template to override)"
        in res.output
    )
    assert yaml.safe_load((run / "config.yaml").read_text())["template"] == "raw"


def test_check_on_lab_models_renders_with_the_lab_template(tmp_path: Path):
    from typer.testing import CliRunner

    from opd.cli import app
    from opd.lab.zoo import eval_prompt_path

    res = CliRunner().invoke(app, ["check", "--student", "lab:student", "--teacher", "lab:teacher_novel",
                                   "--prompts", str(eval_prompt_path(2)), "--n-prompts", "1", "--k", "4"],
                             env={"COLUMNS": "400"})  # fmt: skip
    text = " ".join(res.output.split())
    assert "lab:student (and 1 more): using template raw" in text, text
    assert "template raw" in text and "template chat" not in text
