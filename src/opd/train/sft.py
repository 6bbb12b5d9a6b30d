"""`opd sft`: supervised fine-tuning on response tokens only, the first half of the off-policy cold start.

Data (JSONL, one conversation per line; `opd generate` writes it):

- ``messages`` ending with an assistant turn: rendered with the tokenizer's chat template. The last
  assistant turn is the target; everything before it (system, user, earlier turns) is context with
  label -100. The boundary is found by rendering the conversation without the last turn with
  ``add_generation_prompt=True`` and checking that this text is a prefix of the full rendering (templates
  that rewrite history, e.g. by stripping ``<think>`` blocks, fail here with ``file:line``). The target is
  the rest of the rendering, so the assistant turn's end-of-turn / EOS tokens are learnt too: a student
  that never learns to stop runs away in OPD. Prompt and target are tokenised separately, exactly as the
  teacher generated them (prompt ids, then sampled ids), so no BPE merge crosses the boundary.
- ``prompt`` + ``response`` (used when there are no messages, or with a non-chat template): the prompt is
  rendered with `template` (``raw``, ``dapo``, ``boxed``, a format string, or ``chat``/``chat:<x>`` as a
  single user message); the target is the response followed by EOS.

`opd generate` output: train with ``template: chat`` when it was generated with ``chat`` or
``chat:<x>`` (its messages already hold the filled prompt), and with the generation template itself when
that was a non-chat one (the teacher then saw the raw rendering, which `prompt`/`response` reproduce).

Too-long examples (prompt + target > `max_seq_len` tokens) are SKIPPED and counted, not truncated: a cut
response would teach the student to stop mid-thought, and failing the whole run over a few long-tail
teacher responses is worse than dropping them. The count and the first sources are printed and written
to ``RUN_DIR/data_report.json``; a data set with nothing left is an error.

Optimisation mirrors `opd train`: AdamW, grad-norm clip, `opd.train.loop.lr_lambda` schedules (paper
defaults for SFT here: lr 1e-5, cosine, 5% warmup, weight decay 0.01), atomic checkpoints, ``--resume``.
Each step takes `batch_size` examples (global, across processes) from a `PromptCursor` (epochs are fresh
seeded permutations) and splits them into micro-batches; the loss is the sum of token cross-entropies
divided by the number of target tokens of the WHOLE step, so micro-batch size and process count do not
change the gradient.

Memory, with `opd train`'s levers: the loss is taken from the last hidden states and the LM head one chunk
of target rows at a time (`from_hidden_states`, default; `opd.objectives.cross_entropy`), so no
``[B, S, V]`` logits exist; `autocast` bfloat16 computes on fp32 master weights; `gradient_checkpointing`
recomputes the decoder layers in backward; `micro_batch_tokens` caps the padded tokens of a micro-batch.
Each gives the plain path's loss and gradients (docs/memory.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from opd.config import (
    ChatTemplateKwargs,
    DistTimeout,
    Dtype,
    ExpandableSegments,
    OptimConfig,
    Tf32,
    TrackingConfig,
    TrustRemoteCode,
    dump_config,
    refuse_fp16_autocast,
)
from opd.data import (
    check_messages,
    check_rendered,
    file_sha256,
    fill_template,
    read_jsonl,
    uses_chat,
    validate_template,
)
from opd.device import clock, reduce_sum
from opd.errors import ConfigError, DataError, StorageError
from opd.files import atomic_write_text, json_safe
from opd.precision import apply_tf32, check_dtypes
from opd.progress import bar
from opd.train import checkpoint as ckpt
from opd.train.loop import (
    NonFiniteLossError,
    build_optimizer,
    check_launch,
    configure_cuda_allocator,
    device_choices,
    finished_run,
    grad_norm,
    lock_run_dir,
    open_metrics,
    refuse_to_overwrite,
    release_distributed,
    resumable_checkpoint,
    run_steps,
    save_final_model,
    save_step,
    unlock_run_dir,
)

IGNORE = -100


class SFTOptimConfig(OptimConfig):
    """`opd train`'s optimizer settings with the paper's SFT defaults."""

    lr: float = Field(
        1e-5, gt=0.0, description="AdamW learning rate (peak, with a schedule); the paper's SFT uses 1e-5",
    )  # fmt: skip
    schedule: Literal["constant", "warmup", "cosine"] = Field(
        "cosine", description="learning-rate schedule: constant | warmup (linear ramp to lr over the warm-up steps, then "
        "constant) | cosine (the same ramp, then cosine decay to min_lr_ratio x lr)",
    )  # fmt: skip
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0, description="used when warmup_steps is 0")


class SFTConfig(BaseModel):
    """Every `opd sft` option (each also a --section.field CLI option; YAML with --config)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field("", description="student to fine-tune: local dir, .gguf file, or hub id")
    dtype: Dtype = Field("float32", description="fp32 master weights (bf16 swallows small updates)")
    trust_remote_code: TrustRemoteCode = False
    data: str = Field(
        "", description="JSONL with `messages` (ending in an assistant turn) or prompt/response"
    )
    messages_field: str = Field(
        "messages", description="column of the chat `messages` list (ending in an assistant turn)",
    )  # fmt: skip
    prompt_field: str = Field(
        "prompt", description="column of the prompt, for data with prompt/response columns instead of messages",
    )  # fmt: skip
    response_field: str = Field(
        "response", description="column of the response, for data with prompt/response columns"
    )
    template: str = Field("chat", description="chat | chat:<x> | raw | dapo | boxed | a format string")
    chat_template_kwargs: ChatTemplateKwargs
    max_seq_len: int = Field(8192, ge=2, description="longer examples are skipped and counted")
    run_dir: str = Field(
        "runs/sft", description="where the run writes config.yaml, metrics.jsonl, checkpoints/ and final/",
    )  # fmt: skip
    epochs: float = Field(1.0, gt=0.0, description="passes over the data; ignored when steps is set")
    steps: int | None = Field(
        None, ge=1, description="optimizer steps; default: epochs x examples / batch_size"
    )
    batch_size: int = Field(32, ge=1, description="examples per optimizer step, global across processes")
    micro_batch_size: int = Field(4, ge=1, description="examples per forward/backward (grad accumulation)")
    micro_batch_tokens: int | None = Field(
        None, ge=1, description="also cap each micro-batch at this many padded tokens (rows x its longest "
        "example), as opd train's micro_batch_tokens: a process's examples of a step are sorted by length and "
        "packed under both caps (an example longer than the cap runs alone), so long and short examples cost "
        "even memory; the loss stays a mean over the whole step. null: micro_batch_size alone, in draw order",
    )  # fmt: skip
    autocast: Literal["none", "bfloat16"] = Field(
        "none", description="mixed precision, as opd train's student.autocast: the forward and backward compute "
        "in this dtype under torch.autocast (the LM head's matmuls too) while weights, gradients and AdamW "
        "state stay in dtype. float16 is refused: there is no loss scaling, and fp16's range underflows "
        "small gradients",
    )  # fmt: skip
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in backward instead of keeping them "
        "(opd.train.memory.enable_activation_checkpointing, as opd train's student.gradient_checkpointing): "
        "much less memory for ~1/3 more compute; the same loss and gradients, dropout included (the "
        "recomputation replays the RNG state)",
    )  # fmt: skip
    from_hidden_states: bool = Field(
        True, description="take the model's last hidden states and project them through the LM head one chunk "
        "of target rows at a time inside the loss (opd.objectives.cross_entropy), never building the [B, S, V] "
        "logits, as opd train's loss.from_hidden_states; the same loss and gradients. false = the plain path: "
        "the model's logits, then cross_entropy (needed only for a model whose head is not a linear layer; a "
        "start-up probe refuses those)",
    )  # fmt: skip
    tf32: Tf32 = True
    expandable_segments: ExpandableSegments = True
    dist_timeout_s: DistTimeout = None
    shuffle: bool = Field(
        True, description="draw the examples in a new seeded order each epoch; false: file order"
    )
    optim: SFTOptimConfig = SFTOptimConfig()
    tracking: TrackingConfig = TrackingConfig()
    seed: int = Field(0, description="seed of the example order")
    precision_check: Literal["refuse", "warn", "off"] = Field(
        "refuse", description="at start-up, time a matmul in the chosen dtype on this device (as opd train "
        "does): warn when it is 2x slower than float32, refuse at 8x; warn = only warn, off = no probe",
    )  # fmt: skip
    checkpoint_every: int = Field(
        100, ge=1, description="save a resumable checkpoint every N optimizer steps"
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="checkpoints kept in RUN_DIR/checkpoints; older ones are deleted",
    )  # fmt: skip
    save_final: bool = Field(True, description="save the fine-tuned model to RUN_DIR/final at the end")

    @field_validator("autocast", mode="before")
    @classmethod
    def _no_fp16_autocast(cls, value: Any) -> Any:
        return refuse_fp16_autocast(value, "autocast", "--autocast")

    def require_paths(self) -> None:
        missing = [name for name in ("model", "data") if not getattr(self, name)]
        if missing:
            raise ConfigError(
                f"opd sft: missing required setting(s): {', '.join(missing)}; e.g. --{missing[0]} VALUE"
            )


SFT_ALIASES: dict[str, str] = {"student": "model", "lr": "optim.lr", "prompts": "data"}


# ----------------------------------------------------------------------------------------------------
# Data


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE on context tokens
    source: str

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def read_sft_jsonl(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(file:line, object) for every non-blank line (`opd.data.read_jsonl`, the prompt files' reader);
    bad JSON fails with its line number."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: SFT data file not found; check --data (paths are relative to the cwd).")
    rows = read_jsonl(p, "SFT data file")
    if not rows:
        raise DataError(f"{p}: no records (the file is empty).")
    return rows


def encode_example(
    row: dict[str, Any],
    source: str,
    tokenizer: Any,
    *,
    template: str = "chat",
    chat_template_kwargs: dict[str, Any] | None = None,
    messages_field: str = "messages",
    prompt_field: str = "prompt",
    response_field: str = "response",
) -> tuple[list[int], list[int]]:
    """(context ids, target ids) of one record; see the module docstring for the rules."""
    validate_template(template)
    kwargs = chat_template_kwargs or {}
    chat = uses_chat(template)
    messages = row.get(messages_field)
    prompt, response = row.get(prompt_field), row.get(response_field)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"template {template!r} needs a chat template, but the tokenizer has none; use a non-chat "
                "template (raw, dapo, a format string) with prompt/response data."
            )
        if messages is not None:
            msgs = check_messages(messages, source, messages_field, ends_with_reply=True)
            users = [i for i, m in enumerate(msgs[:-1]) if m["role"] == "user"]
            if users:  # chat:<x> fills the last user message (plain chat leaves it as it is)
                msgs[users[-1]]["content"] = fill_template(template, msgs[users[-1]]["content"])
        elif isinstance(prompt, str) and isinstance(response, str):
            msgs = [
                {"role": "user", "content": fill_template(template, prompt)},
                {"role": "assistant", "content": response},
            ]
        else:
            raise DataError(
                f"{source}: needs `{messages_field}` (ending with an assistant turn) or string "
                f"`{prompt_field}` and `{response_field}` fields."
            )
        try:
            context = tokenizer.apply_chat_template(
                msgs[:-1], add_generation_prompt=True, tokenize=False, **kwargs
            )
            full = tokenizer.apply_chat_template(msgs, tokenize=False, **kwargs)
        except Exception as e:  # Jinja errors from user templates
            raise DataError(
                f"{source}: the chat template failed on this record ({type(e).__name__}: {e})."
            ) from e
        check_rendered(msgs[:-1], context, source)
        if not full.startswith(context):
            raise DataError(
                f"{source}: the chat template's rendering of the conversation does not start with its "
                "rendering of the prompt (add_generation_prompt=True), so the assistant turn cannot be "
                "located; the template rewrites earlier turns (e.g. strips <think> blocks) or adds text "
                f"before the reply. Prompt part ends {context[-40:]!r}; full text there is "
                f"{full[max(0, len(context) - 40) : len(context)]!r}."
            )
        ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        tgt_ids = tokenizer(full[len(context) :], add_special_tokens=False)["input_ids"]
    else:
        if not (isinstance(prompt, str) and isinstance(response, str)):
            raise DataError(
                f"{source}: template {template!r} is not a chat template, so the record needs string "
                f"`{prompt_field}` and `{response_field}` fields (messages need template: chat)."
            )
        context = fill_template(template, prompt)
        ctx_ids = tokenizer(context, add_special_tokens=True)["input_ids"]
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("the tokenizer has no EOS token, so the student could not learn to stop.")
        tgt_ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], int(eos)]
    if not ctx_ids:
        raise DataError(f"{source}: the prompt renders to zero tokens.")
    if not tgt_ids:
        raise DataError(f"{source}: the response renders to zero target tokens.")
    return list(ctx_ids), list(tgt_ids)


def load_sft_examples(cfg: SFTConfig, tokenizer: Any) -> tuple[list[SFTExample], dict[str, Any]]:
    """Encode every record up front (bad records fail before any compute); skip and count too-long ones."""
    examples: list[SFTExample] = []
    skipped: list[str] = []
    rows = read_sft_jsonl(cfg.data)
    for source, row in rows:
        ctx, tgt = encode_example(
            row, source, tokenizer, template=cfg.template, chat_template_kwargs=cfg.chat_template_kwargs,
            messages_field=cfg.messages_field, prompt_field=cfg.prompt_field, response_field=cfg.response_field,
        )  # fmt: skip
        if len(ctx) + len(tgt) > cfg.max_seq_len:
            skipped.append(f"{source} ({len(ctx) + len(tgt)} tokens)")
            continue
        examples.append(SFTExample([*ctx, *tgt], [IGNORE] * len(ctx) + tgt, source))
    report = {
        "records": len(rows),
        "used": len(examples),
        "skipped_too_long": len(skipped),
        "skipped_examples": skipped[:20],
        "max_seq_len": cfg.max_seq_len,
        "target_tokens": sum(e.n_targets for e in examples),
    }
    if not examples:
        raise DataError(
            f"{cfg.data}: all {len(rows)} examples are longer than max_seq_len={cfg.max_seq_len} tokens "
            f"(e.g. {skipped[0]}); raise max_seq_len."
        )
    return examples, report


def collate(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plan_micro_batches(lengths: list[int], max_rows: int, max_tokens: int | None) -> list[list[int]]:
    """Positions into `lengths` grouped into micro-batches of at most `max_rows` examples and, with
    `max_tokens`, at most that many padded tokens (rows x the group's longest example, what `collate`
    builds). None: consecutive slices in the given order. With a budget the examples are taken longest
    first and packed greedily; one longer than the budget runs alone. Every position appears once."""
    if max_rows < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"need max_rows >= 1 and max_tokens >= 1 or None; got {max_rows}, {max_tokens}")
    if max_tokens is None:
        return [list(range(s, min(s + max_rows, len(lengths)))) for s in range(0, len(lengths), max_rows)]
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        g = groups[-1] if groups else None  # longest first: a group's width is its first example's length
        if g is not None and len(g) < max_rows and (len(g) + 1) * lengths[g[0]] <= max_tokens:
            g.append(i)
        else:
            groups.append([i])
    return groups


def autocast_context(device: torch.device | str, autocast: str) -> Any:
    """`torch.autocast` in `autocast`'s dtype on `device`'s type; a null context for ``none``."""
    if autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, autocast))


def token_ce_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, from_hidden_states: bool = False,
                 autocast: str = "none") -> torch.Tensor:  # fmt: skip
    """Sum over target tokens of -log p(token | prefix); the caller normalises by the step's count.

    `from_hidden_states`: the model's last hidden states and its LM head through
    `opd.objectives.cross_entropy.head_ce_sum` (chunks of target rows, no ``[B, S, V]`` logits; the head's
    matmuls in the `autocast` dtype, as the model's own head would run them); otherwise the model's logits
    and ``cross_entropy``. The forward runs under `autocast`; both paths give the same loss and gradients.
    """
    from opd.generation.scoring import head_weights, last_hidden_states
    from opd.objectives.cross_entropy import head_ce_sum

    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if not from_hidden_states:
        with autocast_context(ids.device, autocast):
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
        logits = logits.float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
    with autocast_context(ids.device, autocast):
        h = last_hidden_states(model, input_ids=ids, attention_mask=attn)
    # position t predicts label t + 1; the last position predicts nothing
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    mask = targets != IGNORE
    w, b = head_weights(model)
    project = None if autocast == "none" else getattr(torch, autocast)
    return head_ce_sum(h, w, b, targets.clamp_min(0), mask, project_dtype=project)


def check_sft_head(model: torch.nn.Module) -> None:
    """`from_hidden_states` projects with the LM head's weight itself: the model's logits must be exactly that
    projection (`opd.generation.scoring.check_head_projection`), else a ConfigError naming the setting."""
    from opd.generation.scoring import check_head_projection, head_weights

    try:
        check_head_projection(model, *head_weights(model))
    except ValueError as exc:
        raise ConfigError(f"opd sft from_hidden_states: {exc}; set --from_hidden_states false") from None


# ----------------------------------------------------------------------------------------------------
# The trainer


class SFTTrainer:
    """Set-up, steps, checkpoints and the final save of one SFT run (single or multi-process)."""

    def __init__(self, cfg: SFTConfig, *, resume: bool = False, accelerator: Any = None, log: Any = None):
        from accelerate import Accelerator

        cfg.require_paths()
        self.cfg = cfg
        self.resume = resume
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.log: Callable[[str], Any] = log or (lambda msg: self.acc.print(msg))
        self.run_dir = Path(cfg.run_dir)
        self.start_step = 0
        self.last_checkpoint: Path | None = None

    def setup(self) -> None:
        from accelerate.utils import set_seed

        from opd.data import PromptCursor
        from opd.models.loading import load_model, load_tokenizer

        cfg, acc = self.cfg, self.acc
        world = acc.num_processes
        check_launch(acc)  # the same launch and dtype checks as opd train, before anything loads
        tf32 = apply_tf32(acc.device, cfg.tf32)  # before the probe, so it times float32 as the run will
        check_dtypes(acc.device, {"dtype": cfg.dtype, "autocast": cfg.autocast}, policy=cfg.precision_check,
                     log=lambda msg: self.log(f"[yellow]warning:[/] {msg}"))  # fmt: skip
        if cfg.batch_size % world:
            raise ConfigError(
                f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world})"
            )
        if acc.is_main_process:  # one trainer per run directory; released when train() ends
            self._run_lock = lock_run_dir(self.run_dir, "opd sft")
        if not self.resume:
            refuse_to_overwrite(self.run_dir, "opd sft")
        set_seed(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        self.examples, self.data_report = load_sft_examples(cfg, self.tokenizer)
        self.data_sha256 = file_sha256(cfg.data)
        if self.data_report["skipped_too_long"]:
            self.log(
                f"[yellow]warning:[/] skipped {self.data_report['skipped_too_long']} of "
                f"{self.data_report['records']} examples longer than max_seq_len={cfg.max_seq_len} "
                f"(e.g. {self.data_report['skipped_examples'][0]}); see {self.run_dir}/data_report.json"
            )
        model = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        if cfg.from_hidden_states:
            check_sft_head(model)
        if cfg.gradient_checkpointing:  # train mode stays: the recomputation replays dropout's RNG state
            from opd.train.memory import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        self.cursor = PromptCursor(len(self.examples), seed=cfg.seed, shuffle=cfg.shuffle)
        self.total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(self.examples) / cfg.batch_size))
        model = model.to(acc.device)  # before AdamW: fused only when every parameter is on CUDA
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(params, cfg.optim, self.total_steps)
        self.model, self.optimizer = acc.prepare(model, self.optimizer)
        self.model.train()

        resume_step = None
        if self.resume:
            latest = resumable_checkpoint(self.run_dir, self.log)
            state = json.loads((latest / ckpt.COMPLETE).read_text())
            if state.get("data_sha256") not in (None, self.data_sha256):
                raise ConfigError(
                    f"--resume {self.run_dir}: {cfg.data} changed since the checkpoint was written; resume "
                    "with the original data or start a new run_dir."
                )
            state = ckpt.load_checkpoint(
                latest, model=self._unwrapped(), optimizer=self.optimizer, scheduler=self.scheduler
            )
            self.start_step = int(state["step"])
            self.cursor.load_state_dict(state["cursor"])
            self.last_checkpoint = latest
            resume_step = self.start_step
            self.log(f"resumed from {latest} at step {self.start_step}")
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", dump_config(cfg))
            atomic_write_text(
                self.run_dir / "data_report.json",
                json.dumps(json_safe(self.data_report), indent=1, allow_nan=False) + "\n",
            )
            device = device_choices(acc, tf32=tf32, optimizer=self.optimizer, dist_timeout=cfg.dist_timeout_s)
            atomic_write_text(
                self.run_dir / "device.json", json.dumps(json_safe(device), indent=1, allow_nan=False) + "\n"
            )
        self.metrics = open_metrics(
            self.run_dir,
            cfg.tracking,
            main=acc.is_main_process,
            config=cfg.model_dump(mode="json"),
            resume_step=resume_step,
        )

    def _unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step on the next `batch_size` examples; returns the step's metrics."""
        cfg, acc = self.cfg, self.acc
        world = acc.num_processes
        t0 = clock(acc.device)
        indices = self.cursor.next_indices(cfg.batch_size)
        # Every process knows the whole step, so the global target count needs no communication.
        global_tokens = sum(self.examples[i].n_targets for i in indices)
        per = len(indices) // world
        mine = indices[acc.process_index * per : (acc.process_index + 1) * per]
        plan = plan_micro_batches([len(self.examples[i].input_ids) for i in mine], cfg.micro_batch_size,
                                  cfg.micro_batch_tokens)  # fmt: skip
        micro = [[mine[k] for k in group] for group in plan]
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)  # opd.device: step sums on device
        for i, mb in enumerate(micro):
            batch = {
                k: v.to(acc.device) for k, v in collate([self.examples[j] for j in mb], self.pad_id).items()
            }
            sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(self.model)
            with sync:
                ce = token_ce_sum(self.model, batch, from_hidden_states=cfg.from_hidden_states,
                                  autocast=cfg.autocast)  # fmt: skip
                acc.backward(ce * (world / global_tokens))
            loss_sum += ce.detach().double()
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = grad_norm(acc, params, cfg.optim.max_grad_norm)
        loss = float(reduce_sum(self.acc, loss_sum)) / global_tokens
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            where = self.last_checkpoint or "none (no checkpoint was written yet)"
            raise NonFiniteLossError(
                f"non-finite loss ({loss}) or grad norm ({norm}) at step {step}; stopped, last good "
                f"checkpoint: {where}"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = clock(acc.device) - t0
        seq_tokens = sum(len(self.examples[i].input_ids) for i in indices)
        return {
            "loss": loss,
            "grad_norm": norm,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "target_tokens": float(global_tokens),
            "seq_len_mean": seq_tokens / len(indices),
            "tokens_per_s": seq_tokens / elapsed,
            "step_time_s": elapsed,
            "epoch": float(self.cursor.state_dict()["epoch"]),
        }

    def save(self, step: int) -> Path:
        """Checkpoint `step` with the cursor and the data file's hash (`opd.train.loop.save_step`)."""
        self.last_checkpoint = save_step(
            self.acc, self.run_dir, step, model=self._unwrapped(), optimizer=self.optimizer, scheduler=self.scheduler,
            state={"cursor": self.cursor.state_dict(), "seed": self.cfg.seed, "total_steps": self.total_steps,
                   "data_sha256": self.data_sha256},
            keep=self.cfg.keep_checkpoints, command="opd sft",
        )  # fmt: skip
        return self.last_checkpoint

    def save_final(self) -> Path:
        """The fine-tuned model and its tokenizer in RUN_DIR/final (`opd.train.loop.save_final_model`)."""
        return save_final_model(self.acc, self.run_dir, self._unwrapped(), self.tokenizer,
                                last_checkpoint=self.last_checkpoint, command="opd sft")  # fmt: skip

    def train(self, on_step: Callable[[int, dict[str, float]], Any] | None = None) -> list[dict[str, float]]:
        """Run from start_step to total_steps (`opd.train.loop.run_steps`: signals, checkpoints, final
        model); returns the metrics of the steps run.

        On several processes the run ends by dropping the DDP wrapper (its Reducer) while the process
        group still works, so no rank hangs in the gloo destructor at exit; after a complete run the group
        itself is left to ``acc.end_training()`` (a cold start trains OPD in the same processes next),
        after a stop or an error it is destroyed here.
        """
        from opd.errors import InterruptedRun

        if getattr(self, "_released", False):
            raise RuntimeError(
                "this SFTTrainer's run has ended (its DDP wrapper was released); make a new one"
            )
        ok = completed = False
        try:
            hint = f"opd sft --resume {self.run_dir}"
            history = run_steps(self, hint=hint, save_final=self.cfg.save_final, on_step=on_step)
            ok = completed = True
        except (InterruptedRun, StorageError):
            ok = True  # raised on every process at the same point: the barrier is safe
            raise
        finally:
            self.metrics.close()
            unlock_run_dir(getattr(self, "_run_lock", None))
            if self.acc.num_processes > 1:
                # After a stop or an error nothing else runs in this process: destroy the group here too.
                self._released = True
                release_distributed(self.acc, self, "model", ok=ok, destroy=not completed)
        return history

    def run_step(self, step: int) -> dict[str, float]:
        metrics = self.train_step(step)
        self.metrics.log(step, metrics)
        return metrics

    def checkpoint_due(self, step: int, metrics: dict[str, float]) -> bool:
        return step % self.cfg.checkpoint_every == 0 or step == self.total_steps


def sft_with_progress(cfg: Any, *, resume: bool, log: Callable[[str], Any] | None = None) -> Any:
    """Set up and run an `opd.train.sft.SFTTrainer` with a progress bar; returns the trainer, or None when
    `resume` finds the run finished (`opd.train.loop.finished_run`: one line, nothing on disk changed)."""
    from opd.models.loading import apply_model_defaults

    log = log or print
    if resume:
        done = finished_run(Path(cfg.run_dir), steps=cfg.steps, save_final=cfg.save_final, command="opd sft")
        if done is not None:  # nothing to train, and nothing on disk is touched
            if os.environ.get("RANK", "0") == "0":
                log(done)
            return None
    # a lab:NAME student trains with the lab's template unless told otherwise
    cfg = apply_model_defaults(cfg, [cfg.model], {"template": "template"}, log)
    configure_cuda_allocator(allowed=cfg.expandable_segments, engine_in_process=False)  # before CUDA starts
    trainer = SFTTrainer(cfg, resume=resume, log=log)
    trainer.setup()
    main = trainer.acc.is_main_process
    rep = trainer.data_report
    if main:
        log(
            f"sft: {rep['used']} examples ({rep['target_tokens']} target tokens; {rep['skipped_too_long']} "
            f"skipped as longer than {rep['max_seq_len']}), {trainer.total_steps - trainer.start_step} step(s) "
            f"into {cfg.run_dir} on {trainer.acc.num_processes} process(es)"
        )
    with bar("opd sft", enabled=main) as progress:
        task = progress.add_task("", total=trainer.total_steps, completed=trainer.start_step)

        def on_step(step: int, m: dict[str, float]) -> None:
            desc = f"loss {m['loss']:.4g} | lr {m['lr']:.2e} | {m['tokens_per_s']:.0f} tok/s"
            progress.update(task, completed=step, description=desc)

        trainer.train(on_step=on_step)
    if main:
        final = (
            f", final model in {cfg.run_dir}/final"
            if cfg.save_final
            else " (save_final false: no final model)"
        )
        log(f"[green]done[/]: metrics in {cfg.run_dir}/metrics.jsonl{final}")
    return trainer
