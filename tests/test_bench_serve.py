"""bench_serve.py runs end to end on CPU: every client gets its workload's tokens and the server exits 0."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks.server import REPO, free_port


def test_bench_serve_smoke_on_cpu() -> None:
    command = [sys.executable, "bench_serve.py", "--preset", "tiny", "--num-seqs", "4", "--max-output-len", "8",
               "--client-procs", "2", "--server-args", "--device cpu"]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["output_tokens"] == figures["expected_tokens"] > 0 and figures["server_exit"] == 0
    assert figures["output_tok_per_s"] > 0 and 0 < figures["ttft_ms_p50"] <= figures["ttft_ms_p99"]


def _ptrace_scope() -> int:
    try:
        return int(pathlib.Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        return 0


@pytest.mark.skipif(_ptrace_scope() >= 2, reason="py-spy may not read even its own child processes here (kernel.yama.ptrace_scope >= 2)")
def test_profile_server_records_both_server_processes(tmp_path) -> None:
    profile = tmp_path / "serve.txt"
    command = [sys.executable, "bench_serve.py", "--preset", "tiny", "--num-seqs", "2", "--max-output-len", "4",
               "--client-procs", "1", "--server-args", "--device cpu", "--profile-server", str(profile)]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["output_tokens"] == figures["expected_tokens"] > 0 and figures["server_exit"] == 0
    # A sample's stack starts with its process and the processes above it: `process PID:"command";...`.
    processes = [line.split(";")[:2] for line in profile.read_text().splitlines()]
    assert any("nanovllm.serve" in first and not second.startswith("process ") for first, second in processes), "no sample of the server"
    assert any("nanovllm.serve" in first and "spawn_main" in second for first, second in processes), "no sample of its engine process"


def test_a_client_process_that_fails_ends_the_run() -> None:
    """Nothing listens on the port: every client process fails, and the run raises instead of waiting forever."""
    code = f"import bench_serve; bench_serve.run_client_processes('http://127.0.0.1:{free_port()}', [{{}}] * 2, 2)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "RuntimeError: a client process failed" in done.stderr, done.stderr[-3000:]
