"""Triton paged attention over the block-table KV cache.

Two entry points share one cache layout, ``[num_blocks, block_size, num_kv_heads, head_dim]``
per layer, addressed through an int32 block table ``[batch, max_blocks_per_seq]``:

* :func:`paged_attention_varlen` -- any mix of prefill, prefill over a cached prefix,
  chunked prefill and decode. One program of the varlen kernel handles a tile of query tokens
  of one sequence times all the query heads that share one KV head (GQA packing), and runs an
  online softmax over KV tiles read through the block table; single-token sequences go to the
  decode kernel in its mixed mode.
* :func:`paged_attention_decode` -- one query token per sequence. Split-KV
  (flash-decoding): each program reads one slice of one sequence's KV for one KV head
  with every query head of that group packed into the rows of a ``tl.dot``, so each KV
  byte is read once; a small second kernel merges the partial results. The number of
  splits depends only on static facts, so the call can be captured in a CUDA graph.

Softmax runs in the exp2 domain: scores are multiplied by ``scale * log2(e)``.
"""

import functools
import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _kv_tile_offsets(
    block_table_row_ptr,
    start,
    offs_n,
    limit,
    cache_stride_block,
    cache_stride_token,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Element offsets (int64 [BLOCK_N]) of KV tokens start .. start + BLOCK_N - 1.

    ``start`` is a multiple of BLOCK_N. When a tile fits in one page (BLOCK_N <= PAGE) the
    block table is read once per tile; otherwise once per token, and tokens at or past
    ``limit`` are sent to block 0 (their loads must be masked by the caller).
    """
    if BLOCK_N <= PAGE:
        block = tl.load(block_table_row_ptr + start // PAGE).to(tl.int64)
        in_page = (start % PAGE + offs_n).to(tl.int64)
    else:
        tokens = start + offs_n
        block = tl.load(block_table_row_ptr + tokens // PAGE, mask=tokens < limit, other=0)
        block = block.to(tl.int64)
        in_page = (tokens % PAGE).to(tl.int64)
    return block * cache_stride_block + in_page * cache_stride_token


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
        kv_off = head_off + _kv_tile_offsets(
            bt_row, start, offs_n, seq_len, cache_stride_block, cache_stride_token, PAGE, BLOCK_N
        )
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    for start in range(full_end, kv_end, BLOCK_N):
        kv_pos = start + offs_n
        kv_valid = kv_pos < kv_end
        kv_off = head_off + _kv_tile_offsets(
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
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_i[:, None]
    tl.store(
        out_ptr + token[:, None] * o_stride_t + head[:, None] * o_stride_h + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )


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
    scale_log2,
    q_stride_b,
    q_stride_h,
    o_stride_b,
    o_stride_h,
    cache_stride_block,
    cache_stride_token,
    cache_stride_head,
    bt_stride,
    NUM_Q_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MIXED: tl.constexpr,
):
    """Attention of one decode token over one KV split, all GROUP heads of a KV head at once.

    Grid: (batch, num_kv_heads, NUM_SPLITS). The split length is
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
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
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
        kv_off = head_off + _kv_tile_offsets(
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


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessor count of a CUDA device (a fixed 16 for CPU interpreter runs)."""
    if device.type != "cuda":
        return 16
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_cache_and_q(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor, block_tables: torch.Tensor
) -> None:
    """Validate the tensors both attention entry points share (raises ValueError)."""
    if q.dim() != 3 or q.stride(-1) != 1:
        raise ValueError(f"q must be [tokens, num_q_heads, head_dim] with a contiguous last dim, got {tuple(q.shape)}")
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(
            f"out must match q's shape {tuple(q.shape)} with a contiguous last dim, got {tuple(out.shape)}"
        )
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(
            "k_cache/v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim] with equal strides, "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache need a contiguous last dimension")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError(
            f"q, caches and out must share one of {_DTYPES}, got q={q.dtype}, k_cache={k_cache.dtype}, "
            f"v_cache={v_cache.dtype}, out={out.dtype}"
        )
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_q_heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} != cache head_dim {head_dim}")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if triton.next_power_of_2(num_q_heads // num_kv_heads) > 128:
        raise ValueError(f"at most 128 q heads per kv head are supported, got {num_q_heads // num_kv_heads}")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.stride(-1) != 1:
        raise ValueError(
            f"block_tables must be int32 [batch, max_blocks] with a contiguous last dim, "
            f"got {block_tables.dtype} {tuple(block_tables.shape)}"
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
        scale * _LOG2E,
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
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
        maxnreg=maxnreg,
    )


def _check_varlen_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
) -> None:
    _check_cache_and_q(q, k_cache, v_cache, out, block_tables)
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


def _run_varlen(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
) -> None:
    """The varlen kernel (sequences of two or more query tokens) with its tile chosen from static facts (dtype, head_dim, GQA group, max_seqlen_q)."""
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
    """
    _check_varlen_args(q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables, max_seqlen_q)
    if seq_lens.shape[0] == 0 or q.shape[0] == 0:
        return
    block_n, num_warps = _decode_tile(q)
    _launch_decode(q, k_cache, v_cache, out, seq_lens, block_tables, scale, 1, block_n, num_warps, 2, cu_seqlens_q)
    _run_varlen(q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables, max_seqlen_q, scale)


def _launch_decode(
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
) -> None:
    """Launch the split-KV decode kernel (and the merge kernel when num_splits > 1). With
    `cu_seqlens_q` (one split only) the batch is mixed: see the kernel's MIXED mode."""
    batch, num_q_heads, head_dim = seq_lens.shape[0], q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    if num_splits > 1:
        part_o = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = out
        part_lse = out
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        part_o,
        part_lse,
        seq_lens if cu_seqlens_q is None else cu_seqlens_q,
        seq_lens,
        block_tables,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        NUM_Q_HEADS=num_q_heads,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        PAGE=block_size,
        NUM_SPLITS=num_splits,
        DOT_PRECISION=_dot_precision(q.dtype),
        MIXED=cu_seqlens_q is not None,
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


def _decode_tile(q: torch.Tensor) -> tuple[int, int]:
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
    target = 2 * _sm_count(device)
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
) -> None:
    """Attention of one new token per sequence over its paged KV (split-KV flash decoding).

    The K/V of the new token must already be in the cache. CUDA-graph capturable: no host
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
    """
    _check_cache_and_q(q, k_cache, v_cache, out, block_tables)
    batch = q.shape[0]
    if seq_lens.shape != (batch,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 [{batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for batch {batch}")
    if batch == 0:
        return
    block_n, num_warps = _decode_tile(q)
    num_splits = _decode_num_splits(batch, k_cache.shape[2], block_tables.shape[1] * k_cache.shape[1], q.device)
    _launch_decode(q, k_cache, v_cache, out, seq_lens, block_tables, scale, num_splits, block_n, num_warps, 2)
