"""nano-vLLM (the peer, from ../shared/peer staged in .peer/) on named workloads: same requests as bench.py.

Run with the peer's package first on PYTHONPATH (benchmarks/run_peer.sh does it), never ours:
    bash benchmarks/run_peer.sh --model DIR --workload short
Prints one JSON line per workload: {"engine": "nano-vllm", "workload": ..., "tok_per_s": ..., ...}. Several
workloads (`--workload nano short`) run one after the other in one engine, paying its start-up once; a later
one then finds the engine warm (measured: short 39994.3 tok/s alone, 57897.8 after nano, H200), while
bench.py runs each in its own process, so one workload per call gives like-for-like start conditions. The
workloads draw from one seed: nano's first prompt is the first 964 tokens of prefix's first prefix (3 cache
blocks of 256 a later prefix run may find cached; short's first prompt shares 124 tokens, no whole block).
"""
from __future__ import annotations

import argparse
import json
import time

from nanovllm import LLM, SamplingParams
from workloads import WORKLOADS, make_workload

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--workload", choices=WORKLOADS, nargs="+", default=["nano"])
parser.add_argument("--max-model-len", type=int, default=4096)
parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
parser.add_argument("--max-num-seqs", type=int, default=512)
parser.add_argument("--tp", type=int, default=1)
args = parser.parse_args()

start = time.perf_counter()
llm = LLM(args.model, max_model_len=args.max_model_len, tensor_parallel_size=args.tp,
          max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
startup = time.perf_counter() - start
for name in args.workload:
    workload = make_workload(name, llm.model_runner.config.hf_config.vocab_size)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in workload.max_tokens]
    llm.generate(["Benchmark: "], SamplingParams())
    start = time.perf_counter()
    llm.generate(workload.prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    print(json.dumps({"engine": "nano-vllm", "commit": "bb823b3", "workload": name, "total_tokens": workload.output_tokens,
                      "seconds": round(elapsed, 3), "tok_per_s": round(workload.output_tokens / elapsed, 1),
                      "startup_s": round(startup, 1), "tp": args.tp}), flush=True)
