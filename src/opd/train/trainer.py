"""The OPD loop: student rollouts, teacher scores at student-visited states, the objective, one step.

Built on accelerate so the same code runs in one process or data-parallel under torchrun /
`accelerate launch`. Three invariants carry the design:

- The loss is a token mean over ALL response tokens of the step, across micro-batches and processes:
  each micro-batch contributes sum(per-token loss) * world_size / global_token_count, so gradient
  accumulation and the number of processes do not change the gradient (TRL #4719).
- Rollout sampling is seeded by (seed, step, position of the prompt chunk in the global batch), so the
  same global batch gives the same rollouts on 1 or N processes and after a resume.
- One optimizer step per batch of rollouts: the policy that sampled is the policy being scored, so the
  student's "old" log-probs are the detached values of the training forward itself (PPO ratio 1). The
  student is scored with dropout off for the same reason.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from opd.config import TrainConfig, dump_config
from opd.data import TRAIN_OPTIONS, PromptCursor, load_prompts, prepare_prompts, prompt_columns
from opd.device import clock, host, place, reduce_sum
from opd.diagnostics import StepStats, StepStatsSettings, finalize
from opd.errors import ConfigError, ModelError, StorageError
from opd.files import atomic_write_text, json_safe
from opd.generation.build import build_generator, generator_dtype_settings, rollouts_run_the_student
from opd.generation.rollout import Rollout, SamplingParams, chunk_seed, plan_step_micro_batches
from opd.generation.sampling import stop_ids_for
from opd.generation.scoring import (
    NonFiniteOutputError,
    check_finite_probe,
    check_head_projection,
    frozen_head,
    head_weights,
    response_hidden_states,
    response_logits,
)
from opd.models.loading import Pair, load_pair
from opd.objectives.objective import Objective, hidden_loss_sum, logits_loss, nonfinite_target_positions
from opd.objectives.token import chunk_rows
from opd.precision import check_dtypes
from opd.teachers.build import build_teacher, loads_teacher_weights, teacher_dtype_settings
from opd.teachers.contract import StepTargets, Teacher, as_teacher
from opd.teachers.http import TeacherUnavailableError
from opd.train import checkpoint as ckpt
from opd.train.alarms import Alarm, CheckpointJudge, CollapseError, CollapseMonitor
from opd.train.loop import (
    NonFiniteLossError,
    apply_dist_timeout,
    build_optimizer,
    check_launch,
    grad_norm,
    lock_run_dir,
    open_metrics,
    refuse_to_overwrite,
    release_distributed,
    resumable_checkpoint,
    run_steps,
    unlock_run_dir,
    write_final_model,
)
from opd.train.memory import install_step_in_backward
from opd.train.tracking import write_run_files


def rollout_length_stats(rollouts: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor]:
    """Response lengths and truncation flags of every row, as host float64 (step statistics)."""
    lengths = torch.cat([host(r.lengths) for r in rollouts])
    return lengths, torch.cat([host(r.truncated) for r in rollouts])


@dataclass
class _Accumulated:
    """What phase 3 (loss/backward) of a step hands to phase 4: this process's loss sum and metric
    accumulators on the compute device, the step's global token count, and the HF teacher's time."""

    loss_sum: torch.Tensor
    stats: StepStats
    global_tokens: int
    t_teacher: float = 0.0
    # response positions where the teacher's scores hold NaN/inf: read only when the step is non-finite,
    # to say whether the NaN came from the teacher (a device counter, so no host sync per micro-batch)
    teacher_nonfinite: torch.Tensor | None = None


@dataclass
class StepResult:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)


class OPDTrainer:
    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        accelerator: Accelerator | None = None,
        log: Any = None,
    ):
        cfg.require_paths()
        self.cfg = cfg
        self.resume = resume
        # Without a GPU, accelerate only joins a torchrun process group when told it runs on CPU (gloo).
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.log = log or (lambda msg: self.acc.print(msg))
        self.run_dir = Path(cfg.run_dir)
        self.start_step = 0
        # Collapse alarms, and which checkpoint they leave good (opd.train.alarms)
        self.monitor = CollapseMonitor(cfg.alarms)
        self.checkpoints = CheckpointJudge(cfg.keep_checkpoints)
        self._checkpoint_deferred = False
        self._cursor_before_step: dict[str, Any] | None = None  # rewound when the teacher went down mid-step
        self._eval: Any = None  # the in-loop evaluator (eval.every), made by `train`
        self._alarming = self._declared = False  # the last step's alarm state, read by `checkpoint_due`

    @property
    def last_checkpoint(self) -> Path | None:
        return self.checkpoints.last

    @property
    def last_good_checkpoint(self) -> Path | None:
        return self.checkpoints.good

    @property
    def teacher(self) -> Teacher:
        """The run's teacher, behind `opd.teachers.contract`."""
        return self._teacher

    @teacher.setter
    def teacher(self, value: Any) -> None:
        # any scorer may be set (a notebook's or test's bare `score_topk` object too): kept to the contract
        self._teacher = as_teacher(value, vocab_size=self.vocab_size, device=self.acc.device)

    # ------------------------------------------------------------------------------------------------
    # set-up

    def _warn(self, msg: str) -> None:
        self.log(f"[yellow]warning:[/] {msg}")

    def _check_precision(self) -> None:
        """Refuse (or warn about) a chosen dtype this device runs far slower than float32, before any
        model loads: bf16 autocast on a CPU without bf16 instructions turned one step into 15 minutes."""
        cfg = self.cfg
        choices = {"student.autocast": cfg.student.autocast, "student.dtype": cfg.student.dtype,
                   **teacher_dtype_settings(cfg.teacher), **generator_dtype_settings(cfg.rollout)}  # fmt: skip
        check_dtypes(self.acc.device, choices, policy=cfg.precision_check, log=self._warn)

    def _adjusted_settings(self) -> list[dict[str, Any]]:
        """Settings this run uses with another value than the config asks, each with why.

        The objectives clamp a top-k to the vocabulary so tiny vocabularies work; done silently, a run
        asked for `--loss.k 500` on a 103-token vocabulary would report results of a setting nobody chose.
        Each one is logged as a warning and written to run_dir/adjustments.json by `setup`."""
        cfg, vocab = self.cfg, self.vocab_size
        asked = {"diagnostics.k": cfg.diagnostics.k}
        if cfg.loss.signal == "topk":  # the only signal whose loss takes a top-k
            asked = {"loss.k": cfg.loss.k, **asked}
        return [
            {"setting": name, "asked": value, "used": vocab,
             "why": f"larger than the shared vocabulary of student and teacher ({vocab} tokens)"}
            for name, value in asked.items()
            if value > vocab
        ]  # fmt: skip

    def setup(self) -> None:
        """Build the run's parts in dependency order, each once: checks (the prompt and eval files read
        and checked before any model loads) -> student/teacher pair -> prompts -> settings adjusted to the
        models (adjustments.json) -> the student's update (memory levers, sharding, optimizer, schedule) -> teacher ->
        generator -> resume state -> run files and metrics."""
        self._check_run()
        pair = self._load_pair()
        self._load_prompts()
        self._adjust_settings(pair)
        self._build_update(pair.student)
        self.teacher = self._build_teacher(pair.teacher)
        self._check_finite(
            self.teacher.model
        )  # a NaN model is named as such, before the head probe judges it
        if self.cfg.loss.from_hidden_states:  # refuse a head head_loss cannot take, before any step
            self._check_heads(self.teacher.model)
        self._build_generator()
        resume_step = self._restore() if self.resume else None
        self._open_run_files(resume_step)

    def _check_run(self) -> None:
        """What must hold before anything is loaded: the launch, dtypes, process count, an empty run_dir."""
        cfg, world = self.cfg, self.acc.num_processes
        check_launch(self.acc)
        self._check_precision()
        if cfg.prompts_per_step % world:
            raise ConfigError(
                f"prompts_per_step={cfg.prompts_per_step} must be divisible by the number of processes ({world})"
            )
        self._read_inputs()  # before the run directory is made: a bad file leaves nothing behind
        if self.acc.is_main_process:  # one trainer per run directory; released when train() ends
            self._run_lock = lock_run_dir(self.run_dir, "opd train")
        if not self.resume:
            refuse_to_overwrite(self.run_dir, "opd train")
        set_seed(cfg.seed)

    def _read_inputs(self) -> None:
        """Read and check the prompt file and the in-loop eval file before any model loads: a JSON error
        on line 37 or an eval problem without an answer used to surface after both models had loaded."""
        from opd.evaluation.eval import check_answers

        data, ec = self.cfg.data, self.cfg.eval
        columns = prompt_columns(data)
        self.records = load_prompts(data.prompts, **columns)
        if ec.prompts and ec.every > 0:  # the same records `InLoopEvaluator` will evaluate
            options = {**TRAIN_OPTIONS, "prompts": "eval.prompts"}
            check_answers(load_prompts(ec.prompts, **columns, options=options)[: ec.max_problems])

    def _load_pair(self) -> Pair:
        """Tokenizers and models (no teacher weights for a vLLM/HTTP teacher), the shared vocabulary, and
        the warnings about settings the run will not use as given."""
        cfg, tc = self.cfg, self.cfg.teacher
        pair = load_pair(
            cfg.student.path, tc.path or None, student_dtype=cfg.student.dtype, teacher_dtype=tc.dtype,
            student_trust_remote_code=cfg.student.trust_remote_code,
            teacher_trust_remote_code=tc.trust_remote_code, teacher_model=loads_teacher_weights(tc),
        )  # fmt: skip
        self.tokenizer, self.teacher_tokenizer = pair.tokenizers.student, pair.tokenizers.teacher
        self.tokenizer_notes, self.tokenizer_report = pair.tokenizers.notes, pair.tokenizers.report
        self.vocab_size = pair.vocab_size
        self.chunk_rows = chunk_rows(self.vocab_size, cfg.loss.chunk_size, cfg.loss.chunk_max_elements)
        if cfg.student.dtype in ("bfloat16", "float16"):
            self.log(
                f"[yellow]warning:[/] student.dtype={cfg.student.dtype}: low-precision master weights can "
                f"swallow lr={cfg.optim.lr:g} updates entirely; the paper trains fp32 master weights"
            )
        ro = cfg.rollout
        if ro.top_p < 1.0 or ro.top_k > 0 or ro.temperature != 1.0:
            self.log(
                f"[yellow]warning:[/] rollouts sample with temperature={ro.temperature}, top_p={ro.top_p}, "
                f"top_k={ro.top_k}, but the loss scores them under the untempered student policy: the samples "
                "are off-policy and the sampled-token estimator is biased (set all three to 1.0 / 1.0 / 0 "
                "for the unbiased on-policy objective)"
            )
        if cfg.student.lora.enabled:
            pair.student = self._wrap_lora(pair.student)
        return pair

    def _load_prompts(self) -> None:
        """Render and encode every prompt (read by `_read_inputs`) up front, so a bad record fails before
        any compute."""
        cfg, data, records = self.cfg, self.cfg.data, self.records
        self.prompt_texts, self.prompt_ids = prepare_prompts(
            records, self.tokenizer, template=data.template, chat_template_kwargs=data.chat_template_kwargs,
            system_prompt=data.system_prompt, max_prompt_tokens=data.max_prompt_tokens,
        )  # fmt: skip
        self.cursor = PromptCursor(len(records), seed=cfg.seed, shuffle=data.shuffle)
        self.total_steps = cfg.steps or math.ceil(len(records) / cfg.prompts_per_step)

    def _adjust_settings(self, pair: Pair) -> None:
        """Settings this run uses with another value than asked (`_adjusted_settings`), each logged as a
        warning; `setup` writes them to run_dir/adjustments.json."""
        self.adjustments = self._adjusted_settings() + self._context_adjustments(pair)
        self.max_new_tokens = next(
            (a["used"] for a in self.adjustments if a["setting"] == "rollout.max_new_tokens"),
            self.cfg.rollout.max_new_tokens,
        )
        lc, dc = self.cfg.loss, self.cfg.diagnostics
        # the loss and the step statistics with the settings as used (vocabulary, context)
        self.objective = Objective(
            signal=lc.signal, divergence=lc.divergence, k=lc.k, support=lc.support, renorm=lc.renorm, beta=lc.beta,
            vocab_size=self.vocab_size, chunk_rows=self.chunk_rows, chunk_size=lc.chunk_size,
            chunk_max_elements=lc.chunk_max_elements,
        )  # fmt: skip
        self.stats_settings = StepStatsSettings(
            vocab_size=self.vocab_size, diagnostics_k=dc.k, position_bins=dc.position_bins, bin_len=self.max_new_tokens,
            signal=lc.signal, loss_k=lc.k, support=lc.support, chunk_rows=self.chunk_rows,
        )  # fmt: skip
        for adj in self.adjustments:
            self.log(
                f"[yellow]warning:[/] {adj['setting']}={adj['asked']} is {adj['why']}: using "
                f"{adj['setting']}={adj['used']} (recorded in {self.run_dir / 'adjustments.json'})"
            )

    def _context_adjustments(self, pair: Pair) -> list[dict[str, Any]]:
        """rollout.max_new_tokens clamped to what the smallest context (student's, HF teacher's) leaves
        after the longest prompt; an error when that prompt alone fills it.

        Why: past `max_position_embeddings` a model reads positions it was never trained on (or its
        rotary cache runs out), and a run that asks for 4K new tokens on a 2K-context model trained
        without a word. Clamping keeps every rollout inside both contexts; servers and engines are checked
        against their own `max_model_len` by `_max_model_len`."""
        limits = {role: int(n) for role, m in (("student", pair.student), ("teacher", pair.teacher))
                  if m is not None and (n := getattr(m.config, "max_position_embeddings", None))}  # fmt: skip
        if not limits:
            return []
        role, ctx = min(limits.items(), key=lambda kv: kv[1])
        longest, asked = max(len(p) for p in self.prompt_ids), self.cfg.rollout.max_new_tokens
        if longest + asked <= ctx:
            return []
        path = self.cfg.student.path if role == "student" else self.cfg.teacher.path
        if longest >= ctx:
            where = self.records[
                max(range(len(self.prompt_ids)), key=lambda i: len(self.prompt_ids[i]))
            ].source
            raise ConfigError(
                f"{where}: prompt is {longest} tokens, which fills the {role}'s context ({ctx} tokens, "
                f"max_position_embeddings of {path}), so no response token fits; shorten or drop the long "
                f"prompts (data.max_prompt_tokens={ctx - 1} or lower names each), or use a longer-context model"
            )
        return [{"setting": "rollout.max_new_tokens", "asked": asked, "used": ctx - longest,
                 "why": f"more than the {role}'s context ({ctx} tokens, {path}) leaves after the longest "
                        f"prompt ({longest} tokens)"}]  # fmt: skip

    def _build_update(self, student: torch.nn.Module) -> None:
        """The student as it trains: activation checkpointing, FSDP2 or DDP, AdamW, the lr schedule, and
        the optional optimizer-in-backward hooks."""
        cfg, acc, optim = self.cfg, self.acc, self.cfg.optim
        self.sharded = cfg.sharding == "fsdp"
        self._architecture = type(student).__name__
        if cfg.student.gradient_checkpointing:  # before sharding renames the layer classes
            from opd.train.memory import enable_activation_checkpointing

            enable_activation_checkpointing(student)
        if self.sharded:
            from opd.train.sharding import shard_model

            student = shard_model(student, acc.device, acc.num_processes)
        params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(params, optim, self.total_steps)
        # The scheduler is deliberately not passed to prepare(): accelerate would step it once per process.
        if self.sharded:  # already distributed by FSDP2: accelerate would wrap it in DDP on top
            self.student = student
        else:
            self.student, self.optimizer = acc.prepare(student, self.optimizer)
        self.student.eval()  # dropout off: the loss is taken under the policy that sampled
        self._in_backward = (
            install_step_in_backward(self._unwrapped(), self.optimizer, acc.num_processes)
            if optim.in_backward
            else None
        )

    def _build_generator(self) -> None:
        """Rollouts from the model being trained: HF generate on it, or a colocated vLLM engine."""
        cfg = self.cfg
        self.stop_ids = stop_ids_for(self.tokenizer, self._unwrapped(), cfg.rollout.stop_token_ids)
        self.generator = build_generator(
            cfg.rollout, model=self._unwrapped(), pad_id=self.tokenizer.pad_token_id, stop_ids=self.stop_ids,
            synced=self.sharded, student_path=cfg.student.path, lora=cfg.student.lora.enabled, seed=cfg.seed,
            context=self._max_model_len,
        )  # fmt: skip
        ro = cfg.rollout
        self.sampling = SamplingParams(
            temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k, max_new_tokens=self.max_new_tokens
        )

    def _restore(self) -> int:
        """Weights, optimizer, schedule, data cursor and alarm baselines from the newest whole checkpoint;
        returns its step."""
        latest = resumable_checkpoint(self.run_dir, self.log)
        state = ckpt.load_checkpoint(
            latest, model=self._unwrapped(), optimizer=self.optimizer, scheduler=self.scheduler,
            sharded=self.sharded,
        )  # fmt: skip
        self.start_step = int(state["step"])
        self.cursor.load_state_dict(state["cursor"])
        if "alarms" in state:  # older checkpoints have none: the baselines are learnt again
            self.monitor.load_state_dict(state["alarms"])
        good = state.get("last_good_checkpoint")
        self.checkpoints.resumed(latest, ckpt.checkpoint_dir(self.run_dir) / good if good else None)
        self.log(f"resumed from {latest} at step {self.start_step}")
        if hasattr(self.generator, "sync"):  # an engine loaded the base weights; give it the checkpoint's
            self.generator.sync(self._unwrapped())
        return self.start_step

    def _open_run_files(self, resume_step: int | None) -> None:
        """config.yaml, adjustments.json, samples.jsonl cut back to the resumed step (`write_run_files`), and
        the metrics sink."""
        cfg, main, adjusted = self.cfg, self.acc.is_main_process, self.adjustments
        if main:
            write_run_files(self.run_dir, dump_config(cfg), adjusted, resume_step)
        config = {**cfg.model_dump(mode="json"), **({"adjustments": adjusted} if adjusted else {})}
        self.metrics = open_metrics(
            self.run_dir, cfg.tracking, main=main, config=config, resume_step=resume_step
        )

    def _max_model_len(self, setting: int | None, what: str, scoring: bool = False) -> int:
        """The engine context a run needs; a scoring engine also generates its 1 required token."""
        longest = max(len(p) for p in self.prompt_ids)
        need = longest + self.max_new_tokens + int(scoring)
        if setting is not None and need > setting:
            raise ConfigError(
                f"{what} {setting} < longest prompt ({longest}) + rollout.max_new_tokens "
                f"({self.max_new_tokens}){' + 1' if scoring else ''}; raise it or leave it unset"
            )
        return setting or need

    def _build_teacher(self, model: torch.nn.Module | None) -> Any:
        """The teacher the config asks for (`opd.teachers.build`), behind `opd.teachers.contract`."""
        cfg = self.cfg
        return build_teacher(
            cfg.teacher, model=model, device=self.acc.device, vocab_size=self.vocab_size,
            hidden_states=cfg.loss.from_hidden_states, seed=cfg.seed,
            context=lambda setting, what: self._max_model_len(setting, what, scoring=True),
            tokenizer=self.tokenizer, probe_texts=[self.prompt_texts[0], " 12 + 30 = 42\n"], log=self.log,
        )  # fmt: skip

    @torch.no_grad()
    def teacher_fidelity(self, n_prompts: int = 2, max_new_tokens: int = 32) -> dict[str, float] | None:
        """Engine teacher vs the HF model at teacher.path on a few student rollouts (scored on the main
        process; every process samples, since a sharded student needs them all).

        Scores twice with the engine (determinism) and once with transformers in teacher.dtype, and writes
        ``teacher_fidelity.json`` to the run directory; warns above `FIDELITY_WARN_MEAN`. Returns None
        for an HF teacher, with the check off, or without a local teacher.path.
        """
        from opd.evaluation.checks import engine_fidelity, self_test_rollout
        from opd.objectives.topk import FIDELITY_WARN_MEAN

        tc = self.cfg.teacher
        if not self.teacher.scored_by_engine or not tc.fidelity_check:
            return None
        result = None
        if not tc.path:
            self.log("teacher fidelity check skipped: set teacher.path to a local copy of the served model")
        else:  # every process samples the same rollouts: a sharded student needs them all for a forward
            roll = self_test_rollout(
                self._unwrapped(), self.prompt_ids[:n_prompts], pad_id=self.tokenizer.pad_token_id,
                stop_ids=self.stop_ids, max_new_tokens=min(max_new_tokens, self.max_new_tokens),
                seed=self.cfg.seed,
            )  # fmt: skip
        if self.acc.is_main_process and tc.path:
            result = engine_fidelity(
                self.teacher, place(roll, self.acc.device), vocab_size=self.vocab_size, reference=tc.path,
                dtype=tc.dtype, trust_remote_code=tc.trust_remote_code,
            )  # fmt: skip
            atomic_write_text(
                self.run_dir / "teacher_fidelity.json",
                json.dumps(json_safe(result), indent=1, allow_nan=False),
            )
            line = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k != "ok")
            if result["ok"]:
                self.log(f"[green]ok[/] teacher fidelity ({tc.backend} vs HF {tc.dtype}): {line}")
            else:
                self.log(
                    f"[yellow]warning:[/] teacher fidelity ({tc.backend} vs HF {tc.dtype}): {line}; a mean "
                    f"|Δ log-prob| above {FIDELITY_WARN_MEAN} or non-deterministic scores mean the engine "
                    "is not grading with the teacher you think (dtype, quantisation, model revision)"
                )
        self.acc.wait_for_everyone()
        return result

    def _wrap_lora(self, model: torch.nn.Module) -> torch.nn.Module:
        try:
            from peft import LoraConfig as PeftLora
            from peft import get_peft_model
        except ImportError as exc:  # pragma: no cover - peft is a dependency
            raise ConfigError("student.lora.enabled needs peft: pip install peft") from exc
        lc = self.cfg.student.lora
        peft_cfg = PeftLora(
            r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules
        )
        return get_peft_model(model, peft_cfg)

    def _autocast(self, rollouts: bool = False) -> Any:
        """Mixed precision for the student (`student.autocast`): the same compute dtype for its HF rollouts
        and its training forward, so the policy that samples is the policy that is scored. A vLLM engine
        samples in its own dtype (rollout.vllm_dtype; the engine_logprob_delta metrics show the gap)."""
        dtype = self.cfg.student.autocast
        if dtype == "none" or (rollouts and not rollouts_run_the_student(self.cfg.rollout)):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.acc.device.type, dtype=getattr(torch, dtype))

    def _unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.student)

    # ------------------------------------------------------------------------------------------------
    # one step

    def _rollouts(self, step: int, indices: list[int]) -> list[Rollout]:
        """This process's share of the step's prompts, generated in seeded chunks."""
        acc, cfg = self.acc, self.cfg
        per = len(indices) // acc.num_processes
        offset = acc.process_index * per
        mine = indices[offset : offset + per]
        out = []
        bs = cfg.rollout.batch_size
        for c in range(0, len(mine), bs):
            chunk = mine[c : c + bs]
            seed = chunk_seed(cfg.seed, step, offset + c)
            with self._autocast(rollouts=True):
                roll = self.generator.generate(
                    [self.prompt_ids[i] for i in chunk],
                    self.sampling,
                    cfg.rollout.rollouts_per_prompt,
                    seed,
                    chunk,
                )
            out.append(place(roll, acc.device))  # the device contract: rollouts live on the compute device
        return out

    def _score(self, rollouts: list[Rollout]) -> StepTargets:
        """The teacher's targets for the step; a teacher that fails on any process (a server down) fails
        them all at the same point, so no rank is left waiting in a collective."""
        error: TeacherUnavailableError | None = None
        targets: Any = None
        try:
            targets = self.teacher.score_step(rollouts)
        except TeacherUnavailableError as exc:
            error = exc
        failed = self._reduce(torch.tensor(float(error is not None), dtype=torch.float64))
        if float(failed) > 0:
            raise error or TeacherUnavailableError("the teacher server failed on another process")
        return targets

    def _student_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The student's LM head as one ``[V, H]`` weight (and bias) in the graph of the trained parameters
        (tied, LoRA'd or FSDP-sharded heads included: `opd.generation.scoring.head_weights`)."""
        try:
            return head_weights(self._unwrapped())
        except ValueError as exc:
            raise ConfigError(
                f"loss.from_hidden_states: {exc}; or set loss.from_hidden_states false"
            ) from None

    def _check_finite(self, teacher: torch.nn.Module | None) -> None:
        """Refuse a student or HF teacher whose logits on a short probe hold NaN/inf, naming the model and
        its non-finite weights (a remote teacher's scores are checked every step instead)."""
        cfg = self.cfg
        models = [("student", self._unwrapped(), cfg.student)]
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

    def _check_heads(self, teacher: torch.nn.Module | None) -> None:
        """`loss.from_hidden_states` projects with the heads' weights itself: the student's and an HF
        teacher's logits must be exactly that projection (no soft-capping or scaling after the head)."""
        models = [("student", self._unwrapped(), self._student_head)]
        if teacher is not None:
            models.append(("teacher", teacher, lambda: frozen_head(teacher)))
        for role, model, head in models:
            try:
                check_head_projection(model, *head())
            except ValueError as exc:
                raise ConfigError(
                    f"loss.from_hidden_states ({role}): {exc}; set loss.from_hidden_states false"
                ) from None

    def _micro_batch_loss(self, mb: Rollout, target: Any, stats: StepStats) -> torch.Tensor:
        """The micro-batch's summed per-token loss (0-dim, with gradient); its metrics go into `stats`.

        `loss.from_hidden_states` (default): the student's hidden states and head, projected one chunk of
        response rows at a time inside the loss, metrics from the same chunks. Otherwise the plain path:
        `[B, T, V]` logits, `opd.objectives.token` on them, metrics walked over the detached logits."""
        mask, tokens = mb.response_mask, mb.response_ids
        if self.cfg.loss.from_hidden_states:
            with self._autocast():
                h = response_hidden_states(self.student, mb)
            w, b = self._student_head()
            ac = (
                self.cfg.student.autocast
            )  # the projection runs in the autocast dtype, as the model's head would
            return hidden_loss_sum(h, w, b, target, tokens, mask, self.objective, on_chunk=stats.start(mb, target),
                                   project_dtype=None if ac == "none" else getattr(torch, ac))  # fmt: skip
        with self._autocast():
            s_logits = response_logits(self.student, mb)
        loss = logits_loss(s_logits, target, tokens, mask, self.objective).sum()
        with torch.no_grad():
            stats.add_logits(mb, s_logits.detach(), target)
        return loss

    def _micro_batches(self, rollouts: list[Rollout]) -> list[tuple[int, Any, Rollout]]:
        """The step's micro-batches as (rollout chunk, its rows, the rows as a Rollout): at most `micro_batch_size` sequences and, with `micro_batch_tokens`, at
        most that many padded tokens each (similar lengths grouped). Every process runs the same number of
        micro-batches (FSDP reduce-scatters on every backward), so the count is agreed across processes."""
        cfg = self.cfg
        kw = dict(max_sequences=cfg.micro_batch_size, max_tokens=cfg.micro_batch_tokens)
        plans = plan_step_micro_batches(rollouts, **kw)
        if self.acc.num_processes > 1 and cfg.micro_batch_tokens is not None:
            most = int(
                self._gather_max_row(torch.tensor([float(sum(map(len, plans)))], dtype=torch.float64))[0]
            )
            plans = plan_step_micro_batches(rollouts, **kw, min_groups=most)
        return [
            (j, g, r.select(g))
            for j, (r, groups) in enumerate(zip(rollouts, plans, strict=True))
            for g in groups
        ]

    def _reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return reduce_sum(self.acc, t, op)

    def _gather_max_row(self, row: torch.Tensor) -> torch.Tensor:
        """The host row (of every process's) with the largest first entry."""
        row = host(row)
        if self.acc.num_processes == 1:
            return row
        gathered = host(self.acc.gather(row.to(self.acc.device).unsqueeze(0)))
        return gathered[int(gathered[:, 0].argmax())]

    def train_step(self, step: int) -> StepResult:
        """Step `step` (1-based) as its phases: collect rollouts -> score -> loss/backward -> update ->
        metrics.

        Device contract (opd.device): rollouts and teacher scores arrive on the compute device, losses and
        diagnostic sums stay there, step statistics come back to the host through `_reduce`/`host`, and
        every phase boundary is a synchronized `clock`.
        """
        device = self.acc.device
        t0 = clock(device)
        # 1. collect: the student's own rollouts on this step's prompts
        self._cursor_before_step = self.cursor.state_dict()
        rollouts = self._rollouts(step, self.cursor.next_indices(self.cfg.prompts_per_step))
        t_rollout = clock(device) - t0
        # 2. score: the teacher's targets at the student's states (an engine or server scores the whole step
        # now, before any gradient exists, so a failure loses nothing; an HF teacher scores each micro-batch
        # in phase 3 when asked: opd.teachers.contract)
        targets = self._score(rollouts)
        t_score = clock(device) - t0 - t_rollout
        # 3. loss and backward, micro-batch by micro-batch, normalised by the step's global token count
        t_update0 = clock(device)
        acc = self._loss_and_backward(step, rollouts, targets)
        # 4. update: gradient norm, exact cross-process sums, refuse a non-finite step, optimizer step
        grad_norm = self._grad_norm(step, acc.loss_sum)
        totals = self._reduce_step(rollouts, acc)
        self._update(step, totals["loss"], grad_norm, acc)
        t_sync = self.generator.sync(self._unwrapped()) if hasattr(self.generator, "sync") else None
        t_end = clock(device)
        # 5. metrics (every process holds the same values) and one decoded sample
        times = {
            "step_time_s": t_end - t0,
            "time_rollout_s": t_rollout,
            "time_teacher_s": acc.t_teacher + t_score,
            "time_update_s": t_end - t_update0 - acc.t_teacher - (t_sync or 0.0),
        }
        metrics = self._step_metrics(totals, grad_norm, times, acc, t_sync)
        return StepResult(step, metrics, self._samples(step, rollouts))

    def _loss_and_backward(self, step: int, rollouts: list[Rollout], targets: StepTargets) -> _Accumulated:
        """Phase 3. Gradients are synchronised across processes on the last micro-batch only; with
        `optim.in_backward` the weights step inside backward, so a non-finite loss is refused before it."""
        acc, device = self.acc, self.acc.device
        local_tokens = sum(int(r.response_mask.sum()) for r in rollouts)
        global_tokens = int(self._reduce(torch.tensor(float(local_tokens), dtype=torch.float64)).item())
        micro = self._micro_batches(rollouts)
        if self._in_backward is not None and len(micro) > 1:  # the config check should make this unreachable
            raise ConfigError(f"optim.in_backward needs one micro-batch per step; this step has {len(micro)}")
        # Accumulators of the step: on the compute device (no host round trip per micro-batch), float64.
        out = _Accumulated(torch.zeros((), dtype=torch.float64, device=device), StepStats(self.stats_settings, device),
                           global_tokens, teacher_nonfinite=torch.zeros((), dtype=torch.float64, device=device))  # fmt: skip
        scale = acc.num_processes / max(global_tokens, 1)
        for i, (chunk, rows, mb) in enumerate(micro):
            ts = clock(device)
            target = targets.target(chunk, rows, mb)
            out.t_teacher += clock(device) - ts
            out.teacher_nonfinite += nonfinite_target_positions(target, mb.response_mask, self.vocab_size)
            sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(self.student)
            with sync:
                loss_mb = self._micro_batch_loss(mb, target, out.stats)
                objective = loss_mb * scale
                ib = self._in_backward
                if ib is not None:  # backward will step the weights: refuse a bad loss before it starts
                    if not math.isfinite(float(objective.detach())):
                        raise NonFiniteLossError(
                            f"non-finite loss at step {step}{self._nonfinite_cause(out, reduce=False)}; no "
                            "parameter was stepped",
                            {"loss": math.nan, "grad_norm": math.nan},
                        )
                    ib.arm()
                try:
                    acc.backward(objective)
                finally:
                    if ib is not None:
                        ib.armed = False
            out.loss_sum += loss_mb.detach().double()
            del target, loss_mb, objective
        return out

    def _grad_norm(self, step: int, loss_sum: torch.Tensor) -> float:
        """The pre-clip global gradient norm (clipping on the way when `optim.max_grad_norm` is set).

        Four cases because the gradients live in four shapes: already consumed by `optim.in_backward`
        (its norm was summed in the hooks), FSDP DTensor shards (torch reduces across shards), plain
        tensors under accelerate (clip and norm in one call), or no clipping at all."""
        max_norm = self.cfg.optim.max_grad_norm
        params = [p for p in self.student.parameters() if p.requires_grad]
        ib = self._in_backward
        if ib is not None:  # already stepped inside backward; the norm was summed there
            if ib.bad is not None:
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"non-finite gradient in {ib.bad} at step {step} with optim.in_backward: "
                    f"{ib.stepped} parameter tensors had already been stepped, so the weights in memory "
                    "are damaged and training stops",
                    {"loss": float(loss_sum), "grad_norm": math.nan},
                    weights_damaged=True,
                )
            return math.sqrt(ib.norm_sq)
        if self.sharded:  # DTensor gradients: torch computes the global norm across the shards
            from opd.train.sharding import grad_norm_value

            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
            return grad_norm_value(norm)
        return grad_norm(self.acc, params, max_norm)

    def _reduce_step(self, rollouts: list[Rollout], acc: _Accumulated) -> dict[str, Any]:
        """Cross-process reductions: exact sums, then means on every rank (host float64 from here on)."""
        n_tok = max(acc.global_tokens, 1)
        stats = acc.stats
        sums = stats.sums
        keys = sorted(sums)
        if keys:
            vec = self._reduce(torch.stack([sums[k].double() for k in keys]))
            sums = {k: vec[j] for j, k in enumerate(keys)}
        lengths, trunc = rollout_length_stats(rollouts)
        len_stats = self._reduce(torch.stack([lengths.sum(), trunc.sum(), torch.tensor(float(len(lengths)))]))
        return {
            "loss": float(self._reduce(acc.loss_sum)) / n_tok,
            "reward_mean": float(self._reduce(torch.tensor(stats.reward_sum, dtype=torch.float64))) / n_tok,
            "sums": sums,
            "best_adv": self._gather_max_row(stats.best_adv),
            "len_stats": len_stats,
            "len_max": float(self._gather_max_row(lengths.max().reshape(1))[0]),
        }

    def _nonfinite_cause(self, acc: _Accumulated, *, reduce: bool = True) -> str:
        """Where a non-finite step came from: the teacher's scores (counted per micro-batch) or not.

        `reduce`: sum the count over processes (every process is on this path when the global loss is
        non-finite); False where only this process knows (optim.in_backward's per-micro-batch check)."""
        if acc.teacher_nonfinite is None:
            return ""
        count = acc.teacher_nonfinite.reshape(1)
        bad = int(self._reduce(count)[0]) if reduce else int(count[0])
        tc = self.cfg.teacher
        who = tc.path or ", ".join(tc.urls)
        if bad:
            return (
                f": the teacher's scores hold NaN/inf at {bad} of {acc.global_tokens} response positions of this "
                f"step, so the NaN comes from the teacher ({who}), not the student; {self.teacher.nonfinite_hint}"
            )
        return ": the teacher's scores are finite, so it arose in the student's loss or gradients"

    def _update(self, step: int, loss: float, grad_norm: float, acc: _Accumulated | None = None) -> None:
        """Phase 4's step: refused (gradients dropped, weights untouched) when the loss or norm is not finite."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            cause = self._nonfinite_cause(acc) if acc is not None else ""
            raise NonFiniteLossError(
                f"non-finite loss ({loss}) or grad norm ({grad_norm}) at step {step}{cause}",
                {"loss": loss, "grad_norm": grad_norm},
            )
        if self._in_backward is None:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _step_metrics(self, totals: dict[str, Any], grad_norm: float, times: dict[str, float],
                      acc: _Accumulated, t_sync: float | None) -> dict[str, float]:  # fmt: skip
        len_stats, best_adv = totals["len_stats"], totals["best_adv"]
        n_seq = max(float(len_stats[2]), 1)
        metrics: dict[str, float] = {
            "loss": totals["loss"],
            "grad_norm": grad_norm,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "reward_mean": totals["reward_mean"],
            "kl_sampled": -totals["reward_mean"],
            "adv_max_abs": float(best_adv[0]),
            "p_minus_q_at_max_adv": float(best_adv[1]),
            "response_len_mean": float(len_stats[0]) / n_seq,
            "response_len_max": totals["len_max"],
            "truncation_rate": float(len_stats[1]) / n_seq,
            "response_tokens": float(acc.global_tokens),
            "tokens_per_s": acc.global_tokens / times["step_time_s"],
            **times,
            "epoch": float(self.cursor.state_dict()["epoch"]),
        }
        if t_sync is not None:
            metrics["time_weight_sync_s"] = t_sync
            drift = acc.stats.engine
            ed = self._reduce(torch.stack([drift.abs_sum, drift.count]))
            if float(ed[1]) > 0:
                metrics["engine_logprob_delta_mean"] = float(ed[0] / ed[1])
                metrics["engine_logprob_delta_max"] = float(
                    self._gather_max_row(host(drift.max.reshape(1)))[0]
                )
        metrics.update(finalize(totals["sums"]))
        return metrics

    def _samples(self, step: int, rollouts: list[Rollout]) -> list[dict[str, Any]]:
        """The main process's first rollout of the step, decoded, for RUN_DIR/samples.jsonl."""
        if not (self.acc.is_main_process and rollouts):
            return []
        r = rollouts[0]
        return [{
            "step": step,
            "prompt": self.prompt_texts[r.prompt_index[0]],
            "response": self.tokenizer.decode(r.response_ids[0][r.response_mask[0]]),
            "truncated": bool(r.truncated[0]),
        }]  # fmt: skip

    # ------------------------------------------------------------------------------------------------
    # the run

    def _raise_if_write_failed(self, error: StorageError | None) -> None:
        ckpt.raise_if_write_failed(self.acc, error)

    def save(self, step: int) -> Path | None:
        """Checkpoint `step` (opd.train.checkpoint); a refused write (disk full, ...) raises StorageError on every
        process, naming the path, the free space, the size needed and the checkpoint to resume from."""
        path = None
        model_state = optimizer_state = None
        if self.sharded:  # gathering the shards is collective: every process takes part
            from opd.train.sharding import full_model_state, full_optimizer_state

            model_state = full_model_state(self.student)
            optimizer_state = full_optimizer_state(self.student, self.optimizer)
        error = None
        if self.acc.is_main_process:
            try:
                path = ckpt.save_checkpoint(
                    self.run_dir, step, model=self._unwrapped(), optimizer=self.optimizer, scheduler=self.scheduler,
                    state={"cursor": self.cursor.state_dict(), "seed": self.cfg.seed, "total_steps": self.total_steps,
                           "alarms": self.monitor.state_dict(), "sharding": self.cfg.sharding,
                           "last_good_checkpoint": self.last_good_checkpoint.name if self.last_good_checkpoint else None},
                    keep=self.cfg.keep_checkpoints, model_state=model_state, optimizer_state=optimizer_state,
                )  # fmt: skip
            except StorageError as exc:
                hint = f"opd train --resume {self.run_dir}"
                error = StorageError(f"{exc}; free space, then resume with `{hint}`")
        self._raise_if_write_failed(error)
        path = path or ckpt.checkpoint_path(self.run_dir, step)
        self.checkpoints.saved(path)
        self.acc.wait_for_everyone()
        return path

    def save_final(self) -> Path | None:
        """The trained student as a Hugging Face model in RUN_DIR/final, swapped in only when complete; a
        refused write raises StorageError (the weights stay in the last checkpoint, a resume rewrites it)."""
        full = None
        if self.sharded:  # gathering the shards is collective: every process takes part
            from opd.train.sharding import full_model_state

            full = full_model_state(self.student)
        model = self._unwrapped()
        if self.acc.is_main_process and self.cfg.student.lora.enabled and self.cfg.student.lora.merge_on_save:
            import copy

            model = copy.deepcopy(model).merge_and_unload()

        def write(tmp: Path) -> None:
            if full is not None:
                from opd.train.sharding import restore_architecture

                model.save_pretrained(tmp, safe_serialization=True, state_dict=full)
                restore_architecture(tmp, self._architecture)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

        need = (
            ckpt.state_nbytes(full if full is not None else model.state_dict())
            if self.acc.is_main_process
            else 0
        )
        return write_final_model(self.acc, self.run_dir, write, need, self.last_checkpoint, "opd train")

    def _evaluator(self):
        """In-loop evaluation on held-out problems (the paper evaluates during training), or None."""
        ec = self.cfg.eval
        if not ec.prompts or ec.every <= 0:
            return None
        from opd.evaluation.eval import InLoopEvaluator

        return InLoopEvaluator(ec, self.cfg.data, self.tokenizer)

    def evaluate(self, evaluator: Any, step: int) -> dict[str, float]:
        """Run on the main process only (the others wait); logged at `step` with the training metrics."""
        metrics: dict[str, float] = {}
        if self.acc.is_main_process:
            metrics = evaluator.run(self._unwrapped())
            self.metrics.log(step, {"kind": "eval", **metrics})
            self.log("eval @ step {}: {}".format(step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())))
        self.acc.wait_for_everyone()
        return metrics

    def _teacher_down(self, step: int, exc: TeacherUnavailableError) -> TeacherUnavailableError:
        """The teacher failed during step `step`, before any update: make sure a resume redoes it.

        The weights are still those after step - 1 and only the prompt cursor moved, so rewind the cursor
        and checkpoint step - 1 (unless that checkpoint exists): `--resume` then replays step `step` with
        the same prompts and seeds, as if the failure never happened.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.cursor.load_state_dict(self._cursor_before_step)
        done = step - 1
        if done == 0:
            where = "no step was completed; rerun the same command once the teacher answers"
        else:
            saved = ckpt.checkpoint_path(self.run_dir, done)
            path = saved if self.last_checkpoint == saved else self.save(done)
            where = (
                f"checkpoint {path} holds step {done}; `opd train --resume {self.run_dir}` redoes step {step} "
                "once the teacher answers"
            )
        return TeacherUnavailableError(f"{exc}; step {step} was not taken, nothing was lost: {where}")

    # ------------------------------------------------------------------------------------------------
    # collapse alarms

    def _watch(self, step: int, metrics: dict[str, float]) -> tuple[bool, bool]:
        """Feed the collapse monitor one step; log its alarms; judge the checkpoint written before it.

        Returns (this step alarmed, a collapse was declared at this step). Every process runs the
        monitor on the same reduced metrics; the decisions are still taken from the main process
        (broadcast) so no rank can take another branch on a rounding difference.
        """
        alarms = self.monitor.update(step, metrics)
        alarming, declared = self.monitor.alarming, self.monitor.declared
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast

            flags = torch.tensor([float(alarming), float(declared)], device=self.acc.device)
            flags = broadcast(flags, from_process=0).cpu()
            alarming, declared = bool(flags[0]), bool(flags[1])
        for a in alarms:
            self._log_alarm(a)
        self.checkpoints.judge(alarming)  # the newest checkpoint's weights produced this step's rollouts
        return alarming, declared

    def _log_alarm(self, alarm: Alarm) -> None:
        row = alarm.to_dict()
        del row["step"]
        self.metrics.log(alarm.step, {"kind": "alarm", **row, "collapsed": self.monitor.collapsed})
        self.log(f"[yellow]alarm:[/] step {alarm.step} {alarm.signal}: {alarm.message}")

    def _collapse(self, step: int) -> None:
        """A collapse was declared at `step`: stop (CollapseError) or, without stop_on_collapse, say so."""
        outcome = self.checkpoints.collapse(self.monitor, step, stop=self.cfg.stop_on_collapse)
        if isinstance(outcome, CollapseError):
            raise outcome
        self.log(f"[red]collapse:[/] {outcome}")

    # ------------------------------------------------------------------------------------------------

    def train(self, on_step: Any = None) -> list[dict[str, float]]:
        """Run from start_step to total_steps (`opd.train.loop.run_steps`: signals, checkpoints, final
        model); returns the metrics of the steps run.

        Raises NonFiniteLossError on a non-finite step (``stop_on_nan``) and CollapseError when the
        collapse alarms declare a collapse (``stop_on_collapse``); neither writes a checkpoint of the
        damaged weights. Periodic checkpoints due on an alarming step are deferred to the next clean
        step, so rotation (``keep_checkpoints``) never evicts the last good one for a suspect one.
        """
        apply_dist_timeout(self.acc)
        self._eval = self._evaluator()
        try:
            if self._eval is not None and self.start_step == 0:
                self.evaluate(self._eval, 0)
            hint = f"opd train --resume {self.run_dir}"
            return run_steps(self, hint=hint, save_final=self.cfg.save_final, on_step=on_step)
        finally:
            self.metrics.close()
            unlock_run_dir(getattr(self, "_run_lock", None))

    def run_step(self, step: int) -> dict[str, float] | None:
        """One step and its bookkeeping (metrics, alarms, a decoded sample); None when a non-finite step
        was skipped (``stop_on_nan: false``). A teacher outage or a stopping NaN raises."""
        try:
            result = self.train_step(step)
        except TeacherUnavailableError as exc:
            raise self._teacher_down(step, exc) from None
        except NonFiniteLossError as exc:
            _, declared = self._watch(step, exc.metrics or {"loss": math.nan})
            if self.cfg.stop_on_nan or exc.weights_damaged:
                where = self.last_checkpoint or "none (no checkpoint was written yet)"
                raise NonFiniteLossError(
                    f"{exc}; stopped, last good checkpoint: {where}", exc.metrics, exc.weights_damaged
                ) from None
            self.log(f"[yellow]warning:[/] {exc}; step skipped (stop_on_nan is false)")
            if declared:
                self._collapse(step)
            return None
        self.metrics.log(step, result.metrics)
        self._alarming, self._declared = self._watch(step, result.metrics)
        if self.acc.is_main_process and result.samples:
            with open(self.run_dir / "samples.jsonl", "a") as fh:
                for sample in result.samples:
                    fh.write(json.dumps(json_safe(sample), allow_nan=False) + "\n")
        return result.metrics

    def checkpoint_due(self, step: int, metrics: dict[str, float]) -> bool:
        """After a step: stop on a declared collapse, evaluate when due, then checkpoint unless the step
        alarmed (a due checkpoint is deferred to the next clean step; the last step always saves)."""
        if self._declared:
            self._collapse(step)
        if self._eval is not None and (step % self.cfg.eval.every == 0 or step == self.total_steps):
            self.evaluate(self._eval, step)
        due = step % self.cfg.checkpoint_every == 0 or self._checkpoint_deferred
        if step == self.total_steps or (due and not self._alarming):
            self._checkpoint_deferred = False
            return True
        if due:
            if not self._checkpoint_deferred:
                self.log(f"[yellow]note:[/] checkpoint of step {step} deferred until a step without alarms")
            self._checkpoint_deferred = True
        return False

    def _teardown(self, *, ok: bool) -> None:
        """End a multi-process run in an order that cannot hang: drop the DDP wrapper (its Reducer) and
        accelerate's references while the process group still works, barrier, then destroy the group.

        Left to interpreter exit, the Reducer and the gloo group were freed in arbitrary order and one rank
        hung forever in ``ProcessGroupGloo::~ProcessGroupGloo``. ``ok`` is false after an error that
        only this process may have met: then there is no barrier (the others may never reach it).
        """
        release_distributed(self.acc, self, "student", ok=ok)
