"""The rollout generator a run's config asks for, built once: HF `generate` on the model being trained, or a
colocated vLLM engine on the student's directory. The only place that reads ``rollout.backend``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from opd.config import RolloutConfig
from opd.errors import ConfigError
from opd.generation.rollout import HFGenerator

__all__ = [
    "build_generator",
    "check_generator_processes",
    "generator_dtype_settings",
    "rollout_engine_in_process",
    "rollouts_run_the_student",
]


def generator_dtype_settings(rc: RolloutConfig) -> dict[str, str]:
    """The generator's own dtype settings, by option name, for the precision check (HF rollouts run in
    the student's dtype, checked with it)."""
    return {"rollout.vllm_dtype": rc.vllm_dtype} if rc.backend == "vllm" else {}


def rollouts_run_the_student(rc: RolloutConfig) -> bool:
    """Whether rollouts run the student module itself (HF `generate`, under the student's autocast) rather
    than an engine that samples in its own dtype."""
    return rc.backend != "vllm"


def rollout_engine_in_process(rc: RolloutConfig) -> bool:
    """Whether the generator is an engine living in the training process (vLLM), with its own GPU memory
    pool beside the trainer's (the CUDA allocator's settings must suit it: `opd.train.loop.allocator_choice`)."""
    return rc.backend == "vllm"


def check_generator_processes(rc: RolloutConfig, processes: int) -> None:
    """Refuse a vLLM generator in a run of several processes, before any model loads.

    Why: each process would start its own in-process engine with vLLM's single-process defaults (no
    ``external_launcher``, no per-rank device), so every engine lands on the first GPU beside the trainer's
    process group instead of one engine per rank as TRL's colocate mode arranges."""
    if rc.backend == "vllm" and processes > 1:
        raise ConfigError(
            f"rollout.backend vllm runs one in-process engine, but this run has {processes} processes (each would "
            "start an engine on the same device, outside the trainer's process group): launch one process with "
            "rollout.backend vllm, or use rollout.backend hf (every process samples its own prompts)"
        )


def build_generator(
    rc: RolloutConfig,
    *,
    model: torch.nn.Module,
    pad_id: int,
    stop_ids: list[int],
    synced: bool,
    student_path: str,
    lora: bool,
    seed: int,
    context: Callable[[int | None, str], int],
    vocab_size: int,
    processes: int,
) -> Any:
    """HF `generate` on `model` (`synced`: every process steps every decoding step, as FSDP needs), or a vLLM
    engine on `student_path` whose weights the trainer syncs after each update (``generator.sync``).

    `context(setting, what)`: the engine context the run needs; `lora`: the student trains LoRA adapters,
    which an engine cannot follow yet; `vocab_size`: the tokenizer's vocabulary, ids past it (the head's
    padded rows) are never sampled; `processes`: the run's process count (a vLLM engine needs one)."""
    check_generator_processes(rc, processes)
    if rc.backend != "vllm":
        return HFGenerator(model, pad_id=pad_id, stop_ids=stop_ids, synced=synced, vocab_size=vocab_size)
    from opd.generation.vllm import VLLMGenerator
    from opd.models.loading import model_directory

    path = model_directory(student_path, "rollout.backend vllm (use rollout.backend hf otherwise)")
    if lora:
        raise ConfigError(
            "rollout.backend vllm with student.lora.enabled is not supported yet (the engine would need "
            "merged weights after every step); use rollout.backend hf for LoRA runs"
        )
    return VLLMGenerator(
        str(path), pad_id=pad_id, stop_ids=stop_ids, dtype=rc.vllm_dtype,
        max_model_len=context(rc.vllm_max_model_len, "rollout.vllm_max_model_len"), seed=seed,
        kv_cache_gb=rc.vllm_kv_cache_gb, gpu_memory_utilization=rc.vllm_gpu_memory, seeded=rc.vllm_seeded,
        vocab_size=vocab_size,
    )  # fmt: skip
