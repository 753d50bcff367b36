"""A `nanovllm serve` subprocess for the HTTP tests (always killed at the end), and process inspection."""
from __future__ import annotations

import os
import pathlib
import tempfile

import httpx

from benchmarks.server import REPO, ServerProcess, child_pids

ENGINE_FLAGS = ["--device", "cpu", "--kvcache-block-size", "16", "--max-num-batched-tokens", "4096"]


class Server(ServerProcess):
    def __init__(self, model: str, *flags: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        env.pop("NANOVLLM_API_KEY", None)
        self.log = tempfile.TemporaryFile()
        try:
            super().__init__(model, ["--log-level", "warning", *ENGINE_FLAGS, *flags], env, self.log, timeout_s=120)
        except RuntimeError as error:
            output = self.output()
            self.log.close()
            raise RuntimeError(f"{error}: {output[-3000:]}") from None

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Metric samples without labels, plus `name{labels}` ones, as floats."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}

    def kill(self) -> None:
        super().kill()
        self.log.close()


def descendant_pids(pid: int) -> list[int]:
    """Children, grandchildren, ... of `pid`."""
    return [found for child in child_pids(pid) for found in (child, *descendant_pids(child))]


def engine_pid(server_pid: int) -> int:
    """The server's engine process: its child started by multiprocessing's spawn (the other is the resource tracker)."""
    for child in child_pids(server_pid):
        if b"spawn_main" in pathlib.Path(f"/proc/{child}/cmdline").read_bytes():
            return child
    raise LookupError(f"server {server_pid} has no engine process")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
