"""FSDP2 sharding of the student (`sharding: fsdp`), done with torch's `fully_shard` directly.

Why not accelerate's FSDP plugin: on a machine without GPUs accelerate silently runs an FSDP config as
plain data parallel (or as independent single-process runs), so that path cannot be tested on CPU, while
torch's FSDP2 runs on CPU/gloo and CUDA/NCCL alike. Each decoder layer (the model's `_no_split_modules`)
is its own FSDP unit and the root holds the rest (embeddings, final norm, head); parameters become
DTensors sharded over the ranks, and gradients are reduce-scattered with the same averaging as DDP, so
the trainer's global token normalisation is unchanged.

Everything that needs whole tensors (checkpoints, the final model) gathers a full state dict with
`torch.distributed.checkpoint.state_dict`; these calls are collective: every rank must make them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "full_model_state",
    "full_optimizer_state",
    "grad_norm_value",
    "load_full_model_state",
    "load_full_optimizer_state",
    "mixed_precision_policy",
    "restore_architecture",
    "shard_model",
]


def mixed_precision_policy(autocast: str) -> Any:
    """The FSDP2 `MixedPrecisionPolicy` for ``student.autocast``, None without autocast.

    With autocast, FSDP2 must all-gather the weights in the autocast dtype: gathered in float32, every
    layer's unsharded weights are leaf tensors that autocast casts and caches until its context exits, so a
    whole `generate` (or a micro-batch's forward) kept a bf16 copy of every layer alive and resharding saved
    nothing. Gathered in bf16 there is nothing to cast (and half the all-gather traffic); gradients are
    reduce-scattered in float32 (`reduce_dtype`) into the float32 master shards the optimizer steps.
    Autocast stays on: it still runs the ops it keeps in float32 (softmax, log_softmax, norms' reductions)
    in float32, as without sharding."""
    if autocast == "none":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=getattr(torch, autocast), reduce_dtype=torch.float32)


def shard_model(
    model: torch.nn.Module, device: torch.device, world: int, *, autocast: str = "none"
) -> torch.nn.Module:
    """Shard `model` in place over a 1-D mesh of `world` ranks; returns it (now an FSDP module).

    `autocast` (``student.autocast``): with a dtype, the weights are all-gathered in it
    (`mixed_precision_policy`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from opd.train.memory import decoder_layers

    layers = decoder_layers(model, "sharding fsdp (one unit per decoder layer; else use sharding none)")
    mesh = init_device_mesh(device.type, (world,))
    policy = mixed_precision_policy(autocast)
    kw = {} if policy is None else {"mp_policy": policy}
    model.to(device)
    for layer in layers:
        fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole CPU tensors on rank 0, an empty dict elsewhere (collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    seen: set[int] = set()
    out = {}
    for k, v in state.items():  # tied weights share storage, which safetensors refuses to write twice
        out[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    return out


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter names, whole tensors on rank 0 (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options())


def load_full_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_options())


def sharded_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """The pre-clip global norm of DTensor gradients (torch reduces across the shards), clipping on the way
    when `max_norm` is set."""
    return grad_norm_value(
        torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
    )


def grad_norm_value(norm: Any) -> float:
    """A gradient norm as a float; FSDP2 returns a DTensor (Replicate) from `clip_grad_norm_`."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def restore_architecture(model_dir: Path, name: str) -> None:
    """`save_pretrained` on a sharded model writes its dynamic class ("FSDPLlamaForCausalLM") into
    config.json, which no loader knows; put the real class name back."""
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = [name]
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
