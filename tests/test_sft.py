"""`opd sft`: response-only labels, accumulation invariance, learning, and SIGKILL/resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.errors import DataError
from opd.train.sft import IGNORE, SFTConfig, SFTTrainer, collate, encode_example, load_sft_examples


def _write_data(path: Path, n: int = 4, reply_len: int = 1) -> Path:
    rows = []
    for i in range(n):
        reply = f"Add {i} and {i + 1}: " * reply_len + f"\\boxed{{{2 * i + 1}}}"
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{i}+{i + 1}="},
                    {"role": "assistant", "content": reply},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_tokens_are_masked_and_the_reply_ends_with_eos(tiny_tokenizer):
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2="},
                        {"role": "assistant", "content": "3"}]}  # fmt: skip
    ctx, tgt = encode_example(row, "d.jsonl:1", tiny_tokenizer)
    assert tiny_tokenizer.decode(ctx) == "<bos><|system|>\nBe brief.\n<|user|>\n1+2=\n<|assistant|>\n"
    assert tiny_tokenizer.decode(tgt) == "3<eos>\n"  # the end-of-turn tokens are learnt too
    assert tiny_tokenizer.eos_token_id in tgt
    batch = collate(
        [
            type("E", (), {"input_ids": ctx + tgt, "labels": [IGNORE] * len(ctx) + tgt})(),
            type("E", (), {"input_ids": ctx, "labels": [IGNORE] * len(ctx)})(),
        ],
        pad_id=0,
    )
    assert batch["labels"][0].tolist() == [IGNORE] * len(ctx) + tgt
    assert (batch["labels"][1] == IGNORE).all() and batch["attention_mask"][1].sum() == len(ctx)


def test_prompt_response_records_with_a_format_template(tiny_tokenizer):
    row = {"prompt": "1+2=", "response": "3"}
    ctx, tgt = encode_example(row, "d.jsonl:1", tiny_tokenizer, template="Q: {prompt}\nA: ")
    assert tiny_tokenizer.decode(ctx) == "<bos>Q: 1+2=\nA: "
    assert tgt == [*tiny_tokenizer("3", add_special_tokens=False)["input_ids"], tiny_tokenizer.eos_token_id]
    ctx2, tgt2 = encode_example(row, "d.jsonl:1", tiny_tokenizer, template="chat:boxed")
    assert "Please reason step by step" in tiny_tokenizer.decode(ctx2)
    assert tiny_tokenizer.decode(tgt2) == "3<eos>\n"


def test_a_template_that_rewrites_history_fails_with_file_and_line(tiny_tokenizer):
    # a template that renders the generation prompt differently from a finished turn
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant (thinking): ' }}{% endif %}"
    )
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(DataError, match=r"data.jsonl:7: .*does not start with its rendering of the prompt"):
        encode_example(row, "data.jsonl:7", tiny_tokenizer)
    with pytest.raises(DataError, match="data.jsonl:3: the last message must be the assistant"):
        encode_example({"messages": [{"role": "user", "content": "hi"}]}, "data.jsonl:3", tiny_tokenizer)


def test_too_long_examples_are_skipped_and_counted(tiny_tokenizer, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "1+1=", "response": "2"}, {"prompt": "1+1=", "response": "2" * 100}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SFTConfig(model="unused", data=str(data), template="chat", max_seq_len=40)
    examples, report = load_sft_examples(cfg, tiny_tokenizer)
    assert (
        len(examples) == 1
        and report["skipped_too_long"] == 1
        and f"{data}:2" in report["skipped_examples"][0]
    )
    with pytest.raises(DataError, match="all 2 examples are longer than max_seq_len=5"):
        load_sft_examples(cfg.model_copy(update={"max_seq_len": 5}), tiny_tokenizer)


def _trainer(tiny_pair, data: Path, run_dir: Path, **kw) -> SFTTrainer:
    base = {"model": str(tiny_pair["student"]), "data": str(data), "run_dir": str(run_dir), "batch_size": 4,
            "micro_batch_size": 4, "steps": 1, "shuffle": False, "tracking": {"tensorboard": False},
            "save_final": False}  # fmt: skip
    base.update(kw)
    t = SFTTrainer(SFTConfig.model_validate(base), log=lambda m: None)
    t.setup()
    return t


def test_gradient_accumulation_gives_the_same_update(tiny_pair, tmp_path):
    # replies of different lengths, so a per-micro-batch mean would weight tokens differently
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"{i}+1=", "response": "x" * (3 + 7 * i)} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params, grads = {}, {}
    for mb in (1, 4):
        t = _trainer(tiny_pair, data, tmp_path / f"mb{mb}", micro_batch_size=mb, optim={"lr": 1e-2})
        step, seen = t.optimizer.step, {}

        def capture(*a, _step=step, _seen=seen, _t=t, **k):
            # Adam's first update is nearly sign(grad), so compare the gradients themselves too
            _seen.update({n: p.grad.detach().clone() for n, p in _t._unwrapped().named_parameters()})
            return _step(*a, **k)

        t.optimizer.step = capture
        t.train()
        grads[mb] = seen
        params[mb] = {k: v.detach().clone() for k, v in t._unwrapped().state_dict().items()}
    for k in grads[1]:
        torch.testing.assert_close(grads[1][k], grads[4][k], atol=1e-7, rtol=1e-5)
    for k in params[1]:
        torch.testing.assert_close(params[1][k], params[4][k], atol=1e-6, rtol=1e-5)


def test_loss_decreases_on_a_tiny_dataset(tiny_pair, tmp_path):
    data = _write_data(tmp_path / "d.jsonl")
    t = _trainer(tiny_pair, data, tmp_path / "run", steps=10, optim={"lr": 1e-2, "schedule": "constant"},
                 save_final=True, checkpoint_every=5)  # fmt: skip
    history = t.train()
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "final" / "tokenizer.json").is_file()


def test_paper_defaults():
    o = SFTConfig().optim
    assert (o.lr, o.schedule, o.warmup_ratio, o.weight_decay) == (1e-5, "cosine", 0.05, 0.01)


# ----------------------------------------------------------------------------------------------------


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    code = "import sys; from opd.cli import app; sys.exit(app())"
    from multiproc import Proc  # its own session; a timeout kills the whole tree and shows the output

    return Proc([sys.executable, "-c", code, "sft", *args], env=env)


def _sft_args(tiny_pair, data: Path, run_dir: Path) -> list[str]:
    return ["--model", str(tiny_pair["student"]), "--data", str(data), "--run_dir", str(run_dir), "--batch_size",
            "8", "--micro_batch_size", "4", "--steps", "12", "--lr", "1e-3", "--checkpoint_every", "2",
            "--tracking.tensorboard", "false"]  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tiny_pair, tmp_path):
    data = _write_data(tmp_path / "d.jsonl", n=12, reply_len=12)
    full = _cli(_sft_args(tiny_pair, data, tmp_path / "full"))
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out

    run = tmp_path / "killed"
    proc = _cli(_sft_args(tiny_pair, data, run))
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists(), "the run finished before it was killed"
    resumed = _cli(["--resume", str(run)])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 13))
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert la == [json.loads(x)["loss"] for x in metrics.read_text().splitlines()]


def test_resume_of_a_finished_sft_run_says_so_and_changes_nothing(tiny_pair, tmp_path):
    """`opd sft --resume RUN` after the last step and final/: one line, exit 0, nothing rewritten."""
    from typer.testing import CliRunner

    from opd.cli import app

    data, run = _write_data(tmp_path / "d.jsonl"), tmp_path / "run"
    args = ["--model", str(tiny_pair["student"]), "--data", str(data), "--run_dir", str(run), "--batch_size", "4",
            "--micro_batch_size", "4", "--steps", "2", "--tracking.tensorboard", "false"]  # fmt: skip
    res = CliRunner().invoke(app, ["sft", *args], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    files = [*sorted((run / "final").rglob("*")), run / "metrics.jsonl", run / "config.yaml"]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files if p.is_file()}
    assert run / "final" / "model.safetensors" in before
    time.sleep(0.05)
    res = CliRunner().invoke(app, ["sft", "--resume", str(run)], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    assert (
        f"{run} already finished at step 2/2; nothing to do" in res.output
        and "opd sft --resume" in res.output
    )
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in before} == before


def test_sft_records_its_device_choices(tiny_pair, tmp_path):
    """SFT takes OPD's speed settings (tf32, fused AdamW, the allocator, the collective timeout) and writes
    what it chose to RUN_DIR/device.json, as opd train does; on the CPU nothing is switched on."""
    data = _write_data(tmp_path / "d.jsonl")
    t = _trainer(tiny_pair, data, tmp_path / "run", tf32=False, dist_timeout_s=1800)
    choices = json.loads((tmp_path / "run" / "device.json").read_text())
    assert choices["device"] == "cpu" and choices["fused_adamw"] is False
    assert choices["tf32"]["applied"] is False
    assert t.cfg.dist_timeout_s == 1800 and t.cfg.expandable_segments is True
