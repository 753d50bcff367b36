"""Gated activations."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """silu(first half) * second half: a fused Triton kernel on CUDA, PyTorch elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 2d] -> [N, d] on CUDA; [..., 2d] -> [..., d] elsewhere."""
        if x.is_cuda:
            from nanovllm.kernels import fused

            return fused.silu_and_mul(x)
        return self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """The plain-PyTorch path (any device; the reference for the fused kernel). [..., 2d] -> [..., d]."""
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up
