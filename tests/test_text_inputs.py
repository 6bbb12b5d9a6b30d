"""Valid text is accepted and line numbers are the file's own (issue 21, text): JSON lines split on
``\\n`` only, CSV parsed strictly."""

from __future__ import annotations

import json

import pytest

from opd.data import load_prompts
from opd.errors import DataError
from opd.files import jsonl_lines
from opd.train.sft import read_sft_jsonl
from opd.train.tracking import read_metrics

# What json.dumps(..., ensure_ascii=False) writes raw (it escapes the C0 controls) and str.splitlines()
# breaks at.
SEPARATORS = ["\u2028", "\u2029", "\u0085"]


@pytest.mark.parametrize("sep", SEPARATORS)
def test_jsonl_with_raw_line_separators_in_strings_loads_with_true_line_numbers(tmp_path, sep):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": f"first{sep}half", "answer": "1"}, {"prompt": "second", "answer": "2"}, {"x": 3}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    assert sep in text  # the raw character really is in the file
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.jsonl:3: "):  # line 3 lacks `prompt`: named by its real line
        load_prompts(path)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:2]), encoding="utf-8")
    records = load_prompts(path)
    assert [r.text for r in records] == [f"first{sep}half", "second"]


def test_jsonl_lines_keeps_blank_lines_and_drops_crlf():
    assert jsonl_lines('{"a": 1}\r\n\r\n{"b": "x\u2028y"}\n') == [
        (1, '{"a": 1}'),
        (2, ""),
        (3, '{"b": "x\u2028y"}'),
    ]
    assert jsonl_lines("") == [] and jsonl_lines("x") == [(1, "x")]


def test_a_bad_line_after_a_separator_is_named_by_its_own_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.jsonl:2: invalid JSON"):
        load_prompts(path)


def test_sft_data_and_metrics_read_the_same_way(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        json.dumps({"prompt": "p\u2028q", "response": "r\u2029s"}, ensure_ascii=False) + "\n", "utf-8"
    )
    assert read_sft_jsonl(sft) == [(f"{sft}:1", {"prompt": "p\u2028q", "response": "r\u2029s"})]
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "note": "a\u2028b"}, ensure_ascii=False)
        + "\n"
        + json.dumps({"step": 2})
        + "\n",
        encoding="utf-8",
    )
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_csv_with_an_unclosed_quote_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,answer\n"What is 1+1?,2\nWhat is 2+2?,4\n', encoding="utf-8")
    with pytest.raises(
        DataError,
        match=r"p\.csv:2: not a readable CSV file .*starts on this line: a quote opened there is never closed",
    ):
        load_prompts(path)


@pytest.mark.parametrize(
    ("row", "got"), [("What is 1, 2?,3", 3), ("only a prompt", 1)], ids=["extra field", "missing field"]
)
def test_csv_rows_with_the_wrong_number_of_fields_are_errors(tmp_path, row, got):
    path = tmp_path / "p.csv"
    path.write_text(f"prompt,answer\nWhat is 1+1?,2\n{row}\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"p\.csv:3: row 2 has {got} field\(s\), the header has 2"):
        load_prompts(path)


def test_valid_csv_with_quoted_commas_and_multi_line_cells_loads(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,answer\n"Add 1, 2\nand 3.",6\n"He said ""hi"".",0\n', encoding="utf-8")
    assert [(r.text, r.answer) for r in load_prompts(path)] == [
        ("Add 1, 2\nand 3.", "6"),
        ('He said "hi".', "0"),
    ]
