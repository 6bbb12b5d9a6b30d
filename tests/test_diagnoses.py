"""Diagnoses that point at the cause: what the user is told names the real problem and their own option.

A doctor verdict from a handful of prompts says it is noisy and which option raises the sample; a hint names
the option of the command that printed it (`opd eval --max-prompt-tokens`, `opd doctor --max_prompt_tokens`,
not train's `data.max_prompt_tokens`); a chat template that keeps a role it does not know (ChatML renders
`human` as `<|im_start|>human`) is warned about; a damaged checkpoint skipped at resume is moved where the
resumed run's fresh checkpoint of that step and keep-last-N rotation cannot remove it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_checkpoint_faults import DAMAGES, _args, _trainer  # tests/ is on sys.path (pytest rootdir conftest)
from typer.testing import CliRunner

from opd.cli import app
from opd.data import load_prompts, render_prompt
from opd.evaluation.doctor import DoctorThresholds, sample_size_caution
from opd.train import checkpoint as ckpt

runner = CliRunner()

# Qwen2.5's chat template, reduced to its message loop: ChatML renders every role as `<|im_start|>ROLE`.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _out(res) -> str:
    return " ".join((res.output or "").split())


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------
# 1. `opd doctor` on too few prompts says its verdict is noisy


def test_doctor_verdict_from_one_prompt_is_marked_noisy_naming_n_prompts(tiny_pair, tmp_path):
    out = tmp_path / "doc"
    res = runner.invoke(app, [
        "doctor", "--student", str(tiny_pair["student"]), "--teacher", str(tiny_pair["teacher"]),
        "--prompts", str(tiny_pair["prompts"]), "--n-prompts", "1", "--samples", "2", "--teacher-samples", "1",
        "--max-new-tokens", "4", "--continuation-rollouts", "0", "--k", "4", "--out", str(out), "--no-plots",
    ])  # fmt: skip
    text = _out(res)
    assert res.exit_code == 0, res.output
    assert (
        "warning: teacher: small sample: this verdict rests on 1 prompt (2 student rollouts, 8 response tokens) "
        "and is noisy: fewer than the 10 prompts a stable verdict needs (--thresholds.min_prompts); rerun with "
        "--n-prompts 10 or more"
    ) in text
    data = json.loads((out / "doctor.json").read_text())
    v = data["teachers"]["teacher"]["verdict"]
    assert v["noisy"] is True and not v["withheld"]  # a verdict is still given
    assert any(r.startswith("caution: small sample: this verdict rests on 1 prompt") for r in v["reasons"])
    assert data["sample"] == {"prompts": 1, "student_rollouts": 2, "response_tokens": 8,
                              "noisy": {"teacher": v["reasons"][-1][len("caution: "):]}}  # fmt: skip
    assert (
        "> caution: teacher: small sample: this verdict rests on 1 prompt" in (out / "report.md").read_text()
    )


def test_doctor_on_enough_prompts_is_not_marked_noisy(tiny_pair, tmp_path):
    out = tmp_path / "doc"
    res = runner.invoke(app, [
        "doctor", "--student", str(tiny_pair["student"]), "--teacher", str(tiny_pair["teacher"]),
        "--prompts", str(tiny_pair["prompts"]), "--n-prompts", "10", "--samples", "1", "--teacher-samples", "1",
        "--max-new-tokens", "2", "--continuation-rollouts", "0", "--k", "4", "--out", str(out), "--no-plots",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "small sample" not in res.output
    data = json.loads((out / "doctor.json").read_text())
    assert data["teachers"]["teacher"]["verdict"]["noisy"] is False and data["sample"]["noisy"] == {}


def test_sample_size_caution_uses_the_accuracy_gap_standard_error():
    th = DoctorThresholds()
    m = {"accuracy_gap_se": 0.2, "n_tokens": 4000.0}
    # 16 prompts pass the prompt count, but an s.e. of 0.2 is twice the 0.1 line: 4x the prompts needed
    got = sample_size_caution(m, th, code="go", prompts=16, rollouts=64, file_prompts=500)
    assert got == (
        "small sample: this verdict rests on 16 prompts (64 student rollouts, 4000 response tokens) and is noisy: "
        "the accuracy gap's standard error 0.200 is above the 0.1 gap the verdict draws its line at; rerun with "
        "--n-prompts 64 or more"
    )
    # the file has too few problems for that: say to add some
    got = sample_size_caution(m, th, code="no_gain", prompts=16, rollouts=64, file_prompts=16)
    assert got.endswith("add problems to the prompt file (it has 16; about 64 are needed), then rerun with "
                        "--n-prompts 64")  # fmt: skip
    # compatibility verdicts do not rest on the accuracy gap; identical is never a sampling accident
    assert sample_size_caution(m, th, code="incompatible", prompts=16, rollouts=64, file_prompts=500) is None
    assert sample_size_caution(m, th, code="identical", prompts=1, rollouts=4, file_prompts=500) is None
    assert sample_size_caution({"accuracy_gap_se": 0.05}, th, code="go", prompts=16, rollouts=64,
                               file_prompts=500) is None  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# 2. hints name the option of the command that prints them


def test_eval_names_its_own_max_prompt_tokens_option(tiny_pair, tmp_path):
    res = runner.invoke(app, [
        "eval", "--model", str(tiny_pair["student"]), "--prompts", str(tiny_pair["prompts"]),
        "--max-prompt-tokens", "5", "--samples", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "e"),
    ])  # fmt: skip
    text = _out(res)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"error: {tiny_pair['prompts']}:1: prompt is" in text
    assert (
        "over --max-prompt-tokens 5; raise --max-prompt-tokens, or shorten or filter out this prompt." in text
    )
    assert "data.max_prompt_tokens" not in text and "--max_prompt_tokens" not in text


def test_doctor_names_its_own_max_prompt_tokens_option(tiny_pair, tmp_path):
    res = runner.invoke(app, [
        "doctor", "--student", str(tiny_pair["student"]), "--teacher", str(tiny_pair["teacher"]),
        "--prompts", str(tiny_pair["prompts"]), "--max_prompt_tokens", "5", "--out", str(tmp_path / "d"),
    ])  # fmt: skip
    text = _out(res)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert (
        "over --max_prompt_tokens 5; raise --max_prompt_tokens, or shorten or filter out this prompt." in text
    )
    assert "data.max_prompt_tokens" not in text and "--max-prompt-tokens" not in text


@pytest.mark.parametrize(
    ("command", "said", "not_said"),
    [
        (["eval", "--model", "M"], "set --prompt-field / --messages-field to the right column", "--prompt_field"),
        (["doctor", "--student", "M", "--teacher", "M"], "set --prompt_field / --messages_field to the right column",
         "--prompt-field"),
    ],
)  # fmt: skip
def test_a_file_without_the_prompt_column_names_the_commands_field_option(
    tiny_pair, tmp_path, command, said, not_said
):
    p = _jsonl(tmp_path / "q.jsonl", [{"question": "1+1=", "answer": "2"}])
    args = [a if a != "M" else str(tiny_pair["student"]) for a in command]
    res = runner.invoke(app, [*args, "--prompts", str(p), "--out", str(tmp_path / "o")])
    text = _out(res)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"error: {p}:1: record has neither 'prompt' nor 'messages' (its fields: answer, question)" in text
    assert said in text
    assert not_said not in text and "data.prompt_field" not in text


def test_eval_prompt_field_option_reads_another_column(tiny_pair, tmp_path):
    """The option the hint names exists: `--prompt-field question` reads that column."""
    p = _jsonl(tmp_path / "q.jsonl", [{"question": "1+1=", "answer": "2"}])
    res = runner.invoke(app, ["eval", "--model", str(tiny_pair["student"]), "--prompts", str(p), "--prompt-field",
                              "question", "--samples", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "o")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "student.samples.jsonl").read_text())["prompt"] == "1+1="


# ---------------------------------------------------------------------------------------------------
# 3. a chat template that keeps an unknown role


def test_chatml_template_keeping_an_unknown_role_is_warned_once(tiny_tokenizer, tmp_path, caplog):
    tiny_tokenizer.chat_template = CHATML_TEMPLATE
    p = _jsonl(tmp_path / "sharegpt.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "human", "content": "What is 2 + 3?"}]},
        {"messages": [{"role": "human", "content": "What is 4 + 5?"}]},
    ])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="opd.data"):
        records = load_prompts(p)
    warned = [r.getMessage() for r in caplog.records if r.name == "opd.data"]
    assert warned == [
        f"{p}:2: message 1 has role 'human' (2 message(s) in the file), not one of system, user, assistant, "
        "tool, developer: a chat template renders it as a 'human' turn (or drops it, which is refused), and the "
        "model was most likely trained on user/assistant turns only; rename the role to 'user' (ShareGPT's "
        "'human'/'gpt' are 'user'/'assistant') unless the model's template is made for it."
    ]
    # the template keeps the turn (no drop to refuse): the warning is the only word the user gets
    assert "<|im_start|>human\nWhat is 2 + 3?<|im_end|>" in render_prompt(records[1], tiny_tokenizer)


def test_known_roles_are_not_warned_about(tmp_path, caplog):
    p = _jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": r, "content": "x"} for r in
                                                    ("developer", "system", "user", "assistant", "tool", "user")]}])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="opd.data"):
        load_prompts(p)
    assert [r for r in caplog.records if r.name == "opd.data"] == []


# ---------------------------------------------------------------------------------------------------
# 4. a damaged checkpoint skipped at resume is kept where nothing overwrites or prunes it


def test_damaged_checkpoint_is_set_aside_and_survives_the_redone_step_and_rotation(tiny_pair, tmp_path):
    run = tmp_path / "run"
    _trainer(_args(tiny_pair, run), []).train()  # steps 1-3, keep_checkpoints 2: step_2 and step_3 on disk
    newest = ckpt.checkpoint_path(run, 3)
    DAMAGES["truncated_optimizer"](newest)
    damaged = {f.name: f.read_bytes() for f in newest.iterdir()}

    logs: list[str] = []
    t = _trainer(["--run_dir", str(run)], logs, resume=True, config=run / "config.yaml")
    (kept,) = [d for d in ckpt.checkpoint_dir(run).iterdir() if d.name.startswith(ckpt.DAMAGED)]
    assert kept.name.startswith("damaged-step_00000003-") and kept.name.endswith("Z")
    warned = [m for m in logs if "skipped damaged checkpoint" in m]
    assert warned == [
        f"[yellow]warning:[/] skipped damaged checkpoint {newest}: optimizer.pt is truncated "
        f"({len(damaged['optimizer.pt'])} bytes, {json.loads(damaged['manifest.json'])['files']['optimizer.pt']['size']} "
        f"were written); moved to {kept} (kept, not used; the steps after the checkpoint resumed from are trained "
        "again)"
    ]
    assert t.start_step == 2 and not newest.exists()
    t.train()  # redoes step 3: a fresh step_00000003
    assert ckpt.checkpoint_problem(newest) is None
    assert {f.name: f.read_bytes() for f in kept.iterdir()} == damaged

    # more steps: keep-last-2 rotation prunes step 2 and the fresh step 3, never the damaged one
    _trainer(["--run_dir", str(run), "--steps", "5"], [], resume=True, config=run / "config.yaml").train()
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 5]
    assert {f.name: f.read_bytes() for f in kept.iterdir()} == damaged


def test_set_aside_never_reuses_a_taken_name(tmp_path):
    """Two damaged copies of one step (two resumes within a second) both keep their files."""
    step = tmp_path / "checkpoints" / "step_00000003"
    kept = []
    for content in ("first", "second"):
        step.mkdir(parents=True)
        (step / "state.json").write_text(content)
        kept.append(ckpt.set_aside(step))
    assert kept[0] != kept[1] and not step.exists()
    assert [(k / "state.json").read_text() for k in kept] == ["first", "second"]
    assert all(k.name.startswith("damaged-step_00000003-") for k in kept)
    assert ckpt.list_checkpoints(tmp_path) == []  # outside what listing and rotation look at
