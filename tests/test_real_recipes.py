"""Recipe A on a real instruct model: `opd generate` then `opd sft` end to end on SmolLM2-135M-Instruct.

Marked `real` (run with `pytest -m real`); the model comes from scripts/fetch_real_models.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from opd.cli import app

pytestmark = pytest.mark.real


def test_generate_then_sft_on_smollm2(tmp_path, real_models):
    model = real_models.ensure_model("smollm2")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                               for a, b in [(7, 5), (3, 4), (10, 6), (12, 9), (2, 8), (15, 3)]))  # fmt: skip
    out = tmp_path / "teacher.jsonl"
    runner = CliRunner()
    res = runner.invoke(app, ["generate", "--model", str(model), "--prompts", str(prompts), "--samples", "1",
                              "--max_new_tokens", "64", "--out", str(out), "--filters", "truncated,repetition",
                              "--batch_size", "6"])  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(out.with_name("teacher.jsonl.summary.json").read_text()) if out.with_name(
        "teacher.jsonl.summary.json").exists() else json.loads(next(tmp_path.glob("*summary.json")).read_text())  # fmt: skip
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    print("generate summary:", summary)
    assert kept, "every response was filtered out"
    assert kept[0]["messages"][-1]["role"] == "assistant" and kept[0]["messages"][-1]["content"].strip()

    run = tmp_path / "sft"
    res = runner.invoke(app, ["sft", "--model", str(model), "--data", str(out), "--run_dir", str(run), "--steps", "2",
                              "--batch_size", "4", "--micro_batch_size", "2", "--tracking.tensorboard", "false"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run / "final").num_parameters() > 100e6
