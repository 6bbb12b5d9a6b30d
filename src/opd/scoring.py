"""Forward passes that return the logits at response positions only.

Both the trainable student and the frozen teacher go through `response_logits`, so "the teacher scores
the student's exact ids" is true by construction: same ids, same attention mask, same position ids.
"""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel

from opd.rollout import Rollout


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    base = getattr(model, "module", model)  # DDP wrapper
    base = getattr(base, "get_base_model", lambda: base)()
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its parameters' device, or the execution device of a CPU-offloaded
    model (`accelerate.cpu_offload` leaves its parameters on "meta" and streams them in per layer)."""
    device = next(model.parameters()).device
    if device.type != "meta":
        return device
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device(dev)
    return device


def response_logits(model: torch.nn.Module | PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Logits `[B, T, V]` where row t is the distribution that produced response token t.

    Only the last T + 1 positions go through the LM head when the model supports `logits_to_keep`:
    prompt logits are never needed and cost B x P x V memory (150k-entry vocabularies).
    """
    ids, attn, pos = rollout.sequences()
    device = input_device(model)
    ids, attn, pos = ids.to(device), attn.to(device), pos.to(device)
    T = rollout.response_ids.shape[1]
    kwargs: dict = {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "use_cache": False}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = T + 1
        logits = model(**kwargs).logits
        return logits[:, :T]
    logits = model(**kwargs).logits
    P = rollout.prompt_len
    return logits[:, P - 1 : P - 1 + T]
