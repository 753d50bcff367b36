"""Triton decode attention: one query token per sequence over its paged KV (split-KV flash decoding).

Each program reads one slice of one sequence's KV for one KV head with every query head of that group
packed into the rows of a ``tl.dot``, so each KV byte is read once; a small second kernel merges the
partial results. The number of splits depends only on static facts, so the call can be captured in a
CUDA graph. In its mixed mode the kernel serves the single-token sequences of a varlen batch
(see `paged_attention.paged_attention_varlen`). In a decode step it can also do the rotary kernel's
work itself (`DecodeRotary`): a decode step's attention is then one kernel a layer.
"""

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nanovllm.kernels.attention_common import LOG2E, check_cache_and_q, dot_precision, kv_tile_offsets, sm_count
from nanovllm.kernels.fused import KVCacheWrite, check_rope_args, norm_rotate


class DecodeRotary(NamedTuple):
    """The rotary kernel's work (`fused.qk_norm_rope` with a cache write), for `paged_attention_decode` to do
    itself: one kernel fewer per layer. q and k are RMS-normalised per head (when the weights are given) and
    rotated at the new token's position, seq_len - 1; k and v are stored at slot_mapping. k, v: [batch,
    num_kv_heads, head_dim] as projected (left unchanged), contiguous last dim; slot_mapping: int32/int64
    [batch] (-1: not stored); cos_sin: fp32 [max_positions, head_dim] as [cos | sin] (max_positions >= every
    seq_len); q_weight, k_weight: [head_dim] of q's dtype, or None (rotation only); eps: the norms' epsilon."""

    k: torch.Tensor
    v: torch.Tensor
    slot_mapping: torch.Tensor
    cos_sin: torch.Tensor
    q_weight: torch.Tensor | None = None
    k_weight: torch.Tensor | None = None
    eps: float = 0.0


@triton.jit(do_not_specialize=["bt_stride"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    order_ptr,
    k_new_ptr,
    v_new_ptr,
    slot_mapping_ptr,
    cos_sin_ptr,
    q_weight_ptr,
    k_weight_ptr,
    scale_log2,
    eps,
    q_stride_b,
    q_stride_h,
    o_stride_b,
    o_stride_h,
    cache_stride_block,
    cache_stride_token,
    cache_stride_head,
    bt_stride,
    k_new_stride_b,
    k_new_stride_h,
    v_new_stride_b,
    v_new_stride_h,
    cos_sin_stride,
    NUM_Q_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MIXED: tl.constexpr,
    ORDERED: tl.constexpr,
    ROTATE: tl.constexpr,
    NORM: tl.constexpr,
):
    """Attention of one decode token over one KV split, all GROUP heads of a KV head at once.

    Grid: (num_kv_heads, batch, NUM_SPLITS); program (h, i, s) serves sequence i, or with ORDERED
    sequence order[i] (order: int64 [batch], a permutation). The split length is
    cdiv(cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N tokens; a split past the end of
    the sequence is empty. With NUM_SPLITS == 1 the normalised result goes straight to
    out; otherwise it goes to part_o [batch, NUM_Q_HEADS, NUM_SPLITS, HEAD_DIM] (fp32,
    normalised within the split) and part_lse [batch, NUM_Q_HEADS, NUM_SPLITS] (fp32,
    log2-sum-exp2 of the scaled scores, -inf for an empty split).
    q: [batch, NUM_Q_HEADS, HEAD_DIM]; out: same; caches:
    [num_blocks, PAGE, num_kv_heads, HEAD_DIM]; seq_lens: int32 [batch];
    block_tables: int32 [batch, bt_stride-strided].
    MIXED (NUM_SPLITS == 1 only): a batch of sequences with any query lengths, token rows given by
    cu_seqlens_q int32 [batch + 1]; a program serves its sequence only if it has exactly one query
    token (row cu_seqlens_q[seq]) and exits otherwise.
    ROTATE (not with MIXED): q holds the heads as projected; the program normalises (NORM, with
    q_weight and eps) and rotates its GROUP heads in registers, at position seq_len - 1 through cos_sin
    (fp32 rows [cos | sin]); the program whose split ends the sequence does the same to the KV head of
    k_new [batch, num_kv_heads, HEAD_DIM] (k_weight) and stores it with v_new's at slot_mapping[seq]
    (none when -1), then reads it back from the cache like any other position: bar.sync makes the
    CTA's stores visible to all its threads.
    """
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    if ORDERED:
        seq = tl.load(order_ptr + seq)
    split = tl.program_id(2)

    row = seq.to(tl.int64)
    if MIXED:
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        if tl.load(cu_seqlens_q_ptr + seq + 1) - q_start != 1:
            return
        row = q_start.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_tokens = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    group_valid = offs_g < GROUP
    head = kv_head * GROUP + offs_g
    seq64 = seq.to(tl.int64)

    if ROTATE:
        cos_sin_row = cos_sin_ptr + tl.maximum(seq_len - 1, 0).to(tl.int64) * cos_sin_stride
        q = norm_rotate(q_ptr + row * q_stride_b + kv_head * GROUP * q_stride_h, q_stride_h, q_weight_ptr, cos_sin_row, eps, GROUP, HEAD_DIM,
                        HEAD_DIM, BLOCK_G, NORM).to(q_ptr.dtype.element_ty)
        slot = tl.load(slot_mapping_ptr + seq).to(tl.int64)
        if (start < end) & (end == seq_len) & (slot >= 0):
            cache_off = (slot // PAGE) * cache_stride_block + (slot % PAGE) * cache_stride_token + kv_head.to(tl.int64) * cache_stride_head
            v = tl.load(v_new_ptr + seq64 * v_new_stride_b + kv_head * v_new_stride_h + offs_d)
            k = norm_rotate(k_new_ptr + seq64 * k_new_stride_b + kv_head * k_new_stride_h, k_new_stride_h, k_weight_ptr, cos_sin_row, eps, 1,
                            HEAD_DIM, HEAD_DIM, 1, NORM)
            tl.store(k_cache_ptr + cache_off + offs_d[None, :], k.to(k_cache_ptr.dtype.element_ty))
            tl.store(v_cache_ptr + cache_off + offs_d, v)
        tl.debug_barrier()
    else:
        q = tl.load(
            q_ptr + row * q_stride_b + head[:, None] * q_stride_h + offs_d[None, :],
            mask=group_valid[:, None],
            other=0.0,
        )

    bt_row = block_tables_ptr + seq64 * bt_stride
    head_off = kv_head.to(tl.int64) * cache_stride_head
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)

    for n in range(start, end, BLOCK_N):
        kv_valid = n + offs_n < end
        kv_off = head_off + kv_tile_offsets(
            bt_row, n, offs_n, end, cache_stride_block, cache_stride_token, PAGE, BLOCK_N
        )
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(kv_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + row * o_stride_b + head[:, None] * o_stride_h + offs_d[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=group_valid[:, None],
        )
    else:
        row = (seq64 * NUM_Q_HEADS + head) * NUM_SPLITS + split
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=group_valid[:, None])
        tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=group_valid)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    o_stride_b,
    o_stride_h,
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Merge the NUM_SPLITS partial results of one (sequence, q head) into out.

    Grid: (batch, NUM_Q_HEADS). part_o: fp32 [batch, NUM_Q_HEADS, NUM_SPLITS, HEAD_DIM];
    part_lse: fp32 [batch, NUM_Q_HEADS, NUM_SPLITS]; out: [batch, NUM_Q_HEADS, HEAD_DIM].
    A sequence with no KV at all (every split empty) gets zeros.
    """
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    split_valid = offs_s < NUM_SPLITS
    row = (seq * NUM_Q_HEADS + head) * NUM_SPLITS + offs_s

    lse = tl.load(part_lse_ptr + row, mask=split_valid, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.exp2(lse - lse_max)
    total = tl.sum(weight, 0)
    part = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=split_valid[:, None], other=0.0)
    merged = tl.sum(part * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * o_stride_b + head * o_stride_h + offs_d, merged.to(out_ptr.dtype.element_ty))


def launch_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    cu_seqlens_q: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    rotary: DecodeRotary | None = None,
) -> None:
    """Launch the split-KV decode kernel (and the merge kernel when num_splits > 1). With
    `cu_seqlens_q` (one split only) the batch is mixed: see the kernel's MIXED mode. With `order`
    (int64 [batch], a permutation of the sequences) the GPU starts the sequences' programs in that order.
    With `rotary` (not mixed) the kernel rotates q and k and stores K/V itself (its ROTATE mode).
    batch <= 65535 (grid y; Config caps max_num_seqs there)."""
    batch, num_q_heads, head_dim = seq_lens.shape[0], q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    if num_splits > 1:
        part_o = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = out
        part_lse = out
    unused = seq_lens  # any tensor, for the pointers a mode does not read
    k_new, v_new, slot_mapping, cos_sin, q_weight, k_weight, eps = rotary or (q, q, unused, unused, None, None, 0.0)
    _decode_split_kernel[(num_kv_heads, batch, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        part_o,
        part_lse,
        seq_lens if cu_seqlens_q is None else cu_seqlens_q,
        seq_lens,
        block_tables,
        unused if order is None else order,
        k_new,
        v_new,
        slot_mapping,
        cos_sin,
        unused if q_weight is None else q_weight.contiguous(),
        unused if k_weight is None else k_weight.contiguous(),
        scale * LOG2E,
        eps,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        cos_sin.stride(0),
        NUM_Q_HEADS=num_q_heads,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        PAGE=block_size,
        NUM_SPLITS=num_splits,
        DOT_PRECISION=dot_precision(q.dtype),
        MIXED=cu_seqlens_q is not None,
        ORDERED=order is not None,
        ROTATE=rotary is not None,
        NORM=q_weight is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_q_heads)](
            out,
            part_o,
            part_lse,
            out.stride(0),
            out.stride(1),
            NUM_Q_HEADS=num_q_heads,
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4,
        )


def decode_tile(q: torch.Tensor) -> tuple[int, int]:
    """(block_n, num_warps) of the decode kernel for q's dtype and head_dim."""
    if q.dtype == torch.float32:
        return 32, 8
    if q.shape[2] > 128:
        return 32, 4
    return 64, 4


def _decode_num_splits(batch: int, num_kv_heads: int, max_kv_len: int, device: torch.device) -> int:
    """KV splits per sequence from static facts only: about two programs per SM, no more
    splits than 64-token tiles in the block table's capacity, at most 64.

    (On H100, Qwen3-0.6B shapes in CUDA graphs: batch 64 ran best unsplit, batch 1 best with
    one 64-token tile per split.)"""
    programs = batch * num_kv_heads
    target = 2 * sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(64, math.ceil(target / programs), math.ceil(max_kv_len / 64)))


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    order: torch.Tensor | None = None,
    rotary: DecodeRotary | None = None,
) -> None:
    """Attention of one new token per sequence over its paged KV (split-KV flash decoding).

    The K/V of the new token must already be in the cache, or be given by `rotary`. CUDA-graph capturable: no host
    sync, and the launch configuration depends only on shapes, the block size and the SM
    count. A sequence with seq_len 0 gets zeros.

    Args:
        q: [batch, num_q_heads, head_dim] fp16/bf16/fp32, any strides with a contiguous
            last dim.
        k_cache: [num_blocks, block_size, num_kv_heads, head_dim], last dim contiguous.
        v_cache: same shape, strides and dtype as k_cache.
        out: [batch, num_q_heads, head_dim], fully written.
        seq_lens: int32 [batch], KV length of each sequence including the new token.
        block_tables: int32 [batch, max_blocks_per_seq], -1 padded.
        scale: softmax scale, usually head_dim ** -0.5.
        order: optional int64 [batch], a permutation of the sequences: their programs start in this
            order. Longest first (`longest_first`) keeps a long sequence from starting last and
            running alone at the end of the kernel when the batch fills only a few waves of programs.
        rotary: optional; q is then as projected, and the kernel normalises and rotates q and k and stores
            K/V before it reads them (`DecodeRotary`), instead of `fused.qk_norm_rope` before it.
    """
    check_cache_and_q(q, k_cache, v_cache, out, block_tables)
    if rotary is not None:  # seq_lens stand for the positions: the new token's is seq_len - 1
        check_rope_args(q, rotary.k, rotary.cos_sin, seq_lens, rotary.q_weight, rotary.k_weight,
                        KVCacheWrite(rotary.v, k_cache, v_cache, rotary.slot_mapping))
    batch = q.shape[0]
    if seq_lens.shape != (batch,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 [{batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for batch {batch}")
    check_order(order, batch)
    if batch == 0:
        return
    block_n, num_warps = decode_tile(q)
    num_splits = _decode_num_splits(batch, k_cache.shape[2], block_tables.shape[1] * k_cache.shape[1], q.device)
    launch_decode(q, k_cache, v_cache, out, seq_lens, block_tables, scale, num_splits, block_n, num_warps, 2, order=order, rotary=rotary)


def longest_first(seq_lens: torch.Tensor) -> torch.Tensor:
    """The `order` argument of `paged_attention_decode` and `paged_attention_varlen`: sequences by descending
    KV length (int64 [batch], argsort's own dtype: no cast kernel). On the device, no host sync (a CUDA graph
    captures it); build it once per step, not per layer."""
    return torch.argsort(seq_lens, descending=True)


def check_order(order: torch.Tensor | None, batch: int) -> None:
    """An `order` argument is None or int64 [batch]."""
    if order is not None and (order.shape != (batch,) or order.dtype != torch.int64):
        raise ValueError(f"order must be int64 [{batch}], got {order.dtype} {tuple(order.shape)}")
