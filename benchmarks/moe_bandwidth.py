"""Achieved bandwidth of the fused MoE kernel at decode batch sizes, beside a 1 GiB device copy.

Qwen3-30B-A3B's expert shapes by default: hidden 2048, 128 experts, top-8, moe_intermediate 768, bf16.
Bytes of a call = the weights of the experts its tokens actually touch + x read + output written (the
least one layer must move; the kernel's intermediates are not counted). Routing: random router logits,
so tokens spread over the experts as in a random-weight model. Kernel time: one CUDA graph that runs
the call on `--layers` weight sets in turn (like consecutive layers: far more bytes than L2 holds, no
launch overhead), divided per call. Beside it: the PyTorch reference (`fused_moe_reference`, the CPU path
and oracle; eager, one host sync per call) and a 1 GiB device-to-device copy (bench.py's, read + written)
measured in the same process. Every kernel output is checked against the reference, eagerly with the
buffers it allocates poisoned with NaN first, and again as the graph left it.

    python -m benchmarks.moe_bandwidth                          # CUDA: batches 1, 16, 64, 256 (< 60 s on an H200)
    python -m benchmarks.moe_bandwidth --device cpu --smoke     # tiny shapes, the reference path only
    TRITON_INTERPRET=1 python -m benchmarks.moe_bandwidth --device cpu --smoke   # the kernel too, interpreted
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import torch

from bench import expected_experts_touched, measure_copy_bandwidth
from nanovllm.layers.fused_moe import fused_moe_reference, select_experts

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class Shape:
    hidden: int
    experts: int
    top_k: int
    inter: int
    dtype: torch.dtype

    @property
    def expert_bytes(self) -> int:
        """gate + up [2I, H] and down [H, I] of one expert."""
        return 3 * self.inter * self.hidden * self.dtype.itemsize


QWEN3_30B_A3B = Shape(hidden=2048, experts=128, top_k=8, inter=768, dtype=torch.bfloat16)
SMOKE = Shape(hidden=128, experts=16, top_k=4, inter=64, dtype=torch.float32)


@dataclass
class Layer:
    """One layer's experts and one batch's routed input to them."""

    x: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.x, self.w13, self.w2, self.weights, self.ids


def make_experts(shape: Shape, num_layers: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    h, i = shape.hidden, shape.inter
    return [(torch.randn(shape.experts, 2 * i, h, device=device, dtype=shape.dtype) / h**0.5,
             torch.randn(shape.experts, h, i, device=device, dtype=shape.dtype) / i**0.5) for _ in range(num_layers)]


def route(experts: list[tuple[torch.Tensor, torch.Tensor]], shape: Shape, batch: int, device: torch.device) -> list[Layer]:
    layers = []
    for w13, w2 in experts:
        x = torch.randn(batch, shape.hidden, device=device, dtype=shape.dtype)
        weights, ids = select_experts(torch.randn(batch, shape.experts, device=device, dtype=shape.dtype), shape.top_k, renormalize=True)
        layers.append(Layer(x, w13, w2, weights, ids))
    return layers


def poison_buffers(layer: Layer, shape: Shape) -> None:
    """Fill with NaN, then free, buffers of the sizes the kernel allocates: the caching allocator hands
    them back to it, so a row it fails to write shows up as NaN."""
    slots = layer.ids.numel()
    buffers = [torch.full(size, float("nan"), dtype=shape.dtype, device=layer.x.device)
               for size in ((slots, 2 * shape.inter), (slots, shape.inter), (slots, shape.hidden), tuple(layer.x.shape))]
    del buffers


def check(out: torch.Tensor, expected: torch.Tensor, shape: Shape, what: str) -> float:
    """Max abs error of the kernel's output; RuntimeError when it is off (or NaN)."""
    err = (out.float() - expected.float()).abs().max().item()
    limit = TOLERANCE[shape.dtype] * (1 + expected.abs().max().item())
    if not err <= limit:
        raise RuntimeError(f"{what}: fused MoE output differs from the reference by {err} (limit {limit})")
    return err


def time_graph(layers: list[Layer], kernel, reps: int) -> tuple[float, list[torch.Tensor]]:
    """Seconds per call of `kernel` replayed in one CUDA graph over every layer, and the graph's outputs."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [kernel(*layer.args()) for layer in layers]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps / len(layers), outs


def time_eager(layers: list[Layer], fn, reps: int, device: torch.device) -> float:
    """Seconds per call of `fn` run eagerly over every layer (after one warm-up pass)."""
    for layer in layers:
        fn(*layer.args())
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        for layer in layers:
            fn(*layer.args())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps / len(layers)


def measure(shape: Shape, experts, batch: int, device: torch.device, kernel, reps: int) -> dict:
    layers = route(experts, shape, batch, device)
    touched = sum(layer.ids.unique().numel() for layer in layers) / len(layers)
    moved = touched * shape.expert_bytes + 2 * batch * shape.hidden * shape.dtype.itemsize
    expected = [fused_moe_reference(*layer.args()) for layer in layers]
    row = {"batch": batch, "experts_touched": touched,
           "uniform_expected": round(expected_experts_touched(shape.experts, shape.top_k, batch), 1), "MB": round(moved / 1e6, 2)}
    reference_s = time_eager(layers, fused_moe_reference, 3, device)
    row.update(reference_us=round(reference_s * 1e6, 1), reference_GBps=round(moved / reference_s / 1e9, 1))
    if kernel is None:
        return row
    errors = []
    for i, layer in enumerate(layers):
        poison_buffers(layer, shape)
        errors.append(check(kernel(*layer.args()), expected[i], shape, f"batch {batch}, layer {i}, eager"))
    if device.type == "cuda":
        kernel_s, outs = time_graph(layers, kernel, reps)
        errors += [check(out, ref, shape, f"batch {batch}, layer {i}, graph") for i, (out, ref) in enumerate(zip(outs, expected))]
    else:
        kernel_s = time_eager(layers, kernel, 1, device)
    row.update(kernel_us=round(kernel_s * 1e6, 1), kernel_GBps=round(moved / kernel_s / 1e9, 1), max_abs_err=max(errors))
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes (hidden 128, 16 experts, top-4, intermediate 64)")
    parser.add_argument("--batches", default=None, help="comma-separated token counts (default 1,16,64,256; smoke: 1,16,64)")
    parser.add_argument("--layers", type=int, default=4, help="weight sets the timed graph cycles through (default 4: 4.8 GB at full size)")
    parser.add_argument("--reps", type=int, default=50, help="graph replays timed")
    parser.add_argument("--json", help="also append the figures to this file as one JSON line")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    shape = SMOKE if args.smoke else QWEN3_30B_A3B
    batches = [int(b) for b in (args.batches or ("1,16,64" if args.smoke else "1,16,64,256")).split(",")]
    kernel = None
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        from nanovllm.kernels.moe import fused_moe as kernel
    torch.manual_seed(0)
    copy_gbps = measure_copy_bandwidth(device) / 1e9
    experts = make_experts(shape, args.layers, device)
    print(f"{shape}; {args.layers} layers; {args.device} copy {copy_gbps:.1f} GB/s (read + written)"
          + ("" if kernel else "; no kernel (CUDA or TRITON_INTERPRET=1): reference only"))
    rows = []
    for batch in batches:
        row = measure(shape, experts, batch, device, kernel, args.reps)
        if kernel is not None:
            row["pct_of_copy"] = round(100 * row["kernel_GBps"] / copy_gbps, 1)
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()))
    line = json.dumps({"benchmark": "moe_bandwidth", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "shape": {**vars(shape), "dtype": str(shape.dtype)}, "layers": args.layers, "copy_GBps": round(copy_gbps, 1), "rows": rows})
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return rows


if __name__ == "__main__":
    main()
