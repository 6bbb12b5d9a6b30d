"""`opd eval` on a real instruct model (SmolLM2-135M-Instruct, see scripts/fetch_real_models.py).

Marked `real`: excluded from the default suite, run with `pytest -m real`. 1-2 minutes of CPU time
(40 samples of up to 48 tokens; 104 s on a busy 2-core CPU), after a one-off download of the model.

SmolLM2-135M does not follow "box your answer" instructions, so this uses the ``math-flexible`` verifier
(last number when there is no box/Answer: line). Measured on a 2-core CPU: avg@4 = 0.35, pass@4 = 0.6.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from opd.cli import app

pytestmark = pytest.mark.real

PAIRS = [(7, 5), (3, 4), (10, 6), (12, 9), (2, 8), (15, 3), (6, 6), (9, 1), (20, 5), (11, 4)]


def test_opd_eval_smollm2_arithmetic(tmp_path, real_models):
    model = real_models.ensure_model("smollm2")
    prompts = tmp_path / "arith.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": a + b}) + "\n" for a, b in PAIRS)
    )
    out = tmp_path / "ev"
    res = CliRunner().invoke(app, [
        "eval", "--model", str(model), "--prompts", str(prompts), "--samples", "4", "--temperature", "0.7",
        "--top-p", "0.95", "--max-new-tokens", "48", "--template", "chat", "--verifier", "math-flexible",
        "--batch-size", "10", "--out", str(out),
    ])  # fmt: skip
    text = " ".join((res.output or "").split())
    assert res.exit_code == 0, text
    summary = json.loads((out / "hf.summary.json").read_text())
    print(f"\nSmolLM2-135M-Instruct: avg@4={summary['avg@4']:.3f} pass@4={summary['pass@4']:.3f} "
          f"mean_length={summary['mean_length']:.1f} truncation={summary['truncation_rate']:.3f} "
          f"no_answer={summary['no_answer_rate']:.3f} in {summary['seconds']:.1f}s")  # fmt: skip
    assert summary["n_problems"] == 10 and summary["samples"] == 4
    assert 0.2 <= summary["avg@4"] <= 1.0
    assert summary["pass@4"] >= summary["avg@4"]
    assert summary["verifier_errors"] == 0
    rows = [json.loads(x) for x in (out / "hf.samples.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(len(r["samples"]) == 4 for r in rows)
    assert "<|im_start|>" not in rows[0]["samples"][0]["text"]  # special tokens are not in the texts
