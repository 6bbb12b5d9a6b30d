"""Typed, validated run configuration.

Every field is reachable three ways: a default here, a YAML file, and a ``--section.field value`` CLI
option. Unknown keys are errors (``extra="forbid"``) because a misspelt key that silently keeps its
default is the most expensive kind of config bug in a GPU-days run.
"""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from opd.errors import ConfigError, read_utf8
from opd.objectives import registry

Dtype = Literal["float32", "bfloat16", "float16", "auto"]

# The answer checkers `opd.evaluation.verify.get_verifier` knows, for every `verifier` field's description
# (`tests/test_help.py` checks this text against the names get_verifier accepts).
VERIFIER_HELP = (
    "answer checker: math (math-verify on the last \\boxed{} or `Answer:` line; no such line = wrong) | "
    "math-flexible (as math, else the response's last number; for models that ignore the answer format) | "
    "exact (normalised string equality) | package.module:callable (your own grader: (response, answer) -> bool or Verdict)"
)


# The columns a prompt file's records are read from (`opd.data.load_prompts`): one definition, with its
# description, for every command's config that reads prompt files.
# Settings several commands share, each defined once with its description.
TrustRemoteCode = Annotated[
    bool, Field(description="run the model repository's own Python code (only for a source you trust)")
]
SystemPrompt = Annotated[
    str | None, Field(description="system message put before every prompt (chat templates); null: none")
]
ChatTemplateKwargs = Annotated[
    dict[str, Any],
    Field(default_factory=dict, description="extra chat-template arguments, e.g. {enable_thinking: false}"),
]
PromptColumn = Annotated[
    str | None, Field(description="column of a plain-text prompt; null to ignore this column")
]
MessagesColumn = Annotated[
    str | None, Field(description="column of a chat `messages` list; null to ignore this column")
]
AnswerColumn = Annotated[
    str | None, Field(description="column of the reference answer; null to ignore this column")
]
# The device-speed settings of a training command (`opd train`; `opd sft` takes the same), each defined once.
Tf32 = Annotated[
    bool,
    Field(
        description="CUDA only: float32 matmuls and cuDNN convolutions run on TF32 tensor cores (inputs rounded "
        "to a 10-bit mantissa, float32 accumulation; ~6x the float32 rate on A100/H100); false: full float32. "
        "Changes nothing on a CPU; the choice is recorded in RUN_DIR/device.json",
    ),
]
ExpandableSegments = Annotated[
    bool,
    Field(
        description="CUDA only: when PYTORCH_CUDA_ALLOC_CONF (and PYTORCH_ALLOC_CONF) is unset, set it to "
        "expandable_segments:True before CUDA starts, so the caching allocator grows segments instead of "
        "fragmenting under varying rollout lengths; never with a vLLM engine in the process (its memory "
        "pool refuses expandable segments); recorded in RUN_DIR/device.json",
    ),
]
DistTimeout = Annotated[
    float | None,
    Field(
        gt=0,
        description="several processes: seconds a collective waits for the others before this process fails; "
        "null: 600 on CPU (gloo), 3600 on GPU (NCCL: torch's 600 s killed ranks waiting while the main "
        "process evaluated, loaded the fidelity reference or wrote a checkpoint); raise it when one in-loop "
        "evaluation takes longer; OPD_DIST_TIMEOUT (seconds) overrides it",
    ),
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Section):
    """LoRA through peft; off by default (the paper trains all weights)."""

    enabled: bool = Field(
        False, description="train LoRA adapters (peft) instead of every weight of the student"
    )
    r: int = Field(16, ge=1, description="LoRA rank: rows of each low-rank update")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator: updates are scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA inputs, 0 <= p < 1")
    target_modules: str | list[str] = Field(
        "all-linear", description="modules that get adapters: all-linear, or a list of module names, e.g. "
        "[q_proj, v_proj]",
    )  # fmt: skip
    merge_on_save: bool = Field(True, description="save the final model merged, usable without peft")


class StudentConfig(_Section):
    path: str = Field("", description="local dir, .gguf file, or hub id (hub only when online)")
    dtype: Dtype = Field(
        "float32", description="float32 | bfloat16 | float16 | auto; keep float32 master weights: bfloat16 "
        "rounds away updates as small as lr 1e-6",
    )  # fmt: skip
    autocast: Literal["none", "bfloat16"] = Field(
        "none", description="mixed precision: the student's forward/backward (and HF rollouts) compute in this "
        "dtype under torch.autocast while weights, gradients and optimizer state stay in student.dtype; with "
        "sharding fsdp the all-gathered weights are bfloat16 too (FSDP2 MixedPrecisionPolicy, fp32 gradient "
        "reduction). float16 is refused: opd has no loss scaling, and fp16's range underflows small gradients",
    )  # fmt: skip
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in backward instead of keeping them "
        "(much less memory for ~1/3 more update compute); TRL's default",
    )  # fmt: skip
    trust_remote_code: TrustRemoteCode = False
    lora: LoraConfig = LoraConfig()

    @field_validator("autocast", mode="before")
    @classmethod
    def _no_fp16_autocast(cls, value: Any) -> Any:
        return refuse_fp16_autocast(value, "student.autocast", "student.autocast")


def refuse_fp16_autocast(value: Any, name: str, spelling: str) -> Any:
    """`value` unless it asks for float16 autocast (opd train's student.autocast, opd sft's autocast), which is
    refused naming bfloat16; `name` is the setting as the error names it, `spelling` as the user would type it."""
    if isinstance(value, str) and value.strip().lower() in ("float16", "fp16", "half"):
        raise ValueError(
            f"{name} {value} is not supported: float16 autocast needs loss scaling (a GradScaler), which opd does "
            "not do, and without it fp16's narrow range flushes small gradients to zero; use "
            f"{spelling} bfloat16 (float32's range, no scaling needed) or none"
        )
    return value


def check_server_url(url: str) -> str:
    """`url` if it is a teacher server's base URL (``http://HOST:PORT``, as `opd serve-teacher` prints
    it); else a ValueError naming the entry, what is wrong and the expected form. Checked where the
    config is built, so a typo fails before any model loads, not as urllib's "unknown url type" later."""
    from urllib.parse import urlsplit

    form = "expected http://HOST:PORT, e.g. http://10.0.0.5:8000 (what `opd serve-teacher` prints)"
    if not isinstance(url, str) or "://" not in url:
        bare = isinstance(url, str) and re.fullmatch(r"[\w.-]+(:\d+)?/?", url.strip())  # HOST:PORT alone
        hint = f"; did you mean http://{url.strip()}?" if bare else ""
        raise ValueError(f"{url!r} is not a server URL{hint}; {form}")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in 0-65535
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a server URL ({exc}); {form}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: the scheme must be http or https, not {parts.scheme!r}; {form}")
    if not parts.hostname or " " in parts.netloc:
        raise ValueError(f"{url!r} names no valid host; {form}")
    if parts.path.rstrip("/").endswith("/v1"):
        raise ValueError(f"{url!r}: drop the /v1, opd adds the API paths itself; {form}")
    return url


class TeacherConfig(_Section):
    """Where the teacher runs. `hf` gives full logits (every objective); `vllm` (in-process engine) and
    `http` (vLLM servers, `opd serve-teacher`) give the top-`top_k` log-probs per position, which serve
    the sampled-token and teacher-support top-k objectives exactly and refuse the others; `http` with
    `payload hidden` (`opd serve-teacher --engine hf`) gives hidden states + head, every objective."""

    path: str = Field(
        "", description="local dir, .gguf file, or hub id; must share the student's tokenizer "
        "(backend http: optional, used for the tokenizer report and the fidelity check)",
    )  # fmt: skip
    dtype: Dtype = Field("float32", description="float32 | bfloat16 | float16 | auto; bfloat16 halves teacher "
                         "memory and time")  # fmt: skip
    trust_remote_code: TrustRemoteCode = False
    backend: Literal["hf", "vllm", "http"] = Field(
        "hf", description="hf = transformers forward in the trainer; vllm = in-process vLLM engine; "
        "http = OpenAI-compatible vLLM servers at teacher.urls",
    )  # fmt: skip
    placement: Literal["device", "cpu_offload"] = Field(
        "device", description="backend hf: device = on each process's GPU beside the student (no_grad); "
        "cpu_offload = weights in CPU RAM, streamed to the GPU layer by layer (accelerate cpu_offload)",
    )  # fmt: skip
    top_k: int = Field(20, ge=1, description="backend vllm/http: log-probs per position (vLLM's cap is 20 "
                       "unless the server has a larger --max-logprobs)")  # fmt: skip
    urls: list[str] = Field(default_factory=list, description="backend http: server base URLs, e.g. "
                            "[http://10.0.0.5:8000, http://10.0.0.6:8000]; requests are spread over them")  # fmt: skip
    model_name: str | None = Field(None, description="backend http: served model name; default: the first "
                                   "the server lists")  # fmt: skip
    timeout_s: float = Field(600.0, gt=0, description="backend http: seconds per request")
    retries: int = Field(5, ge=0, description="backend http: retries per request (next server each time)")
    backoff_s: float = Field(1.0, ge=0, description="backend http: first retry wait, doubled per retry")
    sequences_per_request: int = Field(8, ge=1, description="backend http: sequences per request")
    payload: Literal["topk", "hidden", "ids"] = Field(
        "topk", description="backend http: what the servers return; topk = top_k log-probs per position (vLLM "
        "servers); hidden = the teacher's last hidden states, projected here with its LM head (loaded once from "
        "teacher.path or the server; every objective); ids = log-probs at the sampled token and the teacher's "
        "top_k from the full distribution; hidden and ids need `opd serve-teacher --engine hf`",
    )  # fmt: skip
    payload_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="backend http, payload hidden: dtype of the hidden states on the wire (bfloat16 "
        "halves the bytes; a float32 server's states are then rounded)",
    )  # fmt: skip
    vllm_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="backend vllm: dtype"
    )
    vllm_max_model_len: int | None = Field(None, ge=1, description="backend vllm: context length; default: "
                                           "longest prompt + rollout.max_new_tokens")  # fmt: skip
    vllm_kv_cache_gb: int = Field(2, ge=1, description="backend vllm: CPU KV-cache GiB")
    vllm_gpu_memory: float = Field(0.3, gt=0, lt=1, description="backend vllm: share of GPU memory")
    fidelity_check: bool = Field(
        True, description="backend vllm/http: at start-up, score a few rollouts twice with the engine and "
        "once with the HF model at teacher.path (in teacher.dtype); warn above a mean |Δ log-prob| of 0.05",
    )  # fmt: skip

    @field_validator("urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        return [check_server_url(u) for u in urls]


class DataConfig(_Section):
    prompts: str = Field(
        "", description="JSONL, Parquet or CSV with `prompt` or `messages`, optional `answer`"
    )
    prompt_field: PromptColumn = "prompt"
    messages_field: MessagesColumn = "messages"
    answer_field: AnswerColumn = "answer"
    template: str = Field(
        "chat",
        description="raw | chat | dapo | boxed | chat:<named or format string> | a format string with {prompt}",
    )
    chat_template_kwargs: ChatTemplateKwargs
    system_prompt: str | None = Field(
        None, description="system message put before every prompt (chat templates)"
    )
    max_prompt_tokens: int = Field(
        1024,
        ge=1,
        description="longest rendered prompt in tokens; a longer one is an error naming its record",
    )
    shuffle: bool = Field(
        True, description="draw the prompts in a new seeded order each epoch; false: file order"
    )


class RolloutConfig(_Section):
    rollouts_per_prompt: int = Field(4, ge=1, description="student responses sampled per prompt each step")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling, 0 < p <= 1; 1 = off")
    top_k: int = Field(0, ge=0, description="0 = off; truncated sampling biases the sampled-token estimator")
    max_new_tokens: int = Field(256, ge=1, description="response budget (paper: 7168)")
    batch_size: int = Field(8, ge=1, description="prompts per generate call (each with all its rollouts)")
    stop_token_ids: list[int] = Field(default_factory=list, description="extra stop ids besides EOS")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf = transformers generate; vllm = a vLLM engine in the training process "
        "(pip install 'opd[vllm]'), weights pushed after every optimizer step",
    )  # fmt: skip
    vllm_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="vLLM engine dtype")
    vllm_max_model_len: int | None = Field(
        None, ge=1, description="vLLM context length; default: longest prompt + max_new_tokens"
    )
    vllm_kv_cache_gb: int = Field(2, ge=1, description="vLLM CPU KV-cache GiB (VLLM_CPU_KVCACHE_SPACE)")
    vllm_gpu_memory: float = Field(
        0.3, gt=0, lt=1, description="vLLM share of GPU memory (gpu_memory_utilization); the student trains "
        "in the rest (and a vLLM teacher takes teacher.vllm_gpu_memory)",
    )  # fmt: skip
    vllm_seeded: bool = Field(
        False, description="backend vllm: per-request seeds: the same rollouts on any process count and after a "
        "resume, on vLLM's slower seeded sampling path; false (default): vLLM's fast batched sampling, seeded "
        "once at engine start, so a resumed run draws other (equally on-policy) rollouts than an unbroken one",
    )  # fmt: skip


# The objective's names and their descriptions come from opd.objectives.registry, the one list that
# validation, help, docs/api.md and the tests read. These Literals give `opd config fields` and `opd train
# --help` the choices (those registered when this module is imported); LossConfig._registered validates
# against the live registry, so a divergence registered later is accepted too.
SignalName = Literal[tuple(registry.SIGNALS)]  # type: ignore[valid-type]
DivergenceName = Literal[tuple(registry.DIVERGENCES)]  # type: ignore[valid-type]
SupportName = Literal[tuple(registry.SUPPORTS)]  # type: ignore[valid-type]
RenormName = Literal[tuple(registry.RENORMS)]  # type: ignore[valid-type]


class LossConfig(_Section):
    signal: SignalName = Field("topk", description=registry.field_description("signal"))
    divergence: DivergenceName = Field("reverse_kl", description=registry.field_description("divergence"))
    k: int = Field(16, ge=1, description="tokens per position for signal topk (the paper's 16)")
    support: SupportName = Field("student", description=registry.field_description("support"))
    renorm: RenormName = Field("both", description=registry.field_description("renorm"))
    beta: float = Field(
        0.5, ge=0.0, le=1.0, description="the beta of loss.divergence " + " | ".join(
            d.name for d in registry.entries("divergence") if d.uses_beta) + ", in [0, 1] (see its description)",
    )  # fmt: skip
    chunk_size: int | None = Field(2048, ge=1, description="rows per chunk for full-vocabulary math")
    # the default is objectives.DEFAULT_CHUNK_ELEMENTS (a test keeps them equal)
    chunk_max_elements: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto", description="cap on rows x vocabulary per chunk of full-vocabulary math, bounding each temporary "
        "whatever the vocabulary; auto: by the compute device, 2^25 on the CPU (~128 MB fp32: 220 rows at 152k "
        "tokens) and 2^28 on a CUDA GPU (~1 GiB fp32: 1766 rows at 152k, so far fewer kernel launches per step), "
        "the number used is logged at start-up; a number: that cap on every device; null: chunk_size alone",
    )  # fmt: skip
    from_hidden_states: bool = Field(
        True, description="take the student's and HF teacher's last hidden states and project them to the vocabulary "
        "one chunk of response rows at a time inside the loss (opd.objectives.hidden), never building [B, T, V] logits; "
        "diagnostics, signal stats and the engine log-prob cross-check come from the same chunks. Under "
        "student.autocast the student's projection runs in the autocast dtype, as its head would. false = the "
        "plain path: [B, T, V] logits from each model's forward, then opd.objectives.token on them (the readable "
        "reference; needed only for a model whose head is not a linear layer)",
    )  # fmt: skip

    @field_validator("signal", "divergence", "support", "renorm", mode="plain", json_schema_input_type=str)
    @classmethod
    def _registered(cls, value: Any, info: ValidationInfo) -> str:
        names = registry.NameView(info.field_name)  # each field is named after its kind of registry entry
        if not isinstance(value, str) or value not in names:
            # pydantic's own wording for a Literal, so the message reads as every other choice field's
            expected = ", ".join(map(repr, names[:-1])) + f" or {names[-1]!r}"
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return value

    @field_validator("chunk_max_elements", mode="before")
    @classmethod
    def _chunk_elements(cls, value: Any) -> Any:
        if value is None or value == "auto":
            return value
        try:
            number = int(value) if not isinstance(value, (bool, float)) else None
        except (TypeError, ValueError):
            number = None
        if number is None or number < 1:
            raise ValueError("must be a positive integer (rows x vocabulary), auto (by device) or null")
        return number

    @model_validator(mode="after")
    def _combination(self) -> LossConfig:
        from opd.objectives.token import validate_objective

        try:
            validate_objective(self.signal, self.divergence, self.support, self.renorm, self.beta, self.k)
        except ValueError as exc:
            raise ValueError(f"loss: {exc}") from None
        return self


class OptimConfig(_Section):
    lr: float = Field(
        1e-6, gt=0.0, description="AdamW learning rate (peak, with a schedule); the paper uses 1e-6"
    )
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW moment decays, e.g. [0.9, 0.999]")
    eps: float = Field(1e-8, gt=0.0, description="AdamW denominator epsilon")
    max_grad_norm: float | None = Field(1.0, description="grad-norm clip; null disables")
    in_backward: bool = Field(
        False, description="step each parameter inside backward as soon as its gradient is ready and free the "
        "gradient at once (the same AdamW update, without a full set of gradients in memory); needs "
        "max_grad_norm null, one micro-batch per step and one process",
    )  # fmt: skip
    schedule: Literal["constant", "warmup", "cosine"] = Field(
        "constant", description="learning-rate schedule: constant | warmup (linear ramp to lr over the warm-up "
        "steps, then constant) | cosine (the same ramp, then cosine decay to min_lr_ratio x lr at the last step)",
    )  # fmt: skip
    warmup_steps: int = Field(
        0,
        ge=0,
        description="warm-up length in optimizer steps (schedules warmup and cosine); 0: warmup_ratio decides",
    )
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0, description="used when warmup_steps is 0")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine floor as a fraction of lr")
    fused: bool = Field(
        True, description="CUDA only: AdamW's fused kernel (one launch for every parameter instead of a loop of "
        "kernels; the same update up to rounding) when every trained parameter is a floating-point tensor "
        "on a GPU; false: torch's default (foreach) implementation",
    )  # fmt: skip


class DiagnosticsConfig(_Section):
    k: int = Field(16, ge=1, description="top-k for overlap metrics, independent of the loss k")
    position_bins: int = Field(4, ge=0, description="response-position bins for the long-horizon metrics")


class TrackingConfig(_Section):
    tensorboard: bool = Field(True, description="write TensorBoard events to RUN_DIR/tb")
    wandb: bool = Field(False, description="log to Weights & Biases too (pip install wandb; needs a login)")
    wandb_project: str = Field("opd", description="the Weights & Biases project")
    run_name: str | None = Field(
        None, description="the run's name in Weights & Biases; default: one wandb picks"
    )


class EvalConfig(_Section):
    """Evaluation, both `opd eval` and in the training loop (the paper evaluates in the loop)."""

    prompts: str = Field(
        "", description="held-out problems with an `answer` field; empty disables in-loop eval"
    )
    samples: int = Field(16, ge=1, description="k samples per problem (avg@k, pass@k)")
    temperature: float = Field(
        0.7, ge=0.0, description="sampling temperature of the eval samples; 0 = greedy"
    )
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling of the eval samples; 1 = off")
    max_new_tokens: int = Field(1024, ge=1, description="response budget of the eval samples, in tokens")
    batch_size: int = Field(8, ge=1, description="problems per generate call")
    verifier: str = Field("math", description=VERIFIER_HELP)
    every: int = Field(
        0, ge=0, description="in-loop eval every N steps (0 = off); also at step 0 and the end"
    )
    max_problems: int | None = Field(None, ge=1, description="evaluate only the first N problems")
    seed: int = Field(0, description="sampling seed of the eval samples (the same problems, the same draws)")


class AlarmConfig(_Section):
    """Collapse alarms during training (`opd.train.alarms`): the paper's late-collapse signatures (finding 7).

    Each watched metric is compared with its own baseline, an exponential moving average over the run's
    clean steps (steps with an alarm never update it, so a slow collapse cannot drag it along). A null
    threshold turns that signal off. Defaults are deliberately loose: a healthy run drifts slowly (overlap
    rises, entropy falls over hundreds of steps) and the alarms are for the step changes of a collapse.
    """

    enabled: bool = Field(True, description="watch for collapse and log alarms (metrics.jsonl + terminal)")
    warmup_steps: int = Field(
        5, ge=1, description="clean steps averaged into each baseline before that signal can alarm"
    )
    ema: float = Field(
        0.9, ge=0.0, lt=1.0,
        description="baseline decay after warm-up: b = ema*b + (1-ema)*x; 0.9 remembers ~10 clean steps",
    )  # fmt: skip
    entropy_ratio: float | None = Field(
        1.5, gt=1.0, description="alarm when student entropy > ratio x baseline (and above the floor below)"
    )
    entropy_min_delta: float = Field(
        0.2,
        ge=0.0,
        description="entropy must also exceed its baseline by this many nats, so near-zero ones stay quiet",
    )
    overlap_drop: float | None = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="alarm when the overlap ratio falls this far (absolute) below baseline",
    )
    length_ratio: float | None = Field(
        2.0, gt=1.0, description="alarm when the mean response length > ratio x baseline"
    )
    truncation_jump: float | None = Field(
        0.2, gt=0.0, le=1.0, description="alarm when the truncation rate exceeds its baseline by this much"
    )
    grad_norm_ratio: float | None = Field(
        5.0, gt=1.0, description="alarm when the (pre-clip) gradient norm > ratio x baseline"
    )
    patience: int = Field(
        3, ge=1, description="consecutive alarming steps that declare a collapse; fewer only warn"
    )


class TrainConfig(_Section):
    student: StudentConfig = StudentConfig()
    teacher: TeacherConfig = TeacherConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    alarms: AlarmConfig = AlarmConfig()

    run_dir: str = Field(
        "runs/opd",
        description="where the run writes config.yaml, metrics.jsonl, checkpoints/, final/ and tb/",
    )
    steps: int | None = Field(None, ge=1, description="optimizer steps; default: one epoch of prompts")
    prompts_per_step: int = Field(64, ge=1, description="global, across all processes")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward/backward (grad accumulation)")
    micro_batch_tokens: int | None = Field(
        None, ge=1, description="also cap each micro-batch at this many padded tokens, rows x (prompt width + "
        "response width) once all-padding columns are trimmed, so long and short responses cost even memory: "
        "rows are sorted by length and packed under both caps (a single longer sequence runs alone); the loss "
        "stays a mean over the whole step. null: micro_batch_size alone, rows in rollout order",
    )  # fmt: skip
    seed: int = Field(0, description="seed of the prompt order and of rollout sampling")
    checkpoint_every: int = Field(50, ge=1, description="save a resumable checkpoint every N optimizer steps")
    keep_checkpoints: int = Field(
        2, ge=1, description="checkpoints kept in RUN_DIR/checkpoints; older ones are deleted"
    )
    stop_on_nan: bool = Field(
        True, description="stop (exit code 3) on a non-finite loss or gradient instead of skipping the step"
    )
    stop_on_collapse: bool = Field(
        False,
        description="stop when alarms declare a collapse (exit code 4), naming the last good checkpoint; "
        "a bare --stop-on-collapse means true",
    )
    save_final: bool = Field(True, description="save the trained model to RUN_DIR/final at the end")
    startup_checks: bool = Field(True, description="tokenizer/EOS checks and the teacher-fidelity self-test")
    precision_check: Literal["refuse", "warn", "off"] = Field(
        "refuse", description="at start-up, time a matmul in each chosen low-precision dtype on this device "
        "(cached per machine): warn when it is 2x slower than float32, refuse at 8x (a CPU without bf16 "
        "instructions runs bf16 ~150x slower); warn = only warn, off = no probe",
    )  # fmt: skip
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="fsdp = shard the student's weights, gradients and optimizer state over the processes "
        "(torch FSDP2, one unit per decoder layer; CPU/gloo or GPU); none = every process holds the whole student",
    )  # fmt: skip
    tf32: Tf32 = True
    expandable_segments: ExpandableSegments = True
    dist_timeout_s: DistTimeout = None

    @model_validator(mode="after")
    def _sharding(self) -> TrainConfig:
        if self.sharding != "fsdp":
            return self
        if self.student.lora.enabled:
            raise ValueError("sharding fsdp with student.lora.enabled is not supported; LoRA students are small "
                             "enough for sharding none")  # fmt: skip
        if self.rollout.backend != "hf":
            raise ValueError("sharding fsdp with rollout.backend vllm is not supported yet (the engine would need "
                             "the gathered weights after every step); use rollout.backend hf")  # fmt: skip
        if self.eval.every > 0:
            raise ValueError("sharding fsdp with in-loop evaluation (eval.every > 0) is not supported yet; "
                             "evaluate the saved checkpoints with `opd eval`")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _in_backward(self) -> TrainConfig:
        if not self.optim.in_backward:
            return self
        why = "optim.in_backward steps every parameter during backward"
        if self.optim.max_grad_norm is not None:
            raise ValueError(f"{why}, before the global gradient norm exists, so it cannot clip: set "
                             "optim.max_grad_norm null (or optim.in_backward false)")  # fmt: skip
        if self.micro_batch_tokens is not None:
            raise ValueError(f"{why}, so a step must be one micro-batch, which micro_batch_tokens "
                             f"{self.micro_batch_tokens} cannot promise (the split depends on the sampled lengths); "
                             "set micro_batch_tokens null (or optim.in_backward false)")  # fmt: skip
        per_step = self.prompts_per_step * self.rollout.rollouts_per_prompt
        if self.micro_batch_size < per_step:
            raise ValueError(f"{why}, so there is no gradient accumulation: micro_batch_size {self.micro_batch_size} "
                             f"< prompts_per_step x rollout.rollouts_per_prompt = {per_step}; set micro_batch_size "
                             f">= {per_step} (or optim.in_backward false)")  # fmt: skip
        # each generate call's sequences are one micro-batch
        if self.rollout.batch_size < self.prompts_per_step:
            raise ValueError(f"{why}, so a step must be one micro-batch, but rollout.batch_size "
                             f"{self.rollout.batch_size} < prompts_per_step {self.prompts_per_step} splits it into "
                             f"several; set rollout.batch_size >= {self.prompts_per_step} (or optim.in_backward "
                             "false)")  # fmt: skip
        if self.sharding != "none":
            raise ValueError(f"{why}; with sharding {self.sharding} use optim.in_backward false (FSDP already "
                             "shards the gradients)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _teacher_backend(self) -> TrainConfig:
        """A top-K teacher cannot serve every objective: refuse the impossible ones before any compute."""
        tc = self.teacher
        if tc.backend == "hf" or (tc.backend == "http" and tc.payload == "hidden"):
            return self
        from opd.objectives.topk import check_sparse_objective

        try:
            check_sparse_objective(self.loss.signal, self.loss.support, self.loss.k, tc.top_k)
        except ConfigError as exc:
            which = f"teacher.backend {tc.backend}" + (
                f", teacher.payload {tc.payload}" if tc.backend == "http" else ""
            )
            serve = ("; teacher.payload hidden (`opd serve-teacher MODEL --engine hf`) serves every objective"
                     if tc.backend == "http" else "")  # fmt: skip
            raise ValueError(f"{which}: {exc}{serve}") from None
        if self.diagnostics.k > tc.top_k:
            raise ValueError(
                f"teacher.backend {tc.backend}: diagnostics.k {self.diagnostics.k} > teacher.top_k {tc.top_k}; "
                "the overlap metrics need the teacher's top-k, lower diagnostics.k or raise teacher.top_k"
            )
        return self

    def require_paths(self) -> None:
        """Paths have no sensible default, but `opd config show` must work without them."""
        missing = [
            name
            for name, value in (
                ("student.path", self.student.path),
                ("teacher.path", self.teacher.path if self.teacher.backend != "http" else "-"),
                ("teacher.urls", self.teacher.urls if self.teacher.backend == "http" else "-"),
                ("data.prompts", self.data.prompts),
            )
            if not value
        ]
        if missing:
            raise ConfigError(
                f"missing required setting(s): {', '.join(missing)}; set them in the YAML file "
                f"or as CLI options, e.g. --{missing[0]} VALUE"
            )


# ----------------------------------------------------------------------------------------------------
# Loading and overrides

# Short CLI spellings for the options people type most; everything else is --section.field.
ALIASES: dict[str, str] = {
    "student": "student.path",
    "teacher": "teacher.path",
    "prompts": "data.prompts",
    "template": "data.template",
    "lr": "optim.lr",
    "signal": "loss.signal",
    "divergence": "loss.divergence",
    "k": "loss.k",
}


def options_listing(command: str | None = None) -> str:
    """The command that lists every option of `command` (an `opd` command's name, e.g. "train", "doctor"),
    for the "unknown option" and "unknown key" errors: a user who misspelt one must be sent to the list of
    that command's own options, not another's. None: a config whose command is not named."""
    if command == "train":
        return "`opd config fields`"
    return f"`opd config fields --command {command or 'NAME'}`"


def field_paths(model: type[BaseModel] = TrainConfig, prefix: str = "") -> dict[str, str]:
    """Every settable dotted path with its description, for help text and override checking."""
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        path = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(field_paths(ann, path + "."))
        else:
            out[path] = info.description or ""
    return out


def _string_fields(model: type[BaseModel], prefix: str = "") -> dict[str, bool]:
    """Dotted paths of string fields, mapped to whether they also accept null."""
    out: dict[str, bool] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_string_fields(ann, f"{prefix}{name}."))
        elif ann is str or ann == (str | None):
            out[f"{prefix}{name}"] = ann is not str
    return out


def _bool_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of plain bool fields: on the command line these may be given as bare flags."""
    out: set[str] = set()
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _bool_fields(ann, f"{prefix}{name}.")
        elif ann is bool:
            out.add(f"{prefix}{name}")
    return out


def _close_keys(key: str, candidates: list[str]) -> list[str]:
    """The known names closest to a misspelt one (command line and YAML share the suggestion)."""
    import difflib

    def ratio(c: str) -> float:
        return difflib.SequenceMatcher(None, key, c).ratio()

    close = difflib.get_close_matches(key, candidates, n=3)
    if close:  # only the near-best: `loss.sigal` -> loss.signal, not also loss.k because of "loss."
        best = ratio(close[0])
        close = [c for c in close if ratio(c) >= best - 0.1]
    if not close and "." in key:  # a long path: match its last part, in its own section first
        parent, leaf = key.rsplit(".", 1)
        pool = [c for c in candidates if c.rpartition(".")[0] == parent] or candidates
        by_leaf: dict[str, str] = {}
        for c in pool:
            by_leaf.setdefault(c.rsplit(".", 1)[-1], c)
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=3)]
    return close


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _yaml_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of every mapping key in a YAML text, by key path, so errors can point at the line."""
    out: dict[tuple[str, ...], int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, str(key_node.value))
                out.setdefault(key, key_node.start_mark.line + 1)
                walk(value_node, key)

    with contextlib.suppress(yaml.YAMLError):  # the text already parsed; lines are only a courtesy
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    return out


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(
    args: list[str],
    model: type[BaseModel] | None = None,
    aliases: dict[str, str] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Turn ``--a.b value`` / ``--a.b=value`` / ``--a-b value`` into a nested dict.

    Values are parsed as YAML scalars so ``--loss.k 8`` is an int and ``--tracking.wandb true`` a bool.
    A bool field given as a bare flag (``--stop-on-collapse`` with no value, i.e. last or followed by
    another ``--option``) is true. Unknown paths fail here, with the closest known names, rather than
    deep inside pydantic, pointing to the list of `command`'s options (`options_listing`; default: the
    TrainConfig list, `opd config fields`, when no model is given).
    """
    if model is None:
        model, command = TrainConfig, command or "train"
    aliases = ALIASES if aliases is None else aliases
    known = field_paths(model)
    string_fields = _string_fields(model)
    bool_fields = _bool_fields(model)
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.field VALUE")
        key = arg[2:]
        raw: str | None = None
        if "=" in key:
            key, raw = key.split("=", 1)
        key = key.replace("-", "_")
        key = aliases.get(key, key)
        if key not in known and not key.startswith("data.chat_template_kwargs."):
            close = _close_keys(key, list(known) + list(aliases))
            hint = f" did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown option --{key}.{hint} {options_listing(command)} lists every option")
        if raw is not None:
            i += 1
        elif key in bool_fields and (i + 1 >= len(args) or args[i + 1].startswith("--")):
            raw = "true"  # a bare flag
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"option {arg} needs a value")
            raw = args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string; people mean a number
            with contextlib.suppress(ValueError):
                value = float(value)
        # String fields (paths, templates, ...) take the text as typed, even when it looks like YAML.
        if key in string_fields:
            value = None if raw in ("null", "~") and string_fields[key] else raw
        _set_path(tree, key, value)
    return tree


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, section by section; a new dict that shares nothing with either."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _format_validation(
    exc: ValidationError,
    source: str,
    model: type[BaseModel] | None = None,
    key_lines: dict[tuple[str, ...], int] | None = None,
    command: str | None = None,
) -> str:
    """One line for all of a config's errors; an unknown key gets its YAML line (`key_lines`, from
    `_yaml_key_lines`) and the closest known keys, as an unknown command-line option does."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            # sections too, so a misspelt section (`studnet:`) finds `student`
            known = {q for f in field_paths(model) for q in _prefixes(f)} if model is not None else set()
            close = _close_keys(loc, sorted(known))
            hint = f"did you mean {', '.join(close)}? " if close else "check the spelling; "
            msg = f"unknown key ({hint}{options_listing(command)} lists every key)"
            line = (key_lines or {}).get(tuple(str(p) for p in err["loc"]))
            if line is not None:
                loc = f"{loc} (line {line})"
        got = err.get("input")
        shown = "" if isinstance(got, dict) or err["type"] == "extra_forbidden" else f" (got {got!r})"
        parts.append(f"{loc}: {msg}{shown}")
    return f"invalid configuration in {source}: " + "; ".join(parts)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a dict; UTF-8 with or without a BOM, every failure one ConfigError line."""
    return _read_yaml_text(path)[0]


def _read_yaml_text(path: str | Path) -> tuple[dict[str, Any], str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = read_utf8(p, ConfigError, "config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]  # YAML's own text spans lines
        col = f", column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML ({what}{col}); fix the file.") from exc
    if data is None:
        return {}, text
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data, text


def build_config(
    data: dict[str, Any],
    source: str = "config",
    model: type[BaseModel] | None = None,
    key_lines: dict[tuple[str, ...], int] | None = None,
    command: str | None = None,
) -> Any:
    """Validate `data` against `model` (default TrainConfig, `opd train`'s); every error in one ConfigError
    line, an unknown key pointing to the list of `command`'s options."""
    if model is None:
        model, command = TrainConfig, command or "train"
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source, model, key_lines, command)) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    model: type[BaseModel] | None = None,
    aliases: dict[str, str] | None = None,
    command: str | None = None,
) -> Any:
    """YAML file (optional) with CLI overrides on top, validated against `model` (default TrainConfig).

    Other commands (sft, generate, ...) pass their own config class, short aliases and name (`command`,
    so that a misspelt option or key points to `opd config fields --command NAME`).
    """
    return config_from(path, parse_overrides(overrides or [], model, aliases, command), model, command)


def config_from(
    path: str | Path | None,
    values: dict[str, Any],
    model: type[BaseModel] | None = None,
    command: str | None = None,
) -> Any:
    """YAML file (optional) with already-parsed command-line `values` on top, validated against `model`;
    an unknown key in the file is reported with its line and the list of `command`'s options
    (command-line values were checked when parsed)."""
    data: dict[str, Any] = {}
    key_lines: dict[tuple[str, ...], int] = {}
    if path:
        data, text = _read_yaml_text(path)
        key_lines = _yaml_key_lines(text)
    source = f"{path} + command line" if path and values else str(path or "command line")
    return build_config(deep_merge(data, values), source, model, key_lines, command)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
