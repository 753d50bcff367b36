"""Rotary position embedding (GPT-NeoX half rotation, as Qwen3 uses)."""
from __future__ import annotations

import torch
from torch import nn

from nanovllm.layers.layernorm import RMSNorm


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float), inv_freq)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [N, Hq, D], k: [N, Hkv, D], positions: [N]."""
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def forward_with_qk_norm(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q_norm(q) and k_norm(k). q: [N, Hq, D], k: [N, Hkv, D], positions: [N].

        On CUDA one fused kernel normalises and rotates q and k in place and returns them (the
        two norms must share eps); elsewhere it is `self(positions, q_norm(q), k_norm(k))`.
        """
        if not q.is_cuda:
            return self(positions, q_norm(q), k_norm(k))
        if q_norm.eps != k_norm.eps:
            raise ValueError(f"the fused q/k norm needs one eps, got {q_norm.eps} and {k_norm.eps}")
        from nanovllm.kernels import fused

        fused.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, self.cos_sin, positions, q_norm.eps)
        return q, k
