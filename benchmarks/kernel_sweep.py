"""Tile sweep of the Triton attention kernels on the shapes nano-vLLM's workloads give them (issue 11).

Why: decode attention is about three quarters of a decode step and long-prompt prefill reaches under half
the matmul rate; this finds the launch settings (tile, warps, stages, KV splits, register cap) that move
them, so the kernels' defaults can be chosen by measurement. The cases (benchmarks/kernel_cases.py) call
the engine's own launchers (`launch_decode`, `_launch_varlen`) and find the current default of each case by
recording what the engine's entry points (`paged_attention_decode`, `paged_attention_varlen`) would launch.

The search is staged, stage-major over all cases so a spent `--budget-s` still leaves every case its tile
sweep: (1) tile x warps, (2) pipeline stages of the two fastest, (3) decode: KV splits 1 / heuristic / 2x;
prefill: register caps that change how many programs fit on an SM. Each stage's kernels are compiled first
by `--jobs` worker processes (Triton's on-disk cache), so the main process mostly loads them.
Every config runs once on a NaN-poisoned output and is checked against fp32 PyTorch attention
(`layers.attention.attend`) on the same inputs; a failure or an error is printed, never dropped.
Timing (GPU): one CUDA graph of R launches, rotating over enough copies of the cache (as the engine's
layers are) that no launch finds its KV in L2; median of 5 replays / R.

    python3 benchmarks/kernel_sweep.py [--budget-s 120] [--only decode|varlen] [--jobs N]
    TRITON_INTERPRET=1 python3 benchmarks/kernel_sweep.py --smoke      # CPU, tiny fp16 shapes
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, wait

import torch

START = time.monotonic()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # run as a script, sys.path[0] is benchmarks/: the repo's nanovllm, bench and benchmarks
    sys.path.insert(0, REPO)

from benchmarks.kernel_cases import Case, DecodeConfig, Dims, Result, VarlenConfig, make_cases, record_default  # noqa: E402


def stage_configs(case: Case, stage: int, smoke: bool) -> list:
    """Configs of one stage for a case, built from the results of the stages before."""
    top = [cfg for _, cfg in ranked(case)[:2]]
    if case.kind == "decode":
        if stage == 0:
            tiles = itertools.product((16, 32) if smoke else (32, 64, 128), (4,) if smoke else (2, 4, 8))
            return [case.default] + [DecodeConfig(bn, w, 1 if smoke else 2, case.heuristic_splits) for bn, w in tiles]
        if stage == 1:
            return [DecodeConfig(c.block_n, c.num_warps, s, c.num_splits) for c in top for s in ((2,) if smoke else (1, 3, 4))]
        h = case.heuristic_splits
        return [DecodeConfig(c.block_n, c.num_warps, c.num_stages, s) for c in top[:1] for s in (1, h, 2 * h)]
    if stage == 0:
        tiles = itertools.product((16, 32), (16,), (4,)) if smoke else itertools.product((64, 128), (32, 64, 128), (4, 8))
        return [case.default] + [VarlenConfig(bm, bn, w, 1 if smoke else 2, None) for bm, bn, w in tiles]
    if stage == 1:
        return [VarlenConfig(c.block_m, c.block_n, c.num_warps, s, c.maxnreg) for c in top for s in ((2,) if smoke else (3, 4))]
    caps = (128,) if smoke else None
    return [VarlenConfig(c.block_m, c.block_n, c.num_warps, c.num_stages, cap)
            for c in top[: 1 if smoke else 2] for cap in caps or register_caps(c.num_warps)]


def ranked(case: Case) -> list[tuple[float, DecodeConfig | VarlenConfig]]:
    """(µs, config) of the valid results of a case, fastest first."""
    return sorted(((r.us, cfg) for cfg, r in case.results.items() if r.status == "ok"), key=lambda item: item[0])


def register_caps(num_warps: int) -> list[int]:
    """Caps of registers per thread that change how many programs fit on an SM (64K registers): the largest
    cap of each occupancy level above one program. 8 warps: 128 (2 programs); 4 warps: 255, 168, 128."""
    levels = {}
    for cap in (255, 168, 128):
        fit = 65536 // (32 * num_warps * cap)
        if fit > 1:
            levels.setdefault(fit, cap)
    return list(levels.values())


def time_config(case: Case, cfg, device: torch.device) -> float:
    """Seconds per launch: median of 5 replays of a CUDA graph of R launches over the cache copies (GPU);
    one timed call on CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        case.launch(cfg, 0)
        return time.perf_counter() - start
    estimate = case.work / (3e12 if case.kind == "decode" else 3e14)
    launches = max(case.layers, min(128, math.ceil(2e-3 / estimate)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            case.launch(cfg, i % case.layers)
    graph.replay()
    times = []
    for _ in range(5):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times) / launches


def run_config(case: Case, cfg, ref: torch.Tensor, device: torch.device, rates: dict) -> None:
    res = Result()
    start = time.monotonic()
    try:
        case.out.fill_(float("nan"))
        case.launch(cfg, 0)
        first_ms = (time.monotonic() - start) * 1e3
        res.err = ((case.out.float() - ref).abs().max() / ref.abs().max()).item()
        if not res.err <= 2e-2:
            res.status = f"FAIL wrong output (max err {res.err:.3g} of max |ref|)"
        else:
            res.us = time_config(case, cfg, device) * 1e6
    except Exception as exc:  # a config that does not compile or launch is a result, not a crash
        first_ms = (time.monotonic() - start) * 1e3
        res.status = f"ERROR {type(exc).__name__}: {str(exc).strip().splitlines()[0][:90] if str(exc).strip() else ''}"
    case.results[cfg] = res
    mark = "  <- default" if cfg == case.default else ""
    head = f"{case.kind:6} {case.name:22} {cfg.label()} first {first_ms:7.0f} ms"
    print(f"{head} | {res.status}{mark}" if res.status != "ok" else f"{head} | {fmt(case, res.us, rates)} | err {res.err:.1e}{mark}", flush=True)


def fmt(case: Case, us: float, rates: dict) -> str:
    rate = case.work / (us * 1e-6)
    if case.kind == "decode":
        ref = rates.get("copy")
        return f"{us:9.1f} us {rate / 1e9:7.0f} GB/s " + (f"{100 * rate / ref:5.1f}% copy" if ref else "  n/a copy")
    ref = rates.get("matmul")
    return f"{us:9.1f} us {rate / 1e12:7.1f} TFLOP/s " + (f"{100 * rate / ref:5.1f}% mm" if ref else "  n/a mm")


def measure_rates(device: torch.device) -> dict:
    """bench.py's references, measured in this process: read+write bytes/s of a 1 GiB device-to-device copy
    and FLOP/s of a bf16 8192^3 matmul (none on CPU)."""
    if device.type != "cuda":
        return {}
    from bench import measure_copy_bandwidth, measure_matmul_rate

    return {"copy": measure_copy_bandwidth(device), "matmul": measure_matmul_rate(device, torch.bfloat16)}


def _precompile(job: tuple) -> str | None:
    """Worker process: compile one config's kernels (into Triton's on-disk cache) by launching it on a tiny
    case with the same dims, hence the same specialisation. Returns an error name, or None."""
    kind, cfg, dims = job
    try:
        case = Case(kind, "tiny", [1, 1] if kind == "decode" else [5, 3], [dims.page + 5, 7])
        case.build(dims, torch.device("cuda"), 1, 0)
        case.launch(cfg, 0)
        torch.cuda.synchronize()
        return None
    except Exception as exc:
        return type(exc).__name__


def _warm_worker() -> None:
    """Worker process: import the kernels and start CUDA while the main process sets up."""
    import nanovllm.kernels.paged_attention  # noqa: F401

    torch.cuda.init()


def precompile(pool: ProcessPoolExecutor | None, jobs: list, deadline: float) -> ProcessPoolExecutor | None:
    """Compile a stage's configs in the worker processes, until the deadline at most. Returns the pool,
    or None once it has broken (the main process then compiles each config at its first launch)."""
    if pool is None or not jobs:
        return pool
    start = time.monotonic()
    try:
        futures = [pool.submit(_precompile, job) for job in dict.fromkeys(jobs)]
    except Exception as exc:
        print(f"# precompile pool unusable ({type(exc).__name__}); compiling in the main process", flush=True)
        pool.shutdown(wait=False, cancel_futures=True)
        return None
    done, pending = wait(futures, timeout=max(0.0, deadline - time.monotonic()))
    for f in pending:
        f.cancel()
    errors = sum(1 for f in done if f.exception() is not None or f.result() is not None)
    print(f"# precompiled {len(done)}/{len(futures)} configs in {time.monotonic() - start:.1f} s "
          f"({errors} failed there; every config is still run and reported below)", flush=True)
    return pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny fp16 shapes and few configs (CPU: TRITON_INTERPRET=1)")
    parser.add_argument("--budget-s", type=float, default=120.0, help="stop starting configs after this many seconds")
    parser.add_argument("--only", choices=("decode", "varlen"))
    parser.add_argument("--jobs", type=int, default=None, help="precompile worker processes (0: compile in order)")
    args = parser.parse_args()
    import triton

    deadline = START + args.budget_s
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no CUDA device: run with TRITON_INTERPRET=1 (and --smoke)")
    torch.backends.cuda.matmul.allow_tf32 = False
    jobs = args.jobs if args.jobs is not None else (min(12, (os.cpu_count() or 2) - 2) if device.type == "cuda" else 0)
    pool = None
    if jobs > 0 and device.type == "cuda":
        import multiprocessing

        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        for _ in range(jobs):
            pool.submit(_warm_worker)
    dims = Dims(4, 2, 32, 16, 128, torch.float16) if args.smoke else Dims(16, 8, 128, 256, 4096, torch.bfloat16)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"# {name}, torch {torch.__version__}, triton {triton.__version__}; {dims}; precompile jobs {jobs}; "
          f"budget {args.budget_s:.0f} s")
    print("# timing: " + ("CUDA graph of R launches over L cache copies, median of 5 replays / R"
                          if device.type == "cuda" else "one call, wall clock (interpreter: meaningless as speed)"))
    rates = measure_rates(device)
    if rates:
        print(f"# 1 GiB D2D copy {rates['copy'] / 1e9:.0f} GB/s (read+write); bf16 8192^3 matmul "
              f"{rates['matmul'] / 1e12:.0f} TFLOP/s")
    cases = make_cases(args.smoke, args.only)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    refs = {}
    for i, case in enumerate(cases):
        case.dims = dims
        layers = max(1, min(64, math.ceil(4 * l2 / case.work))) if case.kind == "decode" and l2 else 1
        case.build(dims, device, layers, seed=i)
        record_default(case)
        refs[case.name] = case.reference()
        work = f"{case.work / 1e6:.0f} MB K+V" if case.kind == "decode" else f"{case.work / 1e9:.1f} GFLOP"
        print(f"# {case.kind} {case.name}: {len(case.seq_lens)} seqs, {sum(case.q_lens)} query tokens, "
              f"{sum(case.seq_lens)} KV tokens, {work}, {layers} cache copies; default {case.default.label()}")
    for stage in range(3):
        # Round-robin over the cases (each case's default first), so a spent budget still leaves every case rows.
        per_case = [[(case, cfg) for cfg in dict.fromkeys(stage_configs(case, stage, args.smoke)) if cfg not in case.results]
                    for case in cases]
        todo = [item for row in itertools.zip_longest(*per_case) for item in row if item is not None]
        pool = precompile(pool, [(case.kind, cfg, dims) for case, cfg in todo], deadline)
        for case, cfg in todo:
            if time.monotonic() > deadline:
                left = sum(1 for c, g in todo if g not in c.results)
                print(f"# budget spent: {left} configs of stage {stage + 1} not run, later stages skipped")
                break
            run_config(case, cfg, refs[case.name], device, rates)
        if time.monotonic() > deadline:
            break
    if pool is not None:
        pool.shutdown(cancel_futures=True)
    summary(cases, rates)


def summary(cases: list[Case], rates: dict) -> None:
    print(f"\n# summary ({time.monotonic() - START:.0f} s): best valid config per case against the engine's default")
    for case in cases:
        ran = len(case.results)
        bad = sum(1 for r in case.results.values() if r.status != "ok")
        ok = ranked(case)
        default = case.results.get(case.default)
        line = f"{case.kind:6} {case.name:22} ({ran} run, {bad} failed) default {case.default.label()} "
        line += f"{default.us:9.1f} us" if default and default.status == "ok" else f"[{default.status if default else 'not run'}]"
        if ok:
            us, best = ok[0]
            speedup = f"x{default.us / us:.3f}" if default and default.status == "ok" else "x   n/a"
            line += f" | best {best.label()} {fmt(case, us, rates)} {speedup}"
        else:
            line += " | no valid config"
        print(line)


if __name__ == "__main__":
    main()
