"""The teacher: a frozen model that scores the student's exact token ids.

It never holds gradients or optimizer state (NeMo-RL's teacher OOM came from exactly that), runs under
inference mode, and may run in bf16 while the student keeps fp32 master weights.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from transformers import PreTrainedModel

from opd.generation.rollout import Rollout
from opd.generation.scoring import frozen_head, response_hidden_states, response_logits


class Teacher(Protocol):
    def score(self, rollout: Rollout) -> torch.Tensor:
        """Teacher logits `[B, T, V]` at the rollout's response positions (a constant tensor)."""
        ...


class TeacherHidden(NamedTuple):
    """A teacher's last hidden states `[B, T, H_t]` at the response positions and its LM head
    (`weight` `[V_t, H_t]`, `bias` `[V_t]` or None), for `opd.objectives.hidden.head_loss_sum`; all constant."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


class HFTeacher:
    def __init__(self, model: PreTrainedModel):
        model.eval()
        model.requires_grad_(False)
        self.model = model

    def score(self, rollout: Rollout) -> torch.Tensor:
        return score_frozen(self.model, rollout)

    def hidden(self, rollout: Rollout) -> TeacherHidden:
        """Hidden states and head weights instead of `[B, T, V]` logits (`loss.from_hidden_states`)."""
        with torch.inference_mode():
            h = response_hidden_states(self.model, rollout)
        weight, bias = frozen_head(self.model)
        return TeacherHidden(h.clone(), weight, bias)


def score_frozen(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """Logits of `model` at the response positions, computed under inference mode."""
    with torch.inference_mode():
        logits = response_logits(model, rollout)
    # Inference tensors cannot be saved for backward; the loss multiplies teacher terms with live
    # student terms, so hand back an ordinary (still gradient-free) tensor.
    return logits.clone()
