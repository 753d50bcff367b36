"""Serving benchmark: a named workload (benchmarks/workloads.py, default nano-vLLM's) sent by concurrent
streaming HTTP clients, one per request, to a `nanovllm serve` subprocess; prints one JSON line with
output tok/s, TTFT and ITL p50/p99.

Compare `output_tok_per_s` with `tok_per_s` of `python bench.py` on the same card (the offline ceiling).
All clients start at once, as in bench.py. TTFT is from sending a request to its first text event; ITL
is the gap between a request's consecutive text events (one per engine step, as the stream holds back
only incomplete characters). CPU smoke run: `--preset tiny --num-seqs 4 --max-output-len 12 --server-args "--device cpu"`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
from transformers import AutoConfig

from benchmarks.workloads import WORKLOADS, make_workload
from nanovllm.testing import make_checkpoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, flags: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "nanovllm.serve", model, "--port", str(port), "--log-level", "warning", *flags]
    server = subprocess.Popen(command, cwd=os.path.dirname(os.path.abspath(__file__)))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not become ready in 600 s")


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[float, list[float], int]:
    """(TTFT, gaps between text events, completion tokens) of one streamed completion."""
    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if any(choice["text"] for choice in event["choices"]):
                times.append(time.perf_counter())
    return times[0] - start, list(np.diff(times)), tokens


async def run_clients(port: int, bodies: list[dict]) -> tuple[float, list[tuple[float, list[float], int]]]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=None) as client:
        await one_request(client, {**bodies[0], "max_tokens": 4})  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*[one_request(client, body) for body in bodies])
        return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model folder (default: build a random-weight checkpoint)")
    parser.add_argument("--preset", default="qwen3-0.6b", help="checkpoint preset when --model is absent (tiny on CPU)")
    parser.add_argument("--workload", default="nano", choices=WORKLOADS)
    parser.add_argument("--num-seqs", type=int, help="send only the workload's first N requests")
    parser.add_argument("--max-output-len", type=int, help="cap every request's max_tokens (CPU smoke runs)")
    parser.add_argument("--server-args", default="", help="extra `nanovllm serve` flags, e.g. '--device cpu --max-model-len 4096'")
    parser.add_argument("--json", help="also append the figures to this file")
    args = parser.parse_args()

    scratch = None
    model = args.model
    if model is None:
        scratch = tempfile.TemporaryDirectory(prefix="nanovllm-bench-serve-")
        model = str(make_checkpoint(scratch.name, args.preset))
    workload = make_workload(args.workload, AutoConfig.from_pretrained(model).vocab_size)
    max_tokens = [min(n, args.max_output_len or n) for n in workload.max_tokens][: args.num_seqs]
    bodies = [{"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.6, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}} for prompt, n in zip(workload.prompts, max_tokens)]
    port = free_port()
    server = start_server(model, port, args.server_args.split())
    try:
        elapsed, results = asyncio.run(run_clients(port, bodies))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
        if scratch is not None:
            scratch.cleanup()
    ttft = [r[0] for r in results]
    itl = [gap for r in results for gap in r[1]]
    tokens = sum(r[2] for r in results)
    ms = lambda values, q: round(1000 * float(np.percentile(values, q)), 2) if values else None
    figures = {
        "workload": args.workload, "clients": len(bodies), "output_tokens": tokens, "expected_tokens": sum(max_tokens),
        "seconds": round(elapsed, 3), "output_tok_per_s": round(tokens / elapsed, 1),
        "ttft_ms_p50": ms(ttft, 50), "ttft_ms_p99": ms(ttft, 99), "itl_ms_p50": ms(itl, 50), "itl_ms_p99": ms(itl, 99),
        "server_exit": server.returncode, "server_args": args.server_args,
    }
    line = json.dumps(figures)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
