"""Prompt loading, templates, encoding limits, the resumable cursor and left padding."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opd.data import (
    BOXED_TEMPLATE,
    DAPO_TEMPLATE,
    TEMPLATES,
    PromptCursor,
    PromptRecord,
    encode_prompts,
    load_prompts,
    render_prompt,
    uses_chat,
    validate_template,
)
from opd.errors import ConfigError, DataError, OpdError


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def rec(text=None, messages=None, source="f.jsonl:1"):
    return PromptRecord(text=text, messages=messages, answer=None, source=source, raw={})


# ------------------------------------------------------------------------------------------------ loading


def test_jsonl_round_trip_skips_blank_lines_and_converts_numeric_answers(tmp_path):
    p = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "1+1=", "answer": "2"},
            "",
            "   ",
            {"prompt": "2+3=", "answer": 5},
            {"messages": [{"role": "user", "content": "hi"}], "answer": 0.5},
            {"prompt": "no answer"},
        ],
    )
    recs = load_prompts(p)
    assert [r.text for r in recs] == ["1+1=", "2+3=", None, "no answer"]
    assert [r.answer for r in recs] == ["2", "5", "0.5", None]
    assert recs[2].messages == [{"role": "user", "content": "hi"}]
    assert [r.source for r in recs] == [f"{p}:1", f"{p}:4", f"{p}:5", f"{p}:6"]
    assert recs[1].raw == {"prompt": "2+3=", "answer": 5}


def test_tiny_pair_prompts_load(tiny_pair):
    recs = load_prompts(tiny_pair["prompts"])
    assert len(recs) == 64
    assert all(r.text.endswith("=") and r.answer.isdigit() for r in recs)


def test_json_array_file(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))
    recs = load_prompts(p)
    assert [r.text for r in recs] == ["a", "b"]
    assert recs[1].source == f"{p}:row 2"


def test_custom_and_dotted_fields(tmp_path):
    # verl-style DAPO rows: the prompt field holds a message list, the answer is nested.
    row = {
        "prompt": [{"role": "user", "content": "q"}],
        "reward_model": {"ground_truth": "34", "style": "rule"},
    }
    p = write_jsonl(tmp_path / "verl.jsonl", [row])
    recs = load_prompts(p, answer_field="reward_model.ground_truth")
    assert recs[0].messages == [{"role": "user", "content": "q"}] and recs[0].answer == "34"
    p2 = write_jsonl(tmp_path / "q.jsonl", [{"question": "x", "sol": 3}])
    r = load_prompts(p2, prompt_field="question", answer_field="sol")[0]
    assert (r.text, r.answer) == ("x", "3")


def test_csv_round_trip(tmp_path):
    p = tmp_path / "p.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "answer", "messages"])
        w.writerow(["1+1=", "2", ""])
        w.writerow(["multi\nline, with comma", "", ""])
        w.writerow(["", "", json.dumps([{"role": "user", "content": "hey"}])])
    recs = load_prompts(p)
    assert recs[0].text == "1+1=" and recs[0].answer == "2"
    assert recs[1].text == "multi\nline, with comma" and recs[1].answer is None
    assert recs[2].messages == [{"role": "user", "content": "hey"}]
    assert recs[2].source == f"{p}:row 3"


def test_parquet_round_trip(tmp_path):
    p = tmp_path / "p.parquet"
    table = pa.table(
        {
            "prompt": ["a", None],
            "messages": [None, [{"role": "user", "content": "m"}]],
            "answer": [7, None],
        }
    )
    pq.write_table(table, p)
    recs = load_prompts(p)
    assert recs[0].text == "a" and recs[0].answer == "7"
    assert recs[1].messages == [{"role": "user", "content": "m"}]
    assert recs[1].source == f"{p}:row 2"


def test_parquet_error_names_row(tmp_path):
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["ok", "ok"], "answer": [[1], [2]]}), p)
    with pytest.raises(DataError, match=r"p\.parquet:row 1: field 'answer'"):
        load_prompts(p)


def test_corrupt_parquet(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read as Parquet"):
        load_prompts(p)


@pytest.mark.parametrize(
    "lines, pattern",
    [
        (['{"prompt": "a"}', '{"prompt": "b",}'], r"p\.jsonl:2: invalid JSON \(.*column"),
        (['{"prompt": "a"}', "[1, 2]"], r"p\.jsonl:2: expected a JSON object.*got list"),
        (['{"text": "a"}'], r"p\.jsonl:1: record has neither 'prompt' nor 'messages' \(its fields: text\)"),
        (['{"prompt": 42}'], r"p\.jsonl:1: field 'prompt' must be a string, got int \(42\)"),
        (['{"prompt": "  "}'], r"p\.jsonl:1: field 'prompt' is empty"),
        (['{"messages": "hi"}'], r"p\.jsonl:1: field 'messages' must be a non-empty list"),
        (['{"messages": []}'], r"p\.jsonl:1: field 'messages' must be a non-empty list"),
        (['{"messages": [{"role": "user"}]}'], r"p\.jsonl:1: field 'messages', message 0 must be an object"),
        (['{"messages": ["hi"]}'], r"p\.jsonl:1: field 'messages', message 0 must be an object"),
        (
            ['{"messages": [{"role": "user", "content": ["x"]}]}'],
            r"p\.jsonl:1: field 'messages', message 0: 'role' and 'content' must be strings",
        ),
        (
            ['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'],
            r"p\.jsonl:1: field 'messages' ends with an assistant message",
        ),
        (['{"prompt": "a", "answer": {"x": 1}}'], r"p\.jsonl:1: field 'answer' must be a string or a number"),
        (['{"prompt": "a", "answer": true}'], r"p\.jsonl:1: field 'answer' must be a string or a number"),
        (
            ['{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}'],
            r"p\.jsonl:1: both 'prompt' and 'messages' are set",
        ),
    ],
)
def test_jsonl_errors_name_line_and_field(tmp_path, lines, pattern):
    p = write_jsonl(tmp_path / "p.jsonl", lines)
    with pytest.raises(DataError, match=pattern):
        load_prompts(p)


def test_both_fields_resolved_by_disabling_one(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}])
    assert load_prompts(p, messages_field=None)[0].text == "a"
    assert load_prompts(p, prompt_field=None)[0].messages[0]["content"] == "b"


def test_csv_bad_messages_cell(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text('messages\n"[not json"\n')
    with pytest.raises(DataError, match=r"p\.csv:row 1: field 'messages' must be a JSON list"):
        load_prompts(p)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        load_prompts(tmp_path)
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown prompt file extension '\.txt'.*\.jsonl"):
        load_prompts(tmp_path / "p.txt")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "empty.csv").write_text("prompt,answer\n")
    with pytest.raises(DataError, match="no records"):
        load_prompts(tmp_path / "empty.csv")
    assert issubclass(DataError, OpdError)


# ------------------------------------------------------------------------------------------------ templates


def test_raw_template(tiny_tokenizer):
    assert render_prompt(rec("1+1="), tiny_tokenizer, template="raw") == "1+1="
    with pytest.raises(DataError, match=r"f\.jsonl:1: record has messages.*template: chat"):
        render_prompt(rec(messages=[{"role": "user", "content": "x"}]), tiny_tokenizer, template="raw")


def test_chat_template(tiny_tokenizer):
    out = render_prompt(rec("1+1="), tiny_tokenizer, template="chat")
    assert out == "<bos><|user|>\n1+1=\n<|assistant|>\n"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}]
    out = render_prompt(rec(messages=msgs), tiny_tokenizer)
    assert out == "<bos><|system|>\nbe brief\n<|user|>\n2+2=\n<|assistant|>\n"


def test_chat_template_kwargs_pass_through(tiny_tokenizer):
    plain = render_prompt(rec("q"), tiny_tokenizer, template="chat")
    off = render_prompt(
        rec("q"), tiny_tokenizer, template="chat", chat_template_kwargs={"enable_thinking": False}
    )
    assert off == plain + "<think>\n\n</think>\n\n"


def test_system_prompt(tiny_tokenizer):
    out = render_prompt(rec("q"), tiny_tokenizer, system_prompt="sys")
    assert out.startswith("<bos><|system|>\nsys\n<|user|>\nq\n")
    own = [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]
    assert "mine" in render_prompt(rec(messages=own), tiny_tokenizer, system_prompt="sys")
    assert "sys\n" not in render_prompt(rec(messages=own), tiny_tokenizer, system_prompt="sys")
    with pytest.raises(ConfigError, match="system_prompt needs a chat template"):
        render_prompt(rec("q"), tiny_tokenizer, template="raw", system_prompt="sys")


def test_chat_without_template_is_clear(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="has none.*template: raw"):
        render_prompt(rec("q"), tiny_tokenizer, template="chat")


def test_named_templates(tiny_tokenizer):
    dapo = render_prompt(rec("What is 2+2?"), tiny_tokenizer, template="dapo")
    assert dapo.startswith("Solve the following math problem step by step.")
    assert "Answer: $Answer (without quotes)" in dapo and "\n\nWhat is 2+2?\n\n" in dapo
    assert dapo.endswith('Remember to put your answer on its own line after "Answer:".')
    boxed = render_prompt(rec("What is 2+2?"), tiny_tokenizer, template="boxed")
    assert boxed == "What is 2+2? Please reason step by step, and put your final answer within \\boxed{}."
    assert TEMPLATES == {"dapo": DAPO_TEMPLATE, "boxed": BOXED_TEMPLATE}


def test_format_string_keeps_other_braces(tiny_tokenizer):
    out = render_prompt(rec("x {y} z"), tiny_tokenizer, template="Q: {prompt} {json: 1} A:")
    assert out == "Q: x {y} z {json: 1} A:"


def test_chat_combined_with_named_and_format(tiny_tokenizer):
    out = render_prompt(rec("7*6"), tiny_tokenizer, template="chat:boxed")
    assert out == (
        "<bos><|user|>\n7*6 Please reason step by step, and put your final answer within \\boxed{}.\n"
        "<|assistant|>\n"
    )
    out = render_prompt(rec("7*6"), tiny_tokenizer, template="chat:Q: {prompt}")
    assert "<|user|>\nQ: 7*6\n" in out
    # messages records: the last user message is filled
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    out = render_prompt(rec(messages=msgs), tiny_tokenizer, template="chat:boxed")
    assert "<|user|>\na\n" in out and "b Please reason step by step" in out
    assert msgs[1]["content"] == "b"  # the record is not mutated


def test_unknown_template(tiny_tokenizer):
    for bad in ("nope", "chat:nope", "chat:"):
        with pytest.raises(ConfigError, match="unknown prompt template"):
            render_prompt(rec("q"), tiny_tokenizer, template=bad)
        with pytest.raises(ConfigError):
            validate_template(bad)
    for good in ("raw", "chat", "dapo", "chat:boxed", "{prompt}!"):
        validate_template(good)


def test_uses_chat():
    assert uses_chat("chat") and uses_chat("chat:boxed") and uses_chat("chat:{prompt}?")
    assert not uses_chat("raw") and not uses_chat("boxed") and not uses_chat("chatty {prompt}")


def test_broken_chat_template_names_record(tiny_tokenizer):
    tiny_tokenizer.chat_template = "{{ raise_exception('bad role') }}"
    with pytest.raises(DataError, match=r"f\.jsonl:1: the tokenizer's chat template failed"):
        render_prompt(rec("q"), tiny_tokenizer)


# ------------------------------------------------------------------------------------------------ encoding


def test_encode_prompts_special_tokens(tiny_tokenizer):
    chat = render_prompt(rec("1+1="), tiny_tokenizer)
    (ids,) = encode_prompts(
        [chat], tiny_tokenizer, max_prompt_tokens=64, sources=["a:1"], add_special_tokens=False
    )
    assert ids.count(tiny_tokenizer.bos_token_id) == 1 and ids[0] == tiny_tokenizer.bos_token_id
    (raw,) = encode_prompts(
        ["1+1="], tiny_tokenizer, max_prompt_tokens=64, sources=["a:1"], add_special_tokens=True
    )
    assert raw == [
        tiny_tokenizer.bos_token_id,
        *tiny_tokenizer("1+1=", add_special_tokens=False)["input_ids"],
    ]
    assert encode_prompts([], tiny_tokenizer, max_prompt_tokens=4, sources=[], add_special_tokens=True) == []


def test_encode_prompts_too_long(tiny_tokenizer):
    with pytest.raises(DataError, match=r"p\.jsonl:7: prompt is 11 tokens, over data\.max_prompt_tokens=10"):
        encode_prompts(
            ["ok", "0123456789"],
            tiny_tokenizer,
            max_prompt_tokens=10,
            sources=["p.jsonl:1", "p.jsonl:7"],
            add_special_tokens=True,
        )
    with pytest.raises(ValueError):
        encode_prompts(["a"], tiny_tokenizer, max_prompt_tokens=10, sources=[], add_special_tokens=True)


# ------------------------------------------------------------------------------------------------ cursor


def draw(cursor, sizes):
    return [i for n in sizes for i in cursor.next_indices(n)]


def test_cursor_epochs_are_permutations_and_deterministic():
    c = PromptCursor(10, seed=3)
    first, second = c.next_indices(10), c.next_indices(10)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second  # a new permutation each epoch
    assert c.state_dict()["epoch"] == 2 and c.state_dict()["position"] == 0
    # the stream does not depend on how it is chunked
    assert draw(PromptCursor(10, seed=3), [3, 7, 4, 6]) == first + second
    assert draw(PromptCursor(10, seed=4), [20]) != first + second
    assert PromptCursor(4, seed=0, shuffle=False).next_indices(6) == [0, 1, 2, 3, 0, 1]
    assert PromptCursor(3, seed=0).next_indices(0) == []


@pytest.mark.parametrize("split", [4, 10, 13, 27])  # mid-epoch, on the boundary, across boundaries
def test_cursor_resume(split):
    full = PromptCursor(10, seed=7).next_indices(40)
    c = PromptCursor(10, seed=7)
    head = c.next_indices(split)
    state = json.loads(json.dumps(c.state_dict()))  # must survive a JSON checkpoint
    resumed = PromptCursor(10, seed=7)
    resumed.load_state_dict(state)
    assert head + resumed.next_indices(40 - split) == full


def test_cursor_refuses_other_dataset():
    state = PromptCursor(10, seed=7).state_dict()
    with pytest.raises(DataError, match="n_records=10.*n_records=11"):
        PromptCursor(11, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match="same prompt file and seed"):
        PromptCursor(10, seed=8).load_state_dict(state)
    with pytest.raises(DataError):
        PromptCursor(0, seed=0)
