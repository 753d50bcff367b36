"""Linear layers sharded for tensor parallelism; each parameter carries its own `weight_loader`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.loader import CheckpointTensor, materialize
from nanovllm.utils.parallel import tp_group, tp_size


class LinearBase(nn.Module):
    """y = x W^T (+ b). `tp_dim` is the weight dim that is sharded (0: output, 1: input)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int) -> None:
        super().__init__()
        self.tp_dim = tp_dim
        self.group = tp_group()
        self.tp_rank = self.group.rank
        self.tp_size = self.group.size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def expect_shards(self, shard_ids: tuple[object, ...]) -> None:
        """The parts (checkpoint tensors) that together fill each parameter (see utils.loader)."""
        for param in (self.weight, self.bias):
            if param is not None:
                param.shard_ids = shard_ids

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor | CheckpointTensor) -> None:
        if param.dim() > self.tp_dim:
            size = param.size(self.tp_dim)
            loaded = take_shard(loaded, self.tp_dim, self.tp_rank, size, size * self.tp_size)
        _copy_checked(param.data, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def take_shard(loaded: torch.Tensor | CheckpointTensor, dim: int, index: int, size: int, total: int) -> torch.Tensor:
    """Slice `index` (of length `size`) along `dim` of a checkpoint tensor that must be `total` long there (reads only that slice)."""
    if loaded.size(dim) != total:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} has {loaded.size(dim)} rows/columns along dim {dim}, expected {total}")
    return loaded.narrow(dim, index * size, size)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor | CheckpointTensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit parameter of shape {tuple(dst.shape)}")
    dst.copy_(materialize(src))


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank returns its slice."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        world = tp_size()
        if output_size % world:
            raise ValueError(f"output size {output_size} is not divisible by tensor_parallel_size {world}")
        super().__init__(input_size, output_size // world, bias, 0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections stacked in one weight (e.g. gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)
        self.expect_shards(tuple(range(len(output_sizes))))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor | CheckpointTensor, shard_id: int) -> None:
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        shard = take_shard(loaded, 0, self.tp_rank, size, self.output_sizes[shard_id])
        _copy_checked(param.data.narrow(0, offset, size), shard)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one weight; heads split across ranks (KV heads replicated when fewer than ranks)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        world = tp_size()
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = num_heads // world
        self.num_kv_heads = max(1, num_kv_heads // world)
        self.kv_replicas = max(1, world // num_kv_heads)
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * world
        super().__init__(hidden_size, output_size, bias)
        self.expect_shards(("q", "k", "v"))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor | CheckpointTensor, shard_id: str) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, index, total_heads = 0, q_size, self.tp_rank, self.total_num_heads
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, index, total_heads = kv_size, self.tp_rank // self.kv_replicas, self.total_num_kv_heads
        shard = take_shard(loaded, 0, index, size, total_heads * self.head_dim)
        _copy_checked(param.data.narrow(0, offset, size), shard)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        world = tp_size()
        if input_size % world:
            raise ValueError(f"input size {input_size} is not divisible by tensor_parallel_size {world}")
        super().__init__(input_size // world, output_size, bias, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        if self.tp_size > 1:
            self.group.all_reduce(y)
        return y
