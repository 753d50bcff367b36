"""Batched sampling: per-row logit bias, penalties, temperature, top-k, top-p, min-p, seeds, banned
tokens and logprobs.

All rows are processed together on the device; greedy rows take the exact argmax of the
logits. Random rows use the exponential race (argmax of p / E, E ~ Exp(1)), which draws from p.
Rows with a seed take E from a counter-based hash of (seed, position, token id), so their draws
do not depend on what else is in the batch. On CUDA, a batch without filters, seeds, penalties or
biases (the usual case) is sampled by `nanovllm.kernels.sampling` (one fused pass over the logits and a tiny
per-row reduction) instead of six passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_MASK32 = 0xFFFFFFFF


@dataclass
class Penalties:
    """vLLM's penalties, per row [B] (neutral: repetition 1, frequency and presence 0), and the tokens
    they count: prompt_tokens [B, P] and output_tokens [B, O] int64, padded with the vocabulary size."""

    repetition: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor
    prompt_tokens: torch.Tensor
    output_tokens: torch.Tensor

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A token seen in the prompt or output: its logit divided by `repetition` if positive, else
        multiplied; then minus frequency x its output count and minus presence if it was output."""
        rows, vocab = logits.shape
        counts = logits.new_zeros(rows, vocab + 1).scatter_add_(1, self.output_tokens, logits.new_ones(self.output_tokens.shape))[:, :vocab]
        seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=logits.device).scatter_(1, self.prompt_tokens, True)[:, :vocab]
        seen |= counts > 0
        repetition = self.repetition.unsqueeze(1)
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
        return logits - self.frequency.unsqueeze(1) * counts - self.presence.unsqueeze(1) * (counts > 0)


@dataclass
class SamplingTensors:
    """Per-row parameters on the logits' device (B rows). Host flags skip unused work.

    temperatures [B] (0 = greedy), top_k [B] int64 (vocab size = off), top_p [B] (1 = off),
    min_p [B] (0 = off); seeded rows: seed_rows [S], their seeds [S] and the positions [S] of the
    tokens they sample; banned [2, K] (row, token id) pairs whose logits become -inf; bias_index
    [2, K'] (row, token id) pairs whose logits get bias_values [K'] added; penalties.
    max_logprobs: -1 = no logprobs, else the number of top tokens to return. any_greedy=False
    (no greedy row) skips the argmax pass over the raw logits.
    """

    temperatures: torch.Tensor
    top_k: torch.Tensor | None = None
    top_p: torch.Tensor | None = None
    min_p: torch.Tensor | None = None
    seed_rows: torch.Tensor | None = None
    seeds: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    banned: torch.Tensor | None = None
    bias_index: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    penalties: Penalties | None = None
    all_greedy: bool = False
    any_greedy: bool = True
    max_logprobs: int = -1


@dataclass
class SamplerOutput:
    """token_ids [B]; with logprobs requested: sampled_logprobs and sampled_ranks [B] (1 = most
    likely), top_ids / top_logprobs [B, n]."""

    token_ids: torch.Tensor
    sampled_logprobs: torch.Tensor | None = None
    sampled_ranks: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for int64 x < 2**32, without overflowing int64."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash, on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seeded_exponentials(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [S, V] that depends only on (seed, position, token id): -log u with u = (k + 0.5) / 2**23 from the
    top 23 bits k of the hash, strictly inside (0, 1). seeds, positions: int64 [S]."""
    row = mix32(mix32(seeds & _MASK32) ^ (seeds >> 32))
    row = mix32((row + _mul32(positions & _MASK32, 0x9E3779B9)) & _MASK32)
    token = _mul32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64), 0x85EBCA6B)
    bits = mix32(row[:, None] ^ token[None, :])
    # 23 bits, so that k + 0.5 is exact in float32: u is never 1 (24 bits rounded the top value to 1.0,
    # a zero draw that made its token win whatever its probability, once in 2**24 tokens).
    uniform = ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))
    return -torch.log(uniform)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> SamplerOutput:
    """The logprob and rank of token_ids [B] under logprobs [B, V] (float32), and the k most likely (k=0: none)."""
    chosen = logprobs.gather(1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(-1) + 1
    chosen = chosen.squeeze(1)
    if k == 0:
        return SamplerOutput(token_ids, chosen, ranks)
    top_logprobs, top_ids = logprobs.topk(k, -1)
    return SamplerOutput(token_ids, chosen, ranks, top_ids, top_logprobs)


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, params: SamplingTensors) -> SamplerOutput:
        """logits [B, V] (any float dtype) -> sampled token ids [B] and, if asked, raw-logit logprobs."""
        logprobs = logits.float().log_softmax(-1) if params.max_logprobs >= 0 else None
        if params.bias_index is not None:
            logits = logits.float().index_put((params.bias_index[0], params.bias_index[1]), params.bias_values, accumulate=True)
        if params.penalties is not None:
            logits = params.penalties.apply(logits.float())
        if params.banned is not None:
            logits = logits.index_put((params.banned[0], params.banned[1]), logits.new_tensor(float("-inf")))
        if params.all_greedy:
            token_ids = logits.argmax(-1)
        elif logits.is_cuda and params.top_k is None and params.top_p is None and params.min_p is None and params.seeds is None \
                and params.bias_index is None and params.penalties is None:
            from nanovllm.kernels import sampling

            token_ids = sampling.sample(logits, params.temperatures, int(torch.randint(2**31, ()).item()))
        else:
            token_ids = self._race(logits.float(), params)
        if logprobs is None:
            return SamplerOutput(token_ids)
        return gather_logprobs(logprobs, token_ids, params.max_logprobs)

    def _race(self, logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
        """The exponential race over the filtered distribution (greedy rows: argmax). logits float32 [B, V]."""
        temperatures = params.temperatures
        scaled = logits / torch.where(temperatures > 0, temperatures, 1.0).unsqueeze(1)
        probs = self._filter(scaled, params).softmax(-1)
        noise = torch.empty_like(probs).exponential_()
        if params.seeds is not None:
            noise[params.seed_rows] = seeded_exponentials(params.seeds, params.positions, probs.shape[1])
        # A zero draw would turn a masked token's 0 / 0 into NaN, which argmax would pick.
        sampled = (probs / noise.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(-1)
        return torch.where(temperatures > 0, sampled, logits.argmax(-1)) if params.any_greedy else sampled

    @staticmethod
    def _filter(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
        """Mask tokens below min_p times the top probability, outside the top k, or outside the top-p nucleus."""
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
            top_p = params.top_p.unsqueeze(1)
            # Rows with top_p = 1 keep everything, even where rounding lets the running sum pass 1.
            drop |= (mass_before >= top_p) & (top_p < 1)
        return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
