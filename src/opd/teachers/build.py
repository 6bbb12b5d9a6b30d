"""The teacher a run's config asks for, built once, behind `opd.teachers.contract`.

The only place that reads ``teacher.backend``: a new backend is a new branch here and a class that keeps the
contract, never a change to the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from opd.config import TeacherConfig
from opd.errors import ConfigError
from opd.models.loading import freeze_teacher
from opd.teachers.contract import Teacher, TopKTeacher
from opd.teachers.hf import HFTeacher

__all__ = [
    "build_teacher",
    "check_teacher_processes",
    "describe_teacher",
    "loads_teacher_weights",
    "teacher_dtype_settings",
    "teacher_engine_in_process",
]


def loads_teacher_weights(tc: TeacherConfig) -> bool:
    """Whether the run loads the teacher's weights itself (an HF teacher) rather than asking an engine or a
    server that loads them (only its tokenizer is read then)."""
    return tc.backend == "hf"


def teacher_engine_in_process(tc: TeacherConfig) -> bool:
    """Whether the teacher is an engine living in the training process (vLLM), with its own GPU memory pool
    beside the trainer's (a server's engine runs elsewhere; an HF teacher is a module)."""
    return tc.backend == "vllm"


def teacher_dtype_settings(tc: TeacherConfig) -> dict[str, str]:
    """The teacher's dtype settings this run uses, by option name, for the precision check."""
    if tc.backend == "hf":
        return {"teacher.dtype": tc.dtype}
    if tc.backend == "vllm":
        return {"teacher.vllm_dtype": tc.vllm_dtype}
    return {}  # a server runs in its own dtype


def describe_teacher(tc: TeacherConfig) -> dict[str, str]:
    """The start-up table's teacher column: where it runs, its dtype and (engines, servers) what it returns."""
    if tc.backend == "hf":
        return {"path": tc.path, "dtype": tc.dtype}
    where = ", ".join(tc.urls) if tc.backend == "http" else tc.path
    returns = {"topk": f"top-{tc.top_k} log-probs per position",
               "hidden": f"last hidden states ({tc.payload_dtype}), projected with its LM head here",
               "ids": f"log-probs at the sampled token and its top-{tc.top_k} (full distribution)"}  # fmt: skip
    return {"path": f"{tc.backend}: {where}", "dtype": tc.vllm_dtype if tc.backend == "vllm" else "(server's)",
            "teacher returns": returns[tc.payload] if tc.backend == "http" else returns["topk"]}  # fmt: skip


def check_teacher_processes(tc: TeacherConfig, processes: int) -> None:
    """Refuse an in-process vLLM teacher in a run of several processes, before any model loads: each process
    would start its own engine with vLLM's single-process defaults (no ``external_launcher``, no per-rank
    device), all on the first GPU and outside the trainer's process group."""
    if tc.backend == "vllm" and processes > 1:
        raise ConfigError(
            f"teacher.backend vllm runs one in-process engine, but this run has {processes} processes (each would "
            "start an engine on the same device, outside the trainer's process group): launch one process, or "
            "serve the teacher once (`opd serve-teacher`) and use teacher.backend http with teacher.urls (every "
            "process asks the same servers), or teacher.backend hf"
        )


def build_teacher(
    tc: TeacherConfig,
    *,
    model: torch.nn.Module | None,
    device: torch.device,
    vocab_size: int,
    hidden_states: bool,
    seed: int,
    context: Callable[[int | None, str], int],
    tokenizer: Any,
    probe_texts: list[str],
    log: Callable[[str], None],
    processes: int,
) -> Teacher:
    """The run's teacher: the HF `model` here (on `device`, or CPU-offloaded and streamed to it), an
    in-process vLLM engine, or remote servers (top-K log-probs).

    `hidden_states`: an HF teacher hands the objective hidden states + head instead of logits
    (`loss.from_hidden_states`). `context(setting, what)`: the engine context the run needs, refusing a
    setting shorter than its longest prompt + response. `tokenizer` and `probe_texts`: a server is checked to
    tokenize like the student. `processes`: the run's process count (an in-process engine needs one)."""
    check_teacher_processes(tc, processes)
    if tc.backend == "hf":
        assert model is not None
        model = freeze_teacher(model)
        half = tc.dtype in ("bfloat16", "float16")
        hint = (f"load it in float32 (--teacher.dtype float32; {tc.dtype} may overflow) or check it" if half
                else "")  # fmt: skip
        if tc.placement == "cpu_offload":
            from accelerate import cpu_offload

            # Weights stay in CPU RAM and are streamed to the execution device layer by layer.
            model = cpu_offload(model, execution_device=device)
        else:
            model = model.to(device)
        return HFTeacher(model, hidden_states=hidden_states, nonfinite_hint=hint)
    if tc.backend == "vllm":
        from opd.models.loading import model_directory
        from opd.teachers.vllm import VLLMTeacher

        path = model_directory(tc.path, "teacher.backend vllm")
        engine = VLLMTeacher(
            str(path), k=tc.top_k, dtype=tc.vllm_dtype, kv_cache_gb=tc.vllm_kv_cache_gb, seed=seed,
            gpu_memory_utilization=tc.vllm_gpu_memory,
            max_model_len=context(tc.vllm_max_model_len, "teacher.vllm_max_model_len"),
        )  # fmt: skip
        return TopKTeacher(engine, vocab_size=vocab_size, device=device)
    if tc.payload != "topk":  # opd's own scoring server: hidden states + head, or log-probs at ids
        from opd.teachers.remote import ScoringServerTeacher

        remote = ScoringServerTeacher(
            tc.urls, payload=tc.payload, device=device, vocab_size=vocab_size, k=tc.top_k,
            payload_dtype=tc.payload_dtype, hidden_states=hidden_states, head_path=tc.path,
            trust_remote_code=tc.trust_remote_code, model=tc.model_name, timeout_s=tc.timeout_s,
            retries=tc.retries, backoff_s=tc.backoff_s, sequences_per_request=tc.sequences_per_request,
        )  # fmt: skip
        served = remote.max_model_len()
        if served is not None:
            context(served, f"the teacher server's max_model_len ({remote.served})")
        remote.check_tokenizer(tokenizer, probe_texts)
        log(f"teacher: {remote.served} at {', '.join(remote.urls)} (payload {tc.payload}, server dtype "
            f"{remote.info['dtype']})")  # fmt: skip
        return remote
    from opd.teachers.http import HTTPTeacher

    server = HTTPTeacher(
        tc.urls, k=tc.top_k, model=tc.model_name, timeout_s=tc.timeout_s, retries=tc.retries,
        backoff_s=tc.backoff_s, sequences_per_request=tc.sequences_per_request,
    )  # fmt: skip
    served = server.max_model_len()
    if served is not None:
        context(served, f"the teacher server's max_model_len ({server.model})")
    server.check_tokenizer(tokenizer, probe_texts)
    log(f"teacher: {server.model} at {', '.join(server.urls)} (top-{tc.top_k} log-probs)")
    return TopKTeacher(server, vocab_size=vocab_size, device=device, nonfinite_hint="see its server's log")
