"""The parts an OPD run is made of, built once, in dependency order, by `build_run_parts`.

checks (launch, dtypes, process count, the prompt and eval files, the run directory) -> student/teacher
pair -> prompts -> settings adjusted to the models (vocabulary, context: adjustments.json) -> the student's
update (memory levers, sharding, optimizer, schedule) -> teacher -> start-up model probes -> generator.

Why one builder: each part needs the ones before it (the schedule needs the step count the prompts give,
the engine context needs the longest encoded prompt), and set as trainer attributes one by one that order
was an invisible contract. Here it is the order of the statements of one function, and the trainer receives
the finished `RunParts`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from opd.config import TrainConfig
from opd.data import TRAIN_OPTIONS, PromptCursor, PromptRecord, load_prompts, prepare_prompts, prompt_columns
from opd.diagnostics import StepStatsSettings
from opd.errors import ConfigError, ModelError
from opd.generation.build import build_generator, check_generator_processes, generator_dtype_settings
from opd.generation.rollout import SamplingParams
from opd.generation.sampling import stop_ids_for
from opd.generation.scoring import (
    NonFiniteOutputError,
    check_finite_probe,
    check_head_projection,
    frozen_head,
    head_weights,
)
from opd.models.loading import Pair, load_pair
from opd.objectives.objective import Objective
from opd.objectives.token import chunk_elements, chunk_rows
from opd.precision import apply_tf32, check_dtypes
from opd.teachers.build import (
    build_teacher,
    check_teacher_processes,
    loads_teacher_weights,
    teacher_dtype_settings,
)
from opd.teachers.contract import Teacher, as_teacher
from opd.train.loop import (
    build_optimizer,
    check_launch,
    device_choices,
    lock_run_dir,
    refuse_to_overwrite,
    unlock_run_dir,
)
from opd.train.memory import StepInBackward, install_step_in_backward

__all__ = ["RunParts", "build_run_parts", "check_heads", "student_head"]


@dataclass
class RunParts:
    """Everything a run trains with, as `build_run_parts` made it (the trainer reads these as attributes)."""

    tokenizer: Any  # the student's; the prompts are encoded with it
    teacher_tokenizer: Any
    tokenizer_report: Any  # the pair's tokenizer comparison (opd.models.loading.TokenizerPair.report)
    vocab_size: int  # the vocabulary student and teacher share: every top-k and row is cut to it
    chunk_rows: int  # response rows per chunk of the loss and statistics, capped by the vocabulary
    records: list[PromptRecord]
    prompt_texts: list[str]  # rendered (chat template, system prompt)
    prompt_ids: list[list[int]]
    cursor: PromptCursor
    total_steps: int
    adjustments: list[dict[str, Any]]  # settings used with another value than asked, each with why
    max_new_tokens: int  # rollout.max_new_tokens as used (clamped to the context)
    objective: Objective  # the loss with the settings as used
    stats_settings: StepStatsSettings  # the step statistics with the settings as used
    student: torch.nn.Module  # as it trains: checkpointed, sharded or DDP-wrapped, eval mode
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sharded: bool  # FSDP2
    architecture: str  # the student's class name before sharding renames it (written back into final/)
    in_backward: StepInBackward | None  # optim.in_backward's hooks
    teacher: Teacher
    generator: Any  # HFGenerator or a vLLM engine (generate, and sync for an engine)
    stop_ids: list[int]
    sampling: SamplingParams
    run_lock: Path | None  # the run directory's lock, held by the main process until the run ends
    device_choices: dict[str, Any]  # TF32, fused AdamW, allocator, collective timeout: RUN_DIR/device.json


def build_run_parts(
    cfg: TrainConfig,
    acc: Any,
    *,
    resume: bool,
    log: Callable[[str], Any],
    teacher: Any = None,
) -> RunParts:
    """The run's parts for `cfg` on accelerator `acc`, each built once, in the order they depend on.

    `teacher`: a teacher to use instead of the one ``cfg.teacher`` names (a notebook's scorer, a test's fake):
    anything `opd.teachers.contract.as_teacher` takes. Raises ConfigError / ModelError / OSError before any
    model loads for what can be checked without one (launch, dtypes, the input files, the run directory)."""

    def warn(msg: str) -> None:
        log(f"[yellow]warning:[/] {msg}")

    records, run_lock, tf32 = _check_run(cfg, acc, resume=resume, warn=warn)
    try:
        return _build(cfg, acc, records, run_lock, tf32, log=log, warn=warn, teacher=teacher)
    except BaseException:
        unlock_run_dir(run_lock)  # a run that never started leaves its directory to the next attempt
        raise


def _build(cfg: TrainConfig, acc: Any, records: list[PromptRecord], run_lock: Path | None, tf32: dict[str, Any], *,
           log: Callable[[str], Any], warn: Callable[[str], None], teacher: Any) -> RunParts:  # fmt: skip
    """`build_run_parts` once the checks passed: everything that loads or allocates."""
    run_dir = Path(cfg.run_dir)
    pair = _load_pair(cfg, warn)
    texts, ids = prepare_prompts(
        records, pair.tokenizers.student, template=cfg.data.template, chat_template_kwargs=cfg.data.chat_template_kwargs,
        system_prompt=cfg.data.system_prompt, max_prompt_tokens=cfg.data.max_prompt_tokens,
    )  # fmt: skip
    total_steps = cfg.steps or math.ceil(len(records) / cfg.prompts_per_step)
    vocab = pair.vocab_size
    adjustments = _vocab_adjustments(cfg, vocab) + _context_adjustments(cfg, pair, records, ids)
    for adj in adjustments:
        warn(f"{adj['setting']}={adj['asked']} is {adj['why']}: using {adj['setting']}={adj['used']} (recorded in "
             f"{run_dir / 'adjustments.json'})")  # fmt: skip
    max_new = next((a["used"] for a in adjustments if a["setting"] == "rollout.max_new_tokens"),
                   cfg.rollout.max_new_tokens)  # fmt: skip
    lc, dc = cfg.loss, cfg.diagnostics
    # loss.chunk_max_elements "auto" is resolved here, by the compute device, and held as used by the Objective
    elements = chunk_elements(lc.chunk_max_elements, acc.device)
    rows = chunk_rows(vocab, lc.chunk_size, elements)
    if lc.chunk_max_elements == "auto":
        log(f"loss.chunk_max_elements auto: {elements} on {acc.device.type} ({rows} response rows per chunk)")
    objective = Objective(
        signal=lc.signal, divergence=lc.divergence, k=lc.k, support=lc.support, renorm=lc.renorm, beta=lc.beta,
        vocab_size=vocab, chunk_rows=rows, chunk_size=lc.chunk_size, chunk_max_elements=elements,
    )  # fmt: skip
    stats_settings = StepStatsSettings(
        vocab_size=vocab, diagnostics_k=dc.k, position_bins=dc.position_bins, bin_len=max_new, signal=lc.signal,
        loss_k=lc.k, support=lc.support, chunk_rows=rows,
    )  # fmt: skip
    architecture = type(pair.student).__name__
    student, optimizer, scheduler, in_backward = _build_update(cfg, acc, pair.student, total_steps)
    model = acc.unwrap_model(student)

    def context(setting: int | None, what: str, scoring: bool = False) -> int:
        """The engine context a run needs; a scoring engine also generates its 1 required token."""
        longest = max(len(p) for p in ids)
        need = longest + max_new + int(scoring)
        if setting is not None and need > setting:
            raise ConfigError(
                f"{what} {setting} < longest prompt ({longest}) + rollout.max_new_tokens ({max_new})"
                f"{' + 1' if scoring else ''}; raise it or leave it unset"
            )
        return setting or need

    if teacher is None:
        teacher = build_teacher(
            cfg.teacher, model=pair.teacher, device=acc.device, vocab_size=vocab,
            hidden_states=lc.from_hidden_states, seed=cfg.seed,
            context=lambda setting, what: context(setting, what, scoring=True),
            tokenizer=pair.tokenizers.student, probe_texts=[texts[0], " 12 + 30 = 42\n"], log=log,
            processes=acc.num_processes,
        )  # fmt: skip
    teacher = as_teacher(teacher, vocab_size=vocab, device=acc.device)
    teacher_model = getattr(teacher, "model", None)
    _check_finite(cfg, model, teacher_model)  # a NaN model is named as such, before the head probe judges it
    if lc.from_hidden_states:  # refuse a head head_loss cannot take, before any step
        check_heads(model, teacher_model)
    stop_ids = stop_ids_for(pair.tokenizers.student, model, cfg.rollout.stop_token_ids)
    ro = cfg.rollout
    generator = build_generator(
        ro, model=model, pad_id=pair.tokenizers.student.pad_token_id, stop_ids=stop_ids, synced=cfg.sharding == "fsdp",
        student_path=cfg.student.path, lora=cfg.student.lora.enabled, seed=cfg.seed, context=context,
        vocab_size=vocab, processes=acc.num_processes,
    )  # fmt: skip
    return RunParts(
        tokenizer=pair.tokenizers.student, teacher_tokenizer=pair.tokenizers.teacher,
        tokenizer_report=pair.tokenizers.report, vocab_size=vocab, chunk_rows=rows, records=records, prompt_texts=texts,
        prompt_ids=ids, cursor=PromptCursor(len(records), seed=cfg.seed, shuffle=cfg.data.shuffle),
        total_steps=total_steps, adjustments=adjustments, max_new_tokens=max_new, objective=objective,
        stats_settings=stats_settings, student=student, optimizer=optimizer, scheduler=scheduler,
        sharded=cfg.sharding == "fsdp", architecture=architecture, in_backward=in_backward, teacher=teacher,
        generator=generator, stop_ids=stop_ids, run_lock=run_lock,
        device_choices=device_choices(acc, tf32=tf32, optimizer=optimizer, dist_timeout=cfg.dist_timeout_s),
        sampling=SamplingParams(temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k, max_new_tokens=max_new),
    )  # fmt: skip


def _check_run(cfg: TrainConfig, acc: Any, *, resume: bool,
               warn: Callable[[str], None]) -> tuple[list[PromptRecord], Path | None, dict[str, Any]]:  # fmt: skip
    """What must hold before anything is loaded: the launch, dtypes, process count, the prompt and eval
    files (read and checked here: a JSON error on line 37 used to surface after both models had loaded),
    and an empty (or resumed) run_dir, locked for this run. Sets TF32 (`tf32`) first, so the precision
    probe times float32 as the run will compute it. Returns the prompt records, the lock and the TF32 choice."""
    from opd.evaluation.eval import check_answers

    check_launch(acc)
    tf32 = apply_tf32(acc.device, cfg.tf32)
    # bf16 autocast on a CPU without bf16 instructions turned one step into 15 minutes: refused before any load
    choices = {"student.autocast": cfg.student.autocast, "student.dtype": cfg.student.dtype,
               **teacher_dtype_settings(cfg.teacher), **generator_dtype_settings(cfg.rollout)}  # fmt: skip
    check_dtypes(acc.device, choices, policy=cfg.precision_check, log=warn)
    if cfg.prompts_per_step % acc.num_processes:
        raise ConfigError(
            f"prompts_per_step={cfg.prompts_per_step} must be divisible by the number of processes "
            f"({acc.num_processes})"
        )
    check_generator_processes(cfg.rollout, acc.num_processes)  # in-process engines need one process
    check_teacher_processes(cfg.teacher, acc.num_processes)
    data, ec = cfg.data, cfg.eval
    columns = prompt_columns(data)
    records = load_prompts(data.prompts, **columns)
    if ec.prompts and ec.every > 0:  # the same records `InLoopEvaluator` will evaluate
        options = {**TRAIN_OPTIONS, "prompts": "eval.prompts"}
        check_answers(load_prompts(ec.prompts, **columns, options=options)[: ec.max_problems])
    run_dir = Path(cfg.run_dir)  # made only now: a bad input file leaves nothing behind
    lock = lock_run_dir(run_dir, "opd train") if acc.is_main_process else None  # released when train() ends
    if not resume:
        refuse_to_overwrite(run_dir, "opd train")
    set_seed(cfg.seed)
    return records, lock, tf32


def _load_pair(cfg: TrainConfig, warn: Callable[[str], None]) -> Pair:
    """Tokenizers and models (no teacher weights for a vLLM/HTTP teacher), the shared vocabulary, the
    warnings about settings the run will not use as given, and the student's LoRA adapters."""
    tc = cfg.teacher
    pair = load_pair(
        cfg.student.path, tc.path or None, student_dtype=cfg.student.dtype, teacher_dtype=tc.dtype,
        student_trust_remote_code=cfg.student.trust_remote_code, teacher_trust_remote_code=tc.trust_remote_code,
        teacher_model=loads_teacher_weights(tc),
    )  # fmt: skip
    if cfg.student.dtype in ("bfloat16", "float16"):
        warn(f"student.dtype={cfg.student.dtype}: low-precision master weights can swallow lr={cfg.optim.lr:g} "
             "updates entirely; the paper trains fp32 master weights")  # fmt: skip
    ro = cfg.rollout
    if ro.top_p < 1.0 or ro.top_k > 0 or ro.temperature != 1.0:
        warn(
            f"rollouts sample with temperature={ro.temperature}, top_p={ro.top_p}, top_k={ro.top_k}, but the loss "
            "scores them under the untempered student policy: the samples are off-policy and the sampled-token "
            "estimator is biased (set all three to 1.0 / 1.0 / 0 for the unbiased on-policy objective)"
        )
    if cfg.student.lora.enabled:
        try:
            from peft import LoraConfig as PeftLora
            from peft import get_peft_model
        except ImportError as exc:  # pragma: no cover - peft is a dependency
            raise ConfigError("student.lora.enabled needs peft: pip install peft") from exc
        lc = cfg.student.lora
        peft_cfg = PeftLora(
            r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules
        )
        pair.student = get_peft_model(pair.student, peft_cfg)
    return pair


def _vocab_adjustments(cfg: TrainConfig, vocab: int) -> list[dict[str, Any]]:
    """Top-k settings larger than the shared vocabulary, clamped to it.

    The objectives clamp a top-k to the vocabulary so tiny vocabularies work; done silently, a run asked for
    `--loss.k 500` on a 103-token vocabulary would report results of a setting nobody chose."""
    asked = {"diagnostics.k": cfg.diagnostics.k}
    if cfg.loss.signal == "topk":  # the only signal whose loss takes a top-k
        asked = {"loss.k": cfg.loss.k, **asked}
    return [
        {"setting": name, "asked": value, "used": vocab,
         "why": f"larger than the shared vocabulary of student and teacher ({vocab} tokens)"}
        for name, value in asked.items()
        if value > vocab
    ]  # fmt: skip


def _context_adjustments(cfg: TrainConfig, pair: Pair, records: list[PromptRecord],
                         ids: list[list[int]]) -> list[dict[str, Any]]:  # fmt: skip
    """rollout.max_new_tokens clamped to what the smallest context (student's, HF teacher's) leaves after the
    longest prompt; an error when that prompt alone fills it.

    Why: past `max_position_embeddings` a model reads positions it was never trained on (or its rotary cache
    runs out), and a run that asks for 4K new tokens on a 2K-context model trained without a word. Clamping
    keeps every rollout inside both contexts; engines and servers are checked against their own
    `max_model_len` by `build_run_parts`'s `context`."""
    limits = {role: int(n) for role, m in (("student", pair.student), ("teacher", pair.teacher))
              if m is not None and (n := getattr(m.config, "max_position_embeddings", None))}  # fmt: skip
    if not limits:
        return []
    role, ctx = min(limits.items(), key=lambda kv: kv[1])
    longest, asked = max(len(p) for p in ids), cfg.rollout.max_new_tokens
    if longest + asked <= ctx:
        return []
    path = cfg.student.path if role == "student" else cfg.teacher.path
    if longest >= ctx:
        where = records[max(range(len(ids)), key=lambda i: len(ids[i]))].source
        raise ConfigError(
            f"{where}: prompt is {longest} tokens, which fills the {role}'s context ({ctx} tokens, "
            f"max_position_embeddings of {path}), so no response token fits; shorten or drop the long prompts "
            f"(data.max_prompt_tokens={ctx - 1} or lower names each), or use a longer-context model"
        )
    return [{"setting": "rollout.max_new_tokens", "asked": asked, "used": ctx - longest,
             "why": f"more than the {role}'s context ({ctx} tokens, {path}) leaves after the longest prompt "
                    f"({longest} tokens)"}]  # fmt: skip


def _build_update(cfg: TrainConfig, acc: Any, student: torch.nn.Module, total_steps: int) -> tuple[Any, ...]:
    """The student as it trains: activation checkpointing, FSDP2 or DDP, AdamW, the lr schedule, and the
    optional optimizer-in-backward hooks. Returns (student, optimizer, scheduler, in_backward)."""
    if cfg.student.gradient_checkpointing:  # before sharding renames the layer classes
        from opd.train.memory import enable_activation_checkpointing

        enable_activation_checkpointing(student)
    if cfg.sharding == "fsdp":
        from opd.train.sharding import shard_model

        student = shard_model(student, acc.device, acc.num_processes, autocast=cfg.student.autocast)
    else:  # on the device before AdamW is built (prepare() would move it anyway): fused AdamW needs it there
        student = student.to(acc.device)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, cfg.optim, total_steps)
    # The scheduler is deliberately not passed to prepare(): accelerate would step it once per process.
    if cfg.sharding != "fsdp":  # FSDP2 already distributes it: accelerate would wrap it in DDP on top
        student, optimizer = acc.prepare(student, optimizer)
    student.eval()  # dropout off: the loss is taken under the policy that sampled
    in_backward = (install_step_in_backward(acc.unwrap_model(student), optimizer, acc.num_processes)
                   if cfg.optim.in_backward else None)  # fmt: skip
    return student, optimizer, scheduler, in_backward


def student_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The student's LM head as one ``[V, H]`` weight (and bias) in the graph of the trained parameters (tied,
    LoRA'd or FSDP-sharded heads included: `opd.generation.scoring.head_weights`)."""
    try:
        return head_weights(model)
    except ValueError as exc:
        raise ConfigError(f"loss.from_hidden_states: {exc}; or set loss.from_hidden_states false") from None


def _check_finite(cfg: TrainConfig, student: torch.nn.Module, teacher: torch.nn.Module | None) -> None:
    """Refuse a student or HF teacher whose logits on a short probe hold NaN/inf, naming the model and its
    non-finite weights (a remote teacher's scores are checked every step instead)."""
    models = [("student", student, cfg.student)]
    if teacher is not None:
        models.append(("teacher", teacher, cfg.teacher))
    for role, model, mc in models:
        try:
            check_finite_probe(model)
        except NonFiniteOutputError as exc:
            half = (f"load it in float32 (--{role}.dtype float32; {mc.dtype} may overflow), or "
                    if mc.dtype in ("bfloat16", "float16") else "")  # fmt: skip
            raise ModelError(
                f"{role} {mc.path}: {exc}; {half}check the checkpoint (re-download or re-convert it)"
            ) from None


def check_heads(student: torch.nn.Module, teacher: torch.nn.Module | None) -> None:
    """`loss.from_hidden_states` projects with the heads' weights itself: the student's and an HF teacher's
    logits must be exactly that projection (no soft-capping or scaling after the head)."""
    models = [("student", student, lambda: student_head(student))]
    if teacher is not None:
        models.append(("teacher", teacher, lambda: frozen_head(teacher)))
    for role, model, head in models:
        try:
            check_head_projection(model, *head())
        except ValueError as exc:
            raise ConfigError(
                f"loss.from_hidden_states ({role}): {exc}; set loss.from_hidden_states false"
            ) from None
