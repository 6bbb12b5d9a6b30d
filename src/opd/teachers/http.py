"""A teacher on other machines: OpenAI-compatible vLLM servers scored over HTTP (`teacher.backend: http`).

Why: a big teacher often does not fit beside the student, and a teacher is stateless (frozen weights, no
optimizer), so it can live on its own machine behind `opd serve-teacher`. The wire protocol is vLLM's
`/v1/completions` with token-id prompts, ``max_tokens: 1`` and ``prompt_logprobs: K``: the server scores
the student's exact ids (no re-tokenisation) and returns, at every position, the actual token's
log-prob and its top-K, which is what `opd.objectives.topk` needs.

Failure policy: every request is retried with exponential backoff, moving to the next listed server on
each try, so one server going down only slows a step. When every server stays down the step raises
`TeacherUnavailableError` before any gradient or optimizer state has changed; the trainer turns that into
a checkpoint of the previous step, so `opd train --resume` redoes the failed step and nothing is lost.
Only the standard library is used (urllib + threads): the client must work in any environment the
trainer does.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from opd.config import check_server_url
from opd.errors import ConfigError, OpdError, TokenizerMismatchError
from opd.generation.rollout import Rollout
from opd.generation.vllm import response_requests
from opd.objectives.topk import TeacherTopK, topk_from_prompt_logprobs
from opd.teachers import wire

__all__ = ["HTTPTeacher", "TeacherUnavailableError", "parse_prompt_logprobs"]

API_KEY_ENV = "OPD_TEACHER_API_KEY"
"""Environment variable holding the servers' API key (vLLM ``--api-key``); never written to config.yaml."""


class TeacherUnavailableError(OpdError):
    """Every teacher server failed a request after all retries; no training state was changed."""


class _ClientError(Exception):
    """A 4xx answer: the request itself is wrong, so retrying (or another server) cannot help."""


def parse_prompt_logprobs(
    prompt_logprobs: list[Any], start: int, length: int
) -> list[dict[int, tuple[int, float]]]:
    """Response positions ``start .. start+length-1`` of one choice's ``prompt_logprobs``.

    vLLM sends ``null`` at position 0 (nothing predicts the first token), then per position a mapping
    ``{"token_id": {"logprob": float, "rank": int, "decoded_token": str}}`` with JSON string keys.
    """
    if prompt_logprobs is None or len(prompt_logprobs) < start + length:
        got = "none" if prompt_logprobs is None else len(prompt_logprobs)
        raise OpdError(f"the teacher server returned prompt_logprobs for {got} positions, expected at least "
                       f"{start + length}: is it a vLLM server (opd serve-teacher)?")  # fmt: skip
    out = []
    for j in range(start, start + length):
        entry = prompt_logprobs[j]
        if entry is None:
            raise OpdError(f"the teacher server returned no log-probs at position {j}")
        out.append({int(tid): (int(v["rank"]), float(v["logprob"])) for tid, v in entry.items()})
    return out


class HTTPTeacher:
    """Top-K teacher scores from one or more vLLM servers; requests are spread round-robin over `urls`."""

    def __init__(
        self,
        urls: list[str],
        *,
        k: int = 20,
        model: str | None = None,
        timeout_s: float = 600.0,
        retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        sequences_per_request: int = 8,
        concurrency: int = 4,
    ) -> None:
        if not urls:
            raise ConfigError("teacher.backend http needs at least one server in teacher.urls "
                              "(start one with `opd serve-teacher MODEL`)")  # fmt: skip
        for url in urls:  # a TrainConfig checked them already; an HTTPTeacher built in code did not
            try:
                check_server_url(url)
            except ValueError as exc:
                raise ConfigError(f"teacher.urls: {exc}") from None
        self.urls = [u.rstrip("/") for u in urls]
        self.k = k
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sequences_per_request = sequences_per_request
        self.concurrency = max(1, concurrency)
        self.api_key = os.environ.get(API_KEY_ENV)
        self._next = itertools.count()
        self._lock = threading.Lock()
        self.requests_sent = 0
        self.retried = 0
        self.model = model or self.models()[0]

    # -- transport ------------------------------------------------------------------------------------

    def _call(self, url: str, path: str, body: dict[str, Any] | None, timeout: float) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            url + path, data=data, headers=headers, method="GET" if body is None else "POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                if resp.headers.get_content_type() == wire.CONTENT_TYPE:  # opd's own server: tensors
                    return wire.decode(raw)
                return json.loads(raw)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise _ClientError(f"{url}{path} answered {exc.code}: {detail}") from None
            raise OSError(f"{url}{path} answered {exc.code}: {detail}") from None

    def _request(self, path: str, body: dict[str, Any] | None, *, timeout: float | None = None) -> Any:
        """POST (or GET) with retries, backoff and fail-over across the listed servers."""
        with self._lock:
            first = next(self._next)
            self.requests_sent += 1
        errors: list[str] = []
        for attempt in range(self.retries + 1):
            url = self.urls[(first + attempt) % len(self.urls)]
            try:
                return self._call(url, path, body, timeout or self.timeout_s)
            except _ClientError as exc:
                raise ConfigError(f"the teacher server refused the request: {exc}") from None
            except (OSError, json.JSONDecodeError, wire.WireError) as exc:  # refused, reset, 5xx, torn body
                errors.append(f"{url}: {exc}")
                if attempt < self.retries:
                    with self._lock:
                        self.retried += 1
                    time.sleep(min(self.max_backoff_s, self.backoff_s * 2**attempt))
        raise TeacherUnavailableError(
            f"teacher server(s) {', '.join(self.urls)} failed {len(errors)} tries of {path} "
            f"(last: {errors[-1]}); check that they run (`opd serve-teacher MODEL` prints the URL) "
            "or list more in teacher.urls"
        )

    # -- API -------------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        """The served model names (GET /v1/models), which also proves a server answers."""
        out = self._request("/v1/models", None, timeout=min(self.timeout_s, 30.0))
        names = [m["id"] for m in out.get("data", [])]
        if not names:
            raise OpdError(f"{self.urls[0]}/v1/models lists no model")
        return names

    def max_model_len(self) -> int | None:
        out = self._request("/v1/models", None, timeout=min(self.timeout_s, 30.0))
        for m in out.get("data", []):
            if m.get("id") == self.model:
                return m.get("max_model_len")
        return None

    def check_tokenizer(self, tokenizer: Any, texts: list[str]) -> None:
        """The server's tokenizer must map `texts` to the student's ids, or every score is misaligned."""
        for text in texts:
            ours = tokenizer(text, add_special_tokens=False)["input_ids"]
            theirs = self._request(
                "/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False}
            )
            if list(theirs.get("tokens", [])) != list(ours):
                raise TokenizerMismatchError(
                    f"the teacher server's tokenizer ({self.model} at {self.urls[0]}) encodes {text[:60]!r} as "
                    f"{theirs.get('tokens', [])[:12]}..., the student's as {list(ours)[:12]}...: teacher and student "
                    "must share a tokenizer"
                )

    def score_topk(self, rollout: Rollout) -> TeacherTopK:
        prompts, responses = response_requests(rollout)
        seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
        n = self.sequences_per_request
        batches = [list(range(i, min(i + n, len(seqs)))) for i in range(0, len(seqs), n)]

        def one(rows: list[int]) -> list[Any]:
            body = {"model": self.model, "prompt": [seqs[r] for r in rows], "max_tokens": 1, "temperature": 0.0,
                    "prompt_logprobs": self.k}  # fmt: skip
            out = self._request("/v1/completions", body)
            choices = sorted(out["choices"], key=lambda c: c["index"])
            if len(choices) != len(rows):
                raise OpdError(f"the teacher server answered {len(choices)} choices for {len(rows)} prompts")
            return [c.get("prompt_logprobs") for c in choices]

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(batches) or 1)) as pool:
            answers = list(pool.map(one, batches))
        plps = [plp for batch in answers for plp in batch]
        entries = [
            parse_prompt_logprobs(plp, len(p), len(r))
            for plp, p, r in zip(plps, prompts, responses, strict=True)
        ]
        return topk_from_prompt_logprobs(entries, rollout.response_ids, self.k)
