"""benchmarks/step_vs_trl.py pieces the GPU check depends on: TRL's dataset built where datasets and pyarrow
are importable only through PYTHONPATH (as on the GPU machine), and the teacher computing in the same
precision on both sides of the bf16 comparison."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load("step_vs_trl", REPO / "benchmarks" / "step_vs_trl.py")
ROWS = [{"prompt": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(3) for _ in range(2)]


def test_prompt_dataset_is_what_from_list_builds():
    datasets = pytest.importorskip("datasets")
    ours = bench.prompt_dataset(ROWS)
    theirs = datasets.Dataset.from_list(ROWS)
    assert ours.to_list() == theirs.to_list() == ROWS
    assert ours.features == theirs.features
    assert ours._fingerprint == bench.prompt_dataset(list(ROWS))._fingerprint  # the rows' own hash
    assert ours._fingerprint != bench.prompt_dataset(ROWS[:2])._fingerprint


def test_prompt_dataset_where_datasets_comes_through_pythonpath(tmp_path):
    """The failure the GPU check hit (`PicklingError: Can't pickle <class 'MonthDayNano'>`) reproduced: a
    venv that sees the packages only through PYTHONPATH (scripts/plain_checkout.py); `Dataset.from_list`
    fails there, `prompt_dataset` does not."""
    pytest.importorskip("datasets")
    pc = _load("plain_checkout", REPO / "scripts" / "plain_checkout.py")
    dest = tmp_path / "plain"
    pc.build(dest)
    code = f"""
import pickle, sys
sys.path.insert(0, "benchmarks")
from datasets import Dataset
from step_vs_trl import prompt_dataset
rows = {ROWS!r}
try:
    Dataset.from_list(rows)
    print("from_list: ok")
except pickle.PicklingError as exc:
    print("from_list: PicklingError", exc)
print("prompt_dataset:", prompt_dataset(rows).to_list() == rows)
"""
    proc = subprocess.run(
        [str(pc.venv_python(dest / "venv")), "-c", code],
        env=pc.environment(dest),
        cwd=dest / "checkout",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from_list: PicklingError" in proc.stdout  # the environment is the failing one ...
    assert "prompt_dataset: True" in proc.stdout  # ... and the benchmark's dataset is built there


def test_teacher_forward_runs_without_autocast():
    """TRL's teacher under an outer autocast (the HF Trainer's, in transformers versions that enter it)
    computes in its own dtype, as opd's teacher does."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    x = torch.randn(2, 8)

    def last_hidden(m, ids):
        return m(ids)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert last_hidden(model, x).dtype == torch.bfloat16  # what trl-bf16's teacher did
        assert bench.teacher_forward(torch, last_hidden, model, x).dtype == torch.float32


def test_teacher_precision_is_checked_on_every_hf_teacher_arm():
    def arm(seen, backend="hf"):
        res = {"compute_dtypes": {"teacher": seen} if seen else {}, "teacher_backend": backend}
        res["expected_teacher_dtype"] = "float32" if backend == "hf" else "bfloat16"
        return {**res, "summary": {"teacher_compute_dtype": bench.teacher_compute_dtype(res)}}

    results = {"trl-bf16": arm(["float32"]), "opd-full": arm(["float32"]), "opd-topk-vt": arm(None, "vllm")}
    assert bench.teacher_precision(results, "float32") == []
    assert results["opd-topk-vt"]["summary"]["teacher_compute_dtype"] == "bfloat16 (engine)"
    results["trl-bf16"] = arm(["bfloat16 (autocast on)"])
    assert bench.teacher_precision(results, "float32") == ["trl-bf16: bfloat16 (autocast on)"]
    assert bench.teacher_precision({"opd-full": arm(["float32"])}, "bfloat16") == ["opd-full: float32"]


def test_teacher_dtype_option():
    a = bench.parse_args(["--teacher-dtype", "bfloat16"])
    assert a.teacher_dtype == "bfloat16" and bench.parse_args([]).teacher_dtype == "float32"
