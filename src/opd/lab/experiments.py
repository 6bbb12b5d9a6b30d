"""The lab's experiments under one name: specs, statistics, verdicts and the registry, re-exported.

The code lives in modules named for what they hold (`opd.lab.specs`, `opd.lab.stats`,
`opd.lab.verdicts`, `opd.lab.registry`); this module stays so that ``from opd.lab.experiments import
...`` in tests, notebooks and the report's text keeps working after the split.
"""

from __future__ import annotations

from opd.lab.registry import EXPERIMENTS, get_experiment
from opd.lab.specs import STATUSES, ArmSpec, Claim, ExperimentData, ExperimentSpec, PromptsSpec, Verdict
from opd.lab.stats import Stat, aggregate, run_metrics, stat
from opd.lab.verdicts import MIN_GAIN, MIN_RISE, verdict_doctor

__all__ = [
    "EXPERIMENTS",
    "MIN_GAIN",
    "MIN_RISE",
    "STATUSES",
    "ArmSpec",
    "Claim",
    "ExperimentData",
    "ExperimentSpec",
    "PromptsSpec",
    "Stat",
    "Verdict",
    "aggregate",
    "get_experiment",
    "run_metrics",
    "stat",
    "verdict_doctor",
]
