"""Throughput benchmark on a named workload (benchmarks/workloads.py: nano, short, prefix, long), with
the hardware floor measured in the same run; `--itl` and `--kernel-profile` are separate measurements.

Without --model it writes a random-weight checkpoint of --preset to a temp dir (qwen3-0.6b on CUDA,
tiny on CPU); with --load-format dummy only its config and tokenizer (the engine makes random weights on
the device: real-size presets such as llama-3.1-8b or qwen3-30b-a3b then need no disk and start in seconds).
nano-vLLM on the same workload: `bash benchmarks/run_peer.sh --model DIR --workload NAME` (dense Qwen3 only).

floor = (KV bytes read by all decode steps + weight bytes read by the steps that decode) / measured copy bandwidth
        + prefill FLOPs / measured matmul rate
A step that decodes reads every weight except the input embedding table (only its rows; a tied table is
read whole by the LM head); of a MoE layer only the experts its tokens touch, counted as uniform routing
would touch them: E * (1 - (1 - k/E)^tokens) of E experts (a random-weight router spreads tokens so).
Prefill FLOPs per prompt token: 2 x the active matrix parameters (k of E experts, no embedding, no LM
head), plus attention, plus the LM head once per prompt.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from random import randint, seed

import torch

from benchmarks.workloads import WORKLOADS, Workload, make_workload, max_prompt_id
from nanovllm import LLM, SamplingParams
from nanovllm.config import LOAD_FORMATS
from nanovllm.layers.fused_moe import SparseMoeBlock
from nanovllm.testing import PRESETS, make_checkpoint


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


def expected_experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts `tokens` tokens reach when each picks top_k of num_experts uniformly at random."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


@dataclass(frozen=True)
class ModelParams:
    """The model's parameters by how a step uses them (whole model: one rank's count x tp, replicated ones included).

    dense: matrices every token multiplies (no embedding, no LM head); experts: all routed experts'
    parameters, of which a token uses top_k / num_experts; read_whole: what a decoding step reads
    besides the experts (dense + LM head + norms, the embedding table only when it is the tied head)."""

    dense: int
    experts: int
    read_whole: int
    num_experts: int = 1
    top_k: int = 1

    @classmethod
    def of(cls, llm: LLM) -> ModelParams:
        model, tp = llm.model_runner.model, llm.config.tensor_parallel_size
        blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        expert_ids = {id(p) for block in blocks for p in block.experts.parameters()}
        named = dict(model.named_parameters())
        experts = sum(p.numel() for p in named.values() if id(p) in expert_ids)
        embedding = sum(p.numel() for n, p in named.items() if "embed_tokens" in n)
        head = sum(p.numel() for n, p in named.items() if n.startswith("lm_head"))
        total = sum(p.numel() for p in named.values())
        read_whole = total - experts - (0 if model.tie_word_embeddings else embedding)
        moe = (blocks[0].experts.gate_up_proj.shape[0], blocks[0].top_k) if blocks else (1, 1)
        return cls(tp * (total - experts - embedding - head), tp * experts, tp * read_whole, *moe)

    def bytes_read(self, tokens: int, itemsize: int) -> float:
        """Weight bytes a step of `tokens` tokens reads (see the module docstring for the experts)."""
        touched = expected_experts_touched(self.num_experts, self.top_k, tokens) / self.num_experts if self.experts else 0.0
        return (self.read_whole + self.experts * touched) * itemsize

    @property
    def active(self) -> float:
        """Matrix parameters one token multiplies (k of E experts)."""
        return self.dense + self.experts * self.top_k / self.num_experts


@dataclass
class Floor:
    kv_bytes: float
    weight_bytes: float
    prefill_flops: float
    params: ModelParams

    def seconds(self, bandwidth: float, matmul_rate: float) -> float:
        return (self.kv_bytes + self.weight_bytes) / bandwidth + self.prefill_flops / matmul_rate


def workload_floor(llm: LLM, workload: Workload, step_tokens: list[int]) -> Floor:
    """Bytes and FLOPs the workload cannot avoid (one rank's share under TP is not modelled: whole model).
    step_tokens: the token count of every step that decodes (decode and mixed steps)."""
    hf = llm.config.hf_config
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    itemsize = llm.runtime.dtype.itemsize
    kv_per_token = 2 * hf.num_hidden_layers * hf.num_key_value_heads * head_dim * itemsize
    params = ModelParams.of(llm)
    weight_bytes = sum(params.bytes_read(tokens, itemsize) for tokens in step_tokens)
    kv_tokens = 0
    prefill_flops = 0.0
    for prompt, t in zip(workload.prompts, workload.max_tokens):
        p = len(prompt)
        kv_tokens += sum(p + j - 1 for j in range(2, t + 1))
        attention = 4 * hf.num_hidden_layers * hf.num_attention_heads * head_dim * p * (p + 1) / 2
        prefill_flops += 2 * params.active * p + attention + 2 * hf.vocab_size * hf.hidden_size
    return Floor(kv_tokens * kv_per_token, weight_bytes, prefill_flops, params)


def step_kind(batch) -> str:
    """"decode" (one token for every sequence), "prefill" (no sequence past its prompt) or "mixed"."""
    if batch.is_decode:
        return "decode"
    return "mixed" if any(s.num_computed_tokens >= s.num_prompt_tokens for s in batch.seqs) else "prefill"


class StepProfiler:
    """Per step kind (decode, mixed, prefill): how many steps and the mean host wall time of a step()
    call that launched one; with `gpu_timeline` (CUDA only) also CUDA events around each launch's device
    work (from its first input copy to the sampled-token copy), recorded without any host
    synchronisation, for the mean device busy time per kind and the device idle gap between decode steps."""

    KINDS = ("decode", "mixed", "prefill")

    def __init__(self, llm: LLM, gpu_timeline: bool) -> None:
        self.host_s: dict[str, list[float]] = {kind: [] for kind in self.KINDS}
        self.decoding_step_tokens: list[int] = []  # tokens of each decode or mixed step
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event, str]] = []
        self.gpu_timeline = gpu_timeline and llm.runtime.device.type == "cuda"
        self._kind: str | None = None
        self._step = llm.step
        llm.step = self._timed_step
        self._launch = llm.model_runner.launch
        llm.model_runner.launch = self._marked_launch

    @property
    def decode_steps(self) -> int:
        return len(self.host_s["decode"])

    def _marked_launch(self, batch, eos_token_id):
        self._kind = step_kind(batch)
        if self._kind != "prefill":
            self.decoding_step_tokens.append(batch.num_tokens)
        if not self.gpu_timeline:
            return self._launch(batch, eos_token_id)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        handle = self._launch(batch, eos_token_id)
        end.record()
        self.events.append((start, end, self._kind))
        return handle

    def _timed_step(self):
        self._kind = None
        start = time.perf_counter()
        result = self._step()
        if self._kind is not None:
            self.host_s[self._kind].append(time.perf_counter() - start)
        return result

    def busy_ms(self, kind: str) -> list[float]:
        return [start.elapsed_time(end) for start, end, k in self.events if k == kind]

    def summary(self) -> dict:
        """Per kind: steps, mean host ms per step() call and (with the timeline) mean device busy ms;
        the mean device idle gap before a decode step that follows a decode step."""
        if self.events:
            torch.cuda.synchronize()
        figures: dict = {}
        for kind in self.KINDS:
            host = self.host_s[kind]
            figures[f"{kind}_steps"] = len(host)
            if host:
                figures[f"{kind}_host_ms"] = round(1e3 * sum(host) / len(host), 3)
            busy = self.busy_ms(kind)
            if busy:
                figures[f"{kind}_device_ms"] = round(sum(busy) / len(busy), 3)
        gaps = [end.elapsed_time(start) for (_, end, a), (start, _, b) in zip(self.events, self.events[1:]) if a == b == "decode"]
        if gaps and "decode_device_ms" in figures:
            idle = sum(max(0.0, g) for g in gaps) / len(gaps)
            figures.update({"gpu_idle_gap_ms": round(idle, 3), "gpu_idle_pct": round(100 * idle / (figures["decode_device_ms"] + idle), 2)})
        return figures


def run_throughput(llm: LLM, args: argparse.Namespace) -> dict:
    """One named workload: tok/s, % of the measured floor, achieved bandwidth, per-kind step profile."""
    workload = make_workload(args.workload, llm.config.hf_config.vocab_size)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in workload.max_tokens]
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    profiler = StepProfiler(llm, args.profile)
    start = time.perf_counter()
    llm.generate(workload.prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    device = llm.runtime.device
    bandwidth = measure_copy_bandwidth(device)
    matmul_rate = measure_matmul_rate(device, llm.runtime.dtype)
    floor = workload_floor(llm, workload, profiler.decoding_step_tokens)
    total_tokens = workload.output_tokens
    figures = {
        "workload": workload.name, "total_tokens": total_tokens, "seconds": round(elapsed, 3), "tok_per_s": round(total_tokens / elapsed, 1),
        "achieved_GBps": round((floor.kv_bytes + floor.weight_bytes) / elapsed / 1e9, 1),
        "weight_GB_read": round(floor.weight_bytes / 1e9, 1), "kv_GB_read": round(floor.kv_bytes / 1e9, 1),
        "copy_GBps": round(bandwidth / 1e9, 1), "matmul_TFLOPs": round(matmul_rate / 1e12, 1),
        "preemptions": llm.scheduler.num_preemptions, **profiler.summary(),
    }
    # With shared prefixes most prompt tokens need no prefill: no floor is defined for that workload.
    if workload.name != "prefix":
        floor_s = floor.seconds(bandwidth, matmul_rate)
        figures.update({"floor_s": round(floor_s, 3), "pct_of_floor": round(100 * floor_s / elapsed, 1)})
    params = floor.params
    if params.experts:
        figures["floor_assumes"] = (f"uniform routing: a step of n tokens reads E(1-(1-k/E)^n) of E={params.num_experts} experts "
                                    f"per layer (k={params.top_k}); prefill FLOPs count k of E")
        print(f"floor: {figures['floor_assumes']}")
    prefill_busy_ms = sum(profiler.busy_ms("prefill")) + sum(profiler.busy_ms("mixed"))
    if prefill_busy_ms and workload.name != "prefix":
        # Prompt FLOPs over the device time of the steps that prefill (mixed steps' decode rows included).
        figures["prefill_TFLOPs"] = round(floor.prefill_flops / prefill_busy_ms / 1e9, 1)
    print(f"{workload.name}: {total_tokens} tok in {elapsed:.2f} s, {total_tokens / elapsed:.1f} tok/s"
          + (f", {figures['pct_of_floor']}% of the floor ({figures['floor_s']} s)" if "floor_s" in figures else ""))
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
    parser.add_argument("--model", help="HF model folder (default: build a random-weight checkpoint of --preset)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="checkpoint preset when --model is absent (default: qwen3-0.6b on CUDA, tiny on CPU)")
    parser.add_argument("--load-format", choices=LOAD_FORMATS, default="auto",
                        help="dummy: random weights made on the device (without --model: a config-only preset folder)")
    parser.add_argument("--workload", choices=WORKLOADS, default="nano", help="named workload (benchmarks/workloads.py)")
    parser.add_argument("--num-seqs", type=int, default=256, help="batch of the --kernel-profile measurement")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--scheduling-policy", default="chunked")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", action="store_true", help="per step kind: host time, device busy time; device idle gap of decode steps")
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
        dummy = args.load_format == "dummy"
        model = str(make_checkpoint(scratch.name, preset, weights=not dummy))
        print(f"no --model: built a {'config-only' if dummy else 'random-weight'} {preset} checkpoint in {model}")
    start = time.perf_counter()
    llm = LLM(model, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
              tensor_parallel_size=args.tp, attention_backend=args.attention_backend, scheduling_policy=args.scheduling_policy,
              device=args.device, overlap_scheduling=False if args.no_overlap else None, load_format=args.load_format)
    startup_s = time.perf_counter() - start
    device = llm.runtime.device
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "backend": llm.runtime.attention_backend,
        "cuda_graphs": llm.runtime.cuda_graphs, "overlap": llm.runtime.overlap, "policy": args.scheduling_policy,
        "kv_blocks": llm.runtime.num_kvcache_blocks, "tp": args.tp, "startup_s": round(startup_s, 1),
        "model": llm.config.hf_config.architectures[0], "load_format": args.load_format,
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
