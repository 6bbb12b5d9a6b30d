"""The rollout generator a run's config asks for, built once: HF `generate` on the model being trained, or a
colocated vLLM engine on the student's directory. The only place that reads ``rollout.backend``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from opd.config import RolloutConfig
from opd.errors import ConfigError
from opd.generation.rollout import HFGenerator

__all__ = ["build_generator", "generator_dtype_settings", "rollouts_run_the_student"]


def generator_dtype_settings(rc: RolloutConfig) -> dict[str, str]:
    """The generator's own dtype settings, by option name, for the precision check (HF rollouts run in
    the student's dtype, checked with it)."""
    return {"rollout.vllm_dtype": rc.vllm_dtype} if rc.backend == "vllm" else {}


def rollouts_run_the_student(rc: RolloutConfig) -> bool:
    """Whether rollouts run the student module itself (HF `generate`, under the student's autocast) rather
    than an engine that samples in its own dtype."""
    return rc.backend != "vllm"


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
) -> Any:
    """HF `generate` on `model` (`synced`: every process steps every decoding step, as FSDP needs), or a vLLM
    engine on `student_path` whose weights the trainer syncs after each update (``generator.sync``).

    `context(setting, what)`: the engine context the run needs; `lora`: the student trains LoRA adapters,
    which an engine cannot follow yet."""
    if rc.backend != "vllm":
        return HFGenerator(model, pad_id=pad_id, stop_ids=stop_ids, synced=synced)
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
        kv_cache_gb=rc.vllm_kv_cache_gb, gpu_memory_utilization=rc.vllm_gpu_memory,
    )  # fmt: skip
