"""A frozen teacher on an in-process vLLM engine (`teacher.backend: vllm`): top-K prompt log-probs of the
student's exact ids. The engine start-up and the request layout are shared with the vLLM generator
(`opd.generation.vllm`)."""

from __future__ import annotations

from typing import Any

from opd.generation.rollout import Rollout
from opd.generation.vllm import response_requests, start_engine

__all__ = ["VLLMTeacher"]


class VLLMTeacher:
    """A frozen teacher on a vLLM engine that scores the student's exact ids with prompt log-probs.

    Returns `opd.objectives.topk.TeacherTopK` (top-`k` ids and log-probs per response position, plus the
    sampled token's log-prob), which is what the sampled-token and teacher-support top-k objectives need.
    Repeated scoring is bitwise identical (measured: prefix cache on or off, batch 1 or 32).
    """

    def __init__(
        self,
        model_path: str,
        *,
        k: int = 16,
        dtype: str = "bfloat16",
        max_model_len: int = 2048,
        kv_cache_gb: int = 2,
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
    ) -> None:
        self._vllm, self.llm = start_engine(model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                             kv_cache_gb=kv_cache_gb, max_logprobs=max(k, 20),
                                             gpu_memory_utilization=gpu_memory_utilization)  # fmt: skip
        self.k = k

    def score_topk(self, rollout: Rollout) -> Any:
        from vllm.inputs import TokensPrompt

        from opd.objectives.topk import topk_from_prompt_logprobs

        requests, starts, lengths = [], [], []
        for prompt, resp in zip(*response_requests(rollout), strict=True):
            requests.append(TokensPrompt(prompt_token_ids=prompt + resp))
            starts.append(len(prompt))
            lengths.append(len(resp))
        sp = self._vllm.SamplingParams(
            max_tokens=1, prompt_logprobs=self.k, detokenize=False, temperature=0.0
        )
        outs = self.llm.generate(requests, sp, use_tqdm=False)
        rows = [
            [{tid: (v.rank, v.logprob) for tid, v in out.prompt_logprobs[starts[r] + j].items()}
             for j in range(lengths[r])]
            for r, out in enumerate(outs)
        ]  # fmt: skip
        return topk_from_prompt_logprobs(rows, rollout.response_ids, self.k)
