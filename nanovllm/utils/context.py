"""Per-step attention metadata, set by the model runner around each forward pass."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Context:
    """Attention inputs for one step (shapes: B sequences, N new tokens).

    cu_seqlens_q: int32 [B+1], prefix sums of new tokens per sequence.
    seq_lens: int32 [B], KV length per sequence including this step's tokens.
    slot_mapping: int32 [N], cache slot of each new token (-1: padding, not stored).
    block_tables: int32 [B, max_blocks], padded with -1.
    max_seqlen_q / max_seqlen_k: host ints (no device sync needed to size kernels).
    is_decode: every sequence has exactly one new token.
    """

    is_decode: bool = False
    cu_seqlens_q: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(context: Context) -> None:
    global _CONTEXT
    _CONTEXT = context


def reset_context() -> None:
    set_context(Context())
