"""The teacher: a frozen model that scores the student's exact token ids.

It never holds gradients or optimizer state (NeMo-RL's teacher OOM came from exactly that), runs under
inference mode, and may run in bf16 while the student keeps fp32 master weights.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from opd.generation.rollout import Rollout
from opd.generation.scoring import frozen_head, response_hidden_states, response_logits
from opd.objectives.objective import TeacherHidden  # re-exported: the HF teacher's target


class HFTeacher:
    """An in-process Hugging Face teacher behind `opd.teachers.contract`: each micro-batch is scored when
    the objective asks for it, as hidden states + head (`hidden_states`, the default objective path) or as
    dense `[B, T, V]` logits, so at most one micro-batch of teacher activations is alive."""

    scored_by_engine = False

    def __init__(self, model: PreTrainedModel, *, hidden_states: bool = False, nonfinite_hint: str = ""):
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.hidden_states = hidden_states
        self.nonfinite_hint = nonfinite_hint or "check its checkpoint (`opd check` runs it on a few rollouts)"

    def score_step(self, rollouts: list[Rollout]) -> HFTeacher:
        return self  # nothing up front: `target` scores each micro-batch

    def target(self, chunk: int, rows: torch.Tensor | slice, mb: Rollout) -> TeacherHidden | torch.Tensor:
        return self.hidden(mb) if self.hidden_states else self.score(mb)

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
