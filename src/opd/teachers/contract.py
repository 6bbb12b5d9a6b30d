"""The one contract every teacher keeps, so the trainer never asks which kind it holds.

A step asks its teacher once, ``teacher.score_step(rollouts)``, and gets the step's `StepTargets`; for each
micro-batch (rows ``rows`` of rollout chunk ``chunk``) ``targets.target(chunk, rows, mb)`` is what the
objective takes (`opd.objectives.objective`): a `TeacherHidden` (hidden states and LM head), dense logits
``[B, T, V]``, or a `TeacherTopK`. How and when the teacher computes it is its own business:

- an in-process HF model scores each micro-batch when it is asked (`opd.teachers.hf.HFTeacher`), so no
  more than one micro-batch of teacher activations is ever alive;
- an engine or a server (vLLM in-process, vLLM/`opd serve-teacher` over HTTP) scores the whole step up front
  (`TopKTeacher`): they batch far better than micro-batches, and a failure then loses nothing.

Each teacher also says what the trainer's checks need, as capabilities rather than kinds: ``model`` (the
in-process model the start-up probes run on, or None), ``scored_by_engine`` (its scores come from an engine
that the fidelity check compares with transformers) and ``nonfinite_hint`` (what to do when its scores hold
NaN).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from opd.device import place
from opd.generation.rollout import Rollout
from opd.objectives.topk import TeacherTopK

__all__ = ["StepTargets", "Teacher", "TopKTeacher", "as_teacher"]


class StepTargets(Protocol):
    def target(self, chunk: int, rows: torch.Tensor | slice, mb: Rollout) -> Any:
        """The teacher's target for micro-batch `mb`, rows `rows` of the step's rollout chunk `chunk`."""
        ...


class Teacher(Protocol):
    model: torch.nn.Module | None
    scored_by_engine: bool
    nonfinite_hint: str

    def score_step(self, rollouts: list[Rollout]) -> StepTargets:
        """The step's targets; may score everything now (and raise `TeacherUnavailableError` now)."""
        ...


class _ScoredUpFront:
    """Top-K scores of every rollout chunk of a step, computed before any gradient exists."""

    def __init__(self, tops: list[TeacherTopK]):
        self.tops = tops

    def target(self, chunk: int, rows: torch.Tensor | slice, mb: Rollout) -> TeacherTopK:
        return self.tops[chunk].select(rows)


class TopKTeacher:
    """A top-K engine or server (anything with ``score_topk(rollout) -> TeacherTopK``: `VLLMTeacher`,
    `HTTPTeacher`) behind the contract: the step scored up front, each answer cut to the shared vocabulary
    (`TeacherTopK.restrict`) and placed on the compute device (servers answer on the host)."""

    model = None
    scored_by_engine = True

    def __init__(self, engine: Any, *, vocab_size: int, device: torch.device, nonfinite_hint: str = ""):
        self.engine, self.vocab_size, self.device = engine, vocab_size, device
        self.nonfinite_hint = nonfinite_hint or "check the model the engine serves"

    def score_topk(self, rollout: Rollout) -> TeacherTopK:
        """The engine's raw answer for one rollout chunk (the fidelity check compares it with transformers)."""
        return self.engine.score_topk(rollout)

    def score_step(self, rollouts: list[Rollout]) -> _ScoredUpFront:
        return _ScoredUpFront(
            [place(self.score_topk(r).restrict(self.vocab_size), self.device) for r in rollouts]
        )

    def __getattr__(self, name: str) -> Any:  # the engine's own attributes (urls, model name, k, ...)
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)


def as_teacher(teacher: Any, *, vocab_size: int, device: torch.device) -> Teacher:
    """`teacher` itself when it keeps the contract; a bare top-K scorer (``score_topk`` only, as tests and
    notebooks write them) wrapped as a `TopKTeacher`."""
    if callable(getattr(teacher, "score_step", None)):
        return teacher
    if callable(getattr(teacher, "score_topk", None)):
        return TopKTeacher(teacher, vocab_size=vocab_size, device=device)
    raise TypeError(f"{type(teacher).__name__} is not a teacher: it has neither score_step nor score_topk")
