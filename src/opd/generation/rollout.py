"""Student rollouts: the `Rollout` object and the Hugging Face generator.

OPD grades the student on its own samples, so the rollouts must come from exactly the policy being
trained: every sampling knob a model's `generation_config.json` may carry (Qwen ships top_k=20,
repetition_penalty=1.05, temperature=0.7, ...) is overridden here, not inherited.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256


@dataclass
class Rollout:
    """A batch of student samples, laid out so one forward pass scores every response position.

    Prompts are left-padded to a common length P and responses right-padded to T, so the logits that
    produced response token t sit at sequence position P - 1 + t for every row.
    """

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P] 1 = real token
    response_ids: torch.Tensor  # [B, T] right-padded
    response_mask: torch.Tensor  # [B, T] bool: tokens up to and including the first stop token
    truncated: torch.Tensor  # [B] bool: no stop token within the budget
    prompt_index: list[int] = field(default_factory=list)  # record index of each row's prompt
    # [B, T] log-probs of the sampled tokens as the generating engine computed them (vLLM); only a
    # cross-check against the trainer's own log-probs, never used by the objective. None for HF.
    engine_logprobs: torch.Tensor | None = None

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_ids.shape[1])

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask and position_ids of prompt + response.

        Position ids are counted from the first real token, as `generate` does with left padding;
        without them a plain forward would shift every position by the pad count and score the
        response under different positions than it was sampled with.
        """
        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        attn = torch.cat([self.prompt_mask.long(), self.response_mask.long()], dim=1)
        pos = (torch.cumsum(attn, dim=1) - 1).clamp(min=0)
        return ids, attn, pos

    def to(self, device: torch.device | str) -> Rollout:
        """The same rollout with every tensor on `device` (see opd.device: moved once, by the trainer)."""
        device = torch.device(device)
        if self.response_ids.device == device:
            return self
        return Rollout(
            prompt_ids=self.prompt_ids.to(device),
            prompt_mask=self.prompt_mask.to(device),
            response_ids=self.response_ids.to(device),
            response_mask=self.response_mask.to(device),
            truncated=self.truncated.to(device),
            prompt_index=list(self.prompt_index),
            engine_logprobs=None if self.engine_logprobs is None else self.engine_logprobs.to(device),
        )

    def select(self, rows: slice | torch.Tensor | Sequence[int]) -> Rollout:
        """A row slice or row indices, trimmed of columns that are padding in every selected row.

        Trimming is what makes a micro-batch of short rows cheap: its forward runs at its own width, not
        at the width of the longest row of the chunk. Indices (any order, as `plan_step_micro_batches` gives
        them) let rows of similar length from anywhere in the chunk share a micro-batch.
        """
        if not isinstance(rows, slice):
            rows = _row_indices(rows)
        pm = self.prompt_mask[rows]
        rm = self.response_mask[rows]
        first = int((pm.sum(0) > 0).nonzero()[0]) if pm.any() else 0
        last = int((rm.sum(0) > 0).nonzero()[-1]) + 1 if rm.any() else 1
        index = (
            self.prompt_index[rows]
            if isinstance(rows, slice)
            else [self.prompt_index[i] for i in rows.tolist()]
        )
        return Rollout(
            prompt_ids=self.prompt_ids[rows, first:],
            prompt_mask=pm[:, first:],
            response_ids=self.response_ids[rows, :last],
            response_mask=rm[:, :last],
            truncated=self.truncated[rows],
            prompt_index=index,
            engine_logprobs=None if self.engine_logprobs is None else self.engine_logprobs[rows, :last],
        )


def _row_indices(rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """`rows` as a 1-D int64 tensor; a bool mask or a 2-D index would select something else entirely."""
    t = rows if isinstance(rows, torch.Tensor) else torch.tensor(list(rows), dtype=torch.long)
    if t.dim() != 1 or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"row indices must be a 1-D integer tensor or list, got {t.dtype} {tuple(t.shape)}")
    return t.long()


# ----------------------------------------------------------------------------------------------------
# Micro-batch planning


def _row_widths(rollout: Rollout) -> tuple[list[int], list[int]]:
    """Per row, the prompt and response columns it keeps alive under `Rollout.select`'s trimming.

    Read off the masks as `select` reads them (not from real-token counts), so the planner's cost is the
    width `select` will actually produce: prompt columns from the row's first real token to the end
    (left padding), response columns up to its last real token (right padding). One host copy per chunk.
    """
    P, T = rollout.prompt_mask.shape[1], rollout.response_mask.shape[1]
    pm, rm = rollout.prompt_mask.bool(), rollout.response_mask.bool()
    p_first = pm.int().argmax(1)
    p_width = torch.where(pm.any(1), P - p_first, 0)
    r_last = T - 1 - rm.flip(1).int().argmax(1)
    r_width = torch.where(rm.any(1), r_last + 1, 0)
    widths = torch.stack([p_width, r_width]).cpu().tolist()
    return widths[0], widths[1]


class _Planner:
    """Cost bookkeeping shared by the packing and the splitting, for one or several rollout chunks."""

    def __init__(self, rollouts: Sequence[Rollout]):
        self.rollouts = rollouts
        self._widths: dict[int, tuple[list[int], list[int]]] = {}

    def widths(self, chunk: int) -> tuple[list[int], list[int]]:
        if chunk not in self._widths:  # only read when needed: the default plan never touches the device
            self._widths[chunk] = _row_widths(self.rollouts[chunk])
        return self._widths[chunk]

    def cost(self, chunk: int, rows: Sequence[int]) -> int:
        """rows x (prompt width + response width) of `select(rows)`, all-padding fallbacks included."""
        pw, rw = self.widths(chunk)
        r = self.rollouts[chunk]
        p = max((pw[i] for i in rows), default=0) or r.prompt_mask.shape[1]  # select keeps all P columns
        t = max((rw[i] for i in rows), default=0) or 1  # ... and one response column
        return len(rows) * (p + t)

    def pack(self, chunk: int, max_sequences: int, max_tokens: int | None) -> list[list[int]]:
        n = len(self.rollouts[chunk])
        if max_tokens is None:  # today's contiguous slices, so the default run is unchanged
            return [list(range(s, min(s + max_sequences, n))) for s in range(0, n, max_sequences)]
        pw, rw = self.widths(chunk)
        P = self.rollouts[chunk].prompt_mask.shape[1]
        # Longest first: rows of similar length share a micro-batch (little padding), and the chunk's widest
        # micro-batch runs first, so a budget too large for the device fails before much work is spent.
        order = sorted(range(n), key=lambda i: (-(pw[i] + rw[i]), -rw[i], i))
        groups: list[list[int]] = []
        cur: list[int] = []
        p = t = 0
        for i in order:
            np_, nt = max(p, pw[i]), max(t, rw[i])
            if cur and (len(cur) >= max_sequences or (len(cur) + 1) * ((np_ or P) + (nt or 1)) > max_tokens):
                groups.append(cur)
                cur, np_, nt = [], pw[i], rw[i]
            cur.append(i)  # an empty group always takes the row: an oversized sequence runs alone
            p, t = np_, nt
        if cur:
            groups.append(cur)
        return groups


def plan_step_micro_batches(
    rollouts: Sequence[Rollout], *, max_sequences: int, max_tokens: int | None, min_groups: int = 1
) -> list[list[torch.Tensor]]:
    """Row-index groups (CPU int64, for `Rollout.select`) of every chunk of a step: ``out[j]`` covers
    every row of ``rollouts[j]`` exactly once, each group a micro-batch.

    ``max_tokens`` None reproduces plain slicing by ``max_sequences`` in rollout order. With a budget,
    each chunk's rows are sorted by length and packed greedily under both caps, a micro-batch costing
    rows x (prompt width + response width) of what `Rollout.select` returns: the student's and teacher's
    activations, hidden states and logits all scale with the padded sequence, not the real tokens in it.

    ``min_groups`` exists for sharded training: every process must run the same number of backwards
    (FSDP reduce-scatters in each), yet a token budget packs each process's rollouts into its own count.
    The trainer all-reduces the largest count and re-plans with it; the most expensive multi-row group of
    the step is halved until the step has that many, which is possible whenever min_groups <= rows.
    """
    if max_sequences < 1:
        raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    total = sum(len(r) for r in rollouts)
    if min_groups > max(total, 1):  # an empty step stays empty: the default min_groups=1 never fails
        raise ValueError(f"cannot split {total} rows into min_groups={min_groups} non-empty micro-batches")
    planner = _Planner(rollouts)
    plans = [planner.pack(j, max_sequences, max_tokens) for j in range(len(rollouts))]
    count = sum(len(g) for g in plans)
    while count < min(min_groups, total):
        _, j, k = max(  # ties go to the earliest group
            (planner.cost(j, g), -j, -k) for j, gs in enumerate(plans) for k, g in enumerate(gs) if len(g) > 1
        )
        j, k = -j, -k
        g = plans[j][k]
        half = (len(g) + 1) // 2  # packed order: the longer rows stay together
        plans[j][k : k + 1] = [g[:half], g[half:]]
        count += 1
    return [[torch.tensor(sorted(g), dtype=torch.long) for g in gs] for gs in plans]


def response_mask_from_ids(response: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real response tokens (through the first stop token) and truncation flags.

    Computed from the first stop token rather than from the pad id, because many tokenizers use EOS as
    pad and a pad-based mask would drop the EOS the student must learn to emit.
    """
    B, T = response.shape
    is_stop = torch.isin(response, torch.tensor(stop_ids, dtype=response.dtype, device=response.device))
    has_stop = is_stop.any(dim=1)
    first = torch.where(has_stop, is_stop.float().argmax(dim=1), torch.full((B,), T, device=response.device))
    pos = torch.arange(T, device=response.device).unsqueeze(0)
    return pos <= first.unsqueeze(1), ~has_stop


def chunk_seed(seed: int, step: int, first_prompt: int) -> int:
    """Sampling seed for one generate call, keyed by where its prompts sit in the global batch.

    This makes rollouts independent of how many processes split the batch, and identical after a
    resume, without saving generator state.
    """
    digest = hashlib.sha256(f"{seed}:{step}:{first_prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """The ids `tokenizer` can produce: its length, or its highest id + 1 where the vocabulary has holes
    (as `opd.models.loading.shared_vocab_size` counts them). A model's head rows past it are padding."""
    vocab = tokenizer.get_vocab()
    return max(len(tokenizer), max(vocab.values(), default=-1) + 1)


class PaddedRowsMask(LogitsProcessor):
    """Sets the logits of ids >= `vocab_size` (the head's padded rows, beyond the tokenizer) to -inf, in
    place, so no sampler (greedy, temperature, top-k/top-p) can pick them.

    Why: checkpoints pad their LM head (Qwen2.5: 151,936 rows for 151,665 tokens) and those rows' logits are
    whatever training left there; a sampled padded id is an IndexError in the vocabulary-sliced loss on a CPU
    and a device-side assert that poisons the CUDA context on a GPU. `generate` hands the processors a fresh
    float32 copy of each step's logits, so writing into it is safe; processors passed to `generate` run
    before its temperature/top-k/top-p warpers, so a truncation never keeps only padded ids."""

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.vocab_size:
            scores[..., self.vocab_size :] = float("-inf")
        return scores


class HFGenerator:
    """Batched sampling with KV cache via `model.generate`, left padding, stop on any stop id.

    `vocab_size`: the tokenizer's vocabulary (`tokenizer_vocab_size`); ids at or past it (the head's padded
    rows) are never sampled. None: every head row is a token."""

    def __init__(self, model: PreTrainedModel, *, pad_id: int, stop_ids: list[int], synced: bool = False,
                 vocab_size: int | None = None):  # fmt: skip
        if not stop_ids:
            raise ValueError("no stop token: the tokenizer has no EOS and rollout.stop_token_ids is empty")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1 (the tokenizer's vocabulary), got {vocab_size}")
        self.model = model
        # A sharded (FSDP) model all-gathers every layer's weights on every forward, so all processes must
        # keep stepping until the longest generation anywhere is done: generate(synced_gpus=True).
        self.synced = synced
        self.pad_id = pad_id
        self.stop_ids = sorted(set(stop_ids))
        self.vocab_size = vocab_size
        if vocab_size is not None and (past := [i for i in self.stop_ids if i >= vocab_size]):
            raise ValueError(f"stop ids {past} are past the tokenizer's {vocab_size} ids (the head's padded rows, "
                             "never sampled, so no rollout would stop): remove them from rollout.stop_token_ids")  # fmt: skip

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        greedy = params.temperature == 0.0
        # Every logits-shaping option is set explicitly: generate() fills unset (None) fields from the
        # model's own generation_config, which would silently sample from a different policy. Options
        # whose neutral value still installs a (no-op, but per-token costly) processor are neutralised
        # only when the model's config actually sets them.
        own = getattr(self.model, "generation_config", None)
        guarded = {"min_p": 0.0, "suppress_tokens": [], "begin_suppress_tokens": []}
        extra = {k: v for k, v in guarded.items() if getattr(own, k, None) is not None}
        return GenerationConfig(
            do_sample=not greedy,
            temperature=1.0 if greedy else params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            encoder_repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            length_penalty=1.0,
            num_beams=1,
            min_new_tokens=0,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            bad_words_ids=None,
            forced_bos_token_id=None,
            forced_eos_token_id=None,
            renormalize_logits=False,
            use_cache=True,
            **extra,
        )

    def _processors(self) -> LogitsProcessorList:
        """The padded-rows mask where the head has rows past the tokenizer (none otherwise: no per-step cost)."""
        rows = _head_rows(self.model)
        if self.vocab_size is None or (rows is not None and rows <= self.vocab_size):
            return LogitsProcessorList()
        return LogitsProcessorList([PaddedRowsMask(self.vocab_size)])

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, n: int, seed: int, prompt_index: list[int]
    ) -> Rollout:
        rows = [p for p in prompts for _ in range(n)]
        index = [i for i in prompt_index for _ in range(n)]
        width = max(len(r) for r in rows)
        device = next(self.model.parameters()).device
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
                torch.manual_seed(seed)
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, generation_config=self._generation_config(params),
                    logits_processor=self._processors(), **({"synced_gpus": True} if self.synced else {}),
                )  # fmt: skip
        finally:
            self.model.train(was_training)
        response = out[:, width:]
        if response.shape[1] == 0:  # budget of zero new tokens cannot happen (max_new_tokens >= 1)
            raise RuntimeError("generate returned no new tokens")
        rmask, truncated = response_mask_from_ids(response, self.stop_ids)
        response = torch.where(rmask, response, torch.full_like(response, self.pad_id))
        return Rollout(
            prompt_ids=ids,
            prompt_mask=mask.bool(),
            response_ids=response,
            response_mask=rmask,
            truncated=truncated,
            prompt_index=index,
        )


def _head_rows(model: torch.nn.Module) -> int | None:
    """The output rows of `model`'s LM head (its logits' width), None where it cannot be read."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])  # a DTensor shard reports the global shape
    n = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(n) if isinstance(n, int) else None
