"""Triton kernel that scatters new keys/values into the paged KV cache."""

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    key_stride_n,
    key_stride_h,
    value_stride_n,
    value_stride_h,
    cache_stride_block,
    cache_stride_token,
    cache_stride_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Copy the K/V rows of one token into its cache slot.

    Grid: (N,). key/value: [N, NUM_KV_HEADS, HEAD_DIM] (last dim contiguous);
    k_cache/v_cache: [num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM] (same strides,
    last dim contiguous); slot_mapping: int32 [N], -1 marks a token to skip.
    """
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    tok = token.to(tl.int64)
    key = tl.load(
        key_ptr + tok * key_stride_n + offs_h[:, None] * key_stride_h + offs_d[None, :],
        mask=mask,
    )
    value = tl.load(
        value_ptr + tok * value_stride_n + offs_h[:, None] * value_stride_h + offs_d[None, :],
        mask=mask,
    )
    base = (slot // BLOCK_SIZE) * cache_stride_block + (slot % BLOCK_SIZE) * cache_stride_token
    offs = base + offs_h[:, None] * cache_stride_head + offs_d[None, :]
    tl.store(k_cache_ptr + offs, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + offs, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write the keys/values of N new tokens into their paged-cache slots.

    Args:
        key: [N, num_kv_heads, head_dim]; any strides with a contiguous last dim.
        value: [N, num_kv_heads, head_dim]; any strides with a contiguous last dim.
        k_cache: [num_blocks, block_size, num_kv_heads, head_dim], last dim contiguous.
        v_cache: same shape and strides as k_cache.
        slot_mapping: int32 [N]; slot s goes to block s // block_size, offset
            s % block_size; -1 leaves the cache untouched for that token.
    """
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(
            f"key/value must both be [N, num_kv_heads, head_dim], got {tuple(key.shape)} "
            f"and {tuple(value.shape)}"
        )
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(
            "k_cache/v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim] "
            f"with equal strides, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    num_tokens, num_kv_heads, head_dim = key.shape
    if tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"k_cache heads/head_dim {tuple(k_cache.shape[2:])} do not match key "
            f"{(num_kv_heads, head_dim)}"
        )
    if key.stride(-1) != 1 or value.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("key, value and the caches need a contiguous last dimension")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be int32/int64 [{num_tokens}], got {slot_mapping.dtype} "
            f"{tuple(slot_mapping.shape)}"
        )
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
    )
