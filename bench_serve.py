"""Serving benchmark: a named workload (benchmarks/workloads.py, default nano-vLLM's) sent by concurrent
streaming HTTP clients, one per request, spread over --client-procs processes so that parsing the
events never limits the figures, to a `nanovllm serve` subprocess; prints one JSON line with output
tok/s, TTFT, ITL and TPOT p50/p99.

Compare `output_tok_per_s` with `tok_per_s` of `python bench.py` on the same card (the offline ceiling).
All clients start at once, as in bench.py. TTFT is from sending a request to its first text event; ITL
is the gap between a request's consecutive text events (an event carries every token the request got
since its previous one, so a client that falls behind sees fewer, larger events); TPOT is a request's
(last event - first event) / (tokens - 1); tokens_per_event above 1 means the server merged steps for
clients it could not keep up with. CPU smoke run: `--preset tiny --num-seqs 4 --max-output-len 12
--client-procs 1 --server-args "--device cpu"`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import queue
import tempfile
import time

import httpx
import numpy as np

from benchmarks.server import ServerProcess
from benchmarks.workloads import WORKLOADS, make_workload


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[float, list[float], int]:
    """(send time, text event times, completion tokens) of one streamed completion."""
    start = time.monotonic()
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
                times.append(time.monotonic())
    return start, times, tokens


async def run_clients(url: str, bodies: list[dict], start_together) -> list[tuple[float, list[float], int]]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=None) as client:
        await one_request(client, {**bodies[0], "max_tokens": 4})  # warm-up
        start_together()
        return await asyncio.gather(*[one_request(client, body) for body in bodies])


def client_process(url: str, bodies: list[dict], barrier, results) -> None:
    """One client process: its share of the requests, started when every process is ready."""
    results.put(asyncio.run(run_clients(url, bodies, barrier.wait)))


def next_result(results, workers: list) -> list[tuple[float, list[float], int]]:
    """One client process's results; RuntimeError once any has failed (it sends none: waiting would hang)."""
    while True:
        try:
            return results.get(timeout=1)
        except queue.Empty:
            failed = [worker.exitcode for worker in workers if worker.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"a client process failed (exit code {failed[0]}); its error is above") from None


def run_client_processes(url: str, bodies: list[dict], procs: int) -> list[tuple[float, list[float], int]]:
    """Request i goes to process i % procs; the results of all processes (monotonic clocks are system-wide)."""
    context = mp.get_context("spawn")
    barrier = context.Barrier(procs)
    results = context.Queue()
    workers = [context.Process(target=client_process, args=(url, bodies[i::procs], barrier, results)) for i in range(procs)]
    for worker in workers:
        worker.start()
    try:
        gathered = [result for _ in workers for result in next_result(results, workers)]
    except BaseException:
        barrier.abort()  # the others may be waiting there for the failed one
        raise
    finally:
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.kill()
    return gathered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model folder (default: build a random-weight checkpoint)")
    parser.add_argument("--preset", default="qwen3-0.6b", help="checkpoint preset when --model is absent (tiny on CPU)")
    parser.add_argument("--workload", default="nano", choices=WORKLOADS)
    parser.add_argument("--num-seqs", type=int, help="send only the workload's first N requests")
    parser.add_argument("--max-output-len", type=int, help="cap every request's max_tokens (CPU smoke runs)")
    parser.add_argument("--server-args", default="", help="extra `nanovllm serve` flags, e.g. '--device cpu --max-model-len 4096'")
    parser.add_argument("--client-procs", type=int, default=4, help="client processes the requests are spread over (default: 4)")
    parser.add_argument("--json", help="also append the figures to this file")
    parser.add_argument("--profile-server", metavar="PATH", help="record the server's two processes with py-spy into PATH (collapsed stacks)")
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy executable for --profile-server (default: py-spy on PATH)")
    args = parser.parse_args()
    # Here, not at the top: the client processes re-import this module, and need neither torch nor transformers.
    from transformers import AutoConfig

    from nanovllm.testing import make_checkpoint

    scratch = None
    model = args.model
    if model is None:
        scratch = tempfile.TemporaryDirectory(prefix="nanovllm-bench-serve-")
        model = str(make_checkpoint(scratch.name, args.preset))
    workload = make_workload(args.workload, AutoConfig.from_pretrained(model).vocab_size)
    max_tokens = [min(n, args.max_output_len or n) for n in workload.max_tokens][: args.num_seqs]
    bodies = [{"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.6, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}} for prompt, n in zip(workload.prompts, max_tokens)]
    client_procs = min(args.client_procs, len(bodies))
    server = ServerProcess(model, ["--log-level", "warning", *args.server_args.split()], profile=args.profile_server, py_spy=args.py_spy)
    try:
        results = run_client_processes(server.url, bodies, client_procs)
    finally:
        server_exit = server.stop()
        if scratch is not None:
            scratch.cleanup()
    timed = [r for r in results if r[1]]  # a request may end without a text event (only incomplete characters)
    elapsed = max(r[1][-1] for r in timed) - min(r[0] for r in results)
    ttft = [r[1][0] - r[0] for r in timed]
    itl = [gap for r in results for gap in np.diff(r[1])]
    tpot = [(r[1][-1] - r[1][0]) / (r[2] - 1) for r in results if r[2] > 1]
    tokens = sum(r[2] for r in results)
    ms = lambda values, q: round(1000 * float(np.percentile(values, q)), 2) if len(values) else None
    figures = {
        "workload": args.workload, "clients": len(bodies), "client_procs": client_procs, "output_tokens": tokens,
        "expected_tokens": sum(max_tokens), "seconds": round(elapsed, 3), "output_tok_per_s": round(tokens / elapsed, 1),
        "ttft_ms_p50": ms(ttft, 50), "ttft_ms_p99": ms(ttft, 99), "itl_ms_p50": ms(itl, 50), "itl_ms_p99": ms(itl, 99),
        "tpot_ms_p50": ms(tpot, 50), "tpot_ms_p99": ms(tpot, 99), "tokens_per_event": round(tokens / sum(len(r[1]) for r in results), 2),
        "server_exit": server_exit, "server_args": args.server_args,
    }
    line = json.dumps(figures)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
