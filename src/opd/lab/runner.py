"""Run lab experiments: ordinary OPD runs on zoo models, evaluated per level, written as result files.

Each (experiment, arm, seed) is one `opd.train.trainer.OPDTrainer` run with a `TrainConfig` built in code
(`LAB_DEFAULTS`, then the experiment's `common`, then the arm's `loss`/`overrides`), so the lab measures
the same engine a user trains real models with. Around it the runner

* writes the training prompts (fresh problems by level, never a held-out one; or Recipe B's selection),
* optionally prepares the student (Recipe A: teacher rollouts -> response-only SFT),
* evaluates the student before and after, and the teacher, on the zoo's held-out file of every level
  with `opd.evaluation.eval.evaluate_prepared` and `LabVerifier`,
* and writes ``<out>/<experiment>/<arm>/seed<k>/result.json`` (config, per-step metrics copied from
  metrics.jsonl, in-loop gap-level accuracy, per-level accuracy before/after, wall time, seed), then
  ``<out>/<experiment>/summary.json`` with mean and spread over seeds and the verdicts
  (`opd.lab.report.summarize`, from the result files alone).

Decisions, and why:

* Evaluation is greedy (temperature 0, one sample) on all 200 held-out problems of each level. The lab
  models are small and near-deterministic; greedy takes sampling noise out of the before/after
  difference, so the spread over seeds is the spread of training, and it is what the zoo's MANIFEST
  reports as its headline accuracy. `EvalSettings` switches to sampled avg@k.
* The loss is the paper's default estimator (top-k on the student's support, Eq. 5 renormalisation)
  with k = 4: with ~23 symbols a top-16 support is most of the vocabulary. Diagnostics use k = 4 too,
  and the overlap mass is logged beside the ratio (opd logs both every step).
* A finished run is never redone: its result.json carries a fingerprint of everything that determines
  it (model weights, config, prompts spec, preparation, evaluation); a run with an identical fingerprint
  in another experiment (experiment 2's novel arm is experiment 1's compatible arm) is copied, not
  re-trained. A changed setting changes the fingerprint and the run is redone.
* The zoo is injectable (`LabZoo`): tests and development use other models under the same names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opd.config import deep_merge
from opd.lab.specs import ArmSpec, ExperimentSpec, PromptsSpec

__all__ = [
    "LAB_DEFAULTS",
    "EvalSettings",
    "LabRunner",
    "LabZoo",
    "Reporter",
    "UnreadableAnswers",
    "build_train_config",
    "count_unreadable_answers",
    "evaluate_levels",
    "load_result",
    "result_path",
    "teacher_pair_probe",
    "write_training_prompts",
]

RESULT = "result.json"
SUMMARY = "summary.json"
PROBE = "probe.json"
FORMAT = 1

LAB_DEFAULTS: dict[str, Any] = {
    "data": {"template": "raw", "shuffle": True},
    "rollout": {"rollouts_per_prompt": 4, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 96,
                "batch_size": 16},
    "loss": {"signal": "topk", "divergence": "reverse_kl", "k": 4, "support": "student", "renorm": "both"},
    "optim": {"lr": 3e-4, "weight_decay": 0.0, "max_grad_norm": 1.0, "schedule": "constant"},
    "diagnostics": {"k": 4, "position_bins": 4},
    "tracking": {"tensorboard": False},
    "prompts_per_step": 16,
    "micro_batch_size": 64,
    "keep_checkpoints": 1,
    "save_final": False,
    "startup_checks": False,
}  # fmt: skip
"""The lab's OPD settings (see the module docstring for the loss choice). 16 prompts x 4 rollouts per
step. lr 3e-4 (constant, fresh AdamW): the zoo models were trained from scratch at 1.5-3e-3, and on the
shipped student 3e-4 lifted the gap level from 49% to 88% in 80 steps without touching levels 2-3, while
1e-3 on a weaker student halved its level-2 accuracy; the paper's 1e-6 is for 1-7B pretrained models."""


# ----------------------------------------------------------------------------------------------------
# The zoo, injectable


@dataclass
class LabZoo:
    """Where the lab's models and held-out per-level eval files are.

    `models` maps zoo names (student, teacher_novel, ...) to model directories; ``lab:NAME`` specs
    resolve through it. `LabZoo.shipped()` reads the zoo built by `opd lab build`; tests build a
    LabZoo over tiny models with the same names.
    """

    models: dict[str, Path]
    eval_files: dict[int, Path]
    gap_level: int = 4
    root: Path | None = None
    manifest: dict[str, Any] | None = None

    @classmethod
    def shipped(cls, root: str | Path | None = None) -> LabZoo:
        """The shipped (or `root`) zoo; ModelError from `opd.lab.zoo` when it is not built."""
        from opd.lab import zoo as z

        manifest = z.load_manifest(root)
        levels = manifest.get("world", {}).get("levels") or [2, 3, 4, 5]
        return cls(
            models={name: z.zoo_path(name, root) for name in z.ZOO_NAMES},
            eval_files={int(lv): z.eval_prompt_path(int(lv), root) for lv in levels},
            gap_level=int(manifest.get("world", {}).get("gap_level", z.GAP_LEVEL)),
            root=Path(root or z.ZOO_DIR),
            manifest=manifest,
        )

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(sorted(self.eval_files))

    def resolve(self, spec: str) -> str:
        """A model spec as a loadable path: ``lab:NAME`` through the zoo, anything else unchanged."""
        if spec.startswith("lab:"):
            name = spec[4:]
            if name not in self.models:
                from opd.errors import ModelError

                raise ModelError(f"unknown lab model {spec!r}; this zoo has {', '.join(sorted(self.models))}")
            return str(self.models[name])
        return spec

    def heldout(self) -> set[str]:
        """Every held-out prompt string (eval files), excluded from all training prompts."""
        out: set[str] = set()
        for path in self.eval_files.values():
            for line in Path(path).read_text(encoding="utf-8").splitlines():
                if line.strip():
                    out.add(json.loads(line)["prompt"])
        return out


def _weights_digest(path: str | Path) -> str:
    """sha256 over a model directory's weight files: the identity of a model for caching."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class EvalSettings:
    """Per-level evaluation (before/after/teacher) and the in-loop gap-level accuracy curve.

    `n_problems` None = every held-out problem (200 per level). `in_loop_every` 0 disables the curve;
    otherwise the gap level's first `in_loop_problems` problems are evaluated every that many steps (and
    at step 0 and the end) by the trainer's own `InLoopEvaluator`.
    """

    temperature: float = 0.0
    samples: int = 1
    n_problems: int | None = None
    batch_size: int = 200
    seed: int = 0
    in_loop_every: int = 20
    in_loop_problems: int = 100

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@torch.no_grad()
def evaluate_levels(
    model: torch.nn.Module, tokenizer: Any, eval_files: dict[int, Path], settings: EvalSettings
) -> dict[str, dict[str, float]]:
    """{level: {acc, format_A, format_B, truncated}} on the held-out files (see module docstring).

    ``format_A``/``format_B``: rate of responses equal to that pattern's canonical solution (exact
    match), which shows a student switching patterns, not just getting answers right.
    """
    from opd.data import load_prompts
    from opd.evaluation.eval import evaluate_prepared, prepare_prompts
    from opd.lab.world import MAX_NEW_TOKENS, LabVerifier, pattern_of

    was_training = model.training
    model.eval()
    out: dict[str, dict[str, float]] = {}
    verifier = LabVerifier()
    for level, path in sorted(eval_files.items()):
        records = load_prompts(path)
        if settings.n_problems is not None:
            records = records[: settings.n_problems]
        _, ids = prepare_prompts(records, tokenizer, template="raw")
        res = evaluate_prepared(
            model, tokenizer, records, ids, samples=settings.samples, temperature=settings.temperature,
            top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, batch_size=settings.batch_size, verifier=verifier,
            seed=settings.seed, progress=False,
        )  # fmt: skip
        pairs = [(p, s) for p in res.problems for s in p.samples]
        row = {"acc": float(res.summary[f"avg@{settings.samples}"]),
               "truncated": float(res.summary["truncation_rate"])}  # fmt: skip
        for pat in ("A", "B"):
            row[f"format_{pat}"] = sum(
                pattern_of(s.text or "", str(p.prompt)) == pat for p, s in pairs
            ) / max(1, len(pairs))
        out[str(level)] = {k: round(v, 4) for k, v in row.items()}
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------
# Training prompts


def _level_counts(mix: dict[int, float], n: int) -> dict[int, int]:
    """Split n over levels by weight; rounding remainders go to the largest weights."""
    total = sum(mix.values())
    raw = {lv: n * w / total for lv, w in mix.items()}
    counts = {lv: int(math.floor(x)) for lv, x in raw.items()}
    for lv in sorted(raw, key=lambda lv: raw[lv] - counts[lv], reverse=True)[: n - sum(counts.values())]:
        counts[lv] += 1
    return counts


def draw_problems(mix: dict[int, float], n: int, *, seed: int, exclude: set[str]) -> list[Any]:
    """n distinct fresh problems with level shares `mix`, none in `exclude`, shuffled (seeded)."""
    from opd.lab.world import make_problems

    out = []
    for level, count in sorted(_level_counts(mix, n).items()):
        if count:
            out += make_problems(level, count, seed=seed, exclude=exclude)
    random.Random(seed).shuffle(out)
    return out


def write_training_prompts(
    spec: PromptsSpec,
    path: Path,
    *,
    seed: int,
    exclude: set[str],
    score: Callable[[list[Any]], list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Write the run's training prompt file; returns a small report (counts by level, selection stats).

    For kind ``aligned``, `score` maps a list of problems to `opd.recipes.prompts.score_records` rows (the
    runner passes one bound to the student and teacher models).
    """
    from opd.lab.world import write_prompt_file

    base_seed = 10_000 + seed
    report: dict[str, Any] = {"kind": spec.kind}
    if spec.kind == "levels":
        problems = draw_problems(spec.mix, spec.n, seed=base_seed, exclude=exclude)
        write_prompt_file(path, problems)
    elif spec.kind == "aligned":
        from opd.recipes.prompts import select_prompts, summarize

        pool = draw_problems(spec.mix, spec.n_pool, seed=base_seed, exclude=exclude)
        rows = [{"prompt": p.prompt, "answer": p.answer, "level": p.level} for p in pool]
        teacher_rows = None
        if spec.teacher_mix:
            n_teacher = spec.n - int(math.floor(spec.mix_fraction * spec.n + 0.5))
            own = draw_problems(spec.teacher_mix, n_teacher, seed=base_seed + 1,
                                exclude=exclude | {p.prompt for p in pool})  # fmt: skip
            teacher_rows = [{"prompt": p.prompt, "answer": p.answer, "level": p.level} for p in own]
        else:
            if score is None:
                raise ValueError("aligned prompts without teacher_mix need a scoring function")
            for row, scored in zip(rows, score(pool), strict=True):
                row.update({k: v for k, v in scored.items() if isinstance(v, (int, float))})
        chosen = select_prompts(rows, n=spec.n, mix=spec.mix_fraction, key=spec.score_key, seed=base_seed,
                                teacher_prompts=teacher_rows)  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in chosen), encoding="utf-8")
        keys = ("overlap_ratio", "overlap_mass", "entropy_student", "reverse_kl")
        report["aligned"] = summarize([r for r in chosen if r["aligned"]], keys)
        report["mixed"] = summarize([r for r in chosen if not r["aligned"]], keys)
    else:  # pragma: no cover - guarded by the Literal
        raise ValueError(f"unknown prompts kind {spec.kind!r}")
    levels: dict[str, int] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        lv = str(json.loads(line)["level"])
        levels[lv] = levels.get(lv, 0) + 1
    report["levels"] = dict(sorted(levels.items()))
    report["n"] = sum(levels.values())
    return report


# ----------------------------------------------------------------------------------------------------
# Config


def build_train_config(
    spec: ExperimentSpec,
    arm: ArmSpec,
    *,
    seed: int,
    steps: int,
    student_path: str,
    teacher_path: str,
    prompts: Path,
    run_dir: Path,
    eval_file: Path | None,
    eval_settings: EvalSettings,
) -> Any:
    """The run's `TrainConfig`: lab defaults < experiment `common` < arm overrides < run wiring."""
    from opd.config import TrainConfig
    from opd.lab.world import MAX_NEW_TOKENS

    data = deep_merge(LAB_DEFAULTS, spec.common)
    data = deep_merge(data, arm.overrides)
    data = deep_merge(
        data, {"loss": dict(arm.loss)}
    )  # k above the vocabulary is clamped by opd.objectives.token
    data = deep_merge(data, {
        "student": {"path": student_path}, "teacher": {"path": teacher_path},
        "data": {"prompts": str(prompts)}, "run_dir": str(run_dir), "steps": steps, "seed": seed,
        "checkpoint_every": steps,
    })  # fmt: skip
    if eval_file is not None and eval_settings.in_loop_every > 0:
        data["eval"] = {
            "prompts": str(eval_file), "samples": eval_settings.samples, "temperature": eval_settings.temperature,
            "top_p": 1.0, "max_new_tokens": MAX_NEW_TOKENS, "batch_size": eval_settings.batch_size,
            "verifier": "opd.lab.world:LabVerifier", "every": eval_settings.in_loop_every,
            "max_problems": eval_settings.in_loop_problems, "seed": eval_settings.seed,
        }  # fmt: skip
    return TrainConfig.model_validate(data)


def _fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def result_path(out_root: str | Path, experiment: str, arm: str, seed: int) -> Path:
    return Path(out_root) / experiment / arm / f"seed{seed}" / RESULT


def load_result(path: str | Path) -> dict[str, Any] | None:
    """A result.json as a dict, or None when missing or unreadable (a run killed while writing)."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _atomic_write_json(path: Path, obj: Any) -> None:
    from opd.files import atomic_write_text, json_safe

    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN/inf as null, as in every file opd writes (`default` only sees values json cannot write at all)
    atomic_write_text(
        path, json.dumps(json_safe(obj), indent=1, allow_nan=False, default=_json_default) + "\n"
    )


def _json_default(x: Any) -> Any:
    return str(x)  # Path and whatever else json cannot write


# ----------------------------------------------------------------------------------------------------
# Unreadable answers: one counted line per run, not a warning per evaluation

_EVAL_LOGGER = "opd.evaluation.eval"
_UNREADABLE = re.compile(r"(\d+) of (\d+) responses have no final answer")


@dataclass
class UnreadableAnswers:
    """What `count_unreadable_answers` caught: the evaluations whose answers were mostly unreadable."""

    evaluations: int = 0
    unreadable: int = 0
    answers: int = 0

    def line(self, label: str, result: dict[str, Any] | None = None) -> str:
        """One line for the run: the count, and whether the run's own numbers explain it (a collapse)."""
        from opd.lab.stats import run_metrics
        from opd.lab.verdicts import MIN_GAIN

        text = (f"{label}: {self.unreadable:,} of {self.answers:,} answers in {self.evaluations} evaluation(s) had "
                "no final answer the lab verifier can read")  # fmt: skip
        m = run_metrics(result) if result else {}
        easy, gap = m.get("easy_delta", math.nan), m.get("gap_delta", math.nan)
        worst = min((d for d in (easy, gap) if math.isfinite(d)), default=math.nan)
        if math.isfinite(worst) and worst < -MIN_GAIN:
            where = "easy levels" if worst == easy else f"level {result.get('gap_level', 4)}"  # type: ignore[union-attr]
            return text + f" (expected: this run collapsed, {where} {100 * worst:+.1f} pts)"
        return text + " (not explained by a collapse: look at the run's responses)"


class _CountUnreadable(logging.Filter):
    """Drops `opd.evaluation.eval`'s "N of M responses have no final answer" warnings, counting them."""

    def __init__(self, into: UnreadableAnswers) -> None:
        super().__init__()
        self.into = into

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        m = _UNREADABLE.match(record.getMessage())
        if m is None:
            return True
        self.into.evaluations += 1
        self.into.unreadable += int(m.group(1))
        self.into.answers += int(m.group(2))
        return False


@contextlib.contextmanager
def count_unreadable_answers() -> Iterator[UnreadableAnswers]:
    """Within the block, the evaluator's warnings about unreadable answers are counted, not printed.

    In the lab the verifier is always the right one (`LabVerifier`), so unreadable answers mean the model
    stopped writing ``#answer`` (a collapsing arm does): that is a result, reported once per run with its
    count (`UnreadableAnswers.line`), not a hint to change the verifier.
    """
    found = UnreadableAnswers()
    filt = _CountUnreadable(found)
    logger = logging.getLogger(_EVAL_LOGGER)
    logger.addFilter(filt)
    try:
        yield found
    finally:
        logger.removeFilter(filt)


# ----------------------------------------------------------------------------------------------------
# Progress reporting


class Reporter:
    """Progress hooks; the base class is silent (tests), `RichReporter` draws bars."""

    def start_run(self, label: str, total_steps: int) -> None: ...

    def step(self, step: int, metrics: dict[str, float]) -> None: ...

    def end_run(self, label: str, result: dict[str, Any], reused: bool = False) -> None: ...

    def message(self, text: str) -> None: ...


class RichReporter(Reporter):
    """Bars for runs (experiment level) and steps (current run), on a rich Progress the caller owns.

    With `steps_per_run`, the overall bar counts OPD steps over the runs still to train (`total_runs` of
    them; reused runs do not move it), so its rate and ETA cover every run, evaluations included. With
    ``run_bars=False`` no per-run bar is drawn (the overall one says which run is training): in a log
    file a bar per run is a line per 10% of every run.
    """

    def __init__(self, progress: Any, console: Any, total_runs: int | None = None, *,
                 steps_per_run: int | None = None, label: str = "runs", run_bars: bool = True) -> None:  # fmt: skip
        self.progress = progress
        self.console = console
        self.steps_per_run = steps_per_run
        self.total_runs = total_runs or 0
        self.run_bars = run_bars
        self.trained = 0
        self._label = label
        self._current = ""
        self._counting = False
        total = (self.total_runs * steps_per_run if steps_per_run else self.total_runs) or 1
        self.runs_task = progress.add_task(label, total=total, info="") if total_runs else None
        self.task: Any = None

    def set_total_runs(self, total_runs: int) -> None:
        """The number of runs to train changed (the budget dropped seeds): the ETA follows."""
        self.total_runs = total_runs
        if self.runs_task is not None:
            per = self.steps_per_run or 1
            self.progress.update(self.runs_task, total=max(1, total_runs * per))

    def _overall_info(self) -> str:
        if not self._current:
            return ""
        return f"run {min(self.trained + 1, max(self.total_runs, 1))}/{self.total_runs}: {self._current}"

    def start_run(self, label: str, total_steps: int) -> None:
        """A bar for `label`'s steps; an indented label ("  SFT on ...") is a preparation step of the run
        under way, which the overall bar does not count."""
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        self._counting = not label.startswith(" ")
        if self._counting:
            self._current = label
        if self.run_bars or self.runs_task is None:
            self.task = self.progress.add_task(label, total=total_steps, info="")
        elif self.steps_per_run:
            self.progress.update(self.runs_task, info=self._overall_info())

    def step(self, step: int, m: dict[str, float]) -> None:
        if self.runs_task is not None and self.steps_per_run and self._counting:
            done = self.trained * self.steps_per_run + min(step, self.steps_per_run)
            self.progress.update(self.runs_task, completed=done, info=self._overall_info())
        if self.task is None:
            return
        info = (
            f"loss {m.get('loss', float('nan')):.3g} | overlap {m.get('overlap_ratio', float('nan')):.3f} | "
            f"mass {m.get('overlap_mass_student', float('nan')):.3f} | H_s {m.get('entropy_student', float('nan')):.3f}"
        )
        self.progress.update(self.task, completed=step, info=info)  # fmt: skip

    def end_run(self, label: str, result: dict[str, Any], reused: bool = False) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        if self.runs_task is not None:
            if not self.steps_per_run:
                self.progress.advance(self.runs_task)
            elif not reused:
                self.trained += 1
                self.progress.update(self.runs_task, completed=self.trained * self.steps_per_run, info="")
        self._current = ""
        acc = result.get("accuracy", {})
        gap = str(result.get("gap_level", 4))
        b = (acc.get("before") or {}).get(gap, {}).get("acc")
        a = (acc.get("after") or {}).get(gap, {}).get("acc")
        how = f"reused from {result['reused_from']}" if reused and result.get("reused_from") else (
            "reused" if reused else f"{result.get('wall_time_s', 0):.0f}s")  # fmt: skip
        if b is not None and a is not None:
            self.console.print(
                f"  {label}: level-{gap} accuracy {100 * b:.1f}% -> {100 * a:.1f}% ({how})", soft_wrap=True
            )

    def message(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)


def rich_progress(console: Any, name: str = "opd lab") -> Any:
    """The lab's bars, with the time remaining; plain periodic lines with counts, rate and ETA when the
    console is not a terminal."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from opd.progress import Progress

    return Progress(TextColumn("[bold]{task.description:<38}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, transient=False, name=name)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The runner


@dataclass
class LabRunner:
    """Runs experiments into `out_root`; see the module docstring."""

    zoo: LabZoo
    out_root: Path = Path("runs/lab")
    eval: EvalSettings = field(default_factory=EvalSettings)
    reporter: Reporter = field(default_factory=Reporter)
    force: bool = False
    keep_models: bool = False
    threads: int | None = 1
    """torch intra-op threads during runs. 1: the lab's 200k-parameter models gain nothing from more, and
    on a loaded 2-core machine 2 threads made a tiny run 20x slower (measured: spinning OpenMP workers)."""
    device: str = "auto"
    """Where the runner's own model loads run (per-level evaluation, Recipe B scoring, Recipe A's teacher
    answers, the probes): resolved by `opd.device.resolve_device`, so ``auto`` is this process's GPU when
    CUDA is available. The OPD and SFT runs themselves follow accelerate's device (the same rule). Not part
    of any fingerprint: it says where to compute, not what."""
    compute_device: torch.device = field(init=False, repr=False)  # `device`, resolved

    def __post_init__(self) -> None:
        from opd.device import resolve_device

        self.compute_device = resolve_device(self.device)  # `cuda` without CUDA fails here, before any run
        self.out_root = Path(self.out_root)
        self._eval_cache_path = self.out_root / "_eval_cache.json"
        self._digests: dict[str, str] = {}

    # -- caches --------------------------------------------------------------------------------------

    def _digest(self, path: str) -> str:
        if path not in self._digests:
            self._digests[path] = _weights_digest(path)
        return self._digests[path]

    def _read_eval_cache(self) -> dict[str, Any]:
        try:
            return json.loads(self._eval_cache_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    def evaluate_path(self, path: str) -> dict[str, dict[str, float]]:
        """Per-level accuracy of a saved model, cached by weights digest + eval settings + eval files."""
        from opd.models.loading import load_model, load_tokenizer

        files = {str(lv): _weights_digest(p) for lv, p in self.zoo.eval_files.items()}
        key = _fingerprint({"w": self._digest(path), "e": self.eval.key(), "f": files})
        cache = self._read_eval_cache()
        if key in cache:
            return cache[key]
        tok = load_tokenizer(path)
        model = load_model(path, device=self.compute_device)
        acc = evaluate_levels(model, tok, self.zoo.eval_files, self.eval)
        cache = self._read_eval_cache()
        cache[key] = acc
        _atomic_write_json(self._eval_cache_path, cache)
        return acc

    # -- one run -------------------------------------------------------------------------------------

    def fingerprint(self, spec: ExperimentSpec, arm: ArmSpec, seed: int, steps: int) -> str:
        """Everything that determines a run's outcome, and nothing that only names it."""
        return _fingerprint({
            "student": self._digest(self.zoo.resolve(arm.student)), "teacher": self._digest(self.zoo.resolve(arm.teacher)),
            "config": deep_merge(deep_merge(deep_merge(LAB_DEFAULTS, spec.common), arm.overrides), {"loss": dict(arm.loss)}),
            "prompts": dataclasses.asdict(arm.prompts), "prepare": [arm.prepare, arm.prepare_args],
            "seed": seed, "steps": steps, "eval": self.eval.key(), "format": FORMAT,
        })  # fmt: skip

    def _find_reusable(self, fp: str, skip: Path) -> dict[str, Any] | None:
        if not self.out_root.is_dir():
            return None
        for path in sorted(self.out_root.glob(f"*/*/seed*/{RESULT}")):
            if path == skip:
                continue
            res = load_result(path)
            if res is not None and res.get("fingerprint") == fp:
                return res
        return None

    def run_one(self, spec: ExperimentSpec, arm: ArmSpec, seed: int, steps: int) -> dict[str, Any]:
        """Run (or load, or copy) one (arm, seed); returns the result dict written to result.json."""
        path = result_path(self.out_root, spec.name, arm.name, seed)
        label = f"{spec.name}/{arm.name}/seed{seed}"
        fp = self.fingerprint(spec, arm, seed, steps)
        existing = load_result(path)
        if existing is not None and existing.get("fingerprint") == fp and not self.force:
            self.reporter.end_run(label, existing, reused=True)
            return existing
        other = None if self.force else self._find_reusable(fp, path)
        if other is not None:
            res = {**other, "experiment": spec.name, "arm": arm.name, "arm_label": arm.title,
                   "reused_from": f"{other.get('experiment')}/{other.get('arm')}/seed{other.get('seed')}"}  # fmt: skip
            _atomic_write_json(path, res)
            self.reporter.end_run(label, res, reused=True)
            return res
        with count_unreadable_answers() as unreadable:
            res = self._train_and_evaluate(spec, arm, seed, steps, path.parent, label)
        res["fingerprint"] = fp
        _atomic_write_json(path, res)
        self.reporter.end_run(label, res)
        if unreadable.evaluations:
            self.reporter.message("  " + unreadable.line(label, res))
        return res

    def _train_and_evaluate(
        self, spec: ExperimentSpec, arm: ArmSpec, seed: int, steps: int, run_dir: Path, label: str
    ) -> dict[str, Any]:
        from opd.models.loading import load_tokenizer
        from opd.train.tracking import read_metrics
        from opd.train.trainer import OPDTrainer

        t0 = time.perf_counter()
        if run_dir.exists():
            shutil.rmtree(
                run_dir
            )  # a partial run (no result.json): start clean, the trainer refuses leftovers
        run_dir.mkdir(parents=True)
        student = self.zoo.resolve(arm.student)
        teacher = self.zoo.resolve(arm.teacher)
        exclude = self.zoo.heldout()
        prompts = run_dir / "train_prompts.jsonl"
        score = None
        if arm.prompts.kind == "aligned" and not arm.prompts.teacher_mix:
            score = self._scorer(student, teacher, seed)
        prompt_report = write_training_prompts(arm.prompts, prompts, seed=seed, exclude=exclude, score=score)

        origin = None
        prepare_info: dict[str, Any] = {}
        if arm.prepare == "cold_start":
            origin = self.evaluate_path(student)
            student, prepare_info = self._cold_start(arm, student, teacher, seed, run_dir, exclude, prompts)
        elif arm.prepare is not None:
            raise ValueError(f"arm {arm.name}: unknown prepare step {arm.prepare!r}")
        t_eval0 = time.perf_counter()
        before = self.evaluate_path(student) if arm.prepare is None else None
        teacher_acc = self.evaluate_path(teacher)
        eval_time = time.perf_counter() - t_eval0

        cfg = build_train_config(
            spec, arm, seed=seed, steps=steps, student_path=student, teacher_path=teacher, prompts=prompts,
            run_dir=run_dir / "opd", eval_file=self.zoo.eval_files.get(self.zoo.gap_level), eval_settings=self.eval,
        )  # fmt: skip
        log_lines: list[str] = []
        trainer = OPDTrainer(cfg, log=lambda m: log_lines.append(str(m)))
        trainer.setup()
        self.reporter.start_run(label, trainer.total_steps)
        t_train0 = time.perf_counter()
        trainer.train(on_step=self.reporter.step)
        train_time = time.perf_counter() - t_train0
        model = trainer._unwrapped()
        t_eval1 = time.perf_counter()
        if before is None:  # prepared student: evaluate the model OPD started from (saved by the prep step)
            before = self.evaluate_path(student)
        after = evaluate_levels(model, load_tokenizer(student), self.zoo.eval_files, self.eval)
        eval_time += time.perf_counter() - t_eval1
        if self.keep_models:
            model.save_pretrained(run_dir / "final", safe_serialization=True)
            trainer.tokenizer.save_pretrained(run_dir / "final")
        rows = read_metrics(run_dir / "opd")
        train_rows = [r for r in rows if r.get("kind", "train") == "train"]  # not eval rows, not alarms
        eval_rows = [r for r in rows if r.get("kind") == "eval"]
        shutil.rmtree(run_dir / "opd" / "checkpoints", ignore_errors=True)
        del trainer, model
        return {
            "format": FORMAT,
            "experiment": spec.name,
            "arm": arm.name,
            "arm_label": arm.title,
            "seed": seed,
            "steps": steps,
            "student": arm.student,
            "teacher": arm.teacher,
            "student_path": student,
            "teacher_path": teacher,
            "gap_level": self.zoo.gap_level,
            "levels": list(self.zoo.levels),
            "config": cfg.model_dump(mode="json"),
            "eval_settings": dataclasses.asdict(self.eval),
            "prompts": {"spec": dataclasses.asdict(arm.prompts), **prompt_report},
            "prepare": {"kind": arm.prepare, "args": arm.prepare_args, **prepare_info}
            if arm.prepare
            else None,
            "accuracy": {
                "before": before,
                "after": after,
                "teacher": teacher_acc,
                **({"origin": origin} if origin is not None else {}),
            },  # fmt: skip
            "metrics": train_rows,
            "eval_curve": [
                {"step": r["step"], "acc": r.get(f"eval/avg@{self.eval.samples}")} for r in eval_rows
            ],
            "wall_time_s": round(time.perf_counter() - t0, 2),
            "train_time_s": round(train_time, 2),
            "eval_time_s": round(eval_time, 2),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "trainer_log": log_lines[-20:],
        }

    # -- preparation steps ---------------------------------------------------------------------------

    def _scorer(self, student: str, teacher: str, seed: int) -> Callable[[list[Any]], list[dict[str, Any]]]:
        """Recipe B scoring: `opd.recipes.prompts.score_records` of problems on student rollouts vs the teacher."""

        def score(problems: list[Any]) -> list[dict[str, Any]]:
            from opd.data import PromptRecord
            from opd.lab.world import MAX_NEW_TOKENS
            from opd.models.loading import load_model, load_tokenizer, shared_vocab_size
            from opd.recipes.prompts import score_records

            tok = load_tokenizer(student)
            s_model = load_model(student, device=self.compute_device)
            t_model = load_model(teacher, device=self.compute_device)
            records = [PromptRecord(text=p.prompt, messages=None, answer=p.answer, source=f"pool:{i}", raw={})
                       for i, p in enumerate(problems)]  # fmt: skip
            self.reporter.message(
                f"  scoring {len(records)} candidate prompts on student rollouts (Recipe B)"
            )
            return score_records(
                s_model, t_model, tok, records, vocab_size=shared_vocab_size(s_model, t_model, tok),
                template="raw", rollouts=2, max_new_tokens=MAX_NEW_TOKENS, k=int(LAB_DEFAULTS["diagnostics"]["k"]),
                batch_size=32, seed=seed,
            )  # fmt: skip

        return score

    def _cold_start(
        self,
        arm: ArmSpec,
        student: str,
        teacher: str,
        seed: int,
        run_dir: Path,
        exclude: set[str],
        opd_prompts: Path,
    ) -> tuple[str, dict[str, Any]]:
        """Recipe A: the teacher answers fresh problems (T=1, one each), filtered like `opd generate`
        (truncated, no final ``#answer``, repetition; no correctness check, as in the paper's code), then
        response-only SFT of the student (`opd.train.sft.SFTTrainer`). Returns the SFT model's path."""
        from opd.generation.rollout import SamplingParams
        from opd.generation.sampling import sample_responses
        from opd.lab.world import MAX_NEW_TOKENS, parse_answer
        from opd.models.loading import load_model, load_tokenizer
        from opd.recipes.generate import filter_reasons
        from opd.train.sft import SFTConfig, SFTTrainer

        a = arm.prepare_args
        opd_set = {json.loads(x)["prompt"] for x in opd_prompts.read_text(encoding="utf-8").splitlines() if x}
        problems = draw_problems(a.get("mix", {2: 0.3, 3: 0.3, 4: 0.4}), int(a.get("n_prompts", 512)),
                                 seed=20_000 + seed, exclude=exclude | opd_set)  # fmt: skip
        tok = load_tokenizer(teacher)
        t_model = load_model(teacher, device=self.compute_device)
        ids = [tok(p.prompt)["input_ids"] for p in problems]
        self.reporter.message(f"  cold start: {teacher.rsplit('/', 1)[-1]} answers {len(problems)} problems")
        samples = sample_responses(t_model, tok, ids, n=1, params=SamplingParams(temperature=1.0, top_p=1.0, top_k=0,
                                   max_new_tokens=MAX_NEW_TOKENS), batch_size=128, seed=seed)  # fmt: skip
        kept, rejected = [], 0
        filters = list(a.get("filters", ["truncated", "no_answer", "repetition"]))
        for s in samples:
            # opd.recipes.generate's no_answer filter looks for \boxed{}/Answer:, so the lab's `#answer` is checked here
            reasons = filter_reasons(s.text, truncated=s.truncated, answer=None, max_new_tokens=MAX_NEW_TOKENS,
                                     filters=[f for f in filters if f != "no_answer"])  # fmt: skip
            if "no_answer" in filters and parse_answer(s.text) is None:
                reasons["no_answer"] = "no final #answer"
            if reasons:
                rejected += 1
                continue
            kept.append({"prompt": problems[s.prompt_index].prompt, "response": s.text})
        if not kept:
            from opd.errors import DataError

            raise DataError(f"cold start: the filters ({', '.join(filters)}) rejected all {len(samples)} responses "
                            f"of {teacher}; nothing to fine-tune on")  # fmt: skip
        data = run_dir / "sft_data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        del t_model
        steps = int(a.get("steps", 100))
        cfg = SFTConfig.model_validate({
            "model": student, "data": str(data), "template": "raw", "run_dir": str(run_dir / "sft"), "steps": steps,
            "batch_size": int(a.get("batch_size", 32)), "micro_batch_size": int(a.get("batch_size", 32)),
            "optim": {"lr": float(a.get("lr", 1e-3)), "weight_decay": 0.0}, "tracking": {"tensorboard": False},
            "seed": seed, "checkpoint_every": steps, "keep_checkpoints": 1, "save_final": True,
        })  # fmt: skip
        sft = SFTTrainer(cfg, log=lambda m: None)
        sft.setup()
        self.reporter.start_run(f"  SFT on {len(kept)} teacher responses", sft.total_steps)
        hist = sft.train(on_step=lambda s, m: self.reporter.step(s, m))
        shutil.rmtree(run_dir / "sft" / "checkpoints", ignore_errors=True)
        final = run_dir / "sft" / "final"
        info = {"teacher_responses": len(samples), "kept": len(kept), "rejected": rejected, "sft_steps": steps,
                "sft_final_loss": hist[-1].get("loss") if hist else None, "sft_model": str(final)}  # fmt: skip
        return str(final), info

    # -- probes --------------------------------------------------------------------------------------

    def run_probe(self, spec: ExperimentSpec) -> dict[str, Any] | None:
        """The experiment's extra measurement, cached in <exp>/probe.json by its inputs."""
        if spec.probe is None:
            return None
        if spec.probe == "doctor":
            return self._doctor_probe(spec)
        if spec.probe != "teacher_pair":
            raise ValueError(f"unknown probe {spec.probe!r}")
        a = spec.probe_args
        paths = {k: self.zoo.resolve(a[k]) for k in ("student", "teacher_a", "teacher_b")}
        levels = tuple(a.get("levels", (self.zoo.gap_level,)))
        fp = _fingerprint({"d": {k: self._digest(v) for k, v in paths.items()}, "levels": levels,
                           "n": a.get("n", 64)})  # fmt: skip
        path = self.out_root / spec.name / PROBE
        cached = load_result(path)
        if cached is not None and cached.get("fingerprint") == fp and not self.force:
            return cached
        self.reporter.message(f"  probe: {a['teacher_a']} vs {a['teacher_b']} at {a['student']}'s rollouts")
        res = teacher_pair_probe(paths["student"], paths["teacher_a"], paths["teacher_b"],
                                 files=[self.zoo.eval_files[lv] for lv in levels], n=int(a.get("n", 64)),
                                 device=self.compute_device)  # fmt: skip
        res.update({"fingerprint": fp, "models": {k: a[k] for k in ("student", "teacher_a", "teacher_b")},
                    "levels": list(levels)})  # fmt: skip
        _atomic_write_json(path, res)
        return res

    def _doctor_probe(self, spec: ExperimentSpec) -> dict[str, Any]:
        """`opd doctor` (the same `run_doctor` the command runs) on the gap level, cached by its inputs."""
        from opd.evaluation.doctor import DoctorConfig, run_doctor
        from opd.lab.world import MAX_NEW_TOKENS

        a = spec.probe_args
        student = self.zoo.resolve(a["student"])
        teachers = [self.zoo.resolve(t) for t in a["teachers"]]
        cfg = DoctorConfig(
            student=student, teachers=teachers, prompts=str(self.zoo.eval_files[self.zoo.gap_level]),
            n_prompts=int(a.get("n_prompts", 64)), samples=4, teacher_samples=4, templates=["raw"],
            max_new_tokens=int(a.get("max_new_tokens", MAX_NEW_TOKENS)), k=4, depths=[0.25, 0.5, 0.75],
            continuation_rollouts=32, verifier="opd.lab.world:LabVerifier", out=str(self.out_root / spec.name / "doctor"),
            device=str(self.compute_device),
        )  # fmt: skip
        fp = _fingerprint(  # the device is where, not what: a probe cached on one device holds on another
            {"d": [self._digest(p) for p in (student, *teachers)],
             "cfg": cfg.model_dump(mode="json", exclude={"device"})}
        )  # fmt: skip
        path = self.out_root / spec.name / PROBE
        cached = load_result(path)
        if cached is not None and cached.get("fingerprint") == fp and not self.force:
            return cached
        self.reporter.message(f"  probe: opd doctor on {a['student']} with {', '.join(a['teachers'])}")
        res = run_doctor(cfg)
        from opd.report.doctor import write_doctor_report

        write_doctor_report(res, cfg.out)
        res["fingerprint"] = fp
        _atomic_write_json(path, res)
        return res

    # -- experiments ---------------------------------------------------------------------------------

    def run_experiment(
        self,
        spec: ExperimentSpec,
        *,
        seeds: Iterable[int] | None = None,
        steps: int | None = None,
        arms: Iterable[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """All (seed, arm) runs, seed-major so a cut-short experiment still has paired arms; then the summary.

        `deadline` (a `time.monotonic()` value): a new seed starts only if the slowest seed so far still fits.
        """
        from opd.lab.report import write_summary

        seeds = list(spec.seeds if seeds is None else seeds)
        steps = int(steps or spec.steps)
        chosen = [spec.arm(a) for a in arms] if arms else list(spec.arms)
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            self._run_seeds(spec, chosen, seeds, steps, deadline)
        finally:
            torch.set_num_threads(threads)
        summary = write_summary(spec, self.out_root)
        summary["last_run_wall_time_s"] = round(time.perf_counter() - t0, 1)
        _atomic_write_json(self.out_root / spec.name / SUMMARY, summary)
        return summary

    def _run_seeds(
        self,
        spec: ExperimentSpec,
        chosen: list[ArmSpec],
        seeds: list[int],
        steps: int,
        deadline: float | None,
    ) -> None:
        self.run_probe(spec)
        seed_time = 0.0
        for seed in seeds:
            if deadline is not None and time.monotonic() + seed_time > deadline:
                self.reporter.message(f"  budget reached: {spec.name} stopped before seed {seed} (one seed took "
                                      f"{seed_time:.0f}s)")  # fmt: skip
                break
            ts = time.monotonic()
            for arm in chosen:
                self.run_one(spec, arm, seed, steps)
            seed_time = max(seed_time, time.monotonic() - ts)


@torch.no_grad()
def teacher_pair_probe(
    student: str, teacher_a: str, teacher_b: str, *, files: list[Path], n: int = 64, k: int = 4, seed: int = 0,
    device: str | torch.device = "auto",
) -> dict[str, Any]:  # fmt: skip
    """How distinguishable two teachers are at the student's states (paper finding 2's direct check).

    `n` problems per file, one student rollout each at T=1; all three models score the same ids, on
    `device` (`opd.device.resolve_device`). Returns reverse KL and top-k overlap of student vs each
    teacher, and of teacher_a vs teacher_b (a as "p").
    """
    from opd.data import load_prompts
    from opd.device import resolve_device
    from opd.diagnostics import token_diagnostics
    from opd.generation.rollout import HFGenerator, SamplingParams, tokenizer_vocab_size
    from opd.generation.sampling import stop_ids_for
    from opd.generation.scoring import response_logits
    from opd.lab.world import MAX_NEW_TOKENS
    from opd.models.loading import load_model, load_tokenizer

    device = resolve_device(device)
    tok = load_tokenizer(student)
    s_model, a_model, b_model = (load_model(p, device=device) for p in (student, teacher_a, teacher_b))
    prompts = [r.text for f in files for r in load_prompts(f)[:n]]
    ids = [tok(p)["input_ids"] for p in prompts]
    gen = HFGenerator(
        s_model,
        pad_id=tok.pad_token_id,
        stop_ids=stop_ids_for(tok, s_model),
        vocab_size=tokenizer_vocab_size(tok),
    )
    roll = gen.generate(ids, SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS), 1, seed,
                        list(range(len(ids))))  # fmt: skip
    ls, la, lb = (response_logits(m, roll) for m in (s_model, a_model, b_model))
    vocab = len(tok)
    mask = roll.response_mask

    def diag(p: torch.Tensor, q: torch.Tensor) -> dict[str, float]:
        return token_diagnostics(p, q, mask, k=k, vocab_size=vocab)

    sa, sb, ab = diag(ls, la), diag(ls, lb), diag(la, lb)
    return {
        "rollouts": len(ids), "tokens": int(mask.sum()), "k": k,
        "kl_student_to_pre_rl": sa["reverse_kl"], "kl_student_to_big": sb["reverse_kl"],
        "kl_between_teachers": ab["reverse_kl"], "kl_between_teachers_forward": ab["forward_kl"],
        "overlap_ratio_student_pre_rl": sa["overlap_ratio"], "overlap_ratio_student_big": sb["overlap_ratio"],
        "overlap_ratio_teachers": ab["overlap_ratio"], "overlap_mass_teachers": ab["overlap_mass_student"],
    }  # fmt: skip
