"""Throughput benchmark: nano-vLLM's workload, with the hardware floor measured in the same run.

Default workload (nano-vLLM's bench.py): seed 0, 256 sequences, prompt lengths and output lengths
uniform in [100, 1024], random prompt token ids < 10000, temperature 0.6, ignore_eos, max_model_len 4096.
Without --model it writes a random-weight checkpoint to a temp dir (qwen3-0.6b on CUDA, tiny on CPU).

floor = (KV bytes read by all decode steps + weight bytes x decode steps) / measured copy bandwidth
        + prefill FLOPs / measured matmul rate
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from random import randint, seed

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.testing import make_checkpoint


@dataclass
class Workload:
    prompts: list[list[int]]
    params: list[SamplingParams]


def max_prompt_id(vocab_size: int) -> int:
    """nano-vLLM draws prompt token ids in [0, 10000]; capped below the vocabulary size of small models."""
    return min(10000, vocab_size - 1)


def make_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    """nano-vLLM's draws."""
    seed(0)
    max_id = max_prompt_id(vocab_size)
    prompts = [[randint(0, max_id) for _ in range(randint(args.min_input_len, args.max_input_len))] for _ in range(args.num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(args.min_output_len, args.max_output_len)) for _ in range(args.num_seqs)]
    return Workload(prompts, params)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Mean seconds per call after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def measure_copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read and written."""
    numel = (1 << 30) // 2 if device.type == "cuda" else (1 << 26)
    src = torch.empty(numel, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _timed(lambda: dst.copy_(src), device, 20)


def measure_matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product in the model's dtype."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _timed(lambda: a @ b, device, 10)


@dataclass
class Floor:
    kv_bytes: float
    weight_bytes: float
    prefill_flops: float
    decode_steps: int

    def seconds(self, bandwidth: float, matmul_rate: float) -> float:
        return (self.kv_bytes + self.weight_bytes * self.decode_steps) / bandwidth + self.prefill_flops / matmul_rate


def workload_floor(llm: LLM, workload: Workload, decode_steps: int) -> Floor:
    """Bytes and FLOPs the workload cannot avoid (one rank's share under TP is not modelled: whole model)."""
    hf = llm.config.hf_config
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    itemsize = llm.runtime.dtype.itemsize
    kv_per_token = 2 * hf.num_hidden_layers * hf.num_key_value_heads * head_dim * itemsize
    model = llm.model_runner.model
    weight_bytes = sum(p.numel() for p in model.parameters()) * itemsize * llm.config.tensor_parallel_size
    linear_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) * llm.config.tensor_parallel_size
    kv_tokens = 0
    prefill_flops = 0.0
    for prompt, params in zip(workload.prompts, workload.params):
        p, t = len(prompt), params.max_tokens
        kv_tokens += sum(p + j - 1 for j in range(2, t + 1))
        attention = 4 * hf.num_hidden_layers * hf.num_attention_heads * head_dim * p * (p + 1) / 2
        prefill_flops += 2 * linear_params * p + attention + 2 * hf.vocab_size * hf.hidden_size
    return Floor(kv_tokens * kv_per_token, weight_bytes, prefill_flops, decode_steps)


class StepProfiler:
    """Counts decode steps; with `gpu_timeline` (CUDA only) also records CUDA events around each
    step's device work (from the first forward kernel to the sampled-token copy), without any host
    synchronisation, so the idle gaps of the device between decode steps can be measured afterwards."""

    def __init__(self, llm: LLM, gpu_timeline: bool) -> None:
        self.decode_steps = 0
        self.host_s: list[float] = []
        self.prefill_only_s: list[float] = []
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event, bool]] = []
        self._step = llm.step
        llm.step = self._timed_step
        if gpu_timeline and llm.runtime.device.type == "cuda":
            runner = llm.model_runner
            self._execute, self._launch = runner.execute, runner.launch
            runner.execute, runner.launch = self._marked_execute, self._marked_launch

    def _marked_execute(self, inputs):
        self._start = torch.cuda.Event(enable_timing=True)
        self._start.record()
        self._is_decode = inputs.is_decode
        return self._execute(inputs)

    def _marked_launch(self, batch, eos_token_id):
        handle = self._launch(batch, eos_token_id)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.events.append((self._start, end, self._is_decode))
        return handle

    def _timed_step(self):
        start = time.perf_counter()
        chunks, num_prefill, num_decode = self._step()
        elapsed = time.perf_counter() - start
        if num_decode:
            self.decode_steps += 1
            self.host_s.append(elapsed)
        else:
            self.prefill_only_s.append(elapsed)
        return chunks, num_prefill, num_decode

    def summary(self) -> dict:
        """Mean decode-step figures: host wall time per step() call, device busy time, device idle gap before
        the step; and the steps without any decode (prefill only): how many, total host wall time."""
        figures = {"host_step_ms": round(1e3 * sum(self.host_s) / max(len(self.host_s), 1), 3),
                   "prefill_only_steps": len(self.prefill_only_s), "prefill_only_s": round(sum(self.prefill_only_s), 3)}
        if not self.events:
            return figures
        torch.cuda.synchronize()
        busy, idle = [], []
        for (start, end, is_decode), (_, previous_end, previous_decode) in zip(self.events[1:], self.events[:-1]):
            if is_decode and previous_decode:
                busy.append(start.elapsed_time(end))
                idle.append(max(0.0, previous_end.elapsed_time(start)))
        if busy:
            mean_busy, mean_idle = sum(busy) / len(busy), sum(idle) / len(idle)
            figures.update({"gpu_busy_ms": round(mean_busy, 3), "gpu_idle_gap_ms": round(mean_idle, 3),
                            "gpu_idle_pct": round(100 * mean_idle / (mean_busy + mean_idle), 2)})
        return figures


def run_throughput(llm: LLM, args: argparse.Namespace) -> dict:
    """nano-vLLM's workload: tok/s, % of the measured floor, achieved bandwidth, step profile."""
    workload = make_workload(args, llm.config.hf_config.vocab_size)
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    profiler = StepProfiler(llm, args.profile)
    start = time.perf_counter()
    llm.generate(workload.prompts, workload.params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    decode_steps = profiler.decode_steps
    total_tokens = sum(p.max_tokens for p in workload.params)
    device = llm.runtime.device
    bandwidth = measure_copy_bandwidth(device)
    matmul_rate = measure_matmul_rate(device, llm.runtime.dtype)
    floor = workload_floor(llm, workload, decode_steps)
    floor_s = floor.seconds(bandwidth, matmul_rate)
    figures = {
        "total_tokens": total_tokens, "seconds": round(elapsed, 3), "tok_per_s": round(total_tokens / elapsed, 1),
        "floor_s": round(floor_s, 3), "pct_of_floor": round(100 * floor_s / elapsed, 1),
        "achieved_GBps": round((floor.kv_bytes + floor.weight_bytes * decode_steps) / elapsed / 1e9, 1),
        "copy_GBps": round(bandwidth / 1e9, 1), "matmul_TFLOPs": round(matmul_rate / 1e12, 1), "decode_steps": decode_steps,
        "preemptions": llm.scheduler.num_preemptions, **profiler.summary(),
    }
    print(f"Total: {total_tokens}tok, Time: {elapsed:.2f}s, Throughput: {total_tokens / elapsed:.2f}tok/s")
    print(f"Floor: {floor_s:.2f}s ({figures['pct_of_floor']}% of floor), achieved {figures['achieved_GBps']} GB/s "
          f"of {figures['copy_GBps']} GB/s copy bandwidth, matmul {figures['matmul_TFLOPs']} TFLOP/s")
    return figures


def run_itl(llm: LLM, args: argparse.Namespace) -> dict:
    """Long prompts arriving while others decode: 16 sequences decode 128-token prompts, then 8 prompts
    of `--itl-prompt-len` tokens arrive; reports the inter-token latency of the 16 decoding sequences
    while any long prompt is unfinished (prefill_first stalls them for whole long prefills; chunked
    keeps them going). Gaps after the long prompts are done would only dilute the percentiles."""
    seed(1)
    max_id = max_prompt_id(llm.config.hf_config.vocab_size)
    decode_params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=args.itl_decode_tokens)
    long_params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=16)
    decoders = [llm.add_request([randint(0, max_id) for _ in range(128)], decode_params, i, stream=True) for i in range(16)]
    long_prompts = [[randint(0, max_id) for _ in range(args.itl_prompt_len)] for _ in range(8)]
    while min(seq.num_output_tokens for seq in decoders) < 8:
        llm.step()
    arrival = time.perf_counter()
    longs = [llm.add_request(prompt, long_params, 16 + i, stream=True) for i, prompt in enumerate(long_prompts)]
    last_seen = {seq.seq_id: arrival for seq in decoders}
    gaps: list[float] = []
    while not all(seq.is_finished for seq in longs):
        chunks, _, _ = llm.step()
        now = time.perf_counter()
        for chunk in chunks:
            if chunk.index < 16 and chunk.token_ids:
                seq_id = decoders[chunk.index].seq_id
                gaps.append(now - last_seen[seq_id])
                last_seen[seq_id] = now
    window = time.perf_counter() - arrival
    while not llm.is_finished():
        llm.step()
    gaps.sort()

    def percentile_ms(q: float) -> float:
        return round(1e3 * gaps[min(len(gaps) - 1, int(q * len(gaps)))], 2)

    figures = {"itl_samples": len(gaps), "itl_p50_ms": percentile_ms(0.5), "itl_p99_ms": percentile_ms(0.99),
               "itl_max_ms": round(1e3 * gaps[-1], 2), "long_prompts_seconds": round(window, 3),
               "long_prompt_tokens": sum(s.num_completion_tokens for s in longs)}
    print(f"ITL of 16 decoding sequences while 8 x {args.itl_prompt_len}-token prompts arrive: "
          f"p50 {figures['itl_p50_ms']} ms, p99 {figures['itl_p99_ms']} ms, max {figures['itl_max_ms']} ms")
    return figures


def run_kernel_profile(llm: LLM, args: argparse.Namespace) -> dict:
    """Device time per kernel over `--kernel-profile` decode steps of `--num-seqs` sequences with
    512-token prompts (after 10 unprofiled decode steps), from torch.profiler's CUDA activity."""
    seed(2)
    max_id = max_prompt_id(llm.config.hf_config.vocab_size)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=args.kernel_profile + 20)
    seqs = [llm.add_request([randint(0, max_id) for _ in range(512)], params, i) for i in range(args.num_seqs)]
    while min(seq.num_output_tokens for seq in seqs) < 10:
        llm.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(args.kernel_profile):
            llm.step()
        torch.cuda.synchronize()
    while not llm.is_finished():
        llm.step()
    kernels = sorted((e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0),
                     key=lambda e: -e.device_time_total)
    total_ms = sum(e.device_time_total for e in kernels) / 1e3 / args.kernel_profile
    print(f"device time of one decode step at batch {args.num_seqs}: {total_ms:.3f} ms")
    top = []
    for e in kernels[:15]:
        ms = e.device_time_total / 1e3 / args.kernel_profile
        top.append([e.key[:80], round(ms, 3), e.count // args.kernel_profile])
        print(f"{ms:8.3f} ms {100 * ms / total_ms:5.1f}% x{e.count // args.kernel_profile:<4} {e.key[:100]}")
    return {"profiled_steps": args.kernel_profile, "kernel_ms_per_step": round(total_ms, 3), "top_kernels": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF Qwen3 folder (default: build a random-weight checkpoint)")
    parser.add_argument("--preset", choices=["tiny", "qwen3-0.6b"], help="checkpoint preset when --model is absent")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--min-input-len", type=int, default=100)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--min-output-len", type=int, default=100)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--scheduling-policy", default="prefill_first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", action="store_true", help="per decode step: host time, device busy time, device idle gap")
    parser.add_argument("--no-overlap", action="store_true", help="disable overlap scheduling (the host waits for each step)")
    parser.add_argument("--itl", action="store_true", help="run the long-prompt inter-token-latency workload instead")
    parser.add_argument("--itl-prompt-len", type=int, default=8192)
    parser.add_argument("--itl-decode-tokens", type=int, default=512)
    parser.add_argument("--kernel-profile", type=int, default=0, metavar="N",
                        help="instead: per-kernel device time over N decode steps at batch --num-seqs (CUDA)")
    parser.add_argument("--json", help="also append the figures to this file, one JSON line per run")
    args = parser.parse_args()

    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    model, scratch = args.model, None
    if model is None:
        preset = args.preset or ("qwen3-0.6b" if on_cuda else "tiny")
        scratch = tempfile.TemporaryDirectory(prefix="nanovllm-bench-")
        model = str(make_checkpoint(scratch.name, preset))
        print(f"no --model: built a random-weight {preset} checkpoint in {model}")
    llm = LLM(model, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
              tensor_parallel_size=args.tp, attention_backend=args.attention_backend, scheduling_policy=args.scheduling_policy,
              device=args.device, overlap_scheduling=False if args.no_overlap else None)
    device = llm.runtime.device
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "backend": llm.runtime.attention_backend,
        "cuda_graphs": llm.runtime.cuda_graphs, "overlap": llm.runtime.overlap, "policy": args.scheduling_policy,
        "kv_blocks": llm.runtime.num_kvcache_blocks, "tp": args.tp,
        **(run_itl(llm, args) if args.itl else run_kernel_profile(llm, args) if args.kernel_profile else run_throughput(llm, args)),
    }
    line = json.dumps(figures)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    llm.exit()
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
