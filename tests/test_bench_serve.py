"""bench_serve.py runs end to end on CPU: every client gets its workload's tokens and the server exits 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks.server import REPO


def test_bench_serve_smoke_on_cpu() -> None:
    command = [sys.executable, "bench_serve.py", "--preset", "tiny", "--num-seqs", "4", "--max-output-len", "8",
               "--client-procs", "2", "--server-args", "--device cpu"]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["output_tokens"] == figures["expected_tokens"] > 0 and figures["server_exit"] == 0
    assert figures["output_tok_per_s"] > 0 and 0 < figures["ttft_ms_p50"] <= figures["ttft_ms_p99"]
