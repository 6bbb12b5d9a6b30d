"""Sample k decoded responses per prompt from a model: what eval, generate and prompt selection share.

Built on the same `HFGenerator` as training rollouts, so "the policy that was evaluated" and "the policy
that was trained" sample identically (same stop ids, same neutralised generation_config).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from opd.generation.rollout import HFGenerator, Rollout, SamplingParams, chunk_seed, tokenizer_vocab_size


@dataclass
class Sample:
    """One decoded response."""

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    truncated: bool  # no stop token within the budget

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def stop_ids_for(tokenizer, model, extra: Sequence[int] = ()) -> list[int]:
    """EOS of the tokenizer, of the model's generation_config, and any extra ids."""
    ids = {int(i) for i in extra}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def sample_responses(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    n: int,
    params: SamplingParams,
    batch_size: int = 8,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    stop_ids: Sequence[int] | None = None,
    on_batch: Callable[[list[Sample], Rollout], None] | None = None,
) -> list[Sample]:
    """n samples for each prompt, generated `batch_size` prompts at a time.

    `indices` are the prompts' ids in their file (default 0..N-1); seeds are keyed by them, so
    re-running on a subset (a resumed job) reproduces the same samples for the same prompts.
    `on_batch` sees each finished batch (for incremental writing and progress bars). Ids past the
    tokenizer's vocabulary (a padded head's rows) are never sampled.
    """
    indices = list(range(len(prompt_ids))) if indices is None else list(indices)
    if len(indices) != len(prompt_ids):
        raise ValueError("indices and prompt_ids differ in length")
    stops = list(stop_ids) if stop_ids is not None else stop_ids_for(tokenizer, model)
    gen = HFGenerator(
        model, pad_id=tokenizer.pad_token_id, stop_ids=stops, vocab_size=tokenizer_vocab_size(tokenizer)
    )
    out: list[Sample] = []
    for start in range(0, len(prompt_ids), batch_size):
        idx = indices[start : start + batch_size]
        roll = gen.generate(
            [list(p) for p in prompt_ids[start : start + batch_size]],
            params,
            n,
            chunk_seed(seed, 0, idx[0]),
            idx,
        )
        batch = []
        for row in range(len(roll)):
            ids = roll.response_ids[row][roll.response_mask[row]].tolist()
            text_ids = [t for t in ids if t not in stops]
            batch.append(
                Sample(
                    prompt_index=roll.prompt_index[row],
                    sample_index=row % n,
                    text=tokenizer.decode(text_ids, skip_special_tokens=True),
                    token_ids=ids,
                    truncated=bool(roll.truncated[row]),
                )
            )
        out.extend(batch)
        if on_batch is not None:
            on_batch(batch, roll)
    return out
