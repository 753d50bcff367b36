"""RMSNorm with an optional fused residual add (computed in fp32 like HF)."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * (x * rsqrt(mean(x^2) + eps))`` over the last dim: a fused Triton kernel on CUDA, PyTorch elsewhere."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual).

        On CUDA x and residual are [N, H] and the sum is written into `residual` in place (see
        `nanovllm.kernels.fused.rms_norm`); elsewhere [..., H], and `residual` is left as it is.
        """
        if x.is_cuda:
            from nanovllm.kernels import fused

            return fused.rms_norm(x, self.weight, self.eps, residual)
        return self.forward_native(x, residual)

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The plain-PyTorch path (any device; the reference for the fused kernel). x, residual: [..., H]."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
