"""Paged attention layer and its backends (torch reference, Triton, flash-attn).

Every backend stores this step's K/V into the paged cache, then attends each new query token
to the KV positions 0..its own position through the block table. GPU backends import their
kernels lazily, so a CPU process never loads Triton or flash-attn.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Protocol

import torch
from torch import nn

from nanovllm.utils.context import Context, get_context

logger = logging.getLogger("nanovllm")


class AttentionBackend(Protocol):
    name: str

    def store_kvcache(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None: ...

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context, scale: float) -> torch.Tensor: ...


class TorchBackend:
    """Plain PyTorch; the CPU path and the oracle for the GPU kernels.

    Shapes: q [N, Hq, D]; caches [num_blocks, block_size, Hkv, D]; see Context for the rest.
    """

    name = "torch"

    def store_kvcache(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        valid = slot_mapping >= 0
        slots = slot_mapping[valid].long()
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k[valid]
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v[valid]

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        block_size = k_cache.shape[1]
        cu = ctx.cu_seqlens_q.tolist()
        for b, seq_len in enumerate(ctx.seq_lens.tolist()):
            start, end = cu[b], cu[b + 1]
            blocks = ctx.block_tables[b, : (seq_len + block_size - 1) // block_size].long()
            k = k_cache[blocks].flatten(0, 1)[:seq_len]
            v = v_cache[blocks].flatten(0, 1)[:seq_len]
            out[start:end] = attend(q[start:end], k, v, scale)
        return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last q.shape[0] positions of a sequence over all of its KV.

    q [n, Hq, D]; k, v [L, Hkv, D] with L >= n; query i sits at position L - n + i.
    """
    n, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    query_pos = torch.arange(seq_len - n, seq_len, device=q.device)
    mask = torch.arange(seq_len, device=q.device)[None, :] > query_pos[:, None]
    scores.masked_fill_(mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)


class TritonBackend:
    """Our Triton kernels: KV store, varlen paged attention, split-KV decode."""

    name = "triton"

    def __init__(self) -> None:
        from nanovllm.kernels import kv_store, paged_attention

        self._store = kv_store.store_kvcache
        self._varlen = paged_attention.paged_attention_varlen
        self._decode = paged_attention.paged_attention_decode

    def store_kvcache(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self._store(k, v, k_cache, v_cache, slot_mapping)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        if ctx.is_decode:
            self._decode(q, k_cache, v_cache, out, ctx.seq_lens, ctx.block_tables, scale)
        else:
            self._varlen(q, k_cache, v_cache, out, ctx.cu_seqlens_q, ctx.seq_lens, ctx.block_tables, ctx.max_seqlen_q, scale)
        return out


class FlashAttnBackend(TritonBackend):
    """flash-attn's paged calls (nano-vLLM's); needs kvcache_block_size to be a multiple of 256."""

    name = "flash_attn"

    def __init__(self) -> None:
        super().__init__()
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        self._flash_varlen = flash_attn_varlen_func
        self._flash_decode = flash_attn_with_kvcache

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context, scale: float) -> torch.Tensor:
        if ctx.is_decode:
            out = self._flash_decode(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=ctx.seq_lens, block_table=ctx.block_tables, softmax_scale=scale, causal=True)
            return out.squeeze(1)
        cu_seqlens_k = torch.nn.functional.pad(ctx.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return self._flash_varlen(
            q, k_cache, v_cache, max_seqlen_q=ctx.max_seqlen_q, cu_seqlens_q=ctx.cu_seqlens_q,
            max_seqlen_k=ctx.max_seqlen_k, cu_seqlens_k=cu_seqlens_k, softmax_scale=scale, causal=True, block_table=ctx.block_tables,
        )


def select_backend(name: str, device: torch.device, block_size: int) -> AttentionBackend:
    """Resolve `attention_backend` ("auto" | "flash_attn" | "triton" | "torch") for a device."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        if device.type != "cuda":
            name = "torch"
        else:
            name = "flash_attn" if has_flash and block_size % 256 == 0 else "triton"
    if name != "torch" and device.type != "cuda":
        raise ValueError(f"attention_backend={name!r} needs a CUDA device, got {device.type!r}")
    if name == "flash_attn":
        if not has_flash:
            raise ValueError("attention_backend='flash_attn' but flash_attn is not installed")
        if block_size % 256:
            raise ValueError(f"attention_backend='flash_attn' needs kvcache_block_size to be a multiple of 256, got {block_size}")
    backend = {"torch": TorchBackend, "triton": TritonBackend, "flash_attn": FlashAttnBackend}[name]()
    logger.info("attention backend: %s", backend.name)
    return backend


class Attention(nn.Module):
    """Stores this step's K/V, then attends over the paged cache. `backend` and the caches are set by the model runner."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.k_cache = self.v_cache = torch.tensor([])
        self.backend: AttentionBackend | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D]."""
        ctx = get_context()
        self.backend.store_kvcache(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        return self.backend.forward(q, self.k_cache, self.v_cache, ctx, self.scale)
