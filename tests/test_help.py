"""Help that shows the way: `opd train --help` and friends list their main options, every config field has a
description, help text keeps its square brackets, `opd --version`, and each command's "did you mean" points
to a list that holds that command's own options."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from opd.cli import app
from opd.cli.common import COMMAND_CONFIGS, command_config
from opd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})


def _run(*args: str):
    return runner.invoke(app, list(args))


def _flat(text: str) -> str:
    """Output with rich's box characters and line wrapping taken out."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text or "").split())


def _models(model: type[BaseModel], seen: set[type]) -> list[type[BaseModel]]:
    out = [model]
    seen.add(model)
    for info in model.model_fields.values():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and ann not in seen:
            out += _models(ann, seen)
    return out


def _all_config_models() -> list[type[BaseModel]]:
    seen: set[type] = set()
    models: list[type[BaseModel]] = []
    for command in COMMAND_CONFIGS:
        root = command_config(command)[0]
        if root not in seen:
            models += _models(root, seen)
    return models


def test_every_field_of_every_command_config_has_a_description():
    missing = [
        f"{m.__module__}.{m.__qualname__}.{name}"
        for m in _all_config_models()
        for name, info in m.model_fields.items()
        if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel))
        and not (info.description or "").strip()
    ]
    assert len(_all_config_models()) >= 15  # TrainConfig's sections, sft, generate, doctor, eval, ...
    assert not missing, "config fields without a description (Field(description=...)):\n" + "\n".join(missing)


def _verifier_names() -> list[str]:
    """The verifiers `get_verifier` accepts, as its own unknown-verifier message lists them."""
    from opd.evaluation.verify import get_verifier

    with pytest.raises(ConfigError) as ei:
        get_verifier("no-such-verifier")
    listed = str(ei.value).split("use ", 1)[1]
    names = [n.strip(" .") for n in re.split(r",|\bor\b", listed) if n.strip(" .")]
    for n in names:
        if ":" not in n:
            assert get_verifier(n).name, n  # a real, built-in verifier
    return names


def test_every_verifier_field_lists_every_verifier():
    names = _verifier_names()
    assert {"math", "math-flexible", "exact", "package.module:callable"} <= set(names)
    fields = [(m.__qualname__, info.description or "") for m in _all_config_models()
              for n, info in m.model_fields.items() if n == "verifier"]  # fmt: skip
    assert len(fields) >= 4  # train's eval section, doctor, eval, generate
    for owner, desc in fields:
        assert all(n in desc for n in names), (owner, desc)
    out = _flat(_run("config", "fields", "eval.verifier").output)
    assert all(n in out for n in names), out


def test_train_help_lists_the_main_options_their_short_forms_and_the_way_to_the_rest():
    from opd.config import ALIASES

    res = _run("train", "--help")
    out = _flat(res.output)
    assert res.exit_code == 0, out
    for alias, path in ALIASES.items():
        assert f"--{alias}, --{path}" in out, alias
    for opt in ("--run_dir", "--steps", "--rollout.max_new_tokens", "--rollout.rollouts_per_prompt",
                "--prompts_per_step", "--eval.prompts"):  # fmt: skip
        assert opt in out, opt
    assert "<sampled|topk|full>" in out and "[default: topk]" in out
    assert "--section.field VALUE" in out and "`opd config fields` lists them all" in out
    assert "--resume" in out and "--config" in out


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("sft", ["--student, --model", "--lr, --optim.lr", "--epochs", "opd config fields --command sft"]),
        ("generate", ["--teacher, --model", "--filters", "opd config fields --command generate"]),
        ("cold-start", ["--work_dir", "--generate.model", "--opd.steps", "opd config fields --command cold-start"]),
    ],
)  # fmt: skip
def test_recipe_commands_help_lists_their_main_options(command, expected):
    res = _run(command, "--help")
    out = _flat(res.output)
    assert res.exit_code == 0 and "Main options" in out, out
    for text in expected:
        assert text in out, text


def test_square_brackets_survive_in_config_fields_and_in_help():
    out = _flat(_run("config", "fields", "teacher").output)
    assert "e.g. [http://10.0.0.5:8000, http://10.0.0.6:8000]; requests" in out, out
    help_out = _flat(_run("serve-teacher", "--help").output)
    assert "--teacher.urls [http://a:8000, http://b:8000]" in help_out, help_out
    assert "[directory name]" in help_out and "[this one]" in help_out  # option help, not eaten as markup
    assert "\\[" not in help_out  # escaped once, shown literally


def test_config_fields_lists_every_field_and_filters_by_section():
    from opd.config import field_paths

    out = _run("config", "fields").output
    for path in field_paths():
        assert f"--{path} " in out, path
    loss = _run("config", "fields", "loss").output
    assert "--loss.signal" in loss and "--optim.lr" not in loss and "9 config field(s)" in loss
    bad = _run("config", "fields", "los")
    assert bad.exit_code == 2 and "its sections: alarms, data" in _flat(bad.output) and "loss" in bad.output
    unknown = _run("config", "fields", "--command", "trian")
    assert unknown.exit_code == 2 and "choose one of train, sft" in _flat(unknown.output)


def test_version_comes_from_the_package():
    for flag in ("--version", "-V"):
        res = _run(flag)
        assert res.exit_code == 0 and res.output.strip() == f"opd {version('opd')}", res.output
    import opd

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == opd.__version__


@pytest.mark.parametrize(
    ("args", "yaml_text", "listing", "expected"),
    [
        (["train", "--loss.sigal", "topk"], None, ("config", "fields"), "--loss.signal"),
        (["sft", "--epochz", "2"], None, ("config", "fields", "--command", "sft"), "--epochs"),
        (["generate", "--sampels", "2"], None, ("config", "fields", "--command", "generate"), "--samples"),
        (["cold-start", "--work_dri", "x"], None, ("config", "fields", "--command", "cold-start"), "--work_dir"),
        (["doctor", "--studnet", "x"], None, ("config", "fields", "--command", "doctor"), "--student"),
        (["eval", "--prompts", "p.jsonl"], "models: [m]\nsamplez: 4\n", ("config", "fields", "--command", "eval"),
         "samples"),
        (["serve-teacher"], "model: m\nprot: 8001\n", ("config", "fields", "--command", "serve-teacher"), "port"),
        (["doctor"], "studnet: s\n", ("config", "fields", "--command", "doctor"), "--student"),
    ],
)  # fmt: skip
def test_did_you_mean_points_to_the_list_of_the_commands_own_options(
    tmp_path, args, yaml_text, listing, expected
):
    """The error names a listing command; that listing holds the option the error suggests."""
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        args = [*args, "--config", str(tmp_path / "c.yaml")]
    res = _run(*args)
    out = _flat(res.output)
    assert res.exit_code == 2 and "did you mean" in out, out
    assert f"`opd {' '.join(listing)}` lists every" in out, out
    assert expected.lstrip("-") in out.split("did you mean", 1)[1].split("?", 1)[0], out
    listed = _run(*listing)
    assert listed.exit_code == 0 and re.search(rf"(^|\s){re.escape(expected)}\s", listed.output), (
        listed.output
    )
