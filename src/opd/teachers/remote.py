"""The client of opd's own scoring server (`opd serve-teacher --engine hf`): `teacher.backend http` with
`teacher.payload hidden` or `ids`.

- ``hidden``: the server sends the teacher's last hidden states at the response positions
  (`opd.teachers.wire` framing); the LM head is loaded here once, from ``teacher.path`` (only the head's
  tensors are read from safetensors) or from the server (``GET /v1/head``), and its hash must equal the
  server's ``head_sha256`` (the served model is the one the head belongs to). Each micro-batch's target is
  then a `TeacherHidden`, exactly what the in-process HF teacher hands the objective, so every signal,
  support, divergence and diagnostic works (``loss.from_hidden_states false``: dense logits, projected here).
- ``ids``: the server sends, per response position, the sampled token's log-prob and the teacher's top-k
  from its full distribution (normalised over the vocabulary student and teacher share): a `TeacherTopK`,
  serving the sampled-token and teacher-support objectives with a few bytes per id.

Transport, retries, fail-over over ``teacher.urls``, the API key and the tokenizer check are an
`HTTPTeacher`'s (held as ``client``). The whole step is scored up front (before any gradient), as every server teacher is.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from opd.errors import ConfigError, OpdError
from opd.generation.rollout import Rollout
from opd.generation.vllm import response_requests
from opd.objectives.objective import TeacherHidden
from opd.objectives.topk import TeacherTopK
from opd.teachers.http import HTTPTeacher
from opd.teachers.wire import DTYPES, tensor_digest

__all__ = ["ScoringServerTeacher", "load_head"]

PAYLOADS = ("hidden", "ids")


def load_head(spec: str, *, dtype: torch.dtype, trust_remote_code: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The LM head ``(weight [V, H], bias or None)`` of the model at `spec`, in `dtype`, on the CPU.

    From a safetensors directory only the head's tensors are read (the model is built on the meta device to
    learn their names, tied embeddings included); anything else (GGUF, .bin) loads the model once."""
    from opd.models.loading import load_model, model_directory

    try:
        return _safetensors_head(model_directory(spec, "teacher.payload hidden"), dtype, trust_remote_code)
    except (OSError, KeyError, ValueError, ConfigError):
        from opd.generation.scoring import frozen_head

        w, b = frozen_head(load_model(spec, dtype="float32", trust_remote_code=trust_remote_code))
        return w.to(dtype), None if b is None else b.to(dtype)


def _safetensors_head(path: Any, dtype: torch.dtype, trust_remote_code: bool) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise OSError(f"no safetensors files in {path}")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = meta.get_output_embeddings()
    found: dict[str, torch.Tensor] = {}
    for part in ("weight", "bias"):
        t = getattr(head, part, None)
        if not isinstance(t, torch.Tensor):
            continue
        names = [n for n, p in meta.named_parameters(remove_duplicate=False) if p is t]
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                keys = set(sf.keys())
                hit = next((n for n in names if n in keys), None)
                if hit is not None:
                    found[part] = sf.get_tensor(hit).to(dtype)
                    break
        if part not in found:
            raise KeyError(
                f"the LM head's {part} ({', '.join(names)}) is in none of {path}'s safetensors files"
            )
    return found["weight"], found.get("bias")


class _ScoredStep:
    """One step's server answers, per rollout chunk, on the compute device."""

    def __init__(self, owner: ScoringServerTeacher, answers: list[Any]):
        self.owner, self.answers = owner, answers

    def target(self, chunk: int, rows: torch.Tensor | slice, mb: Rollout) -> Any:
        got = self.answers[chunk]
        if isinstance(got, TeacherTopK):
            return got.select(rows)
        h = got[rows][:, : mb.response_ids.shape[1]]
        w, b = self.owner.weight, self.owner.bias
        if self.owner.hidden_states:
            return TeacherHidden(h, w, b)
        return torch.nn.functional.linear(h, w, b)  # dense logits for loss.from_hidden_states false


class ScoringServerTeacher:
    """Hidden states (`payload` hidden) or log-probs at ids (`payload` ids) from opd scoring servers,
    behind `opd.teachers.contract` (``score_step`` -> per micro-batch targets). `client` (an `HTTPTeacher`)
    carries the requests; ``model`` is None (no in-process teacher model), the served name is `served`."""

    model = None
    scored_by_engine = False  # the server is transformers itself: the fidelity check has nothing to compare

    def __init__(self, urls: list[str], *, payload: str, device: torch.device, vocab_size: int, k: int = 20,
                 payload_dtype: str = "float32", hidden_states: bool = True, head_path: str = "",
                 trust_remote_code: bool = False, model: str | None = None, **kw: Any) -> None:  # fmt: skip
        if payload not in PAYLOADS:
            raise ConfigError(
                f"teacher.payload {payload!r}: opd's scoring server answers {' or '.join(PAYLOADS)}"
            )
        self.client = HTTPTeacher(urls, k=k, model=model, **kw)
        self.served, self.urls, self.k = self.client.model, self.client.urls, k
        self.payload, self.payload_dtype, self.device = payload, payload_dtype, device
        self.vocab_size, self.hidden_states = vocab_size, hidden_states
        self.nonfinite_hint = "see its server's log (opd serve-teacher --engine hf)"
        self.info = self.model_info()
        if payload == "ids" and k > int(self.info.get("max_logprobs", 0)):
            raise ConfigError(f"teacher.top_k {k} > the server's max_logprobs {self.info.get('max_logprobs')}: "
                              "lower teacher.top_k or restart it with a larger --max-logprobs")  # fmt: skip
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        if payload == "hidden":
            self.weight, self.bias = self._head(head_path, trust_remote_code)

    def _request(self, path: str, body: dict[str, Any] | None, **kw: Any) -> Any:
        return self.client._request(path, body, **kw)

    def max_model_len(self) -> int | None:
        return self.client.max_model_len()

    def check_tokenizer(self, tokenizer: Any, texts: list[str]) -> None:
        self.client.check_tokenizer(tokenizer, texts)

    def model_info(self) -> dict[str, Any]:
        try:
            info = self._request("/v1/model_info", None, timeout=min(self.client.timeout_s, 30.0))
        except ConfigError as exc:
            raise ConfigError(
                f"teacher.payload {self.payload} needs opd's scoring server (`opd serve-teacher MODEL --engine hf`); "
                f"{self.urls[0]} has no /v1/model_info ({exc}); a vLLM server serves teacher.payload topk"
            ) from None
        if self.payload not in info.get("payloads", []):
            raise ConfigError(f"the server at {self.urls[0]} does not answer teacher.payload {self.payload}")
        return info

    def _head(self, path: str, trust_remote_code: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = DTYPES[self.info["dtype"]]
        want = self.info["head_sha256"]
        if path:
            w, b = load_head(path, dtype=dtype, trust_remote_code=trust_remote_code)
            where = f"teacher.path {path}"
        else:
            header, tensors = self._request("/v1/head", None)
            w, b = tensors["weight"], tensors.get("bias")
            where = f"the head sent by {self.urls[0]}"
        got = tensor_digest(w, b, dtype=dtype)
        if got != want:
            raise ConfigError(
                f"the LM head of {where} is not the served model's (sha256 {got[:12]}... vs the server's "
                f"{want[:12]}...): point teacher.path at the model the server runs, or leave it empty to load the "
                "head from the server"
            )
        return w.to(self.device), None if b is None else b.to(self.device)

    # -- scoring ---------------------------------------------------------------------------------------

    def _ask(self, seqs: list[list[int]], starts: list[int]) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:  # fmt: skip
        n = self.client.sequences_per_request
        batches = [list(range(i, min(i + n, len(seqs)))) for i in range(0, len(seqs), n)]

        def one(rows: list[int]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
            body: dict[str, Any] = {"model": self.served, "payload": self.payload,
                                    "sequences": [seqs[r] for r in rows], "starts": [starts[r] for r in rows]}  # fmt: skip
            if self.payload == "hidden":
                body["dtype"] = self.payload_dtype
            else:
                body.update(top_k=self.k, vocab_size=self.vocab_size)
            out = self._request("/v1/score", body)
            if not isinstance(out, tuple):
                raise OpdError(f"the teacher server answered JSON to /v1/score: {json.dumps(out)[:200]}")
            return out

        with ThreadPoolExecutor(max_workers=min(self.client.concurrency, len(batches) or 1)) as pool:
            return list(pool.map(one, batches))

    def score_rollout(self, rollout: Rollout) -> torch.Tensor | TeacherTopK:
        """The server's answer for one rollout chunk: hidden states ``[B, T, H]`` (payload hidden, zero past
        each row's response) or a `TeacherTopK` (payload ids), on the compute device."""
        prompts, responses = response_requests(rollout)
        seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
        starts = [len(p) for p in prompts]
        answers = self._ask(seqs, starts)
        lengths = [n for header, _ in answers for n in header["lengths"]]
        if lengths != [len(r) for r in responses]:
            raise OpdError(f"the teacher server answered {len(lengths)} sequences / lengths {lengths[:8]}, expected "
                           f"{[len(r) for r in responses][:8]}")  # fmt: skip
        b, t = rollout.response_ids.shape
        rows = torch.tensor([r for r, n in enumerate(lengths) for _ in range(n)], dtype=torch.long)
        cols = torch.tensor([j for n in lengths for j in range(n)], dtype=torch.long)
        if self.payload == "hidden":
            h = torch.cat([tensors["hidden"] for _, tensors in answers])
            out = torch.zeros((b, t, h.shape[-1]), dtype=self.weight.dtype)
            out[rows, cols] = h.to(out.dtype)
            return out.to(self.device)
        tok = torch.cat([tensors["token_logprob"] for _, tensors in answers])
        top_ids = torch.cat([tensors["topk_ids"] for _, tensors in answers]).long()
        top_lp = torch.cat([tensors["topk_logprobs"] for _, tensors in answers])
        ids = torch.zeros((b, t, self.k), dtype=torch.long)
        lps = torch.full((b, t, self.k), float("-inf"), dtype=torch.float32)
        tok_lp = torch.full((b, t), float("-inf"), dtype=torch.float32)
        ids[rows, cols], lps[rows, cols], tok_lp[rows, cols] = top_ids, top_lp.float(), tok.float()
        return TeacherTopK(ids, lps, tok_lp).to(self.device)

    def score_step(self, rollouts: list[Rollout]) -> _ScoredStep:
        return _ScoredStep(self, [self.score_rollout(r) for r in rollouts])
