"""Rotary position embedding (GPT-NeoX half rotation) with HF's rope scaling types.

A model builds one table with `get_rope` and shares it between its layers (one [max_positions,
head_dim] fp32 table per model, not per layer). The inverse frequencies follow transformers'
`modeling_rope_utils` for `default`, `linear`, `dynamic`, `llama3` and `yarn`; yarn's attention
factor (mscale) is folded into the cos/sin table, as HF multiplies its cos/sin by it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from nanovllm.layers.layernorm import RMSNorm

if TYPE_CHECKING:
    from nanovllm.kernels.fused import KVCacheWrite

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(dim: int, base: float, p: Mapping) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    inv_freq = _default_inv_freq(dim, base)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, base: float, p: Mapping, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, ramp between; plus the attention factor."""
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_position_embeddings / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_parameters(config: object) -> dict:
    """The rope parameters of an HF config: transformers 5's `rope_parameters`, else the legacy
    `rope_theta` / `rope_scaling` fields (older config objects)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def inv_freq_and_scale(head_dim: int, params: Mapping, max_position_embeddings: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the cos/sin multiplier for one rope parameter set.

    `dynamic` is computed as HF does for a cache of `max_positions` tokens: HF recomputes its base
    from the current length once it exceeds `max_position_embeddings`, and Config caps
    max_model_len there, so within our limits it equals `default` (documented, tested).
    """
    rope_type = params["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported types: {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor {params['partial_rotary_factor']} is not supported (only 1.0)")
    base = float(params["rope_theta"])
    if rope_type == "linear":
        return _default_inv_freq(head_dim, base) / params["factor"], 1.0
    if rope_type == "dynamic":
        seq_len = max(max_positions, max_position_embeddings)
        factor = params["factor"]
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    if rope_type == "llama3":
        return _llama3_inv_freq(head_dim, base, params), 1.0
    if rope_type == "yarn":
        return _yarn(head_dim, base, params, max_position_embeddings)
    return _default_inv_freq(head_dim, base), 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin table `cos_sin` fp32 [max_positions, head_dim], each row `[cos | sin]` (times the scale)."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, scale: float = 1.0) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float), inv_freq.to(torch.get_default_device()))
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1) * scale, persistent=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [N, Hq, D], k: [N, Hkv, D], positions: [N]. The PyTorch path on every device."""
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def rotate_qk(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None,
        cache: KVCacheWrite | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k, after q_norm(q) and k_norm(k) when given. q: [N, Hq, D], k: [N, Hkv, D], positions: [N].

        On CUDA one fused kernel (normalises and) rotates q and k in place and returns them (the two
        norms must share eps); with `cache` (CUDA only: the Triton attention backend's KV store) the
        same kernel writes k and `cache.v` into the paged cache instead of k. Elsewhere it is the
        PyTorch path, `self(positions, q, k)` on the normed q and k.
        """
        if not q.is_cuda:
            if cache is not None:
                raise ValueError("rotate_qk writes the KV cache only on CUDA")
            return self(positions, q_norm(q), k_norm(k)) if q_norm is not None else self(positions, q, k)
        from nanovllm.kernels import fused

        if q_norm is None:
            fused.rope(q, k, self.cos_sin, positions, cache)
        elif q_norm.eps != k_norm.eps:
            raise ValueError(f"the fused q/k norm needs one eps, got {q_norm.eps} and {k_norm.eps}")
        else:
            fused.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, self.cos_sin, positions, q_norm.eps, cache)
        return q, k


def get_rope(config: object, head_dim: int, max_positions: int) -> RotaryEmbedding:
    """The one rotary table of a model (its layers share it), for positions [0, max_positions)."""
    params = rope_parameters(config)
    max_position_embeddings = getattr(config, "max_position_embeddings", max_positions)
    inv_freq, scale = inv_freq_and_scale(head_dim, params, max_position_embeddings, max_positions)
    return RotaryEmbedding(inv_freq, max_positions, scale)
