"""Forward passes that return the logits at response positions only.

Both the trainable student and the frozen teacher go through `response_logits`, so "the teacher scores
the student's exact ids" is true by construction: same ids, same attention mask, same position ids.
"""

from __future__ import annotations

import inspect
from typing import Any

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


def _response_forward(
    model: torch.nn.Module, rollout: Rollout, keep: int, **extra: bool
) -> tuple[Any, int, int]:
    """One forward over prompt + response (the ids, mask and positions both callers share); only the last
    `keep` positions go through the LM head when the model supports `logits_to_keep`. Returns the model
    output, the padded prompt width P and the response width T."""
    ids, attn, pos = rollout.sequences()
    device = input_device(model)
    ids, attn, pos = ids.to(device), attn.to(device), pos.to(device)
    kwargs: dict = {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": pos,
        "use_cache": False,
        **extra,
    }
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    return model(**kwargs), rollout.prompt_len, rollout.response_ids.shape[1]


def response_logits(model: torch.nn.Module | PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Logits `[B, T, V]` where row t is the distribution that produced response token t.

    Only the last T + 1 positions go through the LM head when the model supports `logits_to_keep`:
    prompt logits are never needed and cost B x P x V memory (150k-entry vocabularies).
    """
    T = rollout.response_ids.shape[1]
    out, P, T = _response_forward(model, rollout, T + 1)
    logits = out.logits
    if logits.shape[1] == T + 1:  # logits_to_keep honoured: the last T + 1 positions
        return logits[:, :T]
    return logits[:, P - 1 : P - 1 + T]


def response_hidden_states(model: torch.nn.Module | PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Last hidden states `[B, T, H]` (after the final norm, the LM head's input) where row t produced
    response token t, for `opd.head_loss`. The HF head projects a single position (`logits_to_keep=1`)
    when the model supports it, so no `[B, T, V]` logits are built."""
    out, P, T = _response_forward(model, rollout, 1, output_hidden_states=True)
    return out.hidden_states[-1][:, P - 1 : P - 1 + T]
