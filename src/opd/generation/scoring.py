"""Forward passes that return the logits at response positions only.

Both the trainable student and the frozen teacher go through `response_logits`, so "the teacher scores
the student's exact ids" is true by construction: same ids, same attention mask, same position ids.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import PreTrainedModel

from opd.generation.rollout import Rollout


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


def _decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformer body under a causal LM (through DDP and peft wrappers), whose output is the last
    hidden state after the final norm; None when the model does not name one."""
    base = getattr(model, "module", model)  # DDP wrapper
    base = getattr(base, "get_base_model", lambda: base)()  # peft
    get = getattr(base, "get_decoder", None)
    try:
        dec = get() if callable(get) else None
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return dec if isinstance(dec, torch.nn.Module) and dec is not base else None


def response_hidden_states(model: torch.nn.Module | PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Last hidden states `[B, T, H]` (after the final norm, the LM head's input) where row t produced
    response token t, for `opd.objectives.hidden`. The HF head projects a single position (`logits_to_keep=1`)
    when the model supports it, so no `[B, T, V]` logits are built.

    The hidden states are caught on the way out of the decoder body rather than asked for with
    `output_hidden_states`, which would keep every layer's `[B, S, H]` alive until the output is dropped
    (a 28-layer teacher under inference mode would hold 28 of them); the call still goes through the
    outer module, so DDP's and FSDP's forward hooks run as in training."""
    ids, attn, pos = rollout.sequences()
    device = input_device(model)
    hidden = last_hidden_states(model, input_ids=ids.to(device), attention_mask=attn.to(device),
                                position_ids=pos.to(device))  # fmt: skip
    P, T = rollout.prompt_len, rollout.response_ids.shape[1]
    return hidden[:, P - 1 : P - 1 + T]


def last_hidden_states(model: torch.nn.Module | PreTrainedModel, **inputs: Any) -> torch.Tensor:
    """Last hidden states `[B, S, H]` (after the final norm, the LM head's input) of one forward with
    `inputs` (``input_ids``, ``attention_mask``, ...; ``use_cache=False`` is added), the head projecting one
    position only (`logits_to_keep=1`) when the model supports it; `response_hidden_states` and SFT's
    chunked cross-entropy use it. The hidden states are caught on the decoder body's way out (see
    `response_hidden_states` for why), falling back to ``output_hidden_states`` for a model without one."""
    inputs = {"use_cache": False, **inputs}
    if _accepts_logits_to_keep(model):
        inputs["logits_to_keep"] = 1
    dec = _decoder(model)
    if dec is None:
        return model(**inputs, output_hidden_states=True).hidden_states[-1]
    caught: list[torch.Tensor] = []

    def catch(_m: torch.nn.Module, _args: Any, output: Any) -> None:
        caught.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = dec.register_forward_hook(catch)
    try:
        model(**inputs)
    finally:
        handle.remove()
    if len(caught) != 1:
        raise RuntimeError(f"expected one decoder forward, caught {len(caught)}")
    return caught[0]


def head_weights(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head as ``(weight [V, H], bias [V] or None)`` in the autograd graph of the parameters the
    optimiser steps, for `opd.objectives.hidden`, which projects hidden states itself instead of calling the head.

    Why not just ``head.weight``: the head is not always one plain weight.
    - Tied embeddings: the weight is the embedding matrix; its gradient reaches it through this tensor.
    - A LoRA'd head (peft): the layer computes ``x W^T + s (x A^T) B^T``, which is ``x (W + s B A)^T``; the
      effective weight is built here, so the gradient reaches A and B (and W only if it trains). Exact
      when the adapter has no dropout, no DoRA and no bias, which is checked.
    - An FSDP2-sharded head: the weight is a DTensor shard; it is gathered with a differentiable
      all-gather whose gradient is summed back onto the shards (a reduce-scatter) and divided by the
      world size, the averaging FSDP applies to every other gradient.
    """
    base = getattr(model, "module", model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is not None and hasattr(head, "base_layer") and hasattr(head, "lora_A"):
        return _lora_head(head)
    _, weight, bias = _linear_head(base)
    return _gathered(weight), _gathered(bias) if bias is not None else None


def _linear_head(model: torch.nn.Module) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
    """``(head module, weight [V, H], bias or None)``, or a ValueError naming what the head is instead."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{type(model).__name__}.get_output_embeddings() is {type(head).__name__}, not a linear head with a "
            "[V, H] weight"
        )
    bias = getattr(head, "bias", None)
    return head, weight, bias if isinstance(bias, torch.Tensor) else None


def _gathered(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(t, DTensor):
        return t
    full = t.full_tensor(grad_placements=[Partial()] * len(t.placements))
    world = t.device_mesh.size()
    # Same value bit for bit (full - full.detach() is exactly 0); gradient scaled by 1/world, as FSDP's own
    # reduce-scatter averages (a Partial "avg" would need ReduceOp.AVG, which gloo lacks).
    return full.detach() + (full - full.detach()) / world


def _lora_head(head: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    name = type(head).__name__
    if getattr(head, "merged", False):
        raise ValueError(f"the LoRA'd LM head ({name}) is merged; unmerge it before training")
    active = list(getattr(head, "active_adapters", []))
    if len(active) != 1:
        raise ValueError(f"the LoRA'd LM head has {len(active)} active adapters; one is supported")
    a = active[0]
    dropout = head.lora_dropout[a]
    if not isinstance(dropout, torch.nn.Identity) and head.training and getattr(dropout, "p", 0.0) > 0:
        raise ValueError(
            f"a LoRA'd LM head with dropout {dropout.p} cannot be folded into one weight (the dropout acts "
            "on the head's input rows); set student.lora.dropout 0 or leave the head out of target_modules"
        )
    if getattr(head, "use_dora", {}).get(a, False) or getattr(head.lora_B[a], "bias", None) is not None:
        raise ValueError("a LoRA'd LM head with DoRA or a LoRA bias is not supported")
    base = head.base_layer
    weight = base.weight + head.get_delta_weight(a).to(base.weight.dtype)
    return weight, getattr(base, "bias", None)


def frozen_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A frozen model's LM head ``(weight [V, H], bias or None)``, detached and on the model's input device.

    A CPU-offloaded teacher (`accelerate.cpu_offload`) keeps its parameters on "meta" and streams them to
    the execution device per forward; its head is read from the offload hook's CPU copy and moved once per
    call, as the forward itself would."""
    head, weight, bias = _linear_head(model)
    if weight.device.type == "meta":
        hook = getattr(head, "_hf_hook", None)
        stored = next(
            (
                h.weights_map
                for h in getattr(hook, "hooks", None) or [hook]
                if getattr(h, "weights_map", None)
            ),
            None,
        )
        if stored is None:
            raise ValueError(f"{type(model).__name__}'s LM head is on 'meta' with no offloaded copy to read")
        device = input_device(model)
        weight = stored["weight"].to(device)
        bias = stored["bias"].to(device) if bias is not None else None
    return weight.detach(), bias.detach() if isinstance(bias, torch.Tensor) else None


class NonFiniteOutputError(ValueError):
    """A model gives NaN/inf logits on a short probe: its weights or its arithmetic are broken, which no
    setting of the objective fixes (raised instead of the head-projection verdict, which would mislead)."""


def nonfinite_parameters(model: torch.nn.Module, limit: int = 3) -> tuple[int, list[str]]:
    """(how many parameter/buffer tensors hold a NaN or inf, the names of the first `limit`).

    Only called once something is known to be wrong: one reduction and host sync per tensor."""
    bad = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
           if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all())]  # fmt: skip
    return len(bad), bad[:limit]


def _probe_ids(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    n = min(8, vocab)
    return torch.arange(1, n + 1, device=input_device(model)).clamp_max(vocab - 1).unsqueeze(0)


def nonfinite_message(model: torch.nn.Module, logits: torch.Tensor) -> str:
    """What is non-finite in `logits` of a probe, and which of the model's tensors hold NaN/inf."""
    rows = ~torch.isfinite(logits.float()).all(dim=-1)
    kind = "NaN" if bool(torch.isnan(logits).any()) else "inf"
    n_bad, names = nonfinite_parameters(model)
    where = (
        f"{n_bad} of its weight tensors hold NaN/inf (first: {', '.join(names)})"
        if n_bad
        else f"its weights are finite, so the forward overflows in {str(logits.dtype).replace('torch.', '')}"
    )
    return (
        f"{type(model).__name__} gives non-finite logits ({kind}) at {int(rows.sum())} of {rows.numel()} "
        f"positions of a {rows.numel()}-token probe; {where}"
    )


def check_finite_probe(model: torch.nn.Module) -> None:
    """Raise `NonFiniteOutputError` when the model's logits on a short probe are not all finite.

    Why at start-up: a NaN head or a checkpoint damaged into NaNs otherwise first shows as a NaN loss at
    step 1 (or, with `loss.from_hidden_states`, as a misleading "transforms its logits after the head"
    verdict of the projection probe), neither of which names the model."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 2)
    ids = _probe_ids(model, vocab)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    if callable(getattr(model, "reshard", None)):  # FSDP2: see check_head_projection
        model.reshard()
    if not bool(torch.isfinite(out.logits).all()):
        raise NonFiniteOutputError(nonfinite_message(model, out.logits[0]))


def check_head_projection(model: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise ValueError unless the model's own logits equal ``hidden @ weight.T + bias`` on a short probe.

    Why: the chunked paths (`opd.objectives.hidden`) project hidden states with the head's weight themselves. A
    model that changes its logits after the head (Gemma-2's final_logit_softcapping, Cohere's logit_scale,
    Granite's logits_scaling, a custom head) would be scored on different numbers without any error; one
    8-token forward at start-up catches every such case, named or not."""
    ids = _probe_ids(model, int(weight.shape[0]))
    dec = _decoder(model)
    caught: list[torch.Tensor] = []
    handle = (
        dec.register_forward_hook(
            lambda _m, _a, o: caught.append(o[0] if isinstance(o, tuple) else o.last_hidden_state)
        )
        if dec is not None
        else None
    )
    try:
        keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                        output_hidden_states=dec is None, **keep)  # fmt: skip
    finally:
        if handle is not None:
            handle.remove()
        if callable(getattr(model, "reshard", None)):  # FSDP2 keeps the root unsharded after a forward,
            model.reshard()  # expecting a backward; a state-dict load after this probe needs the shards
    hidden = (caught[0] if caught else out.hidden_states[-1])[:, -out.logits.shape[1] :]
    with torch.no_grad():
        mine = hidden.to(weight.dtype) @ weight.detach().T
        if bias is not None:
            mine = mine + bias.detach()
    if not bool(torch.isfinite(out.logits).all()):  # broken weights, not a transformed head
        raise NonFiniteOutputError(nonfinite_message(model, out.logits[0]))
    theirs = out.logits.float()
    mine = mine.float()[..., : theirs.shape[-1]]
    tol = (2e-2 if weight.dtype in (torch.bfloat16, torch.float16) else 1e-3) * (
        1.0 + float(theirs.abs().max())
    )
    err = float((mine - theirs).abs().max())
    if not err <= tol:
        raise ValueError(
            f"{type(model).__name__}'s logits are not its last hidden state times its LM head weight (max "
            f"difference {err:.3g} on a probe; the model transforms its logits after the head, e.g. logit "
            "soft-capping or scaling)"
        )
