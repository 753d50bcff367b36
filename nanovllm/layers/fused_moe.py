"""Mixture-of-experts MLP: router top-k, then each token through its k experts (SiLU-gated), weighted.

The PyTorch path (`fused_moe_reference`) is the CPU path and the oracle of the CUDA path, a
Triton grouped GEMM (`nanovllm.kernels.moe`). Tensor parallelism shards every expert's
intermediate dimension; the partial outputs are summed with an all-reduce.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.linear import take_shard
from nanovllm.utils.loader import CheckpointTensor, default_weight_loader
from nanovllm.utils.parallel import tp_group


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """As HF's Qwen3-MoE router: softmax in fp32, top-k, optionally renormalised to sum to 1.

    router_logits [N, E] -> (weights [N, K] in the logits' dtype, expert ids [N, K] int64).
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_k topk_weights[n, k] * down_e(silu(gate_e(x_n)) * up_e(x_n)) with e = topk_ids[n, k].

    x [N, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_* [N, K] -> [N, H].
    Loops over the experts that got tokens (a host sync: fine on CPU and as an oracle).
    """
    out = torch.zeros_like(x)
    for expert in topk_ids.unique().tolist():
        rows, slots = (topk_ids == expert).nonzero(as_tuple=True)
        gate, up = F.linear(x[rows], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert]) * topk_weights[rows, slots, None]
        out.index_add_(0, rows, y.to(out.dtype))
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The Triton grouped GEMM on CUDA, the reference elsewhere (same arguments and result)."""
    if x.is_cuda:
        from nanovllm.kernels import moe

        return moe.fused_moe(x, w13, w2, topk_weights, topk_ids)
    return fused_moe_reference(x, w13, w2, topk_weights, topk_ids)


class FusedExperts(nn.Module):
    """All experts' weights of one layer: `gate_up_proj` [E, 2I/tp, H] and `down_proj` [E, H, I/tp].

    Filled from per-expert checkpoint tensors: shard (e, 0) / (e, 1) is expert e's gate / up
    projection [I, H], shard e of `down_proj` its down projection [H, I]. Precondition: the group's
    size divides intermediate_size (Config checks moe_intermediate_size).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.group = tp_group()
        self.intermediate_size = intermediate_size
        self.local_size = intermediate_size // self.group.size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.local_size, hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, self.local_size), requires_grad=False)
        self.gate_up_proj.weight_loader = self._load_gate_up
        self.gate_up_proj.shard_ids = tuple((e, j) for e in range(num_experts) for j in (0, 1))
        self.down_proj.weight_loader = self._load_down
        self.down_proj.shard_ids = tuple(range(num_experts))

    def _load_gate_up(self, param: nn.Parameter, loaded: torch.Tensor | CheckpointTensor, shard_id: tuple[int, int]) -> None:
        expert, part = shard_id
        size = self.local_size
        shard = take_shard(loaded, 0, self.group.rank, size, self.intermediate_size)
        default_weight_loader(param.data[expert].narrow(0, part * size, size), shard)

    def _load_down(self, param: nn.Parameter, loaded: torch.Tensor | CheckpointTensor, expert: int) -> None:
        shard = take_shard(loaded, 1, self.group.rank, self.local_size, self.intermediate_size)
        default_weight_loader(param.data[expert], shard)


class SparseMoeBlock(nn.Module):
    """Router (`gate`, replicated on every rank) + experts; [N, H] -> [N, H]."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={num_experts}], got {top_k}")
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.gate.weight.requires_grad_(False)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        y = fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        if self.experts.group.size > 1:
            self.experts.group.all_reduce(y)
        return y
