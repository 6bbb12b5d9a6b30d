"""Student rollouts: the `Rollout` object and the Hugging Face generator.

OPD grades the student on its own samples, so the rollouts must come from exactly the policy being
trained: every sampling knob a model's `generation_config.json` may carry (Qwen ships top_k=20,
repetition_penalty=1.05, temperature=0.7, ...) is overridden here, not inherited.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import GenerationConfig, PreTrainedModel


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
    sampling: SamplingParams = SamplingParams()
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
            sampling=self.sampling,
            engine_logprobs=None if self.engine_logprobs is None else self.engine_logprobs.to(device),
        )

    def select(self, rows: slice) -> Rollout:
        """A row slice, trimmed of columns that are padding in every selected row."""
        pm = self.prompt_mask[rows]
        rm = self.response_mask[rows]
        first = int((pm.sum(0) > 0).nonzero()[0]) if pm.any() else 0
        last = int((rm.sum(0) > 0).nonzero()[-1]) + 1 if rm.any() else 1
        return Rollout(
            prompt_ids=self.prompt_ids[rows, first:],
            prompt_mask=pm[:, first:],
            response_ids=self.response_ids[rows, :last],
            response_mask=rm[:, :last],
            truncated=self.truncated[rows],
            prompt_index=self.prompt_index[rows],
            sampling=self.sampling,
            engine_logprobs=None if self.engine_logprobs is None else self.engine_logprobs[rows, :last],
        )


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


class Generator(Protocol):
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, n: int, seed: int, prompt_index: list[int]
    ) -> Rollout: ...


class HFGenerator:
    """Batched sampling with KV cache via `model.generate`, left padding, stop on any stop id."""

    def __init__(self, model: PreTrainedModel, *, pad_id: int, stop_ids: list[int], synced: bool = False):
        if not stop_ids:
            raise ValueError("no stop token: the tokenizer has no EOS and rollout.stop_token_ids is empty")
        self.model = model
        # A sharded (FSDP) model all-gathers every layer's weights on every forward, so all processes must
        # keep stepping until the longest generation anywhere is done: generate(synced_gpus=True).
        self.synced = synced
        self.pad_id = pad_id
        self.stop_ids = sorted(set(stop_ids))

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
                    **({"synced_gpus": True} if self.synced else {}),
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
            sampling=params,
        )
