"""The OPD loop: student rollouts, teacher scores at student-visited states, the objective, one step.

Built on accelerate so the same code runs in one process or data-parallel under torchrun /
`accelerate launch`. Three invariants carry the design:

- The loss is a token mean over ALL response tokens of the step, across micro-batches and processes:
  each micro-batch contributes sum(per-token loss) * world_size / global_token_count, so gradient
  accumulation and the number of processes do not change the gradient (TRL #4719).
- Rollout sampling is seeded by (seed, step, position of the prompt chunk in the global batch), so the
  same global batch gives the same rollouts on 1 or N processes and after a resume (HF rollouts always;
  vLLM rollouts with rollout.vllm_seeded, whose per-request seeds take vLLM's slower sampling path).
- One optimizer step per batch of rollouts: the policy that sampled is the policy being scored, so the
  student's "old" log-probs are the detached values of the training forward itself (PPO ratio 1). The
  student is scored with dropout off for the same reason.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from opd.config import TrainConfig, dump_config
from opd.device import DeviceTimer, clock, host, place, reduce_sum
from opd.diagnostics import StepStats
from opd.errors import ConfigError
from opd.files import json_safe
from opd.generation.build import rollouts_run_the_student
from opd.generation.rollout import Rollout, chunk_seed, plan_step_micro_batches
from opd.generation.scoring import response_hidden_states, response_logits
from opd.objectives.objective import hidden_loss_sum, logits_loss, nonfinite_target_positions
from opd.teachers.contract import StepTargets, Teacher, as_teacher
from opd.teachers.http import TeacherUnavailableError
from opd.train import checkpoint as ckpt
from opd.train.alarms import CheckpointJudge, CollapseError, CollapseMonitor, watch_step
from opd.train.loop import (
    NonFiniteLossError,
    apply_dist_timeout,
    grad_norm,
    open_metrics,
    release_distributed,
    resumable_checkpoint,
    run_steps,
    save_final_model,
    save_step,
    unlock_run_dir,
)
from opd.train.parts import build_run_parts, student_head
from opd.train.step_metrics import reduce_step, step_metrics
from opd.train.tracking import write_run_files


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
        teacher: Any = None,
    ):
        """`teacher`: one to use instead of the one ``cfg.teacher`` names (a notebook's scorer, a test's fake),
        anything `opd.teachers.contract.as_teacher` takes; the run's parts are built by `setup`."""
        cfg.require_paths()
        self._given_teacher = teacher
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

    def setup(self) -> None:
        """The run's parts, built once in dependency order (`opd.train.parts.build_run_parts`: checks, pair,
        prompts, adjusted settings, update, teacher, generator), then the resume state and the run files."""
        cfg, acc = self.cfg, self.acc
        parts = build_run_parts(cfg, acc, resume=self.resume, log=self.log, teacher=self._given_teacher)
        # every part becomes an attribute here, in one place, once all exist (RunParts says what each is)
        vars(self).update({f.name: getattr(parts, f.name) for f in fields(parts) if f.name != "teacher"})
        self._teacher = parts.teacher
        resume_step = self._restore() if self.resume else None
        if acc.is_main_process:  # config.yaml, adjustments.json, device.json, samples.jsonl cut to the resume
            write_run_files(self.run_dir, dump_config(cfg), self.adjustments, resume_step,
                            device=self.device_choices)  # fmt: skip
        adjusted = {"adjustments": self.adjustments} if self.adjustments else {}
        self.metrics = open_metrics(self.run_dir, cfg.tracking, main=acc.is_main_process,
                                    config={**cfg.model_dump(mode="json"), **adjusted}, resume_step=resume_step)  # fmt: skip

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

    def teacher_fidelity(self) -> dict[str, float] | None:
        """Engine teacher vs the HF model at teacher.path on a few student rollouts, written to
        RUN_DIR/teacher_fidelity.json (`opd.evaluation.checks.check_engine_teacher`); None for an HF teacher,
        with the check off, or without a local teacher.path."""
        from opd.evaluation.checks import check_engine_teacher

        return check_engine_teacher(
            self.teacher, self._unwrapped(), self.prompt_ids, self.cfg.teacher, acc=self.acc, run_dir=self.run_dir,
            vocab_size=self.vocab_size, pad_id=self.tokenizer.pad_token_id, stop_ids=self.stop_ids,
            max_new_tokens=self.max_new_tokens, seed=self.cfg.seed, log=self.log,
        )  # fmt: skip

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

    def _micro_batch_loss(self, mb: Rollout, target: Any, stats: StepStats) -> torch.Tensor:
        """The micro-batch's summed per-token loss (0-dim, with gradient); its metrics go into `stats`.

        `loss.from_hidden_states` (default): the student's hidden states and head, projected one chunk of
        response rows at a time inside the loss, metrics from the same chunks. Otherwise the plain path:
        `[B, T, V]` logits, `opd.objectives.token` on them, metrics walked over the detached logits."""
        mask, tokens = mb.response_mask, mb.response_ids
        if self.cfg.loss.from_hidden_states:
            with self._autocast():
                h = response_hidden_states(self.student, mb)
            w, b = student_head(self._unwrapped())
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
        reducers = {"reduce": self._reduce, "max_row": self._gather_max_row}
        totals = reduce_step(rollouts, acc.loss_sum, acc.stats, acc.global_tokens, **reducers)
        self._update(step, totals.loss, grad_norm, acc)
        t_sync = self.generator.sync(self._unwrapped()) if hasattr(self.generator, "sync") else None
        t_end = clock(device)
        # 5. metrics (every process holds the same values) and one decoded sample
        times = {
            "step_time_s": t_end - t0,
            "time_rollout_s": t_rollout,
            "time_teacher_s": acc.t_teacher + t_score,
            "time_update_s": t_end - t_update0 - acc.t_teacher - (t_sync or 0.0),
        }
        metrics = step_metrics(
            totals, grad_norm=grad_norm, lr=float(self.scheduler.get_last_lr()[0]), times=times, t_sync=t_sync,
            epoch=float(self.cursor.state_dict()["epoch"]), global_tokens=acc.global_tokens, engine=acc.stats.engine,
            **reducers,
        )  # fmt: skip
        return StepResult(step, metrics, self._samples(step, rollouts))

    def _loss_and_backward(self, step: int, rollouts: list[Rollout], targets: StepTargets) -> _Accumulated:
        """Phase 3. Gradients are synchronised across processes on the last micro-batch only; with
        `optim.in_backward` the weights step inside backward, so a non-finite loss is refused before it."""
        acc, device = self.acc, self.acc.device
        # one host copy for the step's token count (not one per rollout chunk)
        local = sum(
            (r.response_mask.sum() for r in rollouts), torch.zeros((), dtype=torch.long, device=device)
        )
        global_tokens = int(self._reduce(local.double()).item())
        micro = self._micro_batches(rollouts)
        if self.in_backward is not None and len(micro) > 1:  # the config check should make this unreachable
            raise ConfigError(f"optim.in_backward needs one micro-batch per step; this step has {len(micro)}")
        # Accumulators of the step: on the compute device (no host round trip per micro-batch), float64.
        out = _Accumulated(torch.zeros((), dtype=torch.float64, device=device), StepStats(self.stats_settings, device),
                           global_tokens, teacher_nonfinite=torch.zeros((), dtype=torch.float64, device=device))  # fmt: skip
        scale = acc.num_processes / max(global_tokens, 1)
        # The HF teacher's forward of each micro-batch, timed with device events: no synchronization inside
        # the loop (the total is read once, after it); in_backward's finite check is its only host read.
        teacher_time = DeviceTimer(device)
        for i, (chunk, rows, mb) in enumerate(micro):
            with teacher_time.section():
                target = targets.target(chunk, rows, mb)
            out.teacher_nonfinite += nonfinite_target_positions(target, mb.response_mask, self.vocab_size)
            sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(self.student)
            with sync:
                loss_mb = self._micro_batch_loss(mb, target, out.stats)
                objective = loss_mb * scale
                ib = self.in_backward
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
        out.t_teacher = teacher_time.seconds()
        return out

    def _grad_norm(self, step: int, loss_sum: torch.Tensor) -> float:
        """The pre-clip global gradient norm (clipping on the way with `optim.max_grad_norm`), from wherever
        the gradients are: consumed by `optim.in_backward`'s hooks, FSDP2 shards, or plain tensors."""
        max_norm = self.cfg.optim.max_grad_norm
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.in_backward is not None:  # already stepped inside backward; the norm was summed there
            return self.in_backward.grad_norm(step, float(loss_sum), self.optimizer)
        if self.sharded:
            from opd.train.sharding import sharded_grad_norm

            return sharded_grad_norm(params, max_norm)
        return grad_norm(self.acc, params, max_norm)

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
        if self.in_backward is None:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

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

    def save(self, step: int) -> Path:
        """Checkpoint `step` with the cursor and alarm state (`opd.train.loop.save_step`); a refused write (disk
        full, ...) raises StorageError on every process, naming the free space and how to resume."""
        good = self.last_good_checkpoint
        path = save_step(
            self.acc, self.run_dir, step, model=self._unwrapped(), optimizer=self.optimizer, scheduler=self.scheduler,
            state={"cursor": self.cursor.state_dict(), "seed": self.cfg.seed, "total_steps": self.total_steps,
                   "alarms": self.monitor.state_dict(), "sharding": self.cfg.sharding,
                   "last_good_checkpoint": good.name if good else None},
            keep=self.cfg.keep_checkpoints, command="opd train", sharded=self.sharded,
        )  # fmt: skip
        self.checkpoints.saved(path)
        return path

    def save_final(self) -> Path:
        """The trained student (LoRA merged when asked) as a Hugging Face model in RUN_DIR/final."""
        lora = self.cfg.student.lora
        return save_final_model(
            self.acc, self.run_dir, self._unwrapped(), self.tokenizer, last_checkpoint=self.last_checkpoint,
            command="opd train", sharded=self.sharded, architecture=self.architecture,
            merge_lora=lora.enabled and lora.merge_on_save,
        )  # fmt: skip

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
        """(this step alarmed, a collapse was declared): `opd.train.alarms.watch_step`."""
        return watch_step(
            self.monitor, self.checkpoints, self.acc, step, metrics, log_row=self.metrics.log, log=self.log
        )

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
        apply_dist_timeout(self.acc, self.cfg.dist_timeout_s)
        self._eval = self._evaluator()
        try:
            if self._eval is not None and self.start_step == 0:
                self.evaluate(self._eval, 0)
            hint = f"opd train --resume {self.run_dir}"
            return run_steps(self, hint=hint, save_final=self.cfg.save_final, on_step=on_step)
        finally:
            self.metrics.close()
            unlock_run_dir(getattr(self, "run_lock", None))

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
