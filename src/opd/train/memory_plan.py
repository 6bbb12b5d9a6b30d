"""An estimate of a training config's peak GPU memory per process, from the models' shapes.

Why: a recipe that needs more than the GPU has fails only after minutes of model loading, and the
arithmetic behind "does it fit" (weights, AdamW, teacher, KV cache, activations, loss chunks) is easy to
get wrong by a factor: the paper's setup as first written needed an fp32 KV cache of 32 x 8K tokens
(~56 GiB) and ~175 GiB of fp32 activations on top of ~33 GiB of weights, optimizer state and teacher.
`estimate_memory` writes that arithmetic down once, per component and per phase, so a recipe can be
checked against a budget on a machine without a GPU (`tests/test_memory_plan.py` checks the paper recipes).

These are ESTIMATES, not measurements. What they assume:

- A step has two memory phases, and the peak is the larger one: **rollouts** (HF `generate` with its KV
  cache; the student's gradients are freed, `zero_grad(set_to_none=True)`) and **update** (one micro-batch's
  forward and backward while the step's gradients accumulate). The teacher's scoring forward of a
  micro-batch runs before the student's and is not counted on top of it. Freed memory is reused across
  phases (the trainer sets ``expandable_segments``, which keeps fragmentation low).
- Parameter counts come from the shapes (`ModelShape.params`): embeddings, attention and SwiGLU MLP
  weights, norms, the head when untied. AdamW keeps two moments in the weights' dtype (fused on CUDA, so
  no temporaries). Several processes without FSDP: DDP's gradient buckets are another copy of the
  gradients (accelerate's default ``gradient_as_bucket_view=False``).
- Autocast keeps a low-precision copy of every weight a matmul casts (all but the input embedding) while
  its context is open.
- HF generation keeps ``sequences x (prompt + new tokens) x layers x 2 x KV heads x head_dim`` cache entries
  in the compute dtype (bf16 under autocast, the weights' dtype otherwise); a generate call holds
  ``min(rollout.batch_size, the process's prompts) x rollouts_per_prompt`` sequences.
- Activations per token and decoder layer (`ModelShape.activation_bytes`, flash / memory-efficient SDPA,
  so no ``S x S`` term): the two norms' inputs and outputs in the residual dtype, the projections' inputs
  (autocast casts one copy per projection), q/k/v and the attention output, Qwen3's q/k norms, the MLP's
  four ``intermediate``-wide tensors. With checkpointing each layer keeps only its input, and one layer at
  a time is recomputed (its activations and their gradients: twice the per-layer figure).
- The hidden-state loss holds ``LOSS_TEMPORARIES`` float32 ``[rows, V]`` temporaries of a chunk at once
  (student and teacher rows, log-softmaxes, the gradient, diagnostics), plus the head's autocast copy, its
  fp32 gradient accumulator and the hidden states' gradient. The logits path holds the student's ``[R, V]``
  logits (compute dtype, fp32 copy, fp32 gradient) and an HF teacher's.
- A fixed ``RUNTIME_GIB`` covers the CUDA context, cuBLAS workspaces and NCCL buffers.
- vLLM engines take their ``*_gpu_memory`` share of the GPU for the whole run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from opd.config import TrainConfig
from opd.errors import ConfigError
from opd.generation.build import rollout_engine_in_process, rollouts_run_the_student
from opd.objectives.token import chunk_rows
from opd.teachers.build import loads_teacher_weights, teacher_engine_in_process

__all__ = [
    "GIB",
    "GROUPS",
    "H100_80GB_GIB",
    "LOSS_TEMPORARIES",
    "PAPER_MODELS",
    "RUNTIME_GIB",
    "MemoryEstimate",
    "ModelShape",
    "Part",
    "estimate_memory",
    "micro_batch_tokens",
    "shapes_for",
    "summary_table",
]

GIB = 2**30
H100_80GB_GIB = 81_559 / 1024  # what nvidia-smi reports for an H100 80 GB: 81,559 MiB = 79.6 GiB
RUNTIME_GIB = 2.0  # CUDA context (~0.5 GiB), cuBLAS workspaces, NCCL buffers
LOSS_TEMPORARIES = 8  # float32 [rows, V] tensors of one loss chunk alive at once (loss + diagnostics)

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # auto: the checkpoint's (bf16 here)


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer with SwiGLU MLPs (Llama / Qwen2 / Qwen3 families)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qk_norm: bool = False  # Qwen3: RMSNorm on every head's queries and keys
    qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.q_width, self.kv_width
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return attn + 3 * h * self.intermediate + norms

    @property
    def params(self) -> int:
        """Every parameter: embedding, decoder layers, final norm, and the head unless it is tied."""
        embed = self.vocab * self.hidden
        return embed + self.layers * self.layer_params + self.hidden + (0 if self.tied else embed)

    @property
    def cast_params(self) -> int:
        """The parameters autocast copies to the compute dtype: every matmul weight (the tied head's too),
        not the input embedding lookup."""
        return self.params - (0 if self.tied else self.vocab * self.hidden)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return self.layers * 2 * self.kv_width * dtype_bytes

    def activation_bytes(self, compute_bytes: int, residual_bytes: int, autocast: bool) -> int:
        """Bytes one decoder layer keeps for backward per token, without checkpointing (see the module
        docstring for what is counted)."""
        h, q, kv, c = self.hidden, self.q_width, self.kv_width, compute_bytes
        norms = 2 * 2 * h * residual_bytes  # two RMSNorms: input and normalised output
        inputs = (
            (5 if autocast else 2) * h * c
        )  # q/k/v and gate/up inputs (one cast copy each under autocast)
        attention = (2 * q + 2 * kv) * c + q * c  # q, k, v, the attention output, o_proj's input
        qk_norm = (q + kv) * (c + 4) if self.qk_norm else 0  # input and fp32 normalised values
        mlp = 4 * self.intermediate * c  # gate and up outputs, SiLU(gate), the product down_proj reads
        return norms + inputs + attention + qk_norm + mlp

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelShape:
        """The shape of a transformers config (a `PretrainedConfig` or its ``config.json`` as a dict)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(
            layers=int(get("num_hidden_layers")),
            hidden=hidden,
            intermediate=int(get("intermediate_size")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            vocab=int(get("vocab_size")),
            tied=bool(get("tie_word_embeddings", False)),
            qk_norm=str(get("model_type", "")).startswith("qwen3"),
            qkv_bias=bool(get("attention_bias", False)) or str(get("model_type", "")) == "qwen2",
        )


# The models of the paper's recipes, from their config.json files (assumptions: read off the published
# configs, not loaded here). Qwen2.5's 7B head has 152,064 rows; the shared vocabulary is the smaller.
PAPER_MODELS: dict[str, ModelShape] = {
    "Qwen/Qwen3-1.7B": ModelShape(28, 2048, 6144, 16, 8, 128, 151_936, tied=True, qk_norm=True),
    "Qwen/Qwen3-4B": ModelShape(36, 2560, 9728, 32, 8, 128, 151_936, tied=True, qk_norm=True),
    "Qwen/Qwen3-8B": ModelShape(36, 4096, 12288, 32, 8, 128, 151_936, tied=False, qk_norm=True),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": ModelShape(
        28, 1536, 8960, 12, 2, 128, 151_936, tied=False, qkv_bias=True
    ),  # fmt: skip
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": ModelShape(
        28, 3584, 18944, 28, 4, 128, 152_064, tied=False, qkv_bias=True
    ),  # fmt: skip
    "Skywork/Skywork-OR1-Math-7B": ModelShape(
        28, 3584, 18944, 28, 4, 128, 152_064, tied=False, qkv_bias=True
    ),
}


def shapes_for(cfg: TrainConfig) -> tuple[ModelShape, ModelShape | None]:
    """The student's and (HF) teacher's shapes from `PAPER_MODELS`, by their paths; None for a teacher
    whose weights are not in the training process. A ConfigError names a path it does not know."""
    needs = [("student", cfg.student.path)]
    in_process = loads_teacher_weights(cfg.teacher)
    if in_process:
        needs.append(("teacher", cfg.teacher.path))
    for role, path in needs:
        if path not in PAPER_MODELS:
            raise ConfigError(
                f"memory estimate: no shape for {role} {path!r} (known: {', '.join(PAPER_MODELS)}); pass "
                "ModelShape.from_hf_config(AutoConfig.from_pretrained(PATH)) to estimate_memory"
            )
    return PAPER_MODELS[cfg.student.path], PAPER_MODELS[cfg.teacher.path] if in_process else None


def micro_batch_tokens(cfg: TrainConfig) -> int:
    """The most padded tokens one micro-batch can hold: `micro_batch_size` full-length sequences (longest
    prompt + max_new_tokens), capped by `micro_batch_tokens` (a single longer sequence still runs alone)."""
    seq = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    most = cfg.micro_batch_size * seq
    if cfg.micro_batch_tokens is None:
        return most
    return min(most, max(cfg.micro_batch_tokens, seq))


GROUPS = (
    "student weights + AdamW",
    "teacher weights or vLLM engines",
    "DDP gradient buckets",
    "gradients",
    "autocast weight copies",
    "KV cache (rollouts)",
    "activations (update)",
    "loss (update)",
    "teacher targets (update)",
    "CUDA context, NCCL, workspaces",
)


@dataclass(frozen=True)
class Part:
    """One component: its `group` (one of `GROUPS`, the same across configs), what it is with this config's
    numbers (`label`), and its GiB in each phase (None where the phase does not hold it)."""

    group: str
    label: str
    rollouts: float | None
    update: float | None


@dataclass
class MemoryEstimate:
    """GiB per component for each phase of a step on one process; `peak_gib` is the larger phase."""

    processes: int
    gpu_gib: float
    parts: list[Part] = field(default_factory=list)

    def add(self, group: str, label: str, gib: float, *, rollouts: bool = True, update: bool = True) -> None:
        assert group in GROUPS, group
        self.parts.append(Part(group, label, gib if rollouts else None, gib if update else None))

    @property
    def phases(self) -> dict[str, float]:
        return {
            "rollouts": sum(p.rollouts or 0.0 for p in self.parts),
            "update": sum(p.update or 0.0 for p in self.parts),
        }

    @property
    def peak_gib(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        phases = self.phases
        return max(phases, key=lambda k: phases[k])

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.gpu_gib

    def group_gib(self, group: str) -> float:
        """The group's GiB in the phase where it is largest (0 when the config has none of it)."""
        return max(sum(getattr(p, ph) or 0.0 for p in self.parts if p.group == group) for ph in self.phases)

    def table(self) -> str:
        """A markdown table: one row per component, its GiB in each phase, then the totals."""
        rows = ["| component | rollouts GiB | update GiB |", "| --- | ---: | ---: |"]
        for p in self.parts:
            cells = ["-" if v is None else f"{v:.1f}" for v in (p.rollouts, p.update)]
            rows.append(f"| {p.label} | {cells[0]} | {cells[1]} |")
        totals = self.phases
        rows.append(f"| **total** | **{totals['rollouts']:.1f}** | **{totals['update']:.1f}** |")
        return "\n".join(rows) + "\n"


def summary_table(columns: dict[str, tuple[MemoryEstimate, MemoryEstimate | None]]) -> str:
    """A markdown table with one column per named estimate: each group's GiB (in its larger phase), the two
    phases, the peak against the GPU, and the peak of a second estimate (e.g. the settings as first shipped)."""
    names = list(columns)
    head = "| GiB per process | " + " | ".join(names) + " |"
    rows = [head, "| --- |" + " ---: |" * len(names)]
    ests = [columns[n][0] for n in names]
    for group in GROUPS:
        values = [e.group_gib(group) for e in ests]
        if any(values):
            rows.append(f"| {group} | " + " | ".join(f"{v:.1f}" if v else "-" for v in values) + " |")
    for phase in ("rollouts", "update"):
        rows.append(f"| {phase} phase | " + " | ".join(f"{e.phases[phase]:.1f}" for e in ests) + " |")
    rows.append(
        "| **peak** | "
        + " | ".join(f"**{e.peak_gib:.1f}** of {e.gpu_gib:.1f}{'' if e.fits else ' (over)'}" for e in ests)
        + " |"
    )
    before = [columns[n][1] for n in names]
    if any(b is not None for b in before):
        cells = ["-" if b is None else f"{b.peak_gib:.1f} ({b.peak_phase}){'' if b.fits else ', over'}"
                 for b in before]  # fmt: skip
        rows.append("| peak as first shipped | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def estimate_memory(cfg: TrainConfig, student: ModelShape, teacher: ModelShape | None = None, *, processes: int,
                    gpu_gib: float = H100_80GB_GIB) -> MemoryEstimate:  # fmt: skip
    """Estimated peak GPU memory of one process of `cfg` run on `processes` processes (GiB, per component
    and phase; see the module docstring for every assumption). `teacher` is the in-process HF teacher's
    shape (None for a vLLM or HTTP teacher); `gpu_gib` sizes vLLM's ``*_gpu_memory`` shares and `fits`."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    st, tc, ro = cfg.student, cfg.teacher, cfg.rollout
    if loads_teacher_weights(tc) and teacher is None:
        raise ValueError(
            f"teacher.backend {tc.backend} keeps the teacher in the process: pass its ModelShape"
        )
    sb = _DTYPE_BYTES[st.dtype]
    autocast = st.autocast != "none"
    cb = 2 if autocast else sb  # the compute dtype's bytes
    fsdp = cfg.sharding == "fsdp"
    shard = processes if fsdp else 1
    trainable = _lora_params(cfg, student) if st.lora.enabled else student.params
    seq = cfg.data.max_prompt_tokens + ro.max_new_tokens
    est = MemoryEstimate(processes=processes, gpu_gib=gpu_gib)
    sharded = f", 1/{shard} (fsdp)" if fsdp else ""

    # in both phases
    weights = "student weights + AdamW"
    est.add(weights, f"student weights ({st.dtype}{sharded})", student.params * sb / shard / GIB)
    est.add(weights, f"AdamW moments (2 x {st.dtype}{sharded})", trainable * 2 * sb / shard / GIB)
    engines = "teacher weights or vLLM engines"
    if loads_teacher_weights(tc):
        assert teacher is not None
        offload = tc.placement != "device"
        resident = (
            2 * teacher.layer_params if offload else teacher.params
        )  # offloaded: two layers streamed in
        label = f"teacher weights ({tc.dtype}{', cpu_offload: 2 layers' if offload else ''})"
        est.add(engines, label, resident * _DTYPE_BYTES[tc.dtype] / GIB)
    elif teacher_engine_in_process(tc):
        est.add(engines, f"vLLM teacher engine (teacher.vllm_gpu_memory {tc.vllm_gpu_memory})",
                tc.vllm_gpu_memory * gpu_gib)  # fmt: skip
    if rollout_engine_in_process(ro):
        est.add(engines, f"vLLM rollout engine (rollout.vllm_gpu_memory {ro.vllm_gpu_memory})",
                ro.vllm_gpu_memory * gpu_gib)  # fmt: skip
    if processes > 1 and not fsdp:
        est.add("DDP gradient buckets", f"DDP gradient buckets ({st.dtype})", trainable * sb / GIB)
    est.add("CUDA context, NCCL, workspaces", "CUDA context, NCCL, workspaces", RUNTIME_GIB)
    if autocast:
        cast = student.cast_params * 2 / shard / GIB
        est.add("autocast weight copies", f"autocast copies of the weights ({st.autocast})", cast,
                rollouts=rollouts_run_the_student(ro))  # fmt: skip

    # rollouts: HF generate's KV cache
    if rollouts_run_the_student(ro):
        prompts = min(ro.batch_size, math.ceil(cfg.prompts_per_step / processes))
        sequences = prompts * ro.rollouts_per_prompt
        kv = sequences * seq * student.kv_bytes_per_token(cb)
        label = f"KV cache ({sequences} seqs x {seq} tokens, {'bf16' if cb == 2 else 'fp32'})"
        est.add("KV cache (rollouts)", label, kv / GIB, update=False)

    # update: one micro-batch's forward and backward
    tokens = micro_batch_tokens(cfg)
    if cfg.optim.in_backward:
        est.add("gradients", "gradients (one tensor at a time: optim.in_backward)",
                student.vocab * student.hidden * sb / GIB, rollouts=False)  # fmt: skip
    else:
        est.add("gradients", f"gradients ({st.dtype}{sharded})", trainable * sb / shard / GIB, rollouts=False)
    per_layer = student.activation_bytes(cb, sb, autocast)
    if st.gradient_checkpointing:
        act = tokens * student.layers * student.hidden * sb + 2 * tokens * per_layer
        label = f"activations ({tokens} tokens, checkpointed)"
    else:
        act = tokens * student.layers * per_layer
        label = f"activations ({tokens} tokens)"
    est.add("activations (update)", label, act / GIB, rollouts=False)
    vocab = min(student.vocab, teacher.vocab) if teacher is not None else student.vocab
    response = min(tokens, cfg.micro_batch_size * ro.max_new_tokens)  # response rows of a micro-batch
    if cfg.loss.from_hidden_states:
        rows = chunk_rows(vocab, cfg.loss.chunk_size, cfg.loss.chunk_max_elements, device="cuda") or response
        rows = min(rows, response)
        loss = LOSS_TEMPORARIES * rows * vocab * 4 + vocab * student.hidden * (4 + (2 if autocast else 0))
        loss += tokens * student.hidden * 4  # the hidden states' gradient
        est.add("loss (update)", f"loss chunks ({rows} rows x {vocab})", loss / GIB, rollouts=False)
    else:
        logits = response * vocab * (cb + 4 + 4)
        if teacher is not None:
            logits += response * vocab * (_DTYPE_BYTES[tc.dtype] + 4)
        est.add("loss (update)", f"logits ({response} rows x {vocab})", logits / GIB, rollouts=False)
    if teacher is not None:
        hidden = tokens * teacher.hidden * _DTYPE_BYTES[tc.dtype] / GIB
        est.add("teacher targets (update)", "teacher hidden states", hidden, rollouts=False)
    else:  # a top-K teacher's targets for the process's whole step: int64 ids and fp32 log-probs per slot
        positions = math.ceil(cfg.prompts_per_step / processes) * ro.rollouts_per_prompt * ro.max_new_tokens
        est.add("teacher targets (update)", f"top-{tc.top_k} teacher targets of the step",
                positions * (12 * tc.top_k + 4) / GIB, rollouts=False)  # fmt: skip
    return est


def _lora_params(cfg: TrainConfig, shape: ModelShape) -> int:
    """LoRA adapter parameters when every linear layer of the decoder gets one (all-linear): r x (in + out)
    per projection; fewer target modules only make the estimate larger than the truth."""
    h, q, kv, i = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate
    per_layer = (h + q) * 2 + (h + kv) * 2 + 2 * (h + i) + (i + h)
    return cfg.student.lora.r * per_layer * shape.layers
