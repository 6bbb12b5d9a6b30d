"""What an experiment is, as data: arms, prompts, claims, and what a verdict sees and returns.

Specs are plain frozen dataclasses with no model code, so the registry can be listed, tested and rendered
without torch work, and the runner stays the only place that touches models. The runner fingerprints a
`PromptsSpec` whole (``dataclasses.asdict``), so a field added to it changes every run's fingerprint and
re-trains every run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from opd.lab.stats import Stat, stat

__all__ = [
    "STATUSES",
    "ArmSpec",
    "Claim",
    "ExperimentData",
    "ExperimentSpec",
    "PromptsSpec",
    "Status",
    "Verdict",
    "VerdictFn",
]

Status = Literal["reproduced", "partly", "not reproduced", "not run"]
STATUSES: tuple[str, ...] = ("reproduced", "partly", "not reproduced", "not run")


@dataclass(frozen=True)
class PromptsSpec:
    """The problems an OPD run trains on (written to the run directory as a JSONL prompt file).

    kind ``levels``: `n` fresh problems drawn by level with weights `mix`, never a held-out one.
    kind ``aligned``: Recipe B. A pool of `n_pool` candidates (weights `mix`) is scored on student
    rollouts with `opd.recipes.prompts.score_records`; `opd.recipes.prompts.select_prompts` then takes `n` prompts:
    the teacher's own post-training problems first (weights `teacher_mix`, when given), else the pool's
    best by `score_key`, plus a share `mix_fraction` of random pool prompts.
    Recipe B's control is kind ``levels`` with the pool's `mix`: random prompts of the same distribution.
    """

    kind: Literal["levels", "aligned"] = "levels"
    mix: dict[int, float] = field(default_factory=lambda: {2: 0.15, 3: 0.15, 4: 0.7})
    n: int = 2048
    n_pool: int = 512
    teacher_mix: dict[int, float] | None = None
    mix_fraction: float = 0.25
    score_key: str = "overlap_ratio"


@dataclass(frozen=True)
class ArmSpec:
    """One arm: a student/teacher pair, loss and config overrides, prompts, optional preparation.

    `student`/`teacher` are model specs (``lab:NAME`` resolves through the zoo, anything else is a path).
    `loss` overrides `opd.config.LossConfig` fields; `overrides` is a nested dict over `TrainConfig`
    (e.g. ``{"rollout": {"max_new_tokens": 64}}``). `prepare` names a step the runner performs on the
    student before OPD: ``cold_start`` = the teacher answers `prepare_args["n_prompts"]` problems, the
    student is fine-tuned on the filtered answers (Recipe A), and OPD starts from that model.
    """

    name: str
    student: str
    teacher: str
    label: str = ""
    loss: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    prompts: PromptsSpec = field(default_factory=PromptsSpec)
    prepare: str | None = None
    prepare_args: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Claim:
    """A statement from the paper (brief §3) this experiment tests, with its finding number."""

    id: str
    finding: str
    text: str


@dataclass
class Verdict:
    """The outcome for one claim: the lab's numbers in words and a status from `STATUSES`; `why` says, with
    the numbers, which part of the claim's rule those numbers missed (empty when reproduced or not run)."""

    claim: Claim
    status: str
    result: str
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"claim_id": self.claim.id, "finding": self.claim.finding, "claim": self.claim.text,
                "status": self.status, "result": self.result, "why": self.why}  # fmt: skip


@dataclass
class ExperimentData:
    """What a verdict function sees: per-arm aggregates, the raw per-run metrics, probe results."""

    spec: ExperimentSpec
    arms: dict[str, dict[str, Stat]]
    runs: dict[str, list[dict[str, float]]]
    probe: dict[str, Any] | None = None
    gap_level: int = 4

    def has(self, *arms: str) -> bool:
        return all(self.arms.get(a) and self.runs.get(a) for a in arms)

    def get(self, arm: str, metric: str) -> Stat:
        return self.arms.get(arm, {}).get(metric) or stat([])


VerdictFn = Callable[[ExperimentData], list[Verdict]]


@dataclass(frozen=True)
class ExperimentSpec:
    """One experiment: arms x seeds of OPD runs, the claims they test, and the verdict function.

    `common` is a nested override dict applied to every arm's `TrainConfig` before the arm's own
    (steps, learning rate, batch shape). `probe` names an extra measurement the runner makes once per
    experiment (``teacher_pair``: how distinguishable two teachers are at the student's states).
    `headline` lists the metrics of `run_metrics` shown in tables, first the ones the claims use.
    """

    name: str
    title: str
    description: str
    arms: tuple[ArmSpec, ...]
    claims: tuple[Claim, ...]
    verdict: VerdictFn
    steps: int = 80
    seeds: tuple[int, ...] = (0, 1, 2)
    common: dict[str, Any] = field(default_factory=dict)
    probe: str | None = None
    probe_args: dict[str, Any] = field(default_factory=dict)
    headline: tuple[str, ...] = (
        "gap_before", "gap_after", "gap_delta", "gap_recovery", "easy_delta",
        "overlap_ratio_initial", "overlap_ratio_final", "overlap_mass_student_final", "entropy_gap_final",
    )  # fmt: skip
    notes: str = ""

    def arm(self, name: str) -> ArmSpec:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"experiment {self.name} has no arm {name!r}; arms: {[a.name for a in self.arms]}")
