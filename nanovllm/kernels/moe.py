"""Fused MoE on CUDA: tokens grouped by expert, one grouped-GEMM Triton kernel per projection.

:func:`fused_moe` computes what ``nanovllm.layers.fused_moe.fused_moe_reference`` does:
``out[n] = sum_k w[n, k] * down_e(silu(gate_e(x[n])) * up_e(x[n]))`` with ``e = ids[n, k]``.

Shapes: x [N, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_weights [N, K];
topk_ids [N, K] int64; result [N, H] in x's dtype. fp16 / bf16 / fp32, contiguous weights.

The N*K (token, slot) pairs are sorted by expert and each expert's run is padded to a multiple
of BLOCK_M, so every row block of the grouped GEMM belongs to one expert. The padded length is
bounded on the host by N*K + E*(BLOCK_M - 1): the grid has that many row blocks and blocks past
the real end exit at once. Nothing reads a device value on the host, so a call can be captured
in a CUDA graph.
"""

import torch
import triton
import triton.language as tl

from nanovllm.kernels.fused import silu_and_mul

BLOCK_M = 16


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    weights_ptr,
    sorted_slots_ptr,
    block_experts_ptr,
    num_slots,
    N_OUT,
    K_IN,
    a_stride,
    b_stride_e,
    b_stride_n,
    c_stride,
    TOP_K: tl.constexpr,
    GATHER_BY_TOKEN: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """c[slot, :] = a[row(slot), :] @ b[e]^T (times weights[slot] with MUL_WEIGHT) for one block.

    Grid: (row blocks, cdiv(N_OUT, BLOCK_N)). sorted_slots: [row blocks * BLOCK_M] slot ids
    (slot = token * TOP_K + k), grouped by expert, padded with num_slots; block_experts: the
    expert of each row block (-1 past the end). row(slot) = slot // TOP_K when GATHER_BY_TOKEN
    (a = x, [N, K_IN]) else slot (a = [N*TOP_K, K_IN]). b: [E, N_OUT, K_IN]; c: [N*TOP_K, N_OUT].
    """
    block_m = tl.program_id(0)
    block_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + block_m)
    if expert < 0:
        return
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + offs_m)
    valid_m = slots < num_slots
    rows = slots // TOP_K if GATHER_BY_TOKEN else slots
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_n = offs_n < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * a_stride + offs_k[None, :]
    b_ptrs = b_ptr + expert.to(tl.int64) * b_stride_e + offs_n[None, :].to(tl.int64) * b_stride_n + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K_IN, BLOCK_K)):
        k_left = K_IN - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=valid_n[None, :] & (offs_k[:, None] < k_left), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHT:
        # As the reference: the down projection is rounded to the dtype, then multiplied by the weight.
        acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
        acc = acc * tl.load(weights_ptr + slots, mask=valid_m, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + slots[:, None].to(tl.int64) * c_stride + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid_m[:, None] & valid_n[None, :])


def _align_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_slots [max_blocks * BLOCK_M], block_experts [max_blocks]) without a host sync."""
    num_slots = topk_ids.numel()
    device = topk_ids.device
    max_blocks = triton.cdiv(num_slots + num_experts * (BLOCK_M - 1), BLOCK_M)
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    sorted_experts = flat[order]
    rank = torch.arange(num_slots, device=device) - start[sorted_experts]
    sorted_slots = torch.full((max_blocks * BLOCK_M,), num_slots, dtype=torch.int64, device=device)
    sorted_slots[padded_start[sorted_experts] + rank] = order
    block_starts = torch.arange(max_blocks, device=device) * BLOCK_M
    block_experts = torch.searchsorted(padded_end, block_starts, right=True)
    block_experts = torch.where(block_starts < padded_end[-1], block_experts, -1)
    return sorted_slots, block_experts


def _grouped_gemm(a, b, c, weights, sorted_slots, block_experts, top_k, gather_by_token, mul_weight) -> None:
    n_out, k_in = b.shape[1], b.shape[2]
    block_n = 64 if n_out >= 64 else triton.next_power_of_2(n_out)
    block_k = 64 if k_in >= 64 else max(16, triton.next_power_of_2(k_in))
    grid = (block_experts.numel(), triton.cdiv(n_out, block_n))
    _grouped_gemm_kernel[grid](
        a, b, c, weights, sorted_slots, block_experts, c.shape[0], n_out, k_in,
        a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        TOP_K=top_k, GATHER_BY_TOKEN=gather_by_token, MUL_WEIGHT=mul_weight,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
    )


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """See the module docstring for shapes. x is read in place; returns a new [N, H] tensor."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_i, hidden = w13.shape
    if x.shape != (num_tokens, hidden) or w2.shape != (num_experts, hidden, two_i // 2) or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"fused_moe shapes do not agree: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, topk {tuple(topk_ids.shape)}")
    x = x.contiguous()
    sorted_slots, block_experts = _align_by_expert(topk_ids, num_experts)
    gate_up = torch.empty(num_tokens * top_k, two_i, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, topk_weights, sorted_slots, block_experts, top_k, True, False)
    act = silu_and_mul(gate_up)
    down = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    _grouped_gemm(act, w2, down, topk_weights.contiguous(), sorted_slots, block_experts, top_k, False, True)
    return down.view(num_tokens, top_k, hidden).sum(dim=1)
