"""The named benchmark workloads, as token-id prompts and output lengths (pure Python, no engine import,
so that bench.py and the nano-vLLM runner beside it draw exactly the same requests).

Every request samples at temperature 0.6 with ignore_eos, so each produces exactly its max_tokens.

* nano:   nano-vLLM's bench.py: 256 requests, prompts and outputs uniform in [100, 1024] tokens.
* short:  many short requests (chat, RL rollouts): 2048 requests, prompts 16-128, outputs 16-256.
* prefix: shared system prompts: 512 requests, each one of 16 prefixes of 1024 tokens followed by its
          own 16-128 tokens, outputs 16-256 (prefix caching serves all but the first of each prefix).
* long:   long prompts: 128 requests, prompts 2000-3500, outputs 16-64 (prefill dominates).
"""
from __future__ import annotations

from dataclasses import dataclass
from random import Random

WORKLOADS = ("nano", "short", "prefix", "long")


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


def max_prompt_id(vocab_size: int) -> int:
    """nano-vLLM draws prompt token ids in [0, 10000]; capped below the vocabulary size of small models."""
    return min(10000, vocab_size - 1)


def make_workload(name: str, vocab_size: int) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")
    rng = Random(0)
    top = max_prompt_id(vocab_size)

    def tokens(n: int) -> list[int]:
        return [rng.randint(0, top) for _ in range(n)]

    if name == "prefix":
        prefixes = [tokens(1024) for _ in range(16)]
        prompts = [prefixes[i % 16] + tokens(rng.randint(16, 128)) for i in range(512)]
        return Workload(name, prompts, [rng.randint(16, 256) for _ in prompts])
    num, (lo_in, hi_in), (lo_out, hi_out) = {
        "nano": (256, (100, 1024), (100, 1024)),
        "short": (2048, (16, 128), (16, 256)),
        "long": (128, (2000, 3500), (16, 64)),
    }[name]
    # nano-vLLM's order of draws: all prompts (length, then ids), then all output lengths.
    prompts = [tokens(rng.randint(lo_in, hi_in)) for _ in range(num)]
    return Workload(name, prompts, [rng.randint(lo_out, hi_out) for _ in range(num)])
