"""The teacher: a frozen model that scores the student's exact token ids.

It never holds gradients or optimizer state (NeMo-RL's teacher OOM came from exactly that), runs under
inference mode, and may run in bf16 while the student keeps fp32 master weights.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PreTrainedModel

from opd.rollout import Rollout
from opd.scoring import response_logits


class Teacher(Protocol):
    def score(self, rollout: Rollout) -> torch.Tensor:
        """Teacher logits `[B, T, V]` at the rollout's response positions (a constant tensor)."""
        ...


class HFTeacher:
    def __init__(self, model: PreTrainedModel):
        model.eval()
        model.requires_grad_(False)
        self.model = model

    def score(self, rollout: Rollout) -> torch.Tensor:
        return score_frozen(self.model, rollout)


def score_frozen(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """Logits of `model` at the response positions, computed under inference mode."""
    with torch.inference_mode():
        logits = response_logits(model, rollout)
    # Inference tensors cannot be saved for backward; the loss multiplies teacher terms with live
    # student terms, so hand back an ordinary (still gradient-free) tensor.
    return logits.clone()
