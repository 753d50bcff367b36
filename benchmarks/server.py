"""A `nanovllm serve` subprocess on a free 127.0.0.1 port, started and waited for (bench_serve.py and the HTTP tests)."""
from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx

REPO = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (read from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


class ServerProcess:
    """`python -m nanovllm.serve MODEL --port P *flags`, run from the repository root with `env` (default:
    this process's), its output to `log` (default: inherited). The constructor returns once /health
    answers 200; it kills the server and raises RuntimeError if it exits or is not ready in `timeout_s`.

    With `profile` (a file name), the server runs under `py_spy record --subprocesses --nonblocking` (its
    engine process too, sampled without pausing either), which writes the samples of both as collapsed
    stacks (--format raw) when the server exits; `process` is then py-spy's, and `server_pid` the server's."""

    def __init__(self, model: str, flags: list[str], env: dict[str, str] | None = None, log=None, timeout_s: float = 600,
                 profile: str | None = None, py_spy: str = "py-spy") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "nanovllm.serve", model, "--port", str(self.port), *flags]
        if profile is not None:
            command = [py_spy, "record", "--subprocesses", "--nonblocking", "--format", "raw", "--rate", "100", "--output", profile, "--", *command]
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
        self.server_pid = self.process.pid
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode} before it was ready")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    if profile is not None:
                        [self.server_pid] = child_pids(self.process.pid)
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.process.kill()  # not self.kill(): a subclass's may also release what its error message reads
        self.process.wait(30)
        raise RuntimeError(f"the server was not ready within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 120) -> int:
        """SIGTERM to the server, then wait: the exit status (py-spy's, when profiled)."""
        os.kill(self.server_pid, signal.SIGTERM)
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

