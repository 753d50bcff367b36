"""Batched sampling: per-row temperature, top-k, top-p, min-p, seeds, banned tokens and logprobs.

All rows are processed together on the device; greedy rows take the exact argmax of the raw
logits. Random rows use the exponential race (argmax of p / E, E ~ Exp(1)), which draws from p.
Rows with a seed take E from a counter-based hash of (seed, position, token id), so their draws
do not depend on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingTensors:
    """Per-row parameters on the logits' device (B rows). Host flags skip unused work.

    temperatures [B] (0 = greedy), top_k [B] int64 (vocab size = off), top_p [B], min_p [B],
    seeds [S] and seed_rows [S] / positions [S] for seeded rows, banned [2, K] (row, token) pairs.
    """

    temperatures: torch.Tensor
    top_k: torch.Tensor | None = None
    top_p: torch.Tensor | None = None
    min_p: torch.Tensor | None = None
    seed_rows: torch.Tensor | None = None
    seeds: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    banned: torch.Tensor | None = None
    all_greedy: bool = False
    max_logprobs: int = -1


@dataclass
class SamplerOutput:
    """token_ids [B]; with logprobs requested: sampled_logprobs [B], top_ids / top_logprobs [B, n]."""

    token_ids: torch.Tensor
    sampled_logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def seeded_exponentials(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [S, V] determined by (seed, position, token id) alone."""
    row = _mix32(_mix32(seeds & _MASK32) ^ (seeds >> 32))
    row = _mix32((row + positions * 0x9E3779B9) & _MASK32)
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _mix32(row[:, None] ^ ((token * 0x85EBCA6B) & _MASK32)[None, :])
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(uniform)


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, params: SamplingTensors) -> SamplerOutput:
        """logits [B, V] (any float dtype) -> sampled token ids [B] and optional logprobs."""
        logits = logits.float()
        if params.banned is not None:
            logits[params.banned[0], params.banned[1]] = float("-inf")
        greedy = logits.argmax(-1)
        if params.all_greedy:
            token_ids = greedy
        else:
            temperatures = params.temperatures
            scaled = logits / torch.where(temperatures > 0, temperatures, 1.0).unsqueeze(1)
            scaled = self._filter(scaled, params)
            probs = scaled.softmax(-1)
            noise = torch.empty_like(probs).exponential_()
            if params.seeds is not None:
                noise[params.seed_rows] = seeded_exponentials(params.seeds, params.positions, probs.shape[1])
            sampled = (probs / noise).argmax(-1)
            token_ids = torch.where(temperatures > 0, sampled, greedy)
        if params.max_logprobs < 0:
            return SamplerOutput(token_ids)
        logprobs = logits.log_softmax(-1)
        top_logprobs, top_ids = logprobs.topk(params.max_logprobs, -1) if params.max_logprobs else (None, None)
        return SamplerOutput(token_ids, logprobs.gather(1, token_ids[:, None]).squeeze(1), top_ids, top_logprobs)

    @staticmethod
    def _filter(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
        """Mask tokens outside top-k, the top-p nucleus, or below min_p times the top probability."""
        if params.min_p is not None:
            probs = logits.softmax(-1)
            threshold = params.min_p.unsqueeze(1) * probs.max(-1, keepdim=True).values
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        if params.top_k is None and params.top_p is None:
            return logits
        sorted_logits, order = logits.sort(-1, descending=True)
        ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if params.top_k is not None:
            drop |= ranks >= params.top_k.unsqueeze(1)
        if params.top_p is not None:
            sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
            mass_before = sorted_probs.cumsum(-1) - sorted_probs
            drop |= mass_before >= params.top_p.unsqueeze(1)
        return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
