"""Vocabulary-parallel embedding and LM head (logits gathered on rank 0)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.parallel import tp_group


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary rows; lookups are summed across ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.group = tp_group()
        self.tp_rank = self.group.rank
        self.tp_size = self.group.size
        if num_embeddings % self.tp_size:
            raise ValueError(f"vocab size {num_embeddings} is not divisible by tensor_parallel_size {self.tp_size}")
        self.num_embeddings = num_embeddings
        self.shard_size = num_embeddings // self.tp_size
        self.vocab_start = self.shard_size * self.tp_rank
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if loaded.shape != (self.num_embeddings, param.shape[1]):
            raise ValueError(f"embedding of shape {tuple(loaded.shape)} does not fit vocab {self.num_embeddings} x {param.shape[1]}")
        param.data.copy_(loaded.narrow(0, self.vocab_start, self.shard_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(x, self.weight)
        local = x - self.vocab_start
        mask = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * mask.unsqueeze(1)
        self.group.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for the last new token of each sequence that samples this step."""

    def forward(self, x: torch.Tensor, logits_indices: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits of the rows `logits_indices` of x (every row when None); with `out` (one rank only) they are
        written there, e.g. into a CUDA graph's static buffer."""
        if logits_indices is not None:
            x = x[logits_indices]
        if out is not None:
            if self.tp_size != 1:
                raise ValueError(f"lm_head(out=...) needs one rank, got tensor parallel size {self.tp_size}")
            return torch.mm(x, self.weight.t(), out=out)
        logits = F.linear(x, self.weight)
        if self.tp_size == 1:
            return logits
        return self.group.gather(logits)
