"""One request's tokens and progress. State changes only through Scheduler/BlockManager methods."""
from __future__ import annotations

from enum import Enum, auto
from itertools import count

from nanovllm.sampling_params import SamplingParams


PENDING = -1
"""Placeholder for a sampled token the host has not read yet (overlap scheduling)."""


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Token ids (prompt then generated) plus how far the KV cache has been computed.

    Invariants: `num_cached_tokens <= num_computed_tokens <= num_tokens`;
    `block_table` covers at least `num_computed_tokens` positions;
    `block_hashes[i]` is the prefix-cache hash of full, computed block i;
    the last `num_pending_tokens` entries of `token_ids` are PENDING (sampled on the device, value
    not yet on the host) and every other entry is a real token.
    """

    _ids = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, block_size: int,
                 request_id: str = "", completion_index: int = 0) -> None:
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.completion_index = completion_index  # which of the request's n continuations
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.sampling_params = sampling_params
        self.block_size = block_size
        self.num_cached_tokens = 0
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.num_pending_tokens = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_completion_tokens(self) -> int:
        """Generated tokens, pending ones included (what scheduling and sampling limits count)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens whose values are known on the host."""
        return len(self.token_ids) - self.num_prompt_tokens - self.num_pending_tokens

    @property
    def computes_prompt_logprobs(self) -> bool:
        """Whether this sequence's steps yield the logits of every prompt position (the request's first
        continuation, when prompt_logprobs is asked; it then takes nothing from the prefix cache)."""
        return self.sampling_params.prompt_logprobs is not None and self.completion_index == 0

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        """Generated tokens known on the host (pending ones excluded)."""
        return self.completion_token_ids_from(0)

    def completion_token_ids_from(self, start: int) -> list[int]:
        """`completion_token_ids[start:]`, without copying the tokens before `start` (streams take a
        few new tokens of a growing completion every step)."""
        return self.token_ids[self.num_prompt_tokens + start : len(self.token_ids) - self.num_pending_tokens]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def num_blocks_for(self, num_positions: int) -> int:
        """Blocks needed to hold KV for the first `num_positions` positions."""
        return (num_positions + self.block_size - 1) // self.block_size

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]
