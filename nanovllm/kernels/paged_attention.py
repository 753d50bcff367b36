"""Triton varlen paged attention: any mix of prefill, prefill over a cached prefix, chunked prefill and
decode in one batch.

One program of the varlen kernel handles a tile of query tokens of one sequence times all the query heads
that share one KV head (GQA packing), and runs an online softmax over KV tiles read through the block
table; single-token sequences go to the decode kernel (`decode_attention`) in its mixed mode.
"""

import torch
import triton
import triton.language as tl

from nanovllm.kernels.attention_common import LOG2E, check_cache_and_q, dot_precision, kv_tile_offsets
from nanovllm.kernels.decode_attention import check_order, decode_tile, launch_decode


# Integer arguments that change from step to step are not specialised (Triton would compile a
# variant for values equal to 1 or divisible by 16), so a kernel compiles once per model.
@triton.jit(do_not_specialize=["num_seqs", "bt_stride"])
def _varlen_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    scale_log2,
    num_seqs,
    q_stride_t,
    q_stride_h,
    o_stride_t,
    o_stride_h,
    cache_stride_block,
    cache_stride_token,
    cache_stride_head,
    bt_stride,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Causal attention for one tile of BLOCK_Q query tokens x GROUP heads of one KV head.

    Grid: (num_tokens // BLOCK_Q + num_seqs, num_kv_heads). Sequence b owns tile slots
    [cu_q[b] // BLOCK_Q + b, cu_q[b + 1] // BLOCK_Q + b + 1), which always covers its
    cdiv(q_len, BLOCK_Q) tiles, last (most work under the causal mask) first; spare slots
    exit at once. A program finds its sequence by counting the first slots <= its own,
    SEARCH_BLOCK sequences per vector load. Row r of the tile is query token
    r // GROUP_PAD, head kv_head * GROUP + r % GROUP_PAD (rows with r % GROUP_PAD >= GROUP
    are padding). Sequences of one query token are left to the decode kernel.
    q: [num_tokens, num_q_heads, HEAD_DIM]; out: same; caches:
    [num_blocks, PAGE, num_kv_heads, HEAD_DIM]; cu_seqlens_q: int32 [num_seqs + 1];
    seq_lens: int32 [num_seqs]; block_tables: int32 [num_seqs, bt_stride-strided].
    """
    tile_slot = tl.program_id(0)
    kv_head = tl.program_id(1)

    offs_s = tl.arange(0, SEARCH_BLOCK)
    num_started = tile_slot * 0
    for base in range(0, num_seqs, SEARCH_BLOCK):
        idx = base + offs_s
        in_range = idx < num_seqs
        first_slot = tl.load(cu_seqlens_q_ptr + idx, mask=in_range, other=0) // BLOCK_Q + idx
        num_started += tl.sum((in_range & (first_slot <= tile_slot)).to(tl.int32), 0)
    seq = num_started - 1

    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if q_len == 1:
        return
    num_q_tiles = tl.cdiv(q_len, BLOCK_Q)
    slot_in_seq = tile_slot - (q_start // BLOCK_Q + seq)
    if slot_in_seq >= num_q_tiles:
        return
    q_tile = num_q_tiles - 1 - slot_in_seq
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_idx = q_tile * BLOCK_Q + offs_m // GROUP_PAD
    group_idx = offs_m % GROUP_PAD
    row_valid = (q_idx < q_len) & (group_idx < GROUP)
    head = kv_head * GROUP + group_idx
    token = (q_start + q_idx).to(tl.int64)

    q = tl.load(
        q_ptr + token[:, None] * q_stride_t + head[:, None] * q_stride_h + offs_d[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )
    q_pos = context_len + q_idx

    first_pos = context_len + q_tile * BLOCK_Q
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N

    bt_row = block_tables_ptr + seq.to(tl.int64) * bt_stride
    head_off = kv_head.to(tl.int64) * cache_stride_head
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for start in range(0, full_end, BLOCK_N):
        kv_off = head_off + kv_tile_offsets(
            bt_row, start, offs_n, seq_len, cache_stride_block, cache_stride_token, PAGE, BLOCK_N
        )
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)  # scale_log2 > 0: max commutes with it
        p = tl.exp2(s * scale_log2 - m_new[:, None])  # one FMA per score
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # accumulates in place
        m_i = m_new

    for start in range(full_end, kv_end, BLOCK_N):
        kv_pos = start + offs_n
        kv_valid = kv_pos < kv_end
        kv_off = head_off + kv_tile_offsets(
            bt_row, start, offs_n, kv_end, cache_stride_block, cache_stride_token, PAGE, BLOCK_N
        )
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = (kv_pos[None, :] <= q_pos[:, None]) & kv_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_valid[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_i[:, None]
    tl.store(
        out_ptr + token[:, None] * o_stride_t + head[:, None] * o_stride_h + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )


def _launch_varlen(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    maxnreg: int | None,
) -> None:
    """Launch the varlen kernel with an explicit tile configuration (block_m >= GQA group, pow2;
    maxnreg caps registers per thread, None leaves it to the compiler)."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = block_m // group_pad
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _varlen_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        cu_seqlens_q,
        seq_lens,
        block_tables,
        scale * LOG2E,
        num_seqs,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        PAGE=block_size,
        SEARCH_BLOCK=256,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
        maxnreg=maxnreg,
    )


def paged_attention_varlen(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    decode_order: torch.Tensor | None = None,
) -> None:
    """Causal attention of new query tokens over the paged KV cache (prefill/prefix/chunk/decode mix).

    The K/V of the new tokens must already be in the cache. Query token j of sequence b
    sits at position seq_lens[b] - q_len_b + j and attends to KV positions 0..that position.
    Sequences with one query token (decodes) go to the decode kernel, one program per (sequence,
    KV head) reading the whole KV once; the rest go to the varlen kernel, whose tiles of up to 64
    query tokens would waste most of their rows on a single token. Which sequence is which kind is
    decided on the device: no host synchronisation, and CUDA-graph capturable for a fixed q shape,
    batch and max_seqlen_q. Padding sequences (query length 0) are skipped by both kernels.

    Args:
        q: [num_tokens, num_q_heads, head_dim] fp16/bf16/fp32, any strides with a
            contiguous last dim; rows past cu_seqlens_q[-1] are ignored.
        k_cache: [num_blocks, block_size, num_kv_heads, head_dim], last dim contiguous.
        v_cache: same shape, strides and dtype as k_cache.
        out: [num_tokens, num_q_heads, head_dim], written for rows < cu_seqlens_q[-1].
        cu_seqlens_q: int32 [batch + 1], prefix sums of the query lengths.
        seq_lens: int32 [batch], KV length of each sequence including the new tokens.
        block_tables: int32 [batch, max_blocks_per_seq], -1 padded.
        max_seqlen_q: an upper bound of the query lengths (host int, used for tiling only).
        scale: softmax scale, usually head_dim ** -0.5.
        decode_order: optional int64 [batch], a permutation of the sequences: the decode kernel's
            programs start in this order (`decode_attention.longest_first`; sequences of other query
            lengths exit at once wherever they fall).
    """
    check_cache_and_q(q, k_cache, v_cache, out, block_tables)
    num_seqs = seq_lens.shape[0]
    if seq_lens.dim() != 1 or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 [batch], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if cu_seqlens_q.shape != (num_seqs + 1,) or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens_q must be int32 [{num_seqs + 1}], got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}"
        )
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")
    if max_seqlen_q < 1:
        raise ValueError(f"max_seqlen_q must be >= 1, got {max_seqlen_q}")
    check_order(decode_order, num_seqs)
    if num_seqs == 0 or q.shape[0] == 0:
        return
    decode_block_n, decode_warps = decode_tile(q)
    launch_decode(q, k_cache, v_cache, out, seq_lens, block_tables, scale, 1, decode_block_n, decode_warps, 2, cu_seqlens_q, decode_order)
    # The varlen kernel (sequences of two or more query tokens), its tile chosen from static facts.
    group_pad = triton.next_power_of_2(q.shape[1] // k_cache.shape[2])
    if q.dtype == torch.float32:
        max_block_m, block_n = 32, 16
    elif q.shape[2] > 128:
        max_block_m, block_n = 64, 32
    else:
        max_block_m, block_n = 128, 64
    block_m = min(max_block_m, max(16, group_pad * triton.next_power_of_2(max_seqlen_q)))
    block_m = max(block_m, group_pad)
    num_warps = 8 if block_m >= 128 or q.dtype == torch.float32 else 4
    # Capping the 128 x 64 tile at 128 registers lets two programs share an SM (measured on
    # H100: 254 vs 196 TFLOP/s for 256 causal prefills of 560 tokens, head_dim 128).
    maxnreg = 128 if block_m == 128 and block_n == 64 else None
    _launch_varlen(
        q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables, scale, block_m, block_n, num_warps, 2, maxnreg
    )

