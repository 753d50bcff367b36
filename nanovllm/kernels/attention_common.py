"""What the Triton attention kernels share: the paged cache layout, the tile offsets through the block
table, dtype and shape checks.

Cache layout: ``[num_blocks, block_size, num_kv_heads, head_dim]`` per layer, addressed through an int32
block table ``[batch, max_blocks_per_seq]``. Softmax runs in the exp2 domain: scores are multiplied by
``scale * log2(e)``.
"""

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def kv_tile_offsets(
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


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessor count of a CUDA device (a fixed 16 for CPU interpreter runs)."""
    if device.type != "cuda":
        return 16
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def check_cache_and_q(
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
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError(
            f"q, caches and out must share one of {DTYPES}, got q={q.dtype}, k_cache={k_cache.dtype}, "
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
