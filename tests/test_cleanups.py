"""Issue 22's clean-ups, pinned: NaN is null in every file opd writes (and the old "nan" still reads), one
JSONL reader and one message checker for prompt files and SFT data, one render-then-encode, and what the
unified pieces print.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opd.analysis.analyze import load_run, metric_value, series
from opd.cli import app
from opd.cli.common import load_command_config
from opd.data import (
    PromptRecord,
    fill_template,
    load_prompts,
    option_names,
    prepare_prompts,
    prompt_messages,
    render_prompt,
)
from opd.errors import DataError
from opd.lab.stats import run_metrics
from opd.recipes.prompts import write_jsonl
from opd.train.sft import SFTConfig, encode_example, load_sft_examples, read_sft_jsonl
from opd.train.tracking import MetricsLogger, read_metrics


def _strict_loads(line: str):
    """json.loads that refuses NaN/Infinity, as jq and JavaScript do."""

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def _flat(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------------
# NaN as null


def _log_steps(run_dir: Path) -> None:
    log = MetricsLogger(run_dir, tensorboard=False)
    log.log(1, {"loss": 0.5, "grad_norm": 1.0, "overlap_ratio": 0.7})
    log.log(2, {"loss": float("nan"), "grad_norm": float("inf"), "overlap_ratio": 0.8})
    log.log(3, {"loss": 0.25, "grad_norm": 2.0, "overlap_ratio": 0.9})
    log.log(3, {"kind": "eval", "eval/avg@4": float("nan")})
    log.close()


def test_metrics_are_written_with_null_for_nan_and_inf(tmp_path):
    _log_steps(tmp_path)
    rows = [_strict_loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1] == {"step": 2, "loss": None, "grad_norm": None, "overlap_ratio": 0.8}  # keys kept
    assert rows[3] == {"step": 3, "kind": "eval", "eval/avg@4": None}
    assert read_metrics(tmp_path)[1]["loss"] is None  # read_metrics: the rows as written


def _old_style_run(run_dir: Path) -> None:
    """metrics.jsonl as opd wrote it before null: non-finite values as the strings "nan"/"inf"."""
    rows = [
        {"step": 1, "loss": 0.5, "grad_norm": 1.0, "overlap_ratio": 0.7},
        {"step": 2, "loss": "nan", "grad_norm": "inf", "overlap_ratio": 0.8},
        {"step": 3, "loss": 0.25, "grad_norm": 2.0, "overlap_ratio": 0.9},
        {"step": 3, "kind": "eval", "eval/avg@4": "nan"},
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("style", ["null", "old nan string"])
def test_analyze_reads_nan_back_as_nan_in_new_and_old_files(tmp_path, style):
    run_dir = tmp_path / "run"
    if style == "null":
        _log_steps(run_dir)
    else:
        _old_style_run(run_dir)
    run = load_run(run_dir)
    steps, loss = series(run, "loss")
    assert steps == [1, 2, 3] and loss[0] == 0.5 and math.isnan(loss[1]) and loss[2] == 0.25
    _, grad = series(run, "grad_norm")
    # null cannot say whether it was NaN or inf: read as NaN; the old "inf" string was exact
    assert math.isnan(grad[1]) if style == "null" else grad[1] == math.inf
    e_steps, e_acc = series(run, "eval/avg@4")
    assert e_steps == [3] and math.isnan(e_acc[0])
    assert series(run, "never_logged") == ([], [])  # an absent key stays absent, not NaN


def test_lab_statistics_are_the_same_for_null_and_old_nan_files(tmp_path):
    _log_steps(tmp_path / "new")
    _old_style_run(tmp_path / "old")
    new = run_metrics({"metrics": read_metrics(tmp_path / "new")})
    old = run_metrics({"metrics": read_metrics(tmp_path / "old")})
    assert new["loss_mean"] == old["loss_mean"] == pytest.approx(0.375)  # the NaN step skipped in both
    assert new["grad_norm_max"] == old["grad_norm_max"] == 2.0


def test_metric_value_reads_every_spelling():
    assert (
        math.isnan(metric_value(None)) and math.isnan(metric_value("nan")) and math.isnan(metric_value("NaN"))
    )
    assert metric_value("-inf") == -math.inf and metric_value("Infinity") == math.inf
    assert metric_value(0.5) == 0.5 and metric_value("free text") == "free text"


def test_resume_cuts_back_an_old_style_metrics_file(tmp_path):
    _old_style_run(tmp_path)
    MetricsLogger(tmp_path, tensorboard=False, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_prompt_selection_files_write_nan_as_null(tmp_path):
    path = tmp_path / "scores.jsonl"
    write_jsonl(path, [{"prompt": "a", "overlap_ratio": float("nan"), "where": tmp_path}])
    (row,) = [_strict_loads(x) for x in path.read_text().splitlines()]
    assert row == {"prompt": "a", "overlap_ratio": None, "where": str(tmp_path)}


def test_lab_result_files_write_nan_as_null(tmp_path):
    from opd.lab.runner import _atomic_write_json

    _atomic_write_json(tmp_path / "result.json", {"acc": float("nan"), "rows": [{"x": float("-inf")}]})
    assert _strict_loads((tmp_path / "result.json").read_text()) == {"acc": None, "rows": [{"x": None}]}


# ----------------------------------------------------------------------------------------------------
# One JSONL reader, one message checker (prompt files and SFT data)


def _sft_file(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"messages": [}', r"d\.jsonl:3: invalid JSON \(Expecting value, column 15\); each line must be one JSON object\."),
        ("[1, 2]", r'd\.jsonl:3: expected a JSON object like \{"prompt": \.\.\.\}, got list; each record must be an object\.'),
        ('{"messages": "hi"}', r"d\.jsonl:3: field 'messages' must be a non-empty list of \{role, content\} messages, got str \('hi'\); write it as \[\{\"role\": \"user\", \"content\": \"\.\.\.\"\}, \{\"role\": \"assistant\""),
        ('{"messages": [{"role": "user"}]}', r"d\.jsonl:3: field 'messages', message 0 must be an object with 'role' and 'content'"),
        ('{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]}',
         r"d\.jsonl:3: field 'messages', message 0: 'role' and 'content' must be strings, got role='user', content=7"),
        ('{"messages": [{"role": "user", "content": "hi"}]}',
         r"d\.jsonl:3: the last message must be the assistant's response \(the SFT target\), got role 'user'\."),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}',
         r"d\.jsonl:3: a conversation needs a prompt before the assistant's response\."),
    ],
    ids=["bad json", "not an object", "not a list", "no content", "content not a string", "ends with user",
         "no prompt"],
)  # fmt: skip
def test_sft_data_errors_name_the_file_line_and_field(tmp_path, tiny_tokenizer, line, message):
    data = _sft_file(tmp_path / "d.jsonl", [GOOD, "", line])  # line 3: the blank line 2 is counted
    cfg = SFTConfig(model="unused", data=str(data))
    with pytest.raises(DataError, match=message):
        load_sft_examples(cfg, tiny_tokenizer)


def test_sft_data_read_by_the_prompt_files_reader(tmp_path):
    data = _sft_file(tmp_path / "d.jsonl", ["", GOOD])
    assert read_sft_jsonl(data) == [(f"{data}:2", json.loads(GOOD))]
    with pytest.raises(DataError, match=r"d\.jsonl: no records \(the file is empty\)\.$"):
        read_sft_jsonl(_sft_file(data, ["", "  "]))
    with pytest.raises(DataError, match=r"nope\.jsonl: SFT data file not found; check --data"):
        read_sft_jsonl(tmp_path / "nope.jsonl")
    whole = tmp_path / "d.json"  # a whole-file JSON array (a common .json export), as prompt files allow
    whole.write_text(f"[{GOOD}]")
    assert read_sft_jsonl(whole) == [(f"{whole}:row 1", json.loads(GOOD))]


def test_sft_command_prints_the_message_checkers_line(tmp_path, tiny_pair):
    data = _sft_file(
        tmp_path / "d.jsonl", [GOOD, json.dumps({"messages": [{"role": "user", "content": "hi"}]})]
    )
    res = CliRunner().invoke(app, ["sft", "--model", str(tiny_pair["student"]), "--data", str(data),
                                   "--run_dir", str(tmp_path / "run")], env={"COLUMNS": "400"})  # fmt: skip
    assert res.exit_code == 2, res.output
    assert _flat(res.output) == (
        f"error: {data}:2: the last message must be the assistant's response (the SFT target), got role 'user'."
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_prompt_file_still_refuses_a_conversation_that_ends_with_the_reply(tmp_path):
    path = _sft_file(tmp_path / "p.jsonl", [GOOD])
    with pytest.raises(DataError) as info:
        load_prompts(path)
    assert str(info.value) == (
        f"{path}:1: field 'messages' ends with an assistant message; prompts must end with a user turn. "
        "Drop the assistant reply (SFT data is not a prompt set)."
    )


# ----------------------------------------------------------------------------------------------------
# One render-then-encode


def _rec(text=None, messages=None) -> PromptRecord:
    return PromptRecord(text=text, messages=messages, answer=None, source="p.jsonl:1", raw={})


def test_prepare_prompts_is_render_then_encode_and_still_importable_from_eval(tiny_tokenizer):
    from opd.evaluation import eval as ev

    assert ev.prepare_prompts is prepare_prompts
    records = [_rec("1+1="), _rec(messages=[{"role": "user", "content": "2+2="}])]
    texts, ids = prepare_prompts(records, tiny_tokenizer, template="chat:boxed", system_prompt="Be brief.")
    assert texts == [
        render_prompt(r, tiny_tokenizer, template="chat:boxed", system_prompt="Be brief.") for r in records
    ]
    # a chat template's text holds BOS already: no special tokens added
    assert ids == [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    with pytest.raises(
        DataError, match=r"p\.jsonl:1: prompt is \d+ tokens, over --max-prompt-tokens 3; raise"
    ):
        prepare_prompts(records[:1], tiny_tokenizer, template="raw", max_prompt_tokens=3,
                        options=option_names("--", dashes=True))  # fmt: skip


def test_prompt_messages_are_the_messages_render_prompt_renders(tiny_tokenizer):
    rec = _rec(messages=[{"role": "user", "content": "7*6"}])
    msgs = prompt_messages(rec, template="chat:boxed", system_prompt="Be brief.")
    assert msgs == [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": fill_template("boxed", "7*6")}]  # fmt: skip
    rendered = tiny_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered == render_prompt(rec, tiny_tokenizer, template="chat:boxed", system_prompt="Be brief.")
    assert fill_template("chat", "x") == fill_template("raw", "x") == "x"
    assert fill_template("chat:Q: {prompt} A:", "x") == fill_template("Q: {prompt} A:", "x") == "Q: x A:"


def test_sft_fills_a_chat_format_template_as_render_prompt_does(tiny_tokenizer):
    row = {"prompt": "7*6", "response": "42"}
    ctx, _ = encode_example(row, "d.jsonl:1", tiny_tokenizer, template="chat:boxed")
    assert tiny_tokenizer.decode(ctx) == render_prompt(_rec("7*6"), tiny_tokenizer, template="chat:boxed")


# ----------------------------------------------------------------------------------------------------
# One CLI config builder


def test_the_config_builder_layers_the_file_the_named_options_then_section_field_options(tmp_path):
    cfg_file = tmp_path / "doctor.yaml"
    cfg_file.write_text("n_prompts: 5\nseed: 1\nout: from-yaml\n")
    cfg = load_command_config("doctor", cfg_file, options={"n_prompts": 7, "seed": None, "teachers": []},
                              extra=["--n_prompts", "9", "--out", "from-extra"])  # fmt: skip
    assert (cfg.n_prompts, cfg.seed, cfg.out, cfg.teachers) == (9, 1, "from-extra", [])  # None, []: not given
    named = load_command_config("doctor", cfg_file, options={"n_prompts": 7})
    assert (named.n_prompts, named.out) == (7, "from-yaml")


@pytest.mark.parametrize("command", ["eval", "prompts render"])
def test_a_named_text_option_means_what_it_means_after_section_field(command):
    cfg = load_command_config(command, None, options={
        "chat_template_kwargs": "{enable_thinking: false}", "system_prompt": "null", "template": "null",
    })  # fmt: skip
    assert cfg.chat_template_kwargs == {"enable_thinking": False}
    assert cfg.system_prompt is None  # null: none, where the field allows it
    assert cfg.template == "null"  # a text field that takes no null keeps the text as typed
    ref = load_command_config(command, None, extra=["--chat_template_kwargs", "{enable_thinking: false}"])
    assert ref.chat_template_kwargs == cfg.chat_template_kwargs


def test_eval_ignores_a_column_given_as_null_on_the_command_line():
    cfg = load_command_config("eval", None, options={"messages_field": "null", "answer_field": "solution"})
    assert cfg.messages_field is None and cfg.answer_field == "solution" and cfg.prompt_field == "prompt"


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "--model", "m", "--prompts", "p.jsonl"],
        ["prompts", "render", "--model", "m", "--prompts", "p.jsonl"],
    ],
    ids=["eval", "prompts render"],
)
def test_a_chat_template_kwargs_option_that_is_no_mapping_is_one_line(args):
    res = CliRunner().invoke(app, [*args, "--chat-template-kwargs", "[1, 2]"], env={"COLUMNS": "400"})
    assert res.exit_code == 2, res.output
    assert _flat(res.output) == (
        "error: invalid configuration in command line: chat_template_kwargs: Input should be a valid dictionary "
        "(got [1, 2])"
    )


@pytest.mark.parametrize(("command", "kind"), [("train", "a run directory"), ("sft", "an sft run directory")])
def test_resume_of_a_directory_without_config_yaml_is_one_line(tmp_path, command, kind):
    res = CliRunner().invoke(app, [command, "--resume", str(tmp_path)], env={"COLUMNS": "400"})
    assert res.exit_code == 2, res.output
    assert _flat(res.output) == f"error: --resume {tmp_path}: no config.yaml there; is it {kind}?"
