"""Memory levers for the student's update that leave the maths unchanged.

Activation checkpointing lives here rather than behind transformers' `gradient_checkpointing_enable()`
because transformers only checkpoints modules in training mode, and opd keeps the student in eval mode
(dropout off: the loss must be taken under the policy that sampled).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from opd.errors import ConfigError

__all__ = ["decoder_layers", "enable_activation_checkpointing"]


def decoder_layers(model: torch.nn.Module, purpose: str) -> list[torch.nn.Module]:
    """The repeated blocks a model names as unsplittable (`_no_split_modules`): its decoder layers."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"{purpose}: {type(model).__name__} names no decoder-layer class (_no_split_modules), so opd "
            "cannot find its layers"
        )
    return layers


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute every decoder layer's forward during backward instead of keeping its activations.

    Only forwards that build a graph are checkpointed: generation and no-grad scoring run as before. The
    recomputation runs under the autocast state of the original forward (torch restores it), so bf16
    mixed precision composes. Returns the number of layers wrapped; calling it twice is a no-op.
    """
    layers = decoder_layers(model, "student.gradient_checkpointing")
    wrapped = 0
    for layer in layers:
        if getattr(layer, "_opd_checkpointed", False):
            continue
        plain = layer.forward

        @functools.wraps(plain)
        def forward(*args: Any, _plain: Any = plain, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _plain(*args, **kwargs)
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        layer.forward = forward  # an instance attribute: state_dict keys and the class stay as they are
        layer._opd_checkpointed = True
        wrapped += 1
    return wrapped
