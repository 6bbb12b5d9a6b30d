"""The GPU check script's own logic (scripts/gpu_check.py), and the real-shaped pair it benchmarks.

The check itself runs in CI as `scripts/gpu_check.py --cpu` (about 5 minutes); these tests cover what that
run cannot show quickly: argument handling, step selection, how a failing, timing-out or blocked step is
recorded, the exit code, the rendered tables, and the shaped pair's tokenizer at the real vocabulary size.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


gc = _load()


def _check(tmp_path: Path, *extra: str):
    args = gc.parse_args(["--cpu", str(tmp_path / "out"), *extra])
    return gc.Check(args, gc.sizes_for(args), tmp_path / "out", tmp_path / "work")


# ----------------------------------------------------------------------------------------------------
# arguments and selection


def test_parse_args_and_sizes():
    a = gc.parse_args(["--cpu", "out", "--only", "train,bench-*", "--bench-tokens", "16", "--budget-s", "99"])
    assert a.cpu and a.out_dir == Path("out") and a.only == "train,bench-*" and a.budget_s == 99
    s = gc.sizes_for(a)
    assert s.bench_tokens == 16 and s.bench_size == gc.CPU.bench_size  # override on top of the mode's sizes
    g = gc.sizes_for(gc.parse_args(["out"]))
    assert g == gc.GPU and g.bench_size == "qwen"
    assert gc.parse_args(["--list"]).list
    with pytest.raises(SystemExit):
        gc.parse_args([])  # OUT_DIR is required unless --list


def test_select_only_skip_and_unknown():
    steps = gc.all_steps()
    names = [s.name for s in steps]
    assert names[0] == "deps" and "resume" in names and "bench-fp32" in names and "accelerate-ddp" in names
    chosen, unknown = gc.select(steps, "train,bench-*", None)
    assert [s.name for s in chosen] == ["deps", "tiny", "train", "bench-trl", "bench-fp32", "bench-bf16"]
    assert unknown == []
    chosen, _ = gc.select(steps, "sft", None)  # with what it needs
    assert [s.name for s in chosen] == ["deps", "generate", "sft"]
    chosen, unknown = gc.select(steps, None, "deps,fsdp,nope")
    got = [s.name for s in chosen]
    assert "deps" in got and "fsdp" not in got and unknown == ["nope"]  # deps cannot be skipped


def test_main_list_and_unknown_step(capsys, tmp_path):
    assert gc.main(["--list"]) == 0
    assert "bench-bf16" in capsys.readouterr().out
    assert gc.main([str(tmp_path), "--only", "bogus"]) == 2


# ----------------------------------------------------------------------------------------------------
# running steps: statuses, exit code, files written as it goes


def _cmd_step(name: str, code: str, timeout: float = 60, needs: tuple[str, ...] = ()):
    def run(check):
        return check.simple(name, [sys.executable, "-c", code], timeout)

    return gc.Step(name, name, run, needs=needs, timeout_s=timeout, min_s=0)


def test_failed_step_gives_exit_1_and_rows(tmp_path):
    check = _check(tmp_path)

    def broken(_check):
        raise RuntimeError("bug in a step")

    steps = [
        _cmd_step("ok", "print('hello')"),
        _cmd_step("bad", "import sys; print('ValueError: wrong thing'); sys.exit(3)"),
        _cmd_step("after-bad", "pass", needs=("bad",)),
        _cmd_step("slow", "import time; time.sleep(30)", timeout=0.5),
        gc.Step("broken", "broken", broken, min_s=0),
        gc.Step("too-big", "too big", broken, min_s=10**6),  # more than the budget: skipped, not failed
    ]
    assert gc.run_steps(check, steps) == 1
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["name"]: r for r in data["steps"]}
    assert rows["ok"]["status"] == "PASS" and rows["ok"]["command"].startswith("python -c")
    assert rows["bad"]["status"] == "FAIL" and "exit code 3" in rows["bad"]["note"]
    assert "ValueError: wrong thing" in rows["bad"]["note"]  # the telling line of the log
    assert rows["after-bad"]["status"] == "SKIP" and "needs bad" in rows["after-bad"]["note"]
    assert rows["slow"]["status"] == "FAIL" and "timed out" in rows["slow"]["note"]
    assert rows["broken"]["status"] == "FAIL" and "bug in a step" in rows["broken"]["note"]
    assert rows["too-big"]["status"] == "SKIP" and "budget" in rows["too-big"]["note"]
    assert data["failed"] == ["bad", "slow", "broken"]
    log = tmp_path / "work" / rows["ok"]["log"]  # written in the scratch directory ...
    assert log.exists() and "hello" in log.read_text()
    assert _archived(tmp_path / "out")[rows["ok"]["log"]].startswith("$ ")  # ... and packed into OUT
    assert "hello" in _archived(tmp_path / "out")[rows["ok"]["log"]]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.startswith("# opd GPU check (cpu): FAILED: 1 passed, 3 failed, 2 skipped")
    assert "| bad | FAIL |" in summary


def _archived(out: Path) -> dict[str, str]:
    import tarfile

    with tarfile.open(out / "logs.tar.gz") as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_order_by_value_and_the_plan():
    names = [s.name for s in gc.all_steps()]
    first = ["deps", "tiny", "train", "resume", "fsdp", "bench-trl", "bench-fp32", "bench-bf16"]
    assert names[: len(first)] == first  # the training paths and the TRL comparison come first
    extras = [s.name for s in gc.all_steps() if s.extra]
    assert names[-len(extras) :] == extras == ["check", "analyze", "cold-start", "prompts-select"]
    steps = gc.all_steps()
    est = gc.estimates_for(steps, cpu=False)
    assert est["bench-fp32"] == gc.ESTIMATES["bench-fp32"][0] and all(s.name in est for s in steps)
    # a budget that ends 20 s after bench-fp32: too little for bench-bf16's 60 s minimum, enough for
    # accelerate-ddp's 10 s (it takes longer than the 20 s, so it is the step the budget stops)
    assert est["accelerate-ddp"] > 20
    plan = gc.make_plan(steps, est, budget_s=sum(est[n] for n in first[:7]) + 20)
    by = {p["step"]: p for p in plan}
    assert by["train"]["fits"] == "yes" and by["train"]["by_s"] == sum(est[n] for n in first[:3])
    assert by["bench-fp32"]["fits"] == "yes" and by["bench-fp32"]["by_s"] == sum(est[n] for n in first[:7])
    # bench-bf16 needs its 60 s minimum and is skipped; accelerate-ddp (10 s minimum) then starts in its place
    assert by["bench-bf16"]["fits"].startswith("no") and by["bench-bf16"]["by_s"] is None
    assert by["accelerate-ddp"]["fits"].startswith("starts")
    assert all(by[n]["fits"].startswith("no") for n in ("generate", "prompts-select"))
    everything = gc.make_plan(steps, est, budget_s=10**5)
    assert everything[-1]["by_s"] == sum(est.values()) and all(p["fits"] == "yes" for p in everything)
    assert "estimate s" in gc.text_table(gc.PLAN_HEADERS, gc.plan_rows(plan))


def test_estimates_from_an_earlier_run(tmp_path):
    steps = gc.all_steps()
    earlier = tmp_path / "results.json"
    rows = [
        {"name": "train", "status": "PASS", "seconds": 7.25},
        {"name": "fsdp", "status": "SKIP", "seconds": 0},
    ]
    earlier.write_text(json.dumps({"mode": "gpu", "steps": rows}))
    est = gc.estimates_for(steps, cpu=False, earlier=earlier)
    assert est["train"] == 7.2 and est["fsdp"] == gc.ESTIMATES["fsdp"][0]  # a skipped step keeps its estimate
    with pytest.raises(SystemExit, match="same mode"):
        gc.estimates_for(steps, cpu=True, earlier=earlier)


def test_a_step_cut_by_the_budget_is_stopped_not_failed(tmp_path):
    check = _check(tmp_path, "--budget-s", "3")
    check.estimates = {"long": 60.0}
    steps = [
        _cmd_step("long", "import time; print('working', flush=True); time.sleep(60)"),
        _cmd_step("after", "pass"),
        gc.Step("extra", "extra", lambda c: gc.StepResult("extra", "PASS"), extra=True, min_s=0, cpu_s=50),
    ]
    check.estimates["extra"] = 50.0
    t = time.monotonic()
    assert gc.run_steps(check, steps) == 0  # nothing failed
    assert time.monotonic() - t < 30
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["name"]: r for r in data["steps"]}
    assert rows["long"]["status"] == "SKIP" and "stopped at the budget" in rows["long"]["note"]
    assert "--only long" in rows["long"]["note"] and rows["long"]["estimate_s"] == 60.0
    assert rows["after"]["status"] == "SKIP" and rows["after"]["note"].startswith("budget:")
    assert rows["extra"]["status"] == "SKIP"
    assert data["stopped_by_budget"] == ["long"]
    assert "(1 stopped at the budget)" in (tmp_path / "out" / "summary.md").read_text()
    assert "working" in _archived(tmp_path / "out")[rows["long"]["log"]]  # the stopped step's log is kept


def test_out_dir_holds_three_files(tmp_path, monkeypatch):
    """The GPU machine returns at most 8 files, no more than 2 folders down: OUT gets summary.md,
    results.json and logs.tar.gz, whatever ran (a stale older layout there is removed)."""
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "01-deps.log").write_text("old")
    (out / "bench-fp32.json").write_text("{}")
    fake = {
        "python": "3.12",
        "modules": {m: {"ok": True, "version": "1"} for m in (*gc.CORE_MODULES, *gc.OPTIONAL_MODULES)},
        "cuda_available": False,
    }
    monkeypatch.setattr(gc, "probe", lambda check, log: fake)

    def fake_bench(check):  # stands in for the benchmark: its JSON and an arm log, where the real one writes
        (check.logs / "bench-fp32").mkdir(parents=True, exist_ok=True)
        (check.logs / "bench-fp32" / "trl.log").write_text("arm log")
        (check.logs / "bench-fp32.json").write_text("{}")
        return check.simple("bench-fp32", [sys.executable, "-c", "print('bench')"], 60)

    many = [gc.Step(f"s{i}", "x", lambda c, i=i: c.simple(f"s{i}", [sys.executable, "-c", "pass"], 60), min_s=0)
            for i in range(12)]  # fmt: skip
    steps = [gc.all_steps()[0], *many, gc.Step("bench-fp32", "b", fake_bench, min_s=0)]
    monkeypatch.setattr(gc, "all_steps", lambda: steps)
    assert gc.main(["--cpu", str(out), "--work", str(tmp_path / "work")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "results.json", "summary.md"]
    names = set(_archived(out))
    # every step's log (deps wrote none: its probe is faked), the benchmark's JSON and its arm's log
    assert {"logs/02-s0.log", "logs/14-bench-fp32.log", "logs/bench-fp32.json"} <= names
    assert "logs/bench-fp32/trl.log" in names and len(names) == 15
    data = json.loads((out / "results.json").read_text())
    assert data["plan"][0]["step"] == "deps" and data["logs"] == "logs.tar.gz"
    assert "(not installed)" in gc.describe_env({"opd_from": str(gc.REPO / "src" / "opd")})


def test_archive_keeps_the_tail_of_a_huge_log(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "ARCHIVE_MEMBER_MAX", 100)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "01-x.log").write_text("a" * 500 + "THE END")
    (tmp_path / "logs" / "model.safetensors").write_text("not a log")
    assert gc.write_archive(tmp_path, tmp_path / "out.tar.gz") == 1
    import tarfile

    with tarfile.open(tmp_path / "out.tar.gz") as tar:
        text = tar.extractfile("logs/01-x.log").read().decode()
    assert text.endswith("THE END") and "first 407 bytes cut" in text


def test_all_passing_gives_exit_0(tmp_path):
    check = _check(tmp_path)
    assert gc.run_steps(check, [_cmd_step("a", "pass"), _cmd_step("b", "pass", needs=("a",))]) == 0
    assert "PASSED: 2 passed, 0 failed, 0 skipped" in (tmp_path / "out" / "summary.md").read_text()


def test_no_gpu_without_cpu_flag_is_refused(tmp_path, monkeypatch):
    fake = {
        "python": "3.12",
        "modules": {m: {"ok": True, "version": "1"} for m in (*gc.CORE_MODULES, *gc.OPTIONAL_MODULES)},
        "cuda_available": False,
    }
    monkeypatch.setattr(gc, "probe", lambda check, log: fake)
    assert gc.main([str(tmp_path / "out")]) == 2
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["name"] for r in data["steps"]] == ["deps", "gpu"]
    assert "--cpu" in data["steps"][1]["note"]


def test_missing_trl_is_a_failed_row_not_a_crash(tmp_path):
    check = _check(tmp_path)
    check.env_info = {"trl": None}
    row = gc.step_bench_trl(check)
    assert row.status == "FAIL" and "gpu_check_prepare.sh" in row.note
    check.env_info = {"trl": "1.16.0"}
    assert gc.step_bench_trl(check).status == "PASS"


def test_wheel_selection():
    tag = "cpython-312 x86_64"
    assert gc.wheel_fits(Path("trl-1.16.0-py3-none-any.whl"), tag)
    assert gc.wheel_fits(Path("multiprocess-0.70.19-py312-none-any.whl"), tag)
    assert gc.wheel_fits(Path("xxhash-4.1.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"), tag)
    assert not gc.wheel_fits(Path("pandas-3.1.1-cp312-cp312-manylinux_2_28_x86_64.whl"), "cpython-311 x86_64")
    assert gc.wheel_module(Path("antlr4_python3_runtime-4.13.2-py3-none-any.whl")) == "antlr4"
    assert (
        gc.wheel_module(Path("pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl")) == "pydantic_core"
    )


# ----------------------------------------------------------------------------------------------------
# rendering


def test_pretty_commands(tmp_path):
    py = sys.executable
    work = tmp_path / "w"
    assert gc.pretty([py, "-m", "opd.cli", "train", "--run_dir", str(work / "x")], py, work) == (
        "opd train --run_dir WORK/x"
    )
    assert gc.pretty([py, "-m", "accelerate.commands.launch", "--cpu"], py).startswith(
        "accelerate launch --cpu"
    )
    assert (
        gc.pretty([py, str(REPO / "benchmarks" / "step_vs_trl.py")], py) == "python benchmarks/step_vs_trl.py"
    )


def test_last_error_prefers_error_lines():
    text = "$ cmd\nloading\nTraceback (most recent call last):\n  File x\nRuntimeError: CUDA error\nbye\n"
    assert gc.last_error(text) == "RuntimeError: CUDA error"
    assert gc.last_error("") == "(no output)"


def _bench_json() -> dict:
    def arm(step, tok, dtype):
        return {
            "summary": {
                "median_step_s": step,
                "median_rollout_s": 1.0,
                "median_teacher_s": 0.5,
                "median_update_s": 0.5,
                "tokens_per_s": tok,
                "update_compute_dtype": dtype,
                "teacher_compute_dtype": "float32",
                "peak_rss_mb": 1000.0,
                "cuda_peak_alloc_mb": 5000.0,
            }
        }

    return {
        "meta": {
            "device": "cuda (NVIDIA H200)",
            "prompts_per_step": 8,
            "rollouts": 4,
            "max_new_tokens": 128,
            "warmup": 1,
            "steps": 2,
            "labels": {"opd-topk": "opd[topk]"},
        },
        "results": {
            "trl": arm(4.0, 100.0, "float32"),
            "opd-topk": arm(2.0, 250.0, "float32"),
            "opd-full": {
                "framework": "opd-full",
                "error": "exit code 1; log tail:\nRuntimeError: out of memory",
            },
        },
    }


def test_bench_rows_and_summary(tmp_path):
    headers, rows = gc.bench_rows(_bench_json())
    assert headers[-1] == "CUDA peak MB" and headers[6] == "teacher in"
    by = {r[0]: r for r in rows}
    assert by["opd[topk]"][4] == "2.50x" and by["trl"][4] == "1.00x" and by["opd[topk]"][7] == "5000"
    assert by["trl"][6] == "float32"
    assert by["opd-full"][1] == "FAILED" and "out of memory" in by["opd-full"][2]
    data = {
        "mode": "gpu",
        "started": "now",
        "elapsed_s": 1.0,
        "budget_s": 480,
        "environment": {},
        "steps": [],
        "benchmark": {"fp32": {"json": _bench_json(), "table": "=====\nraw table"}},
    }
    md = gc.render_summary(data)
    assert "## Benchmark fp32" in md and "| opd[topk] | 2.000 |" in md and "raw table" in md
    assert "8 prompts x 4 rollouts x 128 tokens" in md
    assert "opd[topk]" in gc.text_table(headers, rows)


def test_bench_table_extracts_the_printed_table():
    text = (
        "running trl ...\n"
        + "=" * 100
        + "\nheader\n"
        + "=" * 100
        + "\n  arm  1.0\n\nwhat each side did:\n  x\n"
    )
    got = gc.bench_table(text)
    assert got.startswith("=" * 100) and "arm  1.0" in got and "what each side did" not in got
    assert gc.bench_table("no table") == ""


# ----------------------------------------------------------------------------------------------------
# the real-shaped pair (opd.models.tiny.save_shaped_pair): the full 151,936-entry vocabulary at toy width


def test_shaped_pair_tokenizer_and_models(tmp_path):
    from transformers import AutoConfig, AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from opd.models.tiny import QWEN_VOCAB_SIZE, save_shaped_pair, shaped_pair_matches

    paths = save_shaped_pair(tmp_path, "qwen2.5-tiny")
    # transformers loads a qwen2 directory's tokenizer with its own Qwen2Tokenizer, which rebuilds the
    # pipeline; the generic class reads the saved one: both must see the same tokenizer
    auto = AutoTokenizer.from_pretrained(paths["student"])
    generic = TokenizersBackend.from_pretrained(paths["student"])
    text = "12+34=46\nHello, world!  中文 é\t"
    chat = [{"role": "user", "content": "1+2="}]
    for tok in (auto, generic):
        assert len(tok) == QWEN_VOCAB_SIZE == 151_936
        assert tok.decode(tok(text)["input_ids"]) == text  # text round-trips, spaces and non-ASCII included
        assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
            "<bos><|user|>\n1+2=\n<|assistant|>\n"
        )
        assert (
            tok.eos_token_id is not None
            and tok.pad_token_id is not None
            and tok.eos_token_id != tok.pad_token_id
        )
    assert auto(text)["input_ids"] == generic(text)["input_ids"]
    assert [auto.bos_token_id, auto.eos_token_id, auto.pad_token_id] == [
        generic.bos_token_id,
        generic.eos_token_id,
        generic.pad_token_id,
    ]
    fillers = [300, 20_000, 100_000, QWEN_VOCAB_SIZE - 10]  # every filler decodes to one whole character
    assert all(len(auto.decode([i])) == 1 for i in fillers)
    for name in ("student", "teacher"):
        cfg = AutoConfig.from_pretrained(paths[name])
        assert cfg.model_type == "qwen2" and cfg.vocab_size == QWEN_VOCAB_SIZE and cfg.tie_word_embeddings
        assert cfg.eos_token_id == auto.eos_token_id and cfg.pad_token_id == auto.pad_token_id
    assert (
        AutoConfig.from_pretrained(paths["teacher"]).hidden_size
        > AutoConfig.from_pretrained(paths["student"]).hidden_size
    )
    assert paths["prompts"].read_text().count("\n") == 64
    assert shaped_pair_matches(tmp_path, "qwen2.5-tiny")
    assert not shaped_pair_matches(tmp_path, "qwen2.5-tiny", seed=1)
    assert not shaped_pair_matches(tmp_path, "qwen2.5-0.5b/1.5b")


def test_shaped_shapes_are_qwen25():
    from opd.models.tiny import SHAPED_PAIRS, build_byte_level_tokenizer

    pair = SHAPED_PAIRS["qwen2.5-0.5b/1.5b"]
    assert (
        pair["student"].hidden,
        pair["student"].layers,
        pair["student"].heads,
        pair["student"].kv_heads,
        pair["student"].intermediate,
    ) == (896, 24, 14, 2, 4864)
    assert (
        pair["teacher"].hidden,
        pair["teacher"].layers,
        pair["teacher"].heads,
        pair["teacher"].kv_heads,
        pair["teacher"].intermediate,
    ) == (1536, 28, 12, 2, 8960)
    assert len(build_byte_level_tokenizer(1000)) == 1000
    with pytest.raises(ValueError):
        build_byte_level_tokenizer(100)
