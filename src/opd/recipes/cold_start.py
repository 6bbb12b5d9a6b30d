"""`opd cold-start`: the paper's Recipe A (off-policy cold start, finding 5) as one resumable pipeline.

1. generate: the teacher answers the SFT prompts (`opd.recipes.generate`, one response per prompt and the
   truncation / no-answer / repetition filters by default) -> WORK/teacher.jsonl
2. sft: the student is fine-tuned on those responses (`opd.train.sft`) -> WORK/sft/final
3. opd: on-policy distillation (`opd.train.trainer.OPDTrainer`, as `opd train` runs it) from the SFT model on
   the OPD prompts, after dropping every prompt that repeats one the teacher answered for SFT
   (`opd.recipes.prompts.dedup_records`: exact match after normalisation, or embedding cosine >= threshold)
   -> WORK/opd_prompts.jsonl (kept), WORK/opd_prompts.removed.jsonl (what was dropped and why), WORK/opd

Wiring: the sections are the commands' own configs, and the pipeline fills in what connects them:
`generate.prompts` = `sft_prompts`, `generate.out` = WORK/teacher.jsonl, `generate.model` defaults to
`opd.teacher.path`; `sft.model` defaults to `opd.student.path` (the ORIGINAL student), `sft.data` =
WORK/teacher.jsonl, `sft.run_dir` = WORK/sft, and `sft.template` follows the generation template (``chat``
when generation used a chat template, since the generated messages already hold the filled prompt;
the same non-chat template otherwise); `opd.student.path` = WORK/sft/final, `opd.data.prompts` =
WORK/opd_prompts.jsonl, `opd.run_dir` = WORK/opd.

Resume: rerun the same command. Each stage writes WORK/<stage>.DONE last and is skipped when it is
there; an interrupted stage continues from its own resume state (generate's written lines, the SFT and
OPD checkpoints). Under torchrun, generation and de-duplication run on the main process while the
others wait; SFT and OPD run on all processes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from opd.config import TrainConfig, dump_config
from opd.data import option_names
from opd.errors import ConfigError, DataError
from opd.files import atomic_write_text, json_safe
from opd.recipes.generate import GenerateConfig
from opd.train import checkpoint as ckpt
from opd.train.sft import SFTConfig

STAGES = ("generate", "sft", "opd")
# How `opd cold-start` spells the generate stage's prompt settings (errors name them): its section's options,
# and sft_prompts for the prompt file it answers.
GENERATE_STAGE_OPTIONS = {**option_names("--generate."), "prompts": "--sft_prompts"}


class ColdStartDedup(BaseModel):
    """How held-out OPD prompts are cleaned of the SFT prompts (the paper's control-set rule)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    threshold: float = Field(0.6, ge=-1.0, le=1.0, description="embedding cosine at or above which to drop")
    use_embeddings: bool = Field(True, description="false: exact (normalised) matches only, no model")
    device: str = Field(
        "cpu", description="where the embedding model runs (as `opd prompts dedup --device`): cpu | auto | "
        "cuda | cuda:N; cpu by default, the small model is fast there and its cosines are the same everywhere",
    )  # fmt: skip


class ColdStartConfig(BaseModel):
    """The whole recipe: one section per stage plus the paths that connect them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    work_dir: str = Field("runs/cold-start", description="every stage writes under this directory")
    sft_prompts: str = Field(
        "", description="prompts the teacher answers for SFT (default: generate.prompts)"
    )
    opd_prompts: str = Field("", description="held-out prompts for OPD (default: opd.data.prompts)")
    dedup: ColdStartDedup = ColdStartDedup()
    generate: GenerateConfig = GenerateConfig()
    sft: SFTConfig = SFTConfig()
    opd: TrainConfig = TrainConfig()


def stage_paths(work_dir: str | Path) -> dict[str, Path]:
    w = Path(work_dir)
    return {
        "teacher": w / "teacher.jsonl",
        "sft_dir": w / "sft",
        "sft_final": w / "sft" / "final",
        "opd_prompts": w / "opd_prompts.jsonl",
        "opd_removed": w / "opd_prompts.removed.jsonl",
        "opd_dir": w / "opd",
        **{f"done_{s}": w / f"{s}.DONE" for s in STAGES},
    }


def stage_configs(cfg: ColdStartConfig) -> tuple[GenerateConfig, SFTConfig, TrainConfig]:
    """The three commands' configs with the pipeline's wiring filled in (see the module docstring)."""
    from opd.data import uses_chat

    p = stage_paths(cfg.work_dir)
    teacher = cfg.generate.model or cfg.opd.teacher.path
    student = cfg.sft.model or cfg.opd.student.path
    sft_prompts = cfg.sft_prompts or cfg.generate.prompts
    opd_prompts = cfg.opd_prompts or cfg.opd.data.prompts
    missing = [
        name
        for name, value in (
            ("generate.model (or opd.teacher.path)", teacher),
            ("sft.model (or opd.student.path)", student),
            ("sft_prompts", sft_prompts),
            ("opd_prompts", opd_prompts),
        )
        if not value
    ]
    if missing:
        raise ConfigError(f"opd cold-start: missing required setting(s): {', '.join(missing)}")
    if Path(student).resolve() == p["sft_final"].resolve():
        raise ConfigError("sft.model points at the SFT output itself; set it to the original student")
    gen = GenerateConfig.model_validate(
        {**cfg.generate.model_dump(), "model": teacher, "prompts": sft_prompts, "out": str(p["teacher"])}
    )
    sft_template = "chat" if uses_chat(gen.template) else gen.template
    sft = SFTConfig.model_validate(
        {
            **cfg.sft.model_dump(),
            "model": student,
            "data": str(p["teacher"]),
            "run_dir": str(p["sft_dir"]),
            "template": sft_template,
            "chat_template_kwargs": cfg.sft.chat_template_kwargs or gen.chat_template_kwargs,
        }
    )
    opd = cfg.opd.model_dump()
    opd["student"]["path"] = str(p["sft_final"])
    opd["teacher"]["path"] = cfg.opd.teacher.path or teacher
    opd["data"]["prompts"] = str(p["opd_prompts"])
    opd["run_dir"] = str(p["opd_dir"])
    return gen, sft, TrainConfig.model_validate(opd)


def _main_only(fn: Callable[[], Any]) -> None:
    """Run `fn` on the main process; the others wait (one writer for files every process then reads)."""
    from accelerate import PartialState

    from opd.device import resolve_device

    state = PartialState(cpu=resolve_device("auto").type == "cpu")  # the trainer's own rule
    if state.is_main_process:
        fn()
    state.wait_for_everyone()


def _mark_done(path: Path, info: dict[str, Any]) -> None:
    def write() -> None:
        atomic_write_text(path, json.dumps(json_safe(info), indent=1, allow_nan=False) + "\n")

    _main_only(write)


def dedup_opd_prompts(
    cfg: ColdStartConfig, gen: GenerateConfig, opd: TrainConfig, paths: dict[str, Path]
) -> dict[str, Any]:
    """Write the held-out OPD prompts without any that repeat the prompts the teacher answered for SFT."""
    from opd.data import load_prompts, prompt_columns
    from opd.recipes.prompts import dedup_records, get_embedder

    candidates = load_prompts(
        cfg.opd_prompts or cfg.opd.data.prompts, **prompt_columns(opd.data),
        options={**option_names("--opd.data."), "prompts": "--opd_prompts"},
    )  # fmt: skip
    against = load_prompts(gen.prompts, **prompt_columns(gen), options=GENERATE_STAGE_OPTIONS)
    if gen.max_prompts is not None:
        against = against[: gen.max_prompts]  # only the prompts the teacher actually answered
    embed = cfg.dedup.use_embeddings and bool(candidates) and bool(against)  # else no model is needed
    kept, removed = dedup_records(
        candidates, against, threshold=cfg.dedup.threshold, use_embeddings=cfg.dedup.use_embeddings,
        embedder=get_embedder(cfg.dedup.device) if embed else None,
    )  # fmt: skip
    if not kept:
        raise DataError(
            f"all {len(candidates)} OPD prompts repeat SFT prompts (exact or cosine >= {cfg.dedup.threshold}); "
            "OPD needs held-out prompts: use another opd_prompts file (or a higher dedup.threshold)."
        )
    atomic_write_text(
        paths["opd_removed"],
        "".join(json.dumps(json_safe(r), ensure_ascii=False, allow_nan=False) + "\n" for r in removed),
    )
    atomic_write_text(
        paths["opd_prompts"],
        "".join(json.dumps(json_safe(r.raw), ensure_ascii=False, allow_nan=False) + "\n" for r in kept),
    )  # written last: its presence means the de-duplication finished
    return {"candidates": len(candidates), "kept": len(kept), "removed": len(removed)}


def run_cold_start(cfg: ColdStartConfig, *, log: Callable[[str], Any] | None = None) -> dict[str, Path]:
    """Run (or continue) the three stages; returns the paths of their outputs."""
    from opd.device import resolve_device
    from opd.recipes.generate import generate_with_progress
    from opd.train.sft import sft_with_progress

    log = log or print
    gen, sft, opd = stage_configs(cfg)
    # Device settings are checked on every process before any stage: a bad one must not surface on the
    # main process alone (inside `_main_only`) while the others wait for it.
    devices = {
        "generate.device": gen.device,
        "dedup.device": cfg.dedup.device if cfg.dedup.use_embeddings else None,
    }
    for setting, value in devices.items():
        if value is not None:
            try:
                resolve_device(value)
            except ConfigError as exc:
                raise ConfigError(f"{setting}: {exc}") from None
    paths = stage_paths(cfg.work_dir)
    work = Path(cfg.work_dir)

    def write_config() -> None:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / "cold_start.yaml", dump_config(cfg))

    _main_only(write_config)

    # 1. teacher responses
    if paths["done_generate"].exists():
        log(f"stage 1/3 generate: skipped, {paths['teacher']} exists")
    else:
        log(f"stage 1/3 generate: teacher {gen.model} answers {gen.prompts} -> {paths['teacher']}")
        summary: dict[str, Any] = {}

        def generate() -> None:
            summary.update(generate_with_progress(gen, log=log, options=GENERATE_STAGE_OPTIONS).summary)
            if summary["kept"] == 0:
                raise DataError(
                    f"the filters rejected every teacher response (see {paths['teacher']}'s .summary.json); "
                    "raise generate.max_new_tokens, check the template asks for a final answer, or relax "
                    "generate.filters."
                )

        _main_only(generate)
        _mark_done(paths["done_generate"], {"out": str(paths["teacher"])})

    # 2. SFT of the student
    if paths["done_sft"].exists():
        log(f"stage 2/3 sft: skipped, {paths['sft_final']} exists")
    else:
        resume = bool(ckpt.list_checkpoints(paths["sft_dir"]))
        log(
            f"stage 2/3 sft: {sft.model} on {paths['teacher']} (template {sft.template}) -> {paths['sft_final']}"
            + (" [resuming]" if resume else "")
        )
        sft_with_progress(sft, resume=resume, log=log)
        _mark_done(paths["done_sft"], {"final": str(paths["sft_final"])})

    # 3. OPD from the SFT model on held-out prompts
    if paths["done_opd"].exists():
        log(f"stage 3/3 opd: skipped, {paths['opd_dir'] / 'final'} exists")
    else:
        if paths["opd_prompts"].exists():
            log(f"stage 3/3 opd: held-out prompts already de-duplicated in {paths['opd_prompts']}")
        else:
            stats: dict[str, Any] = {}
            _main_only(lambda: stats.update(dedup_opd_prompts(cfg, gen, opd, paths)))
            if stats:
                log(
                    f"stage 3/3 opd: kept {stats['kept']}/{stats['candidates']} held-out prompts "
                    f"({stats['removed']} repeat SFT prompts; see {paths['opd_removed']})"
                )
        resume = bool(ckpt.list_checkpoints(paths["opd_dir"]))
        log(f"stage 3/3 opd: {opd.student.path} distilled from {opd.teacher.path} -> {paths['opd_dir']}")
        from opd.train.run import run_training

        run_training(opd, resume=resume)
        _mark_done(paths["done_opd"], {"final": str(paths["opd_dir"] / "final")})
    return {"teacher": paths["teacher"], "sft": paths["sft_final"], "opd": paths["opd_dir"] / "final"}
