"""Every command in the README's ```bash blocks is run by a test.

Each command (one logical line: `\\` continuations joined, `# comments` dropped) must be in exactly one table:

- ``RUN``: cheap commands (seconds each), run here for real, in README order, in one temporary directory,
  with the README's placeholders (STUDENT, TEACHER, prompts.jsonl, ...) replaced by the tiny pair of
  `tests/conftest.py` and tiny sizes appended (the text after the command in the table).
- ``COVERED``: expensive commands (the demo, the whole suite, real models, several processes, a vLLM
  server), each with the tests that run it, as ``path::name``: for a test file, ``def name(`` must be in
  it; for a script (`.ci/run`, `scripts/...`), ``name`` must be in its text (a function as ``def name(``
  when ``name`` is an identifier).
- ``INSTALL``: the `pip install` lines, which change the environment and are checked against what
  `scripts/setup_venv.sh` (the set-up `make` runs) and `requirements-lock.txt` install.

A README command in no table fails `test_every_readme_command_is_run_or_covered` with what to do; a table
entry the README no longer has fails it too, so the tables cannot drift from the README.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
THIS = "tests/test_readme.py"

# Appended to a training command so that it runs in seconds on the tiny pair.
TINY_TRAIN = (
    "--steps 2 --prompts_per_step 2 --rollout.rollouts_per_prompt 2 --rollout.max_new_tokens 8 "
    "--checkpoint_every 1 --tracking.tensorboard false"
)

# README command -> (arguments appended for tiny sizes, what must hold afterwards: "file:PATH" under the
# working directory, or a text the output must contain). Run in README order in one directory.
RUN: dict[str, tuple[str, str]] = {
    "make help": ("", "make demo"),
    "opd --version": ("", "opd"),
    "opd tiny runs/tiny && opd train --config configs/tiny.yaml": (TINY_TRAIN, "file:runs/tiny-opd/final"),
    "opd check --student STUDENT --teacher TEACHER --teacher-dtype bfloat16": (
        "--n-prompts 1 --max-new-tokens 4",
        "check finished",
    ),
    "opd train --student STUDENT --teacher TEACHER --prompts prompts.jsonl --run_dir runs/x "
    "--loss.signal topk --loss.k 16": (TINY_TRAIN, "file:runs/x/final"),
    "opd train --resume runs/x": ("", "already finished"),
    "opd analyze runs/x": ("", "file:runs/x/analysis/analysis.md"),
    "opd --help": ("", "serve-teacher"),
    "opd train --help": ("", "opd config fields"),
    "opd config fields loss": ("", "--loss.signal"),
    "opd config show --config configs/tiny.yaml --loss.k 8": ("", "k: 8"),
}

# README command -> the tests (or CI scripts) that run it.
COVERED: dict[str, tuple[str, ...]] = {
    "make demo": (
        "tests/test_demo_output.py::test_demo_output_from_plan_to_report",
        "tests/test_readme.py::test_make_targets_run_what_the_readme_says",
    ),
    "make test": (".ci/run::make test", "tests/test_readme.py::test_make_targets_run_what_the_readme_says"),
    "opd demo": ("tests/test_demo_output.py::test_demo_output_from_plan_to_report",),
    "opd doctor --student STUDENT --teacher TEACHER --prompts problems.jsonl --out doctor/": (
        "tests/test_command_devices.py::test_doctor_on_cpu_and_refused_cuda",
        "tests/test_doctor.py::test_doctor_on_the_tiny_pair_end_to_end",
    ),
    "opd eval --model runs/x/final --name-as before=STUDENT --name-as teacher=TEACHER --prompts problems.jsonl "
    "--before before --after final --teacher teacher --out evals/": (
        "tests/test_eval.py::test_cli_two_models_gap_recovery",
    ),
    "opd generate --model TEACHER --prompts sft_prompts.jsonl --out teacher.jsonl": (
        "tests/test_generate.py::test_cli_reports_refusal_in_red_with_exit_2",
        "tests/test_command_devices.py::test_generate_on_cpu_and_refused_cuda",
    ),
    "opd sft --model STUDENT --data teacher.jsonl --run_dir runs/sft": (
        "tests/test_sft.py::test_sigkill_then_resume_matches_uninterrupted_run",
        "tests/test_real_recipes.py::test_generate_then_sft_on_smollm2",
    ),
    "opd cold-start --config configs/cold_start_tiny.yaml": (
        "tests/test_cold_start.py::test_tiny_recipe_config_is_valid",
        "tests/test_cold_start.py::test_cold_start_end_to_end_then_rerun_skips_everything",
    ),
    "opd prompts select --student STUDENT --teacher TEACHER --candidates pool.jsonl --n 256 --mix 0.25 "
    "--out selected.jsonl": ("tests/test_prompts.py::test_cli_select_end_to_end",),
    "opd serve-teacher /models/teacher --max-logprobs 20": (
        "tests/test_serve_teacher_lifecycle.py::test_stopping_the_command_stops_the_server",
        "tests/test_vllm_backend.py::test_serve_teacher_real_server_on_loopback",
    ),
    "torchrun --standalone --nproc_per_node 2 -m opd.cli train --config configs/tiny.yaml": (
        "tests/test_trainer.py::test_two_processes_match_one",
        "tests/test_trainer.py::test_fsdp_two_processes_match_one_process_and_resume",
    ),
    "accelerate launch --config_file configs/accelerate/ddp.yaml -m opd.cli train "
    "--config configs/paper_qwen3_1p7b.yaml": (
        "scripts/gpu_check.py::make_accelerate_step",
        ".ci/run::scripts/gpu_check.py --cpu",
        "tests/test_config.py::test_shipped_training_recipes_validate",
    ),
}

# The `pip install` lines: checked by test_install_commands_match_the_setup_script.
INSTALL: tuple[str, ...] = (
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu",
    "pip install torch==2.13.0",
    'pip install -c requirements-lock.txt -e ".[dev]"',
    "pip install -e .",
)


def _strip_comment(line: str) -> str:
    """`line` without a trailing `# comment` (a `#` outside quotes, at the start or after a blank)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block, in order: continuations joined, comments dropped, blanks
    collapsed to one space."""
    commands: list[str] = []
    for block in re.findall(r"^```bash[ \t]*\n(.*?)^```", text, flags=re.S | re.M):
        logical = ""
        for raw in block.splitlines():
            line = raw.rstrip()
            if line.endswith("\\"):
                logical += line[:-1] + " "
                continue
            logical += line
            cmd = " ".join(_strip_comment(logical).split())
            logical = ""
            if cmd:
                commands.append(cmd)
        if logical.strip():
            commands.append(" ".join(_strip_comment(logical).split()))
    return commands


def test_readme_commands_parse() -> None:
    text = "```bash\nopd a \\\n   --b 1   # note\n# only a comment\n\nx 'q # kept'\n```\n```python\nnot_me\n```\n"
    assert readme_commands(text) == ["opd a --b 1", "x 'q # kept'"]


def test_every_readme_command_is_run_or_covered() -> None:
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert commands, "no ```bash block found in README.md"
    tables = {"RUN": set(RUN), "COVERED": set(COVERED), "INSTALL": set(INSTALL)}
    problems = []
    for cmd in commands:
        where = [name for name, keys in tables.items() if cmd in keys]
        if not where:
            problems.append(
                f"README command `{cmd}` is run by no test: add it to RUN in {THIS} if it takes seconds (it "
                f"then runs here on the tiny pair), or to COVERED with the test that runs it (path::name)"
            )
        elif len(where) > 1:
            problems.append(f"README command `{cmd}` is in {' and '.join(where)} of {THIS}: keep it in one")
    for name, keys in tables.items():
        for key in sorted(keys - set(commands)):
            problems.append(
                f"{name} in {THIS} has `{key}`, which is no longer in README.md: remove or update it"
            )
    assert not problems, "\n".join(problems)


def _target_exists(target: str) -> str | None:
    """None when `path::name` names something that exists, else what is wrong."""
    path, _, name = target.partition("::")
    file = ROOT / path
    if not name or not file.is_file():
        return f"{target}: no file {path}" if name else f"{target}: use path::name"
    text = file.read_text(encoding="utf-8")
    if re.fullmatch(r"[A-Za-z_]\w*", name):
        return (
            None
            if re.search(rf"^\s*(async\s+)?def {name}\(", text, flags=re.M)
            else f"{target}: no `def {name}(`"
        )
    return None if name in text else f"{target}: `{name}` is not in {path}"


def test_covered_commands_name_existing_tests() -> None:
    problems = [p for targets in COVERED.values() for t in targets if (p := _target_exists(t))]
    assert not problems, "COVERED in tests/test_readme.py names tests that do not exist:\n" + "\n".join(
        problems
    )


def test_target_check_catches_a_missing_test() -> None:
    assert _target_exists("tests/test_readme.py::test_covered_commands_name_existing_tests") is None
    assert "no `def" in _target_exists("tests/test_readme.py::test_no_such_test")
    assert "no file" in _target_exists("tests/no_such_file.py::test_x")
    assert _target_exists(".ci/run::make test") is None


def test_make_targets_run_what_the_readme_says() -> None:
    """`make demo` and `make test` (the README's two commands) run `opd demo` and the default suite."""
    if shutil.which("make") is None:
        pytest.skip("no `make` on PATH (the README's set-up needs it: apt-get install make)")
    for target, expected in (("demo", "/opd demo"), ("test", "-m pytest -q")):
        res = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert expected in res.stdout, f"`make -n {target}` does not run `{expected}`:\n{res.stdout}"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test\s*$", ci, flags=re.M), ".ci/run no longer calls `make test`"


def test_install_commands_match_the_setup_script() -> None:
    """The README's pip lines install what `scripts/setup_venv.sh` (the set-up `make` runs) installs."""
    lock = (ROOT / "requirements-lock.txt").read_text(encoding="utf-8")
    setup = (ROOT / "scripts" / "setup_venv.sh").read_text(encoding="utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    extras_section = pyproject.split("[project.optional-dependencies]", 1)[-1].split("\n[", 1)[0]
    torch_pin = re.search(r"^torch==(\S+)", lock, flags=re.M)
    assert torch_pin, "requirements-lock.txt pins no torch version"
    for cmd in INSTALL:
        words = shlex.split(cmd)
        for w in words:
            if w.startswith("torch=="):
                assert w == f"torch=={torch_pin.group(1)}", (
                    f"README `{cmd}`: the lock pins torch=={torch_pin.group(1)}"
                )
        if "--index-url" in words:
            url = words[words.index("--index-url") + 1]
            assert f'CPU_INDEX="${{OPD_TORCH_CPU_INDEX:-{url}}}"' in setup, (
                f"README `{cmd}`: not setup_venv's CPU index"
            )
        if "-c" in words:
            assert words[words.index("-c") + 1] == "requirements-lock.txt"
            assert 'install -c "$LOCK" -e ".[$EXTRAS]"' in setup, (
                "setup_venv.sh no longer installs from the lock"
            )
            extras = re.search(r"\[(.*)\]", words[-1]).group(1).split(",")
            for extra in extras:
                assert re.search(rf"^{extra}\s*=", extras_section, flags=re.M), (
                    f"README `{cmd}`: no extra [{extra}]"
                )
    assert re.search(r'^requires-python\s*=\s*">=3.10"', pyproject, flags=re.M), (
        "pyproject's requires-python changed"
    )
    assert "Python >= 3.10" in README.read_text(encoding="utf-8")
    assert "sys.version_info < (3, 10)" in setup


def _substitute(cmd: str, pair: dict[str, Path]) -> str:
    """The README's placeholders replaced by the tiny pair's paths."""
    subs = {
        r"\bSTUDENT\b": str(pair["student"]),
        r"\bTEACHER\b": str(pair["teacher"]),
        r"(?<![\w/])(prompts|problems)\.jsonl\b": str(pair["prompts"]),
    }
    for pattern, value in subs.items():
        cmd = re.sub(pattern, lambda _m, v=value: shlex.quote(v), cmd)
    return cmd


def test_placeholders_are_substituted() -> None:
    pair = {"student": Path("/p/s"), "teacher": Path("/p/t"), "prompts": Path("/p/q.jsonl")}
    got = _substitute(
        "opd x --student STUDENT --teacher TEACHER --prompts prompts.jsonl --out runs/prompts.jsonl", pair
    )
    assert got == "opd x --student /p/s --teacher /p/t --prompts /p/q.jsonl --out runs/prompts.jsonl"


def _run_one(cmd: str, pair: dict[str, Path], work: Path, env: dict[str, str]) -> str | None:
    """Run one RUN command as the README shows it (placeholders substituted, tiny sizes appended); None when
    it worked, else what went wrong."""
    extra, expect = RUN[cmd]
    line = _substitute(cmd, pair) + (f" {extra}" if extra else "")
    cwd = ROOT if cmd.startswith("make ") else work
    try:
        res = subprocess.run(
            ["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
        )
    except subprocess.TimeoutExpired:
        return f"`{cmd}` (ran as `{line}`): still running after 240 s"
    out = res.stdout + res.stderr
    ok = res.returncode == 0 and (
        (work / expect[5:]).exists() if expect.startswith("file:") else expect in out
    )
    if ok:
        return None
    return (
        f"`{cmd}` (ran as `{line}`): exit {res.returncode}, expected {expect!r}; output ends:\n{out[-1500:]}"
    )


@pytest.mark.slow
def test_readme_commands_run(tiny_pair, tmp_path: Path) -> None:
    """The RUN commands, for real, in one directory. Those on runs/x run in README order (train, then
    --resume, then analyze), one after another; the others each on their own, two at a time."""
    commands = [c for c in readme_commands(README.read_text(encoding="utf-8")) if c in RUN]
    if shutil.which("make") is None:  # test_make_targets_run_what_the_readme_says says why
        commands = [c for c in commands if not c.startswith("make ")]
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "configs", work / "configs")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "OPD_PRECISION_PROBE": "0",
        "COLUMNS": "120",
    }
    chain = [c for c in commands if "runs/x" in c]
    jobs = [chain] + [[c] for c in commands if c not in chain]

    def run_jobs(job: list[str]) -> list[str]:
        failures = []
        for cmd in job:
            if (failure := _run_one(cmd, tiny_pair, work, env)) is not None:
                failures.append(failure)
                break  # the rest of a chain depends on this one
        return failures

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for fs in pool.map(run_jobs, jobs) for f in fs]
    assert not failures, "README commands that fail:\n\n" + "\n\n".join(failures)


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_docs_resolve() -> None:
    """Relative links (and their #anchors) in the README, docs/, ARCHITECTURE.md and the benchmarks/ and
    scripts/ READMEs point at files and headings that exist: moving a section must not break them."""
    pages = [README, ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
    pages += [ROOT / "benchmarks" / "README.md", ROOT / "scripts" / "README.md"]
    problems = []
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                problems.append(f"{page.relative_to(ROOT)}: link to missing {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), flags=re.M)
                if anchor not in {_slug(h) for h in headings}:
                    problems.append(
                        f"{page.relative_to(ROOT)}: no heading #{anchor} in {file.relative_to(ROOT)}"
                    )
    assert not problems, "\n".join(problems)


def test_slug_matches_github() -> None:
    assert _slug("`gpu_check.py`: every device-touching entry point, one verdict") == (
        "gpu_checkpy-every-device-touching-entry-point-one-verdict"
    )
    assert _slug("Results: Qwen2.5-Coder 0.5B (student) / 1.5B (teacher), 2 CPU cores") == (
        "results-qwen25-coder-05b-student--15b-teacher-2-cpu-cores"
    )


def test_readme_spells_config_options_as_fields() -> None:
    """The README's config options are `--section.field` paths (or top-level fields with underscores) that
    `opd train` knows, and the short forms it lists are exactly the ones the CLI accepts."""
    from opd.config import ALIASES, field_paths

    text = README.read_text(encoding="utf-8")
    known = set(field_paths())
    dotted = set(re.findall(r"--([a-z_]+\.[a-z_.]*[a-z_])", text))
    underscored = set(re.findall(r"--([a-z]+_[a-z_]+)\b", text)) - {"nproc_per_node", "config_file"}
    unknown = sorted(o for o in dotted | underscored if o not in known and o != "section.field")
    assert not unknown, (
        f"README options that are no config field of `opd train`: {unknown} (see `opd config fields`)"
    )
    listed = re.search(r"A few have short forms: (.*?)\. ", " ".join(text.split()))
    assert listed, "README no longer lists the short forms ('A few have short forms: ...')"
    assert set(re.findall(r"`--(\w+)`", listed.group(1))) == set(ALIASES), (
        "README's short forms != opd.config.ALIASES"
    )
