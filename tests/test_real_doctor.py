"""`opd doctor` on real models (see scripts/fetch_real_models.py). Marked `real`: `pytest -m real`.

* SmolLM2-135M-Instruct from its GGUF as both student and teacher must read "identical" (a minute).
* The Qwen2.5-Coder 0.5B student / 1.5B teacher pair on 16 short math problems (examples/short_math.jsonl)
  must finish, print its headline numbers and satisfy the sanity relations below (about 10-15 minutes on
  2 cores, bf16 teacher). The numbers are recorded in the closing note of issue 5, not asserted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opd.cli import app

pytestmark = pytest.mark.real

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "short_math.jsonl"
# Short answers keep the 0.5B student inside a CPU-sized budget (at 160 tokens with the paper's `boxed`
# prompt, 75% of its rollouts were truncated and accuracy meant nothing).
CONCISE = "chat:{prompt}\nSolve it in at most three short lines, then give the final answer as \\boxed{N}."


def test_doctor_smollm2_gguf_student_equals_teacher(tmp_path, real_models):
    gguf = real_models.ensure_gguf("smollm2")
    out = tmp_path / "doc"
    res = CliRunner().invoke(app, [
        "doctor", "--student", str(gguf), "--teacher", str(gguf), "--prompts", str(EXAMPLES), "--template", "chat:boxed",
        "--n-prompts", "4", "--samples", "2", "--teacher-samples", "0", "--max-new-tokens", "32",
        "--continuation-rollouts", "0", "--verifier", "math-flexible", "--out", str(out), "--no-plots",
    ])  # fmt: skip
    assert res.exit_code == 0, " ".join((res.output or "").split())
    data = json.loads((out / "doctor.json").read_text())
    (name,) = data["teachers"]
    t = data["teachers"][name]
    m = t["by_template"]["chat:boxed"]
    assert t["verdict"]["code"] == "identical"
    assert m["reverse_kl"] < 1e-6 and m["overlap_ratio"] == pytest.approx(1.0)
    assert m["overlap_mass_student"] == pytest.approx(m["overlap_mass_teacher"], abs=1e-6)


def test_doctor_qwen_coder_pair(tmp_path, real_models):
    student = real_models.ensure_model("qwen-0.5b")
    teacher = real_models.ensure_model("qwen-1.5b")
    out = tmp_path / "doc"
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, [
        "doctor", "--student", str(student), "--teacher", str(teacher), "--prompts", str(EXAMPLES),
        "--template", CONCISE, "--n-prompts", "16", "--samples", "2", "--teacher-samples", "1",
        "--max-new-tokens", "224", "--depth", "0.25", "--depth", "0.5", "--continuation-rollouts", "8",
        "--teacher-dtype", "bfloat16", "--batch-size", "16", "--out", str(out),
    ])  # fmt: skip
    seconds = time.perf_counter() - t0
    assert res.exit_code == 0, " ".join((res.output or "").split())
    data = json.loads((out / "doctor.json").read_text())
    (name,) = data["teachers"]
    m = data["teachers"][name]["by_template"][CONCISE]
    keys = ("overlap_ratio", "overlap_mass_student", "overlap_mass_teacher", "overlap_token_advantage",
            "entropy_student", "entropy_teacher", "entropy_gap", "reverse_kl", "student_acc", "teacher_acc",
            "teacher_only_share", "reward_auroc", "continuation_advantage@0.25", "continuation_advantage@0.5")  # fmt: skip
    print(f"\nQwen2.5-Coder 0.5B -> 1.5B doctor in {seconds:.0f}s: "
          + ", ".join(f"{k}={m.get(k)}" for k in keys) + f"; truncation {data['templates'][CONCISE]['truncation_rate']}" + f"; verdict {data['teachers'][name]['verdict']['code']}")  # fmt: skip
    assert 0.0 < m["overlap_ratio"] <= 1.0
    assert m["overlap_mass_student"] <= 1.0 and m["overlap_mass_teacher"] <= 1.0
    assert m["overlap_token_advantage"] <= 1e-9
    assert m["reverse_kl"] > 1e-3  # two different models
    assert data["teachers"][name]["verdict"]["code"] != "identical"
