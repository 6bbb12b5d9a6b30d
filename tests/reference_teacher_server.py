"""A small OpenAI-compatible teacher server for tests of the HTTP client: the same wire protocol as
vLLM's `/v1/completions` with `prompt_logprobs` (and `/v1/models`, `/tokenize`), computed by an HF model in
fp32, on a real socket on loopback. It isolates the client's protocol, retry and fail-over logic from
vLLM; the vLLM CI stage tests the client against a real `opd serve-teacher` server.

Fault injection: `fail_next` answers that many requests with 503; `stop()` closes the socket (connection
refused, like a dead machine).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch


class ReferenceTeacherServer:
    def __init__(self, model: Any, tokenizer: Any, *, name: str = "ref-teacher", max_model_len: int = 512,
                 max_logprobs: int = 20) -> None:  # fmt: skip
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_model_len, self.max_logprobs = max_model_len, max_logprobs
        self.fail_next = 0
        self.completions = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"data": [{"id": server.name, "max_model_len": server.max_model_len}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    if server.fail_next > 0:
                        server.fail_next -= 1
                        return self._send(503, {"error": "injected failure"})
                if self.path == "/tokenize":
                    ids = server.tokenizer(
                        body["prompt"], add_special_tokens=body.get("add_special_tokens", True)
                    )
                    return self._send(200, {"tokens": ids["input_ids"]})
                if self.path != "/v1/completions":
                    return self._send(404, {"error": "not found"})
                k = body.get("prompt_logprobs")
                if k is not None and k > server.max_logprobs:
                    return self._send(
                        400, {"error": f"prompt_logprobs {k} > max_logprobs {server.max_logprobs}"}
                    )
                prompts = body["prompt"]
                prompts = [prompts] if prompts and isinstance(prompts[0], int) else prompts
                with server.lock:
                    server.completions += 1
                choices = [{"index": i, "text": "", "prompt_logprobs": server.prompt_logprobs(p, k)}
                           for i, p in enumerate(prompts)]  # fmt: skip
                self._send(200, {"id": "cmpl-ref", "object": "text_completion", "choices": choices})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int], k: int) -> list[Any]:
        x = torch.tensor([ids])
        logits = self.model(input_ids=x).logits[0].double()
        log_q = torch.log_softmax(logits, dim=-1)  # over every output row, padded ones included, as vLLM
        out: list[Any] = [None]
        for pos in range(1, len(ids)):
            row = log_q[pos - 1]
            vals, top = row.topk(k)
            entry = {str(int(t)): {"logprob": float(v), "rank": r + 1, "decoded_token": ""}
                     for r, (t, v) in enumerate(zip(top, vals, strict=True))}  # fmt: skip
            actual = ids[pos]
            if str(actual) not in entry:
                rank = int((row > row[actual]).sum()) + 1
                entry[str(actual)] = {"logprob": float(row[actual]), "rank": rank, "decoded_token": ""}
            out.append(entry)
        return out

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
