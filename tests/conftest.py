"""Shared fixtures: a real character-level tokenizer and a saved tiny student/teacher pair.

Everything is built locally (no hub access); the teacher's vocabulary is padded to a multiple of 64,
so every test that uses the pair meets the padded-vocabulary situation of real same-family pairs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from opd.models.tiny import build_tiny_tokenizer, save_tiny_pair

# The dtype-speed probe (opd.precision) measures the machine, not the code: the suite runs bf16 autocast on
# whatever CPU CI has, so the probe is off here (subprocesses inherit it) except where a test turns it on.
os.environ.setdefault("OPD_PRECISION_PROBE", "0")


@pytest.fixture
def tiny_tokenizer():
    """A fresh tokenizer per test, since tests may mutate it (pad token, padding side)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> dict[str, Path]:
    """{"student", "teacher", "prompts"} paths of a saved pair; read-only, shared by all tests."""
    return save_tiny_pair(tmp_path_factory.mktemp("tiny_pair"))


@pytest.fixture(scope="session")
def tiny_pair_dir(tiny_pair) -> Path:
    """The directory holding `student/`, `teacher/` (vocab padded to 128) and `prompts.jsonl`."""
    return tiny_pair["student"].parent


@pytest.fixture(scope="session")
def real_models():
    """scripts/fetch_real_models.py as a module (`ensure_model`, `ensure_gguf`), for the `real` tests."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "fetch_real_models.py"
    spec = importlib.util.spec_from_file_location("fetch_real_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_tiny_zoo(root: Path, *, problems_per_level: int):
    """A `LabZoo` of four random lab-tokenizer models under the zoo's names, with the first
    `problems_per_level` held-out problems of each level, under `root` (the lab tests' stand-in zoo)."""
    from opd.lab.runner import LabZoo
    from opd.lab.world import LEVELS, build_lab_tokenizer, eval_problems, write_prompt_file
    from opd.models.tiny import build_tiny_model

    tok = build_lab_tokenizer()
    models = {}
    for i, name in enumerate(("student", "teacher_novel", "teacher_big", "teacher_incompatible")):
        model = build_tiny_model(tok, hidden=32, layers=1, seed=i)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        models[name] = root / name
    files = {
        lv: write_prompt_file(root / "eval" / f"level{lv}.jsonl", eval_problems(lv)[:problems_per_level])
        for lv in LEVELS
    }
    return LabZoo(models=models, eval_files=files, gap_level=4)
