"""Damaged, unsafe or oddly encoded inputs end in one `opd.errors` line naming the file, never a traceback.

Each case is a file a user can really meet: a GGUF or safetensors download cut short, a ``.bin`` whose
pickle holds a Python global, a prompt file in Latin-1, a spreadsheet CSV with a BOM, a chat template
that silently drops a role, a misspelt YAML key, references the verifier cannot read, a NaN teacher.
"""

from __future__ import annotations

import json
import logging
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from opd.cli import app
from opd.config import load_config, read_yaml
from opd.data import PromptRecord, load_prompts, render_prompt
from opd.errors import ConfigError, DataError, ModelError
from opd.evaluation.checks import determinism_check, pair_diagnostics, self_test_rollout
from opd.evaluation.eval import ProblemResult, evaluate, unparsed_references
from opd.evaluation.verify import get_verifier
from opd.models.loading import load_model, load_tokenizer, prepare_tokenizer
from opd.models.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_gguf

runner = CliRunner()

# A Qwen-like template: it renders only the roles it knows and skips any other without a word.
KNOWN_ROLES_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] in ['system', 'user', 'assistant'] %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _out(res) -> str:
    return " ".join((res.output or "").split())


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---------------------------------------------------------------------------------------------------
# Model files


@pytest.fixture
def truncated_gguf(tmp_path, tiny_tokenizer) -> Path:
    model = build_tiny_model(tiny_tokenizer, hidden=32, layers=2, vocab_pad_to=64, seed=3)
    path = save_tiny_gguf(model, tiny_tokenizer, tmp_path / "gguf" / "tiny.gguf")
    _truncate(path)
    return path


def test_truncated_gguf_is_one_model_error(truncated_gguf):
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelError) as ei:
            load(str(truncated_gguf))
        msg = str(ei.value)
        assert msg.startswith(f"{truncated_gguf}: ") and "truncated GGUF" in msg and "re-download" in msg
        assert "\n" not in msg


def test_not_a_gguf_is_one_model_error(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_text("<html>404</html>")
    with pytest.raises(ModelError, match=r"x\.gguf: not a GGUF file"):
        load_model(str(p))


def test_truncated_safetensors_is_one_model_error(tiny_pair, tmp_path):
    d = _copy_model(tiny_pair["student"], tmp_path / "m")
    _truncate(d / "model.safetensors")
    with pytest.raises(ModelError) as ei:
        load_model(str(d))
    msg = str(ei.value)
    assert msg.startswith(f"{d / 'model.safetensors'}: truncated safetensors file") and "re-download" in msg


def test_missing_shard_and_bad_config_json(tiny_pair, tmp_path):
    d = _copy_model(tiny_pair["student"], tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(ModelError, match=r"model-00002-of-00002\.safetensors: weight shard .* is missing"):
        load_model(str(d))
    (d / "model.safetensors.index.json").unlink()
    (d / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelError, match=r"config\.json:1: not valid JSON"):
        load_model(str(d))


def test_pickle_with_a_global_is_refused_without_weights_only_advice(tiny_pair, tmp_path):
    d = _copy_model(tiny_pair["student"], tmp_path / "m")
    state = load_model(str(d)).state_dict()
    (d / "model.safetensors").unlink()
    state["extra"] = Fraction(1, 2)  # a harmless global; torch's safe loader refuses any it does not know
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ModelError) as ei:
        load_model(str(d))
    msg = str(ei.value)
    assert msg.startswith(f"{d / 'pytorch_model.bin'}: refused to load") and "fractions.Fraction" in msg
    assert "safetensors" in msg and "weights_only" not in msg and "\n" not in msg


def test_truncated_bin_is_one_model_error(tiny_pair, tmp_path):
    d = _copy_model(tiny_pair["student"], tmp_path / "m")
    state = load_model(str(d)).state_dict()
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    _truncate(d / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pytorch_model\.bin: damaged or truncated PyTorch checkpoint"):
        load_model(str(d))


def test_cli_damaged_model_is_one_line_and_debug_shows_the_cause(truncated_gguf, monkeypatch):
    args = ["check", "--student", str(truncated_gguf), "--teacher", str(truncated_gguf)]
    monkeypatch.delenv("OPD_DEBUG", raising=False)
    res = runner.invoke(app, args)
    lines = [ln for ln in (res.output or "").splitlines() if ln.strip()]
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert lines[-1].startswith(f"error: {truncated_gguf}: ") and "truncated GGUF" in lines[-1]
    res = runner.invoke(app, args, env={"OPD_DEBUG": "1"})
    assert res.exit_code == 2 and "Traceback" in res.output and "ModelError" in res.output
    assert [ln for ln in res.output.splitlines() if ln.strip()][-1] == lines[-1]


# ---------------------------------------------------------------------------------------------------
# Text encodings


def test_bom_in_csv_jsonl_and_yaml_is_accepted(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_bytes('prompt,answer\r\n1+1=,2\r\n"multi\nline",3\r\n'.encode("utf-8-sig"))
    recs = load_prompts(csv_path)
    assert [(r.text, r.answer) for r in recs] == [("1+1=", "2"), ("multi\nline", "3")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes((json.dumps({"prompt": "2+2=", "answer": 4}) + "\n").encode("utf-8-sig"))
    assert load_prompts(jsonl)[0].answer == "4"
    yml = tmp_path / "c.yaml"
    yml.write_bytes("loss:\n  signal: sampled\n".encode("utf-8-sig"))
    assert load_config(yml).loss.signal == "sampled" and read_yaml(yml) == {"loss": {"signal": "sampled"}}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_prompt_file_names_file_and_line(tmp_path, suffix):
    p = tmp_path / f"latin{suffix}"
    if suffix == ".jsonl":
        p.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    else:
        p.write_bytes(b"prompt\nok\ncaf\xe9\n")
    line = 2 if suffix == ".jsonl" else 3
    with pytest.raises(
        DataError, match=rf"latin\{suffix}:{line}: prompt file is not valid UTF-8 \(byte 0xe9"
    ):
        load_prompts(p)


def test_non_utf8_yaml_is_a_config_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"run_dir: runs/x\nrun_name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: config file is not valid UTF-8"):
        load_config(p)


# ---------------------------------------------------------------------------------------------------
# Templates that drop content


def test_template_dropping_an_unknown_role_is_refused(tiny_tokenizer, tmp_path):
    tiny_tokenizer.chat_template = KNOWN_ROLES_TEMPLATE
    p = tmp_path / "p.jsonl"
    p.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
        + json.dumps({"messages": [{"role": "human", "content": "What is 2 + 3?"}]}) + "\n"
    )  # fmt: skip
    ok, dropped = load_prompts(p)
    assert "hi" in render_prompt(ok, tiny_tokenizer, template="chat")
    with pytest.raises(DataError) as ei:
        render_prompt(dropped, tiny_tokenizer, template="chat")
    msg = str(ei.value)
    assert msg.startswith(f"{p}:2: the chat template dropped message 0 (role 'human')")


def test_template_whitespace_changes_are_not_drops(tiny_tokenizer):
    tiny_tokenizer.chat_template = "{% for m in messages %}<|user|>\n{{ m['content'] | trim }}\n{% endfor %}"
    rec = PromptRecord(text=None, messages=[{"role": "user", "content": "  a \n  b  "}], answer=None,
                       source="mem:1", raw={})  # fmt: skip
    assert render_prompt(rec, tiny_tokenizer, template="chat").endswith("a \n  b\n")


def test_cli_check_refuses_a_dropped_prompt(tiny_pair, tmp_path):
    d = _copy_model(tiny_pair["student"], tmp_path / "m")
    tok = load_tokenizer(str(d))
    tok.chat_template = KNOWN_ROLES_TEMPLATE
    tok.save_pretrained(d)
    p = tmp_path / "human.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "human", "content": "What is 2 + 3?"}]}) + "\n")
    res = runner.invoke(app, ["check", "--student", str(d), "--teacher", str(d), "--prompts", str(p)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"{p}:1: the chat template dropped message 0 (role 'human')" in _out(res)


# ---------------------------------------------------------------------------------------------------
# YAML typos


def test_yaml_typo_suggests_the_key_with_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("student:\n  path: x\nloss:\n  sigal: topk\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg and "loss.sigal (line 4)" in msg and "did you mean loss.signal" in msg
    assert "\n" not in msg
    p.write_text("studnet:\n  path: x\n")
    with pytest.raises(ConfigError, match=r"studnet \(line 1\): unknown key \(did you mean student\b"):
        load_config(p)


def test_cli_yaml_typo_is_one_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-5\n  warmup_step: 3\n")
    res = runner.invoke(app, ["config", "show", "--config", str(p)])
    lines = [ln for ln in (res.output or "").splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith(f"error: invalid configuration in {p}: optim.warmup_step (line 3)")
    assert "did you mean optim.warmup_steps" in lines[0]


@pytest.mark.parametrize(
    ("command", "text", "where", "suggestion"),
    [
        (["eval", "--prompts", "p.jsonl"], "models: [m]\nsamplez: 4\n", "samplez (line 2)", "samples"),
        (["doctor"], "student: s\nteachers: [t]\nprompt: p.jsonl\n", "prompt (line 3)", "prompts"),
        (["serve-teacher"], "model: m\nprot: 8001\n", "prot (line 2)", "port"),
    ],
)  # fmt: skip
def test_yaml_typos_of_eval_doctor_and_serve_teacher_name_the_line(
    tmp_path, command, text, where, suggestion
):
    """Every command with a --config file reports an unknown key with its line and the closest key."""
    p = tmp_path / "c.yaml"
    p.write_text(text)
    res = runner.invoke(app, [*command, "--config", str(p)])
    lines = [ln for ln in (res.output or "").splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert str(p) in lines[0] and f"{where}: unknown key (did you mean {suggestion}" in lines[0], res.output


# ---------------------------------------------------------------------------------------------------
# Answers the verifier cannot read


def test_unparseable_references_are_warned_and_counted(tiny_pair, caplog):
    model = load_model(str(tiny_pair["student"]))
    tok = load_tokenizer(str(tiny_pair["student"]))
    prepare_tokenizer(tok)
    records = [
        PromptRecord(text="1+1=", messages=None, answer="@@ ##", source=f"mem:{i}", raw={})
        for i in range(1, 4)
    ]
    with caplog.at_level(logging.WARNING, logger="opd.evaluation.eval"):
        res = evaluate(model, tok, records, samples=2, max_new_tokens=4, verifier="math", template="raw",
                       progress=False)  # fmt: skip
    s = res.summary
    assert s["unparsed_references"] == 3 and s["unparsed_predictions"] == 6 and s["avg@2"] == 0.0
    text = caplog.text
    assert "3 of 3 reference answers cannot be parsed by the math verifier (e.g. mem:1" in text
    assert "6 of 6 responses have no final answer the math verifier can read" in text


def test_parseable_references_do_not_warn(caplog):
    problems = [ProblemResult(index=0, source="mem:1", prompt="q", answer="\\frac{1}{2}")]
    with caplog.at_level(logging.WARNING, logger="opd.evaluation.eval"):
        assert unparsed_references(problems, get_verifier("math")) == []
    assert caplog.text == ""


# ---------------------------------------------------------------------------------------------------
# A NaN teacher in `opd check`


def _nan_teacher(tok) -> torch.nn.Module:
    teacher = build_tiny_model(tok, seed=1)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.fill_(float("nan"))
    return teacher.eval()


def test_nan_teacher_is_reported_as_non_finite_logits():
    tok = build_tiny_tokenizer()
    prepare_tokenizer(tok)
    student = build_tiny_model(tok, seed=0).eval()
    ids = [tok("12+7=")["input_ids"], tok("3+4=")["input_ids"]]
    roll = self_test_rollout(
        student, ids, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id], max_new_tokens=4
    )
    res = determinism_check(_nan_teacher(tok), roll)
    assert not res.ok and res.name == "teacher logits finite"
    n = int(roll.response_mask.sum())
    assert res.detail.startswith(
        f"teacher produces non-finite logits on {n} of {n} response positions (first: NaN"
    )
    diag = pair_diagnostics(student, _nan_teacher(tok), roll, vocab_size=len(tok))
    assert diag["nonfinite_positions"] == n and "entropy_teacher" not in diag


def test_cli_check_fails_on_a_nan_teacher(tiny_pair, tmp_path):
    tok = load_tokenizer(str(tiny_pair["student"]))
    teacher = load_model(str(tiny_pair["student"]))
    with torch.no_grad():
        teacher.get_output_embeddings().weight.fill_(float("nan"))
    teacher.save_pretrained(tmp_path / "nan")
    tok.save_pretrained(tmp_path / "nan")
    res = runner.invoke(app, ["check", "--student", str(tiny_pair["student"]), "--teacher", str(tmp_path / "nan"),
                              "--prompts", str(tiny_pair["prompts"]), "--n-prompts", "2", "--k", "8"])  # fmt: skip
    out = _out(res)
    assert res.exit_code == 1, out
    assert "FAIL teacher logits finite: teacher produces non-finite logits on" in out
    assert "teacher determinism" not in out
