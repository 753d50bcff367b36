"""Paged attention layer and its backends (torch reference, Triton, flash-attn).

Every backend normalises (q/k norms) and rotates this step's q and k, stores its K/V into the paged
cache, then attends each new query token to the KV positions 0..its own position through the block
table. A backend owns its per-step
metadata: the runner (or a CUDA graph's capture) hands it one `AttentionMetadata` per step with
`begin_step`, the backend derives what its kernels need once, and every layer reads it from there.
GPU backends import their kernels lazily, so a CPU process never loads Triton or flash-attn.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import RotaryEmbedding

logger = logging.getLogger("nanovllm")


@dataclass
class AttentionMetadata:
    """Attention inputs of one step, on the device (B sequences, N new tokens).

    cu_seqlens_q: int32 [B+1], prefix sums of new tokens per sequence.
    seq_lens: int32 [B], KV length per sequence including this step's tokens.
    slot_mapping: int32 [N], cache slot of each new token (-1: padding, not stored).
    block_tables: int32 [B, max_blocks], padded with -1.
    max_seqlen_q / max_seqlen_k: host upper bounds (size kernels without a device sync).
    is_decode: every sequence has exactly one new token.
    Under a CUDA graph B and N are the graph's padded sizes: padding sequences have no query
    tokens and no KV, padding tokens have slot -1.
    """

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    is_decode: bool


class AttentionBackend:
    """Per-step hooks: `begin_step` takes the step's metadata (derived tensors are built here, once),
    `end_step` drops it; `attend` runs in every layer: `rotate_and_store` then `forward`, unless the
    backend fuses them."""

    name: str

    def __init__(self) -> None:
        self.metadata: AttentionMetadata | None = None

    def begin_step(self, metadata: AttentionMetadata) -> None:
        self.metadata = metadata

    def end_step(self) -> None:
        self.metadata = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
               norms: tuple[RMSNorm, RMSNorm] | tuple[()], k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """One layer's attention: q, k, v [N, H, D] as projected -> [N, Hq, D] (see `Attention.forward`)."""
        q = self.rotate_and_store(q, k, v, positions, rotary, norms, k_cache, v_cache)
        return self.forward(q, k_cache, v_cache, scale)

    def rotate_and_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                         norms: tuple[RMSNorm, RMSNorm] | tuple[()], k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """(q/k-norm and) rotate q and k, store k and v at the step's slots; returns the rotated q."""
        q, k = rotary.rotate_qk(positions, q, k, *norms)
        self.store_kvcache(k, v, k_cache, v_cache)
        return q

    def store_kvcache(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        raise NotImplementedError


class TorchBackend(AttentionBackend):
    """Plain PyTorch; the CPU path and the oracle for the GPU kernels.

    Shapes: q [N, Hq, D]; caches [num_blocks, block_size, Hkv, D]; see AttentionMetadata for the rest.
    """

    name = "torch"

    def store_kvcache(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        slot_mapping = self.metadata.slot_mapping
        valid = slot_mapping >= 0
        slots = slot_mapping[valid].long()
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k[valid]
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v[valid]

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        ctx = self.metadata
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


class TritonBackend(AttentionBackend):
    """Our Triton kernels: split-KV decode, and for other steps varlen attention (its decode rows to the
    decode kernel, longer queries to the varlen kernel). In a decode step the decode kernel also does the
    rotary and the K/V store (one kernel a layer); otherwise the rotary kernel stores K/V (no separate store
    kernel). The decode kernel's programs start longest sequence first in every step."""

    name = "triton"
    orders_decode = True  # begin_step sorts the step's sequences for the decode kernel
    rotates_in_decode = True  # the decode kernel does the rotary kernel's work in decode steps

    def __init__(self) -> None:
        super().__init__()
        from nanovllm.kernels import decode_attention, fused, paged_attention

        self._cache_write = fused.KVCacheWrite
        self._varlen = paged_attention.paged_attention_varlen
        self._decode = decode_attention.paged_attention_decode
        self._decode_rotary = decode_attention.DecodeRotary
        self._longest_first = decode_attention.longest_first
        self._decode_order: torch.Tensor | None = None

    def begin_step(self, metadata: AttentionMetadata) -> None:
        """The step's sequences by descending KV length, once for every layer's decode kernel (a decode
        step's and the decode rows of a mixed step alike)."""
        super().begin_step(metadata)
        if self.orders_decode:
            self._decode_order = self._longest_first(metadata.seq_lens)

    def end_step(self) -> None:
        super().end_step()
        self._decode_order = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
               norms: tuple[RMSNorm, RMSNorm] | tuple[()], k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """A decode step's layer is one kernel (the rotary kernel costs ~3 us a layer at decode batch sizes, measured
        on the H200, most of it latency); other steps, and norms with two epsilons, take the two-kernel path."""
        ctx = self.metadata
        if not (self.rotates_in_decode and ctx.is_decode and (not norms or norms[0].eps == norms[1].eps)):
            return super().attend(q, k, v, positions, rotary, norms, k_cache, v_cache, scale)
        weights = (norms[0].weight, norms[1].weight, norms[0].eps) if norms else ()
        new_tokens = self._decode_rotary(k, v, ctx.slot_mapping, rotary.cos_sin, *weights)
        out = torch.empty_like(q)
        self._decode(q, k_cache, v_cache, out, ctx.seq_lens, ctx.block_tables, scale, self._decode_order, new_tokens)
        return out

    def rotate_and_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                         norms: tuple[RMSNorm, RMSNorm] | tuple[()], k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """One kernel: q (normed and) rotated in place, k (normed and) rotated straight into the cache with v."""
        q, _ = rotary.rotate_qk(positions, q, k, *norms, cache=self._cache_write(v, k_cache, v_cache, self.metadata.slot_mapping))
        return q

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        ctx = self.metadata
        out = torch.empty_like(q)
        if ctx.is_decode:
            self._decode(q, k_cache, v_cache, out, ctx.seq_lens, ctx.block_tables, scale, self._decode_order)
        else:
            self._varlen(q, k_cache, v_cache, out, ctx.cu_seqlens_q, ctx.seq_lens, ctx.block_tables, ctx.max_seqlen_q, scale,
                         self._decode_order)
        return out


class FlashAttnBackend(TritonBackend):
    """flash-attn's paged calls (our Triton rotary kernel stores K/V); needs fp16/bf16, head_dim 128 in the wheel
    built for the device, and kvcache_block_size a multiple of 256."""

    name = "flash_attn"
    orders_decode = False  # flash-attn decodes: no order to build
    rotates_in_decode = False  # flash-attn reads the new token's K/V from the cache: the rotary kernel stores it first

    def __init__(self) -> None:
        super().__init__()
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        self._flash_varlen = flash_attn_varlen_func
        self._flash_decode = flash_attn_with_kvcache
        self._cu_seqlens_k: torch.Tensor | None = None

    def begin_step(self, metadata: AttentionMetadata) -> None:
        """flash-attn's varlen call wants the KV prefix sums too: built here once, not in every layer."""
        super().begin_step(metadata)
        if not metadata.is_decode:
            self._cu_seqlens_k = torch.nn.functional.pad(metadata.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))

    def end_step(self) -> None:
        super().end_step()
        self._cu_seqlens_k = None

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        ctx = self.metadata
        if ctx.is_decode:
            out = self._flash_decode(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=ctx.seq_lens, block_table=ctx.block_tables, softmax_scale=scale, causal=True)
            return out.squeeze(1)
        return self._flash_varlen(
            q, k_cache, v_cache, max_seqlen_q=ctx.max_seqlen_q, cu_seqlens_q=ctx.cu_seqlens_q,
            max_seqlen_k=ctx.max_seqlen_k, cu_seqlens_k=self._cu_seqlens_k, softmax_scale=scale, causal=True, block_table=ctx.block_tables,
        )


def select_backend(name: str, device: torch.device, block_size: int, dtype: torch.dtype, head_dim: int) -> AttentionBackend:
    """Resolve `attention_backend` ("auto" | "flash_attn" | "triton" | "torch") for a device.

    "auto" is Triton on CUDA (it measured faster than flash-attn on nano-vLLM's workload, and runs
    every dtype and head size) and torch elsewhere; flash_attn is used only when asked for.
    """
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name != "torch" and device.type != "cuda":
        raise ValueError(f"attention_backend={name!r} needs a CUDA device, got {device.type!r}")
    if name == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attention_backend='flash_attn' but flash_attn is not installed")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attention_backend='flash_attn' needs dtype float16 or bfloat16, got {dtype}")
        if block_size % 256:
            raise ValueError(f"attention_backend='flash_attn' needs kvcache_block_size to be a multiple of 256, got {block_size}")
        if head_dim % 8 or head_dim > 256:
            raise ValueError(f"attention_backend='flash_attn' needs head_dim a multiple of 8 up to 256, got {head_dim}")
    backend = {"torch": TorchBackend, "triton": TritonBackend, "flash_attn": FlashAttnBackend}[name]()
    logger.info("attention backend: %s", backend.name)
    return backend


class Attention(nn.Module):
    """Rotates q and k, stores this step's K/V, then attends over the paged cache. `backend` and the
    caches are set by the model runner."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.k_cache = self.v_cache = torch.tensor([])
        self.backend: AttentionBackend | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                norms: tuple[RMSNorm, RMSNorm] | tuple[()] = ()) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] as projected (q and k may be changed in place), positions [N]
        -> [N, Hq, D], inside the backend's begin_step/end_step. `norms`: the (q_norm, k_norm) applied
        before the rotary, if the family has them."""
        return self.backend.attend(q, k, v, positions, rotary, norms, self.k_cache, self.v_cache, self.scale)
