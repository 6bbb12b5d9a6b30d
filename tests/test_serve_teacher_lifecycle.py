"""`opd serve-teacher` process handling: every way of stopping the command stops the server it started.

A stand-in "python" replaces vLLM here. It answers the `import vllm` probe and serves `/v1/models` on the
requested port. This isolates the wrapper's process management; the vLLM CI stage runs the real server
(tests/test_vllm_backend.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

FAKE_SERVER = r"""
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])
open(os.environ["FAKE_PID_FILE"], "w").write(str(os.getpid()))
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        body = json.dumps({"data": [{"id": "teacher", "max_model_len": 256}]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@pytest.fixture
def teacher_dir(tiny_pair) -> Path:
    return tiny_pair["teacher"]


@pytest.fixture
def fake_python(tmp_path) -> Path:
    server = tmp_path / "fake_server.py"
    server.write_text(FAKE_SERVER)
    exe = tmp_path / "fake-python"
    # `-c ...` is the wrapper's `import vllm` probe; `-m vllm.entrypoints...` starts the stand-in server.
    exe.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exit 0; fi\nexec {sys.executable} {server} "$@"\n')
    exe.chmod(0o755)
    return exe


@pytest.mark.parametrize(
    ("sig", "ignore_sigint_at_start"),
    [(signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGHUP, False)],
    ids=["ctrl-c", "ctrl-c-in-a-background-job", "kill", "hangup"],
)
def test_stopping_the_command_stops_the_server(
    teacher_dir, fake_python, tmp_path, sig, ignore_sigint_at_start
):
    port = _free_port()
    pid_file = tmp_path / "server.pid"

    def prologue() -> None:  # how a non-interactive shell starts a background job: SIGINT ignored
        if ignore_sigint_at_start:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(
        [sys.executable, "-m", "opd.cli", "serve-teacher", str(teacher_dir), "--port", str(port), "--python",
         str(fake_python)],
        env={**os.environ, "FAKE_PID_FILE": str(pid_file), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=prologue,
    )  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "teacher ready" in line or not line:
                break
        assert "teacher ready" in "".join(lines), "".join(lines)
        server_pid = int(pid_file.read_text())
        assert _alive(server_pid)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "stopping the teacher server" in out
        for _ in range(50):
            if not _alive(server_pid):
                break
            time.sleep(0.1)
        assert not _alive(server_pid), "the server outlived `opd serve-teacher`"
    finally:
        if proc.poll() is None:
            proc.kill()
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
