"""`opd generate`: the filters on crafted responses, the files it writes, and resume after a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opd.config import load_config
from opd.errors import ConfigError
from opd.recipes.generate import (
    GENERATE_ALIASES,
    GenerateConfig,
    OutputPaths,
    filter_reasons,
    no_answer_reason,
    read_complete_lines,
    repetition_reason,
    run_generate,
    truncated_reason,
)

CLEAN = """Let me add the two numbers step by step.
First, 17 + 25: the units give 7 + 5 = 12, so write 2 and carry 1.
Then the tens give 1 + 2 + 1 = 4.
\\begin{aligned}
x &= 17 + 25 \\\\
\\end{aligned}
\\begin{aligned}
y &= 42 \\\\
\\end{aligned}
\\begin{aligned}
z &= 42 \\\\
\\end{aligned}
Wait, let me double-check the carry once more.
Wait, let me double-check the carry once more.
Yes, 17 + 25 = 42.
The answer is \\boxed{42}."""


def test_clean_response_passes_every_filter():
    assert repetition_reason(CLEAN) is None  # short/one-word lines thrice, a real line twice: fine
    assert no_answer_reason(CLEAN) is None
    assert truncated_reason(False, 64) is None
    assert (
        filter_reasons(
            CLEAN,
            truncated=False,
            answer="42",
            filters=["truncated", "no_answer", "repetition"],
            max_new_tokens=64,
        )
        == {}
    )


def test_truncated_and_no_answer():
    assert "max_new_tokens=64" in truncated_reason(True, 64)
    assert no_answer_reason("I think it is 42 but I am not sure") is not None
    assert no_answer_reason("so the result follows.\nAnswer: 42") is None
    assert no_answer_reason("\\boxed{\\frac{1}{2}}") is None


def test_repeated_lines_are_caught():
    text = "Let me compute the sum of the digits here.\n" * 3 + "\\boxed{1}"
    reason = repetition_reason(text)
    assert reason is not None and "line repeated 3x" in reason
    twice = "Let me compute the sum of the digits here.\n" * 2 + "\\boxed{1}"
    assert repetition_reason(twice) is None


def test_repeated_word_windows_in_one_line_are_caught():
    loop = "so we add the carry to the tens digit and then we get " * 6
    reason = repetition_reason("Start. " + loop + " end")
    assert reason is not None and "10-word window repeated" in reason


def test_character_loops_at_the_end_are_caught():
    assert "1-character loop" in repetition_reason("The value is 0." + "1" * 250)
    reason = repetition_reason("Compute: " + "ab+cd=" * 60)
    assert reason is not None and "6-character loop" in reason
    # a long separator or number under the span threshold is fine
    assert repetition_reason("Result\n" + "-" * 80 + "\n\\boxed{3}") is None


def test_every_failing_filter_is_reported_and_incorrect_uses_the_verifier():
    from opd.evaluation.verify import get_verifier

    bad = "Wait, this is going nowhere at all.\n" * 4
    reasons = filter_reasons(
        bad, truncated=True, answer="7", filters=["truncated", "no_answer", "repetition", "incorrect"],
        max_new_tokens=8, verifier=get_verifier("exact"),
    )  # fmt: skip
    assert set(reasons) == {"truncated", "no_answer", "repetition", "incorrect"}
    v = get_verifier("exact")
    assert filter_reasons("\\boxed{7}", truncated=False, answer="7", filters=["incorrect"], max_new_tokens=8,
                          verifier=v) == {}  # fmt: skip
    assert "incorrect" in filter_reasons("\\boxed{8}", truncated=False, answer="7", filters=["incorrect"],
                                         max_new_tokens=8, verifier=v)  # fmt: skip


def test_filters_option_accepts_comma_lists_and_none():
    cfg = load_config(
        None, ["--filters", "truncated,no_answer"], model=GenerateConfig, aliases=GENERATE_ALIASES
    )
    assert cfg.filters == ["truncated", "no_answer"]
    assert GenerateConfig().filters == ["truncated", "no_answer", "repetition"]  # incorrect is off by default
    assert GenerateConfig(filters="none").filters == []
    with pytest.raises(ConfigError, match="unknown filter"):
        load_config(None, ["--filters", "truncated,typo"], model=GenerateConfig, aliases=GENERATE_ALIASES)


def test_yaml_config_with_cli_overrides(tmp_path):
    f = tmp_path / "gen.yaml"
    f.write_text("model: T\nprompts: p.jsonl\nout: o.jsonl\nfilters: [truncated, incorrect]\nsamples: 4\n")
    cfg = load_config(
        f, ["--top-p", "0.95", "--teacher", "T2"], model=GenerateConfig, aliases=GENERATE_ALIASES
    )
    assert (cfg.model, cfg.samples, cfg.top_p, cfg.filters) == ("T2", 4, 0.95, ["truncated", "incorrect"])


def test_torn_last_line_is_cut(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert read_complete_lines(p) == [{"a": 1}, {"a": 2}]
    assert p.read_text() == '{"a": 1}\n{"a": 2}\n'


def _cfg(tiny_pair, out: Path, **kw) -> GenerateConfig:
    base = {
        "model": str(tiny_pair["teacher"]), "prompts": str(tiny_pair["prompts"]), "out": str(out),
        "max_new_tokens": 12, "batch_size": 4, "max_prompts": 10, "filters": "truncated",
    }  # fmt: skip
    base.update(kw)
    return GenerateConfig(**base)


def test_generate_writes_chat_records_summary_and_skips_done_work(tiny_pair, tmp_path):
    out = tmp_path / "teacher.jsonl"
    res = run_generate(_cfg(tiny_pair, out, samples=2), log=lambda m: None)
    paths = OutputPaths.for_out(out)
    kept, rejected = read_complete_lines(paths.out), read_complete_lines(paths.rejected)
    assert len(kept) + len(rejected) == 20 and res.generated == 20 and res.written == 20
    assert {(r["prompt_index"], r["sample_index"]) for r in kept + rejected} == {
        (i, j) for i in range(10) for j in (0, 1)
    }
    for r in kept:
        assert r["messages"][0] == {"role": "user", "content": r["prompt"]}
        assert r["messages"][-1] == {"role": "assistant", "content": r["response"]}
        assert (
            not r["truncated"] and r["n_tokens"] <= 12 and r["source"].endswith(f":{r['prompt_index'] + 1}")
        )
    for r in rejected:
        assert set(r["reasons"]) == {"truncated"}
    summary = json.loads(paths.summary.read_text())
    assert summary["kept"] == len(kept) and summary["rejected"] == len(rejected)
    assert summary["rejected_by_filter"] == {"truncated": len(rejected)}
    assert summary["settings"]["temperature"] == 1.0 and "prompts_sha256" in summary["settings"]
    again = run_generate(_cfg(tiny_pair, out, samples=2), log=lambda m: None)
    assert again.generated == 0 and again.written == 0 and again.already_done == 20


def test_changed_settings_are_refused(tiny_pair, tmp_path):
    out = tmp_path / "t.jsonl"
    run_generate(_cfg(tiny_pair, out, max_prompts=2), log=lambda m: None)
    before = out.read_bytes() if out.exists() else b""
    with pytest.raises(ConfigError, match=r"different settings \(temperature: 1.0 -> 0.5\)"):
        run_generate(_cfg(tiny_pair, out, max_prompts=2, temperature=0.5), log=lambda m: None)
    assert (out.read_bytes() if out.exists() else b"") == before
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"x": 1}\n')
    with pytest.raises(ConfigError, match="cannot be resumed safely"):
        run_generate(_cfg(tiny_pair, foreign, max_prompts=2), log=lambda m: None)


def test_cli_reports_refusal_in_red_with_exit_2(tiny_pair, tmp_path):
    from typer.testing import CliRunner

    from opd.cli import app

    out = tmp_path / "c.jsonl"
    args = ["generate", "--model", str(tiny_pair["teacher"]), "--prompts", str(tiny_pair["prompts"]), "--out",
            str(out), "--max-new-tokens", "4", "--batch-size", "2", "--max_prompts", "2", "--filters", "none"]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert len(read_complete_lines(out)) == 2  # no filters: everything is kept
    second = CliRunner().invoke(app, [*args, "--seed", "1"])
    assert second.exit_code == 2
    assert "different settings (seed: 0 -> 1)" in second.output


# ----------------------------------------------------------------------------------------------------
# A real SIGKILL of the command, then the same command again


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # `from opd.cli import app` rather than `-m opd.cli`, so commands registered below cli's __main__
    # guard exist too.
    code = "import sys; from opd.cli import app; sys.exit(app())"
    from multiproc import Proc  # its own session; a timeout kills the whole tree and shows the output

    return Proc([sys.executable, "-c", code, *args], env=env)


def _gen_args(tiny_pair, out: Path) -> list[str]:
    return ["generate", "--model", str(tiny_pair["teacher"]), "--prompts", str(tiny_pair["prompts"]), "--out",
            str(out), "--max-new-tokens", "24", "--batch-size", "4", "--max_prompts", "48", "--filters",
            "truncated,repetition", "--samples", "1"]  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_rerun_matches_uninterrupted_run(tiny_pair, tmp_path):
    full_out = tmp_path / "full" / "teacher.jsonl"
    full = _cli(_gen_args(tiny_pair, full_out))
    log, _ = full.communicate(timeout=300)
    assert full.returncode == 0, log

    out = tmp_path / "killed" / "teacher.jsonl"
    paths = OutputPaths.for_out(out)
    proc = _cli(_gen_args(tiny_pair, out))

    def n_lines() -> int:
        return sum(p.read_bytes().count(b"\n") for p in (paths.out, paths.rejected) if p.exists())

    deadline = time.time() + 120
    while time.time() < deadline and n_lines() < 12 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not paths.summary.exists(), "the run finished before it was killed; the test needs a mid-way kill"
    # A kill in the middle of a write leaves a torn line; make sure the rerun meets one.
    with open(paths.rejected, "a") as fh:
        fh.write('{"messages": [{"role": "user", "con')
    done = {(r["prompt_index"], r["sample_index"]) for p in (paths.out, paths.rejected)
            for r in read_complete_lines(p, repair=False)}  # fmt: skip
    assert 0 < len(done) < 48
    incomplete_batches = {i // 4 for i in range(48) if (i, 0) not in done}

    rerun = _cli(_gen_args(tiny_pair, out))
    log, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log
    assert f"resuming {out}: {len(done)}/48 samples already written" in log
    last = json.loads(paths.summary.read_text())["last_run"]
    assert last["already_done"] == len(done)
    assert last["written"] == 48 - len(done)  # nothing written twice, nothing lost
    assert last["generated"] == 4 * len(incomplete_batches)  # only batches with missing samples run again
    full_paths = OutputPaths.for_out(full_out)
    assert paths.out.read_bytes() == full_paths.out.read_bytes()
    assert paths.rejected.read_bytes() == full_paths.rejected.read_bytes()
    assert paths.rejected.read_bytes().endswith(b"\n")
