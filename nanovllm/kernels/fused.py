"""Fused Triton kernels for the per-layer elementwise work of a decoder step.

* :func:`rms_norm` -- RMSNorm with an optional residual add (one program per row).
* :func:`qk_norm_rope` -- per-head RMSNorm of q and k followed by GPT-NeoX rotary, q in place, k in
  place or, with a :class:`KVCacheWrite`, straight into the paged KV cache with v (the attention layer's
  KV store in the same kernel); :func:`rope` -- the rotary alone (families without q/k norms).
* :func:`silu_and_mul` -- ``silu(gate) * up`` of a merged gate/up projection.

Each kernel reproduces the rounding steps of the PyTorch layers it replaces
(``nanovllm.layers``): math runs in fp32, and every intermediate that PyTorch stores in the
activation dtype is rounded to that dtype at the same point. The kernels are compiled with
``enable_fp_fusion=False`` so that ``a * b - c * d`` is not contracted into an FMA, which
PyTorch's separate kernels never do. No wrapper syncs with the host, so every call can be
captured in a CUDA graph. Supported dtypes: fp16, bf16, fp32.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    x_stride,
    residual_stride,
    out_stride,
    hidden_size,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Normalise one row.

    Grid: (N,). x, residual, out: [N, hidden_size] with contiguous rows; weight: [hidden_size].
    With HAS_RESIDUAL the row s = x + residual (rounded to the dtype) replaces the residual row
    and is the value normalised.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden_size
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_stride + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(dtype)
        tl.store(residual_ptr + row * residual_stride + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden_size + eps)
    normed = (xf * rstd).to(dtype).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + offs, (weight * normed).to(dtype), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * (x * rsqrt(mean(x^2) + eps))`` per row, with an optional residual add first.

    Args:
        x: [N, H], contiguous last dim (any row stride); fp16, bf16 or fp32.
        weight: [H], same dtype as x.
        eps: added to the mean square before the reciprocal square root.
        residual: optional [N, H] of x's dtype, contiguous last dim. It is overwritten in place
            with ``s = x + residual`` (rounded to x's dtype, as PyTorch's ``x + residual``).

    Returns:
        Without residual: ``norm(x)`` [N, H], a new contiguous tensor. With residual:
        ``(norm(s), s)`` where ``s`` is the ``residual`` tensor itself.
    """
    if x.dim() != 2 or x.dtype not in _DTYPES or x.stride(-1) != 1:
        raise ValueError(f"x must be a [N, H] fp16/bf16/fp32 tensor with a contiguous last dim, got {x.dtype} {tuple(x.shape)}")
    num_rows, hidden_size = x.shape
    if weight.shape != (hidden_size,) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [{hidden_size}] of {x.dtype}, got {weight.dtype} {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1):
        raise ValueError(f"residual must match x {x.dtype} {tuple(x.shape)} with a contiguous last dim, got {residual.dtype} {tuple(residual.shape)}")
    out = torch.empty((num_rows, hidden_size), dtype=x.dtype, device=x.device)
    if num_rows:
        block = triton.next_power_of_2(hidden_size)
        _rms_norm_kernel[(num_rows,)](
            x,
            x if residual is None else residual,
            weight.contiguous(),
            out,
            x.stride(0),
            0 if residual is None else residual.stride(0),
            out.stride(0),
            hidden_size,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=min(max(block // 256, 1), 8),
            enable_fp_fusion=False,
        )
    return out if residual is None else (out, residual)


class KVCacheWrite(NamedTuple):
    """Where the rotary kernel writes k (rotated) and v instead of rotating k in place: the paged caches
    [num_blocks, block_size, num_kv_heads, D] (equal strides, contiguous last dim) and int32/int64
    slot_mapping [N] (slot s is block s // block_size, row s % block_size; -1 skips the token);
    v [N, num_kv_heads, D] with a contiguous last dim."""

    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor


@triton.jit
def norm_rotate(x_ptr, stride_h, weight_ptr, cos_sin_ptr, eps, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_H: tl.constexpr, NORM: tl.constexpr):
    """The NUM_HEADS heads of one token starting at x_ptr (head h at x_ptr + h * stride_h), RMS-normalised (when
    NORM, with weight and eps) and rotated at the position whose [cos | sin] row starts at cos_sin_ptr: [BLOCK_H,
    BLOCK_D] fp32 holding values of x's dtype (rows >= NUM_HEADS and columns >= HEAD_DIM are zeros).

    Each element is computed from itself and its partner in the other half (loaded again in the partner's
    order), so the heads come out whole, in the layout a `tl.dot` takes; a caller writing them back in place
    must put a barrier between this and its store (a partner may belong to another warp's thread)."""
    dtype = x_ptr.dtype.element_ty
    half = HEAD_DIM // 2
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    first = cols < half
    partner = tl.where(first, cols + half, cols - half)
    mask = (heads < NUM_HEADS) & (cols < HEAD_DIM)
    rows = x_ptr + heads * stride_h
    x = tl.load(rows + cols, mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(rows + partner, mask=mask, other=0.0).to(tl.float32)
    # The per-column operands are loaded in x's [BLOCK_H, BLOCK_D] shape (every row the same), so they get x's
    # layout: loaded [1, BLOCK_D] they got another, and x a conversion through shared memory to it.
    same_row = heads * 0
    freq = same_row + tl.where(first, cols, cols - half)
    cos = tl.load(cos_sin_ptr + freq, mask=mask, other=0.0)
    # [x1 * cos - x2 * sin | x2 * cos + x1 * sin]: the first half adds its partner's product negated (exactly a subtraction).
    sin = tl.load(cos_sin_ptr + half + freq, mask=mask, other=0.0)
    sin = tl.where(first, -sin, sin)
    if NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        weight = tl.load(weight_ptr + same_row + cols, mask=mask, other=0.0).to(tl.float32)
        weight_partner = tl.load(weight_ptr + same_row + partner, mask=mask, other=0.0).to(tl.float32)
        x = (weight * (x * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x_partner = (weight_partner * (x_partner * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return (x * cos + x_partner * sin).to(dtype).to(tl.float32)


@triton.jit
def _norm_rope_heads(x_ptr, stride_h, out_ptr, out_stride_h, weight_ptr, cos_sin_ptr, eps, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, NORM: tl.constexpr):
    """`norm_rotate` of the NUM_HEADS heads at x_ptr, head h written to out_ptr + h * out_stride_h (may be x_ptr: in place)."""
    rotated = norm_rotate(x_ptr, stride_h, weight_ptr, cos_sin_ptr, eps, NUM_HEADS, HEAD_DIM, BLOCK_D, BLOCK_H, NORM)
    tl.debug_barrier()  # every partner is read before any element is overwritten
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_HEADS) & (offs[None, :] < HEAD_DIM)
    tl.store(out_ptr + heads[:, None] * out_stride_h + offs[None, :], rotated.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    q_weight_ptr,
    k_weight_ptr,
    cos_sin_ptr,
    positions_ptr,
    q_stride_n,
    q_stride_h,
    k_stride_n,
    k_stride_h,
    v_stride_n,
    v_stride_h,
    cache_stride_block,
    cache_stride_token,
    cache_stride_head,
    cos_sin_stride,
    eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PAGE: tl.constexpr,
    NORM: tl.constexpr,
    STORE: tl.constexpr,
):
    """RMS-normalise (when NORM) the q heads, or the k heads, of one token, then rotate them: q in place;
    k in place, or (STORE) into the token's cache slot together with its v.

    Grid: (N, 2): program (t, 0) does token t's q heads, (t, 1) its k heads (and v). q: [N, NUM_Q_HEADS,
    HEAD_DIM], k and v: [N, NUM_K_HEADS, HEAD_DIM] (contiguous last dims); q_weight, k_weight: [HEAD_DIM];
    cos_sin: fp32 [max_positions, HEAD_DIM] as [cos | sin]; positions: [N]; with STORE the caches
    [num_blocks, PAGE, NUM_K_HEADS, HEAD_DIM] and slot_mapping [N] (-1: the token's k and v are not stored).
    Programs take all heads of a token's q or k (a head is only HEAD_DIM elements, too little work for a
    program); q and k in separate programs halve the chain of dependent loads and stores a program waits
    through (at decode batch sizes the kernel is latency-bound).
    """
    token = tl.program_id(0).to(tl.int64)
    cos_sin_row = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * cos_sin_stride
    k_row = k_ptr + token * k_stride_n
    if tl.program_id(1) == 0:
        q_row = q_ptr + token * q_stride_n
        _norm_rope_heads(q_row, q_stride_h, q_row, q_stride_h, q_weight_ptr, cos_sin_row, eps, NUM_Q_HEADS, HEAD_DIM, BLOCK_D, BLOCK_Q, NORM)
    elif STORE:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:
            # v is loaded before k's stores, so its load does not wait behind them.
            heads = tl.arange(0, BLOCK_K)
            offs = tl.arange(0, BLOCK_D)
            mask = (heads[:, None] < NUM_K_HEADS) & (offs[None, :] < HEAD_DIM)
            v = tl.load(v_ptr + token * v_stride_n + heads[:, None] * v_stride_h + offs[None, :], mask=mask)
            cache_row = (slot // PAGE) * cache_stride_block + (slot % PAGE) * cache_stride_token
            _norm_rope_heads(k_row, k_stride_h, k_cache_ptr + cache_row, cache_stride_head, k_weight_ptr, cos_sin_row, eps, NUM_K_HEADS,
                             HEAD_DIM, BLOCK_D, BLOCK_K, NORM)
            tl.store(v_cache_ptr + cache_row + heads[:, None] * cache_stride_head + offs[None, :], v, mask=mask)
    else:
        _norm_rope_heads(k_row, k_stride_h, k_row, k_stride_h, k_weight_ptr, cos_sin_row, eps, NUM_K_HEADS, HEAD_DIM, BLOCK_D, BLOCK_K, NORM)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
    cache: KVCacheWrite | None = None,
) -> None:
    """Per-head RMSNorm of q and k followed by GPT-NeoX rotary embedding; q in place, k in place or
    (with `cache`) written with v into the paged KV cache.

    Each D-vector v becomes ``n = weight * (v * rsqrt(mean(v^2) + eps))`` (rounded to the dtype
    twice, like RMSNorm), then ``[n1 * cos - n2 * sin, n2 * cos + n1 * sin]`` with n1/n2 its
    halves, computed in fp32 and written back in the dtype.

    Args:
        q: [N, Hq, D], contiguous last dim (any token/head strides, e.g. a view of a fused
            qkv projection output); fp16, bf16 or fp32.
        k: [N, Hkv, D] of q's dtype, contiguous last dim.
        q_weight: [D] of q's dtype, the q-norm weight.
        k_weight: [D] of q's dtype, the k-norm weight.
        cos_sin: fp32 [max_positions, D], each row ``[cos(D/2) | sin(D/2)]``, contiguous last dim.
        positions: int32/int64 [N], each in [0, max_positions) (not checked: that needs a sync).
        eps: the RMSNorm epsilon, shared by q and k.
        cache: see KVCacheWrite (k is then left as it was).
    """
    _launch_rope(q, k, cos_sin, positions, q_weight, k_weight, eps, cache)


def rope(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor, cache: KVCacheWrite | None = None) -> None:
    """GPT-NeoX rotary embedding of q and k: each D-vector v becomes ``[v1 * cos - v2 * sin, v2 * cos +
    v1 * sin]``, computed in fp32 and written back in the dtype. Arguments as `qk_norm_rope`'s."""
    _launch_rope(q, k, cos_sin, positions, None, None, 0.0, cache)


def _launch_rope(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor,
                 q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, cache: KVCacheWrite | None) -> None:
    """Check the shapes and launch two programs a token (q; k and v); without weights the heads are only rotated."""
    check_rope_args(q, k, cos_sin, positions, q_weight, k_weight, cache)
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    norm = q_weight is not None
    v, k_cache, v_cache, slot_mapping = cache if cache is not None else (k, k, k, positions)
    _rope_kernel[(num_tokens, 2)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        q_weight.contiguous() if norm else q,
        k_weight.contiguous() if norm else k,
        cos_sin,
        positions,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0) if cache is not None else 0,
        k_cache.stride(1) if cache is not None else 0,
        k_cache.stride(2) if cache is not None else 0,
        cos_sin.stride(0),
        eps,
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=k.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_Q=triton.next_power_of_2(num_q_heads),
        BLOCK_K=triton.next_power_of_2(k.shape[1]),
        PAGE=k_cache.shape[1] if cache is not None else 1,
        NORM=norm,
        STORE=cache is not None,
        num_warps=4,
        enable_fp_fusion=False,
    )


def check_rope_args(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor | None,
                    k_weight: torch.Tensor | None, cache: KVCacheWrite | None) -> None:
    """The arguments of `qk_norm_rope` (or `rope`, without weights) are what it documents (raises ValueError)."""
    if q.dim() != 3 or k.dim() != 3 or q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q/k must be [N, H, D] fp16/bf16/fp32 tensors of one dtype, got {q.dtype} {tuple(q.shape)} and {k.dtype} {tuple(k.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need equal N and an equal, even D")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin.stride(-1) != 1:
        raise ValueError("q, k and cos_sin need a contiguous last dimension")
    if cos_sin.dim() != 2 or cos_sin.shape[1] != head_dim or cos_sin.dtype != torch.float32:
        raise ValueError(f"cos_sin must be fp32 [max_positions, {head_dim}], got {cos_sin.dtype} {tuple(cos_sin.shape)}")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 [{num_tokens}], got {positions.dtype} {tuple(positions.shape)}")
    norm = q_weight is not None
    for name, weight in (("q_weight", q_weight), ("k_weight", k_weight)) if norm else ():
        if weight.shape != (head_dim,) or weight.dtype != q.dtype:
            raise ValueError(f"{name} must be [{head_dim}] of {q.dtype}, got {weight.dtype} {tuple(weight.shape)}")
    if cache is not None:
        _check_cache_write(k, cache)


def _check_cache_write(k: torch.Tensor, cache: KVCacheWrite) -> None:
    v, k_cache, v_cache, slot_mapping = cache
    if v.shape != k.shape or v.dtype != k.dtype or v.stride(-1) != 1:
        raise ValueError(f"v must match k {tuple(k.shape)} {k.dtype} with a contiguous last dim, got {tuple(v.shape)} {v.dtype}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim] with equal strides and a "
                         f"contiguous last dim, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if tuple(k_cache.shape[2:]) != tuple(k.shape[1:]) or k_cache.dtype != k.dtype or v_cache.dtype != k.dtype:
        raise ValueError(f"the caches {tuple(k_cache.shape)} {k_cache.dtype} do not hold k's heads {tuple(k.shape[1:])} {k.dtype}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [{k.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, intermediate_size, BLOCK: tl.constexpr):
    """One BLOCK-wide column tile of one row.

    Grid: (N, cdiv(intermediate_size, BLOCK)). x: [N, 2 * intermediate_size] as [gate | up];
    out: [N, intermediate_size]; both with contiguous rows.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate_size
    dtype = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + intermediate_size + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (silu * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for x = [gate | up].

    silu runs in fp32 and is rounded to the dtype before the product (as ``F.silu(gate) * up``).

    Args:
        x: [N, 2 * I], contiguous last dim (any row stride); fp16, bf16 or fp32.

    Returns:
        A new contiguous [N, I] tensor of x's dtype.
    """
    if x.dim() != 2 or x.shape[1] % 2 or x.dtype not in _DTYPES or x.stride(-1) != 1:
        raise ValueError(f"x must be a [N, 2 * I] fp16/bf16/fp32 tensor with a contiguous last dim, got {x.dtype} {tuple(x.shape)}")
    num_rows, intermediate_size = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_rows, intermediate_size), dtype=x.dtype, device=x.device)
    if num_rows and intermediate_size:
        block = min(triton.next_power_of_2(intermediate_size), 1024)
        _silu_and_mul_kernel[(num_rows, triton.cdiv(intermediate_size, block))](
            x, out, x.stride(0), out.stride(0), intermediate_size, BLOCK=block, num_warps=4
        )
    return out
