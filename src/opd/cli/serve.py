"""`opd serve-teacher MODEL`: put a teacher on its own machine for `teacher.backend: http`."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from opd.cli.common import PASSTHROUGH, console, fail, load_command_config, os_error
from opd.errors import OpdError

if TYPE_CHECKING:
    from opd.teachers.server import TeacherServer


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop_on_signals() -> None:
    """Ctrl-C, `kill` and a closed terminal all stop the vLLM server, never orphan it.

    SIGINT is set explicitly: a shell starts background jobs with SIGINT ignored, and Python then installs
    no KeyboardInterrupt handler, so the documented Ctrl-C/SIGINT stop would do nothing. SIGTERM and SIGHUP
    would otherwise kill this wrapper alone and leave the server (and its memory) running.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


def _shutdown(server: TeacherServer | None) -> None:
    """Stop the server; a second Ctrl-C or `kill` meanwhile must not abandon it half-stopped."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if server is not None:
        server.stop()


def register(app: typer.Typer) -> None:
    @app.command("serve-teacher", context_settings=PASSTHROUGH)
    def serve_teacher(
        ctx: typer.Context,
        model: str | None = typer.Argument(None, help="teacher: local model directory or lab:NAME"),
        config: Path | None = typer.Option(
            None, "--config", "-c", help="YAML with ServeTeacherConfig fields"
        ),
        host: str | None = typer.Option(None, "--host", help="bind address [127.0.0.1]"),
        port: int | None = typer.Option(None, "--port", help="[8000]"),
        max_logprobs: int | None = typer.Option(
            None, "--max-logprobs", help="largest top-k clients ask [20]"
        ),
        dtype: str | None = typer.Option(None, "--dtype", help="[bfloat16]"),
        max_model_len: int | None = typer.Option(None, "--max-model-len", help="prompt + response limit"),
        kv_cache_gb: int | None = typer.Option(None, "--kv-cache-gb", help="CPU KV cache GiB [4]"),
        served_name: str | None = typer.Option(None, "--served-name", help="[directory name]"),
        python: str | None = typer.Option(None, "--python", help="interpreter that has vllm [this one]"),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
        log_file: str | None = typer.Option(None, "--log-file", help="server output to this file"),
        engine: str | None = typer.Option(
            None,
            "--engine",
            help="vllm (top-K log-probs) | hf (opd's transformers server: hidden, ids, topk) [vllm]",
        ),
        device: str | None = typer.Option(None, "--device", help="engine hf: auto | cpu | cuda:N [auto]"),
        device_map: str | None = typer.Option(None, "--device-map", help="engine hf: e.g. auto, over GPUs"),
        max_batch_tokens: int | None = typer.Option(None, "--max-batch-tokens", help="engine hf [16384]"),
        max_request_tokens: int | None = typer.Option(
            None, "--max-request-tokens", help="engine hf [262144]"
        ),
    ) -> None:
        """Start a server that scores token ids, on 127.0.0.1 by default: vLLM (prompt log-probs) or, with
        --engine hf, opd's own transformers server (hidden states, log-probs at ids, or vLLM's top-K).

        Arguments after `--` go to vLLM unchanged. With --engine hf train with `--teacher.backend http
        --teacher.urls URL --teacher.payload hidden` (every objective) or `--teacher.payload ids`. Train against it with
        `--teacher.backend http --teacher.urls URL --loss.support teacher` (or --loss.signal sampled);
        several servers: --teacher.urls [http://a:8000, http://b:8000].
        Set OPD_TEACHER_API_KEY (on both sides) before binding to a non-loopback address.
        """
        from opd.teachers.server import build_server

        named = dict(
            model=model, host=host, port=port, max_logprobs=max_logprobs, dtype=dtype, max_model_len=max_model_len,
            kv_cache_gb=kv_cache_gb, served_name=served_name, python=python, log_file=log_file,
            trust_remote_code=trust_remote_code or None, vllm_args=list(ctx.args), engine=engine, device=device,
            device_map=device_map, max_batch_tokens=max_batch_tokens, max_request_tokens=max_request_tokens,
        )  # fmt: skip
        server = None
        _stop_on_signals()
        try:
            cfg = load_command_config("serve-teacher", config, options=named)
            if cfg.host not in ("127.0.0.1", "localhost", "::1"):
                console.print(
                    f"[yellow]warning:[/] binding to {cfg.host}: anyone who can reach this port can use the "
                    "server; set OPD_TEACHER_API_KEY here and where you train"
                )
            server = build_server(cfg)  # assigned before it starts: a signal during start still stops it
            server.start()
            console.print(f"starting the teacher server: {' '.join(server.cmd)}")
            server.wait_ready(cfg.ready_timeout_s)
            if cfg.engine == "hf":
                console.print(
                    f"[green]teacher ready[/] at {cfg.url} (opd scoring server, {cfg.dtype}); train with\n"
                    f"  opd train ... --teacher.backend http --teacher.urls {cfg.url} --teacher.payload hidden "
                    f"--teacher.path {cfg.model}\nCtrl-C stops it."
                )
            else:
                console.print(
                    f"[green]teacher ready[/] at {cfg.url} (top-{cfg.max_logprobs} log-probs); train with\n"
                    f"  opd train ... --teacher.backend http --teacher.urls {cfg.url} --teacher.top_k "
                    f"{min(cfg.max_logprobs, 20)} --teacher.path {cfg.model}\nCtrl-C stops it."
                )
            code = server.proc.wait() if server.proc else 0
        except OpdError as exc:
            _shutdown(server)
            fail(exc)
        except OSError as exc:  # a log file it may not write, a model file it may not read: one line
            _shutdown(server)
            if os_error(exc) is None:
                raise
            fail(exc)
        except KeyboardInterrupt:
            console.print("stopping the teacher server")
            _shutdown(server)
            code = 0
        raise typer.Exit(code)
