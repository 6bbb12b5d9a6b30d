"""opd's own scoring server (`opd serve-teacher MODEL --engine hf`): a transformers teacher, prefill only.

Why opd's own server beside vLLM's: vLLM returns top-K log-probs (K <= 20), which serve only the
sampled-token and teacher-support objectives. This server runs the teacher's forward over the student's
exact ids and answers three payloads:

- ``hidden`` (``POST /v1/score``): the last hidden states (after the final norm, the LM head's input) at the
  response positions, in `opd.teachers.wire`'s binary framing, float32 or bfloat16 as asked. With the
  teacher's LM head (`GET /v1/head`, or loaded by the client from its own copy and checked against
  ``head_sha256``) the trainer has what the in-process teacher gives it: every signal, support, divergence
  and diagnostic works;
- ``ids`` (``POST /v1/score``): log-probs from the full distribution at requested ids per position, the
  sampled token's and the teacher's own top-k: a few bytes per id;
- vLLM's ``/v1/completions`` with ``prompt_logprobs`` (`teacher.payload topk`), so a client written for
  vLLM works unchanged.

Also ``/health`` (no key needed), ``/v1/models``, ``/tokenize`` and ``/v1/model_info`` (tokenizer hash,
vocabulary, head and hidden sizes, dtype, limits). Loopback by default; ``OPD_TEACHER_API_KEY`` in the
server's environment makes every other endpoint ask for ``Authorization: Bearer KEY``. A request larger
than ``--max-request-tokens`` (or ``--max-request-mb``) is answered 413 with what to change. Sequences are
batched by tokens (``--max-batch-tokens`` per forward, longest first); one forward runs at a time.

Built on FastAPI + uvicorn; run as ``python -m opd.teachers.hf_server --model PATH ...`` (that is what
`opd serve-teacher --engine hf` starts, see `opd.teachers.server.server_command`).
"""

from __future__ import annotations

import argparse
import hmac
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from opd.teachers.http import API_KEY_ENV
from opd.teachers.wire import CONTENT_TYPE, DTYPES, encode, tensor_digest, tokenizer_digest

__all__ = ["HFScoringServer", "ScoreRequest", "build_app", "main"]

SERVER_DTYPES = ("float32", "bfloat16")


class ScoreRequest(BaseModel):
    """``POST /v1/score``: the student's sequences (prompt + response ids) and what to return at the
    response positions ``start - 1 .. len - 2`` of each (the rows that predict response tokens)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="served model name (checked when given)")
    payload: str = Field(description="hidden | ids")
    sequences: list[list[int]] = Field(description="prompt + response token ids, one list per sequence")
    starts: list[int] = Field(description="per sequence: the prompt's length (first response position)")
    dtype: str = Field("float32", description="payload hidden: float32 | bfloat16")
    top_k: int = Field(0, ge=0, description="payload ids: the teacher's own top-k per position (0: none)")
    ids: list[list[list[int]]] | None = Field(
        None,
        description="payload ids: per sequence, per response position, the ids to score (same count each)",
    )
    vocab_size: int | None = Field(None, ge=1, description="payload ids: normalise over the first rows only")


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class HFScoringServer:
    """The model and the maths behind the endpoints (no HTTP here, so it can be tested directly)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, name: str, dtype: str,
                 max_model_len: int | None = None, max_batch_tokens: int = 16384,
                 max_request_tokens: int = 262144, max_logprobs: int = 20, rows_per_chunk: int = 1024) -> None:  # fmt: skip
        from opd.generation.scoring import frozen_head, input_device

        model.eval()
        model.requires_grad_(False)
        self.model, self.tokenizer, self.name, self.dtype = model, tokenizer, name, dtype
        self.device = input_device(model)
        self.weight, self.bias = frozen_head(model)
        cfg = getattr(model, "config", None)
        self.max_model_len = int(max_model_len or getattr(cfg, "max_position_embeddings", 0) or 0) or None
        self.max_batch_tokens = max_batch_tokens
        self.max_request_tokens = max_request_tokens
        self.max_logprobs = max_logprobs
        self.rows_per_chunk = rows_per_chunk
        self.lock = threading.Lock()
        self.info = {
            "model": name, "dtype": dtype, "payloads": ["hidden", "ids", "topk"],
            "head_rows": int(self.weight.shape[0]), "hidden_size": int(self.weight.shape[1]),
            "head_bias": self.bias is not None, "vocab_size": int(getattr(cfg, "vocab_size", self.weight.shape[0])),
            "tokenizer_size": len(tokenizer), "tokenizer_sha256": tokenizer_digest(tokenizer),
            "head_sha256": tensor_digest(self.weight, self.bias, dtype=DTYPES[dtype]),
            "max_model_len": self.max_model_len, "max_batch_tokens": max_batch_tokens,
            "max_request_tokens": max_request_tokens, "max_logprobs": max_logprobs,
        }  # fmt: skip

    # -- checks ---------------------------------------------------------------------------------------

    def check_sequences(self, sequences: list[list[int]], starts: list[int] | None = None) -> None:
        total = sum(len(s) for s in sequences)
        if total > self.max_request_tokens:
            raise _Refused(413, f"request of {total} tokens > the server's --max-request-tokens "
                                f"{self.max_request_tokens}: send fewer sequences per request (teacher."
                                "sequences_per_request) or restart the server with a larger --max-request-tokens")  # fmt: skip
        rows = int(self.weight.shape[0])
        for i, s in enumerate(sequences):
            if not s:
                raise _Refused(400, f"sequence {i} is empty")
            if self.max_model_len and len(s) > self.max_model_len:
                raise _Refused(400, f"sequence {i} has {len(s)} tokens > the server's max_model_len "
                                    f"{self.max_model_len} (--max-model-len)")  # fmt: skip
            if min(s) < 0 or max(s) >= rows:
                raise _Refused(400, f"sequence {i} holds a token id outside the teacher's {rows} rows")
            if starts is not None and not 1 <= starts[i] <= len(s):
                raise _Refused(400, f"sequence {i}: start {starts[i]} must be in [1, {len(s)}]")

    # -- maths ----------------------------------------------------------------------------------------

    def _batches(self, sequences: list[list[int]]) -> list[list[int]]:
        """Indices of `sequences` grouped so that each forward holds <= max_batch_tokens (padded), longest
        first; a sequence longer than the budget runs alone."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[list[int]] = []
        for i in order:
            if out and len(sequences[out[-1][0]]) * (len(out[-1]) + 1) <= self.max_batch_tokens:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def hidden_rows(self, sequences: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
        """Per sequence the last hidden states ``[len - start, H]`` at the positions that predict its
        response tokens, in the model's dtype, on the model's device."""
        from opd.generation.scoring import last_hidden_states

        out: list[torch.Tensor | None] = [None] * len(sequences)
        with self.lock, torch.inference_mode():
            for group in self._batches(sequences):
                width = max(len(sequences[i]) for i in group)
                ids = torch.zeros((len(group), width), dtype=torch.long)
                attn = torch.zeros((len(group), width), dtype=torch.long)
                for r, i in enumerate(group):
                    ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
                    attn[r, : len(sequences[i])] = 1
                pos = (attn.cumsum(-1) - 1).clamp_min(0)
                h = last_hidden_states(self.model, input_ids=ids.to(self.device),
                                       attention_mask=attn.to(self.device), position_ids=pos.to(self.device))  # fmt: skip
                for r, i in enumerate(group):
                    out[i] = h[r, starts[i] - 1 : len(sequences[i]) - 1].clone()
        return [t for t in out if t is not None]

    def _log_probs(self, h: torch.Tensor, vocab_size: int | None) -> Iterator[torch.Tensor]:
        """Full-distribution log-probs (float32) of hidden rows `h`, `rows_per_chunk` rows at a time."""
        w, b = self.weight, self.bias
        v = min(vocab_size or w.shape[0], w.shape[0])
        for i in range(0, h.shape[0], self.rows_per_chunk):
            logits = torch.nn.functional.linear(h[i : i + self.rows_per_chunk].to(w.dtype), w, b)
            yield torch.log_softmax(logits[:, :v].float(), dim=-1)

    def score(self, req: ScoreRequest) -> bytes:
        if self.model_name_mismatch(req.model):
            raise _Refused(404, f"this server serves {self.name!r}, not {req.model!r}")
        if len(req.starts) != len(req.sequences):
            raise _Refused(400, f"{len(req.sequences)} sequences but {len(req.starts)} starts")
        self.check_sequences(req.sequences, req.starts)
        lengths = [len(s) - st for s, st in zip(req.sequences, req.starts, strict=True)]
        if req.payload == "hidden":
            if req.dtype not in SERVER_DTYPES:
                raise _Refused(400, f"dtype {req.dtype!r}: the hidden payload is float32 or bfloat16")
            rows = self.hidden_rows(req.sequences, req.starts)
            h = torch.cat(rows) if rows else torch.zeros((0, self.info["hidden_size"]))
            return encode({"payload": "hidden", "lengths": lengths}, {"hidden": h.to(DTYPES[req.dtype])})
        if req.payload != "ids":
            raise _Refused(400, f"payload {req.payload!r}: this server answers hidden or ids (and topk at "
                                "/v1/completions)")  # fmt: skip
        if req.top_k > self.max_logprobs:
            raise _Refused(400, f"top_k {req.top_k} > the server's max_logprobs {self.max_logprobs} "
                                "(--max-logprobs)")  # fmt: skip
        asked = None
        if req.ids is not None:
            if len(req.ids) != len(req.sequences) or any(
                len(a) != n for a, n in zip(req.ids, lengths, strict=True)
            ):
                raise _Refused(400, "ids: one list per response position of every sequence")
            flat = [p for a in req.ids for p in a]
            m = len(flat[0]) if flat else 0
            if any(len(p) != m for p in flat):
                raise _Refused(400, "ids: the same number of ids at every position")
            asked = torch.tensor(flat, dtype=torch.long).reshape(len(flat), m)
        rows = self.hidden_rows(req.sequences, req.starts)
        h = torch.cat(rows) if rows else torch.zeros((0, self.info["hidden_size"]), device=self.device)
        tokens = torch.tensor([t for s, st in zip(req.sequences, req.starts, strict=True) for t in s[st:]],
                              dtype=torch.long, device=h.device)  # fmt: skip
        v = min(req.vocab_size or self.weight.shape[0], self.weight.shape[0])
        if asked is not None and asked.numel() and int(asked.max()) >= v:
            raise _Refused(400, f"ids: an id >= the {v} rows scored")
        asked = None if asked is None else asked.to(h.device)
        tok, top_ids, top_lp, ids_lp = [], [], [], []
        with torch.inference_mode():
            for c, lp in enumerate(self._log_probs(h, req.vocab_size)):
                sl = slice(c * self.rows_per_chunk, c * self.rows_per_chunk + lp.shape[0])
                tok.append(lp.gather(-1, tokens[sl].clamp_max(v - 1).unsqueeze(-1)).squeeze(-1))
                if req.top_k:
                    vals, idx = lp.topk(min(req.top_k, v), dim=-1)
                    top_ids.append(idx.to(torch.int32))
                    top_lp.append(vals)
                if asked is not None:
                    ids_lp.append(lp.gather(-1, asked[sl]))
        n = h.shape[0]
        tensors = {"token_logprob": torch.cat(tok) if tok else torch.zeros(0)}
        if req.top_k:
            tensors["topk_ids"] = (
                torch.cat(top_ids) if top_ids else torch.zeros((0, req.top_k), dtype=torch.int32)
            )
            tensors["topk_logprobs"] = torch.cat(top_lp) if top_lp else torch.zeros((0, req.top_k))
        if asked is not None:
            tensors["ids_logprobs"] = torch.cat(ids_lp) if ids_lp else torch.zeros((n, asked.shape[1]))
        return encode({"payload": "ids", "lengths": lengths}, tensors)

    def prompt_logprobs(self, sequences: list[list[int]], k: int) -> list[list[Any]]:
        """vLLM's ``prompt_logprobs`` of each sequence: None at position 0, then the top-`k` and the actual
        token with their ranks, normalised over every head row as vLLM does."""
        if k > self.max_logprobs:
            raise _Refused(400, f"requested prompt_logprobs {k} > max_logprobs {self.max_logprobs} "
                                "(--max-logprobs)")  # fmt: skip
        self.check_sequences(sequences)
        rows = self.hidden_rows(sequences, [1] * len(sequences))
        out = []
        with torch.inference_mode():
            for s, h in zip(sequences, rows, strict=True):
                entries: list[Any] = [None]
                actual = torch.tensor(s[1:], dtype=torch.long, device=h.device)
                for c, lp in enumerate(self._log_probs(h, None)):
                    sl = slice(c * self.rows_per_chunk, c * self.rows_per_chunk + lp.shape[0])
                    a_lp = lp.gather(-1, actual[sl].unsqueeze(-1))
                    a_rank = (lp > a_lp).sum(-1) + 1
                    vals, idx = lp.topk(min(k, lp.shape[-1]), dim=-1)
                    for ti, tv, a, ar, al in zip(idx.tolist(), vals.tolist(), actual[sl].tolist(), a_rank.tolist(),
                                                 a_lp.squeeze(-1).tolist(), strict=True):  # fmt: skip
                        e = {
                            str(t): {"logprob": v, "rank": r + 1}
                            for r, (t, v) in enumerate(zip(ti, tv, strict=True))
                        }
                        e.setdefault(str(a), {"logprob": al, "rank": int(ar)})
                        entries.append(e)
                out.append(entries)
        return out

    def head_message(self) -> bytes:
        tensors = {"weight": self.weight.to(DTYPES[self.dtype])}
        if self.bias is not None:
            tensors["bias"] = self.bias.to(DTYPES[self.dtype])
        return encode({"head_sha256": self.info["head_sha256"]}, tensors)

    def model_name_mismatch(self, name: str | None) -> bool:
        return bool(name) and name != self.name


def build_app(
    server: HFScoringServer, *, api_key: str | None = None, max_request_bytes: int = 256 << 20
) -> Any:
    """The FastAPI application answering for `server`."""
    app = FastAPI(title="opd scoring server", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(_Refused)
    async def refused(_req: Request, exc: _Refused) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.middleware("http")
    async def size_limit(request: Request, call_next: Any) -> Any:
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > max_request_bytes:
            return JSONResponse({"error": f"request body of {int(n)} bytes > the server's limit of "
                                 f"{max_request_bytes} (--max-request-mb): send fewer sequences per request "
                                 "(teacher.sequences_per_request)"}, status_code=413)  # fmt: skip
        return await call_next(request)

    def authorized(request: Request) -> None:
        if not api_key:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise _Refused(
                401, f"missing or wrong API key: set {API_KEY_ENV} where you train to the server's key"
            )

    auth = [Depends(authorized)]

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=auth)
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.name, "object": "model",
                                            "max_model_len": server.max_model_len}]}  # fmt: skip

    @app.get("/v1/model_info", dependencies=auth)
    def model_info() -> dict[str, Any]:
        return server.info

    @app.get("/v1/head", dependencies=auth)
    def head() -> Response:
        return Response(server.head_message(), media_type=CONTENT_TYPE)

    @app.post("/tokenize", dependencies=auth)
    def tokenize(body: dict[str, Any]) -> dict[str, Any]:
        special = bool(body.get("add_special_tokens", True))
        ids = server.tokenizer(str(body.get("prompt", "")), add_special_tokens=special)["input_ids"]
        return {"tokens": list(ids), "count": len(ids)}

    @app.post("/v1/score", dependencies=auth)
    def score(req: ScoreRequest) -> Response:
        return Response(server.score(req), media_type=CONTENT_TYPE)

    @app.post("/v1/completions", dependencies=auth)
    def completions(body: dict[str, Any]) -> dict[str, Any]:
        if server.model_name_mismatch(body.get("model")):
            raise _Refused(404, f"this server serves {server.name!r}, not {body.get('model')!r}")
        k = body.get("prompt_logprobs")
        prompts = body.get("prompt")
        if (
            not isinstance(k, int)
            or not isinstance(prompts, list)
            or not all(isinstance(p, list) for p in prompts)
        ):
            raise _Refused(400, "this server scores only: prompt = a list of token-id lists, prompt_logprobs = K "
                                "(generation is not served; it runs prefill only)")  # fmt: skip
        plps = server.prompt_logprobs(prompts, k)
        return {"object": "text_completion", "model": server.name,
                "choices": [{"index": i, "text": "", "prompt_logprobs": p} for i, p in enumerate(plps)]}  # fmt: skip

    return app


def load_server(args: argparse.Namespace) -> HFScoringServer:
    """The model and tokenizer `args` name, loaded once, in `args.dtype`."""
    from pathlib import Path

    from opd.models.loading import load_model, load_tokenizer, model_directory

    if args.dtype not in SERVER_DTYPES:
        raise SystemExit(f"--dtype {args.dtype}: opd serve-teacher --engine hf runs float32 or bfloat16")
    path = model_directory(args.model, "opd serve-teacher --engine hf")
    if args.device_map:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=DTYPES[args.dtype], device_map=args.device_map, attn_implementation=args.attn,
            trust_remote_code=args.trust_remote_code,
        )  # fmt: skip
    else:
        model = load_model(
            str(path), dtype=args.dtype, trust_remote_code=args.trust_remote_code, device=args.device
        )
        if args.attn and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(args.attn)
    tokenizer = load_tokenizer(str(path), trust_remote_code=args.trust_remote_code)
    return HFScoringServer(model, tokenizer, name=args.served_name or Path(path).name, dtype=args.dtype,
                           max_model_len=args.max_model_len, max_batch_tokens=args.max_batch_tokens,
                           max_request_tokens=args.max_request_tokens, max_logprobs=args.max_logprobs)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m opd.teachers.hf_server", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--device-map", default=None)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--served-name", default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--max-request-tokens", type=int, default=262144)
    p.add_argument("--max-request-mb", type=float, default=256.0)
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument("--trust-remote-code", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    server = load_server(args)
    app = build_app(server, api_key=os.environ.get(API_KEY_ENV) or None,
                    max_request_bytes=int(args.max_request_mb * (1 << 20)))  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
