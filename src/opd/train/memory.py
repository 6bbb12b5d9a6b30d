"""Memory levers for the student's update that leave the maths unchanged.

Activation checkpointing lives here rather than behind transformers' `gradient_checkpointing_enable()`
because transformers only checkpoints modules in training mode, and opd keeps the student in eval mode
(dropout off: the loss must be taken under the policy that sampled).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from opd.errors import ConfigError

__all__ = ["StepInBackward", "decoder_layers", "enable_activation_checkpointing", "install_step_in_backward"]


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


@dataclass
class StepInBackward:
    """optim.in_backward bookkeeping for one backward pass: what the hooks did, for the step's metrics.

    Device: the hooks never read the device. Each parameter's gradient norm is added to a float64 device
    tensor and kept (0-dim, on the device) for the finite check; `grad_norm` reads them back once, after
    backward, at the phase boundary."""

    armed: bool = False  # hooks act only between arm() and the end of the trainer's own backward
    stepped: int = 0  # parameter tensors stepped in this backward (all of those that got a gradient)
    norm_sq: torch.Tensor | None = None  # sum over parameters of |grad|^2 (float64, on the device)
    norms: list[torch.Tensor] = field(default_factory=list)  # each parameter's |grad|, in hook order
    names: list[str] = field(default_factory=list)  # the parameters, in the same order

    def arm(self) -> None:
        self.armed, self.stepped, self.norm_sq, self.norms, self.names = True, 0, None, [], []

    def add(self, name: str, grad: torch.Tensor) -> None:
        """One parameter's gradient, as its hook sees it: device arithmetic only."""
        # The norm in the gradient's own dtype, like clip_grad_norm_: a float64 copy of a 152k x 896
        # embedding gradient would cost 1 GB, the very memory this path exists to save.
        norm = torch.linalg.vector_norm(grad.detach()).double()
        sq = norm.square()
        self.norm_sq = sq if self.norm_sq is None else self.norm_sq.add_(sq)
        self.norms.append(norm)
        self.names.append(name)

    def grad_norm(self, step: int, loss_sum: float, optimizer: torch.optim.Optimizer) -> float:
        """The step's pre-clip gradient norm, summed in the hooks (one host copy); a non-finite gradient met
        in a hook raises `NonFiniteLossError` with ``weights_damaged``, naming the first such parameter (in
        backward order): every parameter was stepped by then, so the weights in memory are damaged."""
        from opd.train.loop import NonFiniteLossError

        if self.norm_sq is None:
            return 0.0
        finite = torch.isfinite(torch.stack(self.norms))
        values = torch.cat([self.norm_sq.reshape(1), finite.double()]).tolist()  # the one host copy
        norm_sq, ok = values[0], values[1:]
        if not all(ok):
            bad = self.names[ok.index(0.0)]
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite gradient in {bad} at step {step} with optim.in_backward: the {self.stepped} "
                "parameter tensors were stepped inside backward (the gradients are checked once, after it), "
                "so the weights in memory are damaged and training stops",
                {"loss": loss_sum, "grad_norm": math.nan},
                weights_damaged=True,
            )
        return math.sqrt(norm_sq)


def install_step_in_backward(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, processes: int
) -> StepInBackward:
    """optim.in_backward: the AdamW step of each parameter runs in its post-accumulate-grad hook.

    The gradient is freed right after, so the step never holds a full set of gradients (2.5 GB of a
    0.5B fp32 student). The update is the optimizer's own `step()`: with every other `.grad` None it
    touches only this parameter, and AdamW's update is per-parameter, so the result equals the plain
    step's (tested bit for bit) and checkpoints keep the same optimizer state. Hooks act only while
    the trainer arms them (`StepInBackward.arm`), so any other backward pass is left alone.
    """
    if processes > 1:
        raise ConfigError(
            f"optim.in_backward needs one process ({processes} were launched): data-parallel "
            "gradients are averaged across processes after backward; use optim.in_backward false"
        )
    state = StepInBackward()
    names = {p: n for n, p in model.named_parameters()}

    def hook(p: torch.Tensor) -> None:
        if not state.armed or p.grad is None:
            return
        state.add(names.get(p, "?"), p.grad)
        # Every parameter is stepped, whatever its gradient: deciding here would read the device once per
        # parameter. A non-finite gradient is found after backward (`StepInBackward.grad_norm`), which then
        # declares the weights damaged and stops the run (NonFiniteLossError with weights_damaged), as it
        # would have to anyway for the parameters stepped before the bad one.
        optimizer.step()
        state.stepped += 1
        p.grad = None

    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(hook)
    return state
