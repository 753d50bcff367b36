"""ScheduledBatch -> StepInputs: the host arrays of one forward pass (numpy, no torch kernels)."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import PENDING, Sequence


@dataclass
class StepInputs:
    """Host arrays for one forward pass: the whole message a TP worker needs (B seqs, N tokens, S sampled).

    input_ids/positions int64 [N]; slot_mapping int32 [N]; cu_seqlens_q int32 [B+1];
    seq_lens int32 [B]; block_tables int32 [B, W] padded with -1; samples bool [B]: whether the step reaches
    sequence b's last token (it samples); logits_indices int64 [S]: the last row of each sampling sequence.
    prompt_logits_indices int64 [R]: rows whose logits score the next prompt token (prompt_logprobs),
    prompt_targets int64 [R] those tokens; their logits follow the S sampled rows'.
    Under overlap scheduling some input ids are PENDING: `input_ids[pending_rows]` is taken on the
    device from row `pending_src` of the previous step's sampled tokens (rank 0 broadcasts them to
    the other ranks when `share_sampled`).
    """

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    cu_seqlens_q: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray
    samples: np.ndarray
    logits_indices: np.ndarray
    max_seqlen_k: int
    is_decode: bool
    pending_rows: np.ndarray
    pending_src: np.ndarray
    share_sampled: bool = False
    prompt_logits_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    prompt_targets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


def num_prompt_logits(seq: Sequence, start: int, end: int) -> int:
    """How many of positions [start, end) are prompt positions whose logits score the next prompt token
    (positions 0 .. num_prompt_tokens - 2) for a sequence that computes prompt logprobs; else 0."""
    if not seq.computes_prompt_logprobs:
        return 0
    return max(0, min(end, seq.num_prompt_tokens - 1) - start)


def padded_block_tables(tables: list[list[int]]) -> np.ndarray:
    """int32 [B, W] of the block tables, each padded with -1 to the longest (W)."""
    lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    width = int(lengths.max())
    block_tables = np.full((len(tables), width), -1, dtype=np.int32)
    block_tables[np.arange(width) < lengths[:, None]] = np.fromiter(chain.from_iterable(tables), dtype=np.int32, count=int(lengths.sum()))
    return block_tables


def rows_among(seq_ids: list[int], sampled_ids: list[int]) -> np.ndarray:
    """int64 row of each of `seq_ids` in `sampled_ids` (the sequences whose tokens the previous step sampled,
    in row order). Steady decoding asks for the previous rows themselves, or their first rows: no lookup."""
    if seq_ids == sampled_ids[: len(seq_ids)]:
        return np.arange(len(seq_ids), dtype=np.int64)
    row_of = {seq_id: row for row, seq_id in enumerate(sampled_ids)}
    return np.array([row_of[seq_id] for seq_id in seq_ids], dtype=np.int64)


def build_step_inputs(batch: ScheduledBatch, block_size: int, sampled_ids: list[int], share_sampled: bool) -> StepInputs:
    """The step's host arrays from sequence state (before `Scheduler.advance`). `sampled_ids`: the sequences
    whose tokens the previous step sampled, in row order (the sources of PENDING inputs).

    Runs for every step over every sequence: one list comprehension per attribute read, then numpy."""
    seqs = batch.seqs
    num_seqs = len(seqs)
    block_tables = padded_block_tables([s.block_table for s in seqs])
    starts = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)
    lengths = np.array([len(s.token_ids) for s in seqs], dtype=np.int64)
    counts = np.array(batch.num_new_tokens, dtype=np.int64)
    ends = starts + counts
    cu_seqlens_q = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(counts, out=cu_seqlens_q[1:])
    if batch.is_decode:
        input_ids = np.array([s.token_ids[e - 1] for s, e in zip(seqs, ends.tolist())], dtype=np.int64)
        positions = starts
        seq_index = np.arange(num_seqs)
    else:
        chunks = [s.token_ids[b:e] for s, b, e in zip(seqs, starts.tolist(), ends.tolist())]
        input_ids = np.fromiter(chain.from_iterable(chunks), dtype=np.int64, count=int(cu_seqlens_q[-1]))
        seq_index = np.repeat(np.arange(num_seqs), counts)
        positions = np.arange(len(input_ids), dtype=np.int64) - np.repeat(cu_seqlens_q[:-1] - starts, counts)
    slot_mapping = (block_tables[seq_index, positions // block_size].astype(np.int64) * block_size + positions % block_size).astype(np.int32)
    samples = ends == lengths
    prompt_rows: list[int] = []
    prompt_targets: list[int] = []
    for i in [i for i, s in enumerate(seqs) if s.sampling_params.prompt_logprobs is not None]:
        seq, row, b, e = seqs[i], int(cu_seqlens_q[i]), int(starts[i]), int(ends[i])
        count = num_prompt_logits(seq, b, e)
        prompt_rows.extend(range(row, row + count))
        prompt_targets.extend(seq.token_ids[b + 1 : b + 1 + count])
    pending_rows = np.flatnonzero(input_ids == PENDING)
    pending_src = rows_among([seqs[i].seq_id for i in seq_index[pending_rows].tolist()], sampled_ids)
    return StepInputs(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        cu_seqlens_q=cu_seqlens_q,
        seq_lens=ends.astype(np.int32),
        block_tables=block_tables,
        samples=samples,
        logits_indices=(cu_seqlens_q[1:][samples] - 1).astype(np.int64),
        max_seqlen_k=int(ends.max()),
        is_decode=batch.is_decode,
        pending_rows=pending_rows,
        pending_src=pending_src,
        share_sampled=share_sampled,
        prompt_logits_indices=np.asarray(prompt_rows, dtype=np.int64),
        prompt_targets=np.asarray(prompt_targets, dtype=np.int64),
    )


def prefill_inputs(num_seqs: int, seq_len: int, block_size: int) -> StepInputs:
    """A prefill of `num_seqs` prompts of `seq_len` zero tokens in blocks 0, 1, 2, ... (start-up profiling)."""
    blocks_per_seq = (seq_len + block_size - 1) // block_size
    block_tables = np.arange(num_seqs * blocks_per_seq, dtype=np.int32).reshape(num_seqs, blocks_per_seq)
    positions = np.tile(np.arange(seq_len, dtype=np.int64), num_seqs)
    return StepInputs(
        input_ids=np.zeros(num_seqs * seq_len, dtype=np.int64),
        positions=positions,
        slot_mapping=(np.repeat(np.arange(num_seqs), seq_len) * blocks_per_seq * block_size + positions).astype(np.int32),
        cu_seqlens_q=np.arange(0, (num_seqs + 1) * seq_len, seq_len, dtype=np.int32),
        seq_lens=np.full(num_seqs, seq_len, dtype=np.int32),
        block_tables=block_tables,
        samples=np.ones(num_seqs, dtype=bool),
        logits_indices=np.arange(seq_len - 1, num_seqs * seq_len, seq_len, dtype=np.int64),
        max_seqlen_k=seq_len,
        is_decode=False,
        pending_rows=np.zeros(0, dtype=np.int64),
        pending_src=np.zeros(0, dtype=np.int64),
    )


def to_device_packed(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Several host arrays -> device tensors in one copy, without waiting for the device: the arrays of each
    dtype laid out in one region of one (pinned) byte buffer, copied once, returned as views of the copy
    with each array's dtype and shape. Each separate small copy would cost a pinned allocation and a launch
    on the host. Every view starts at a 16-byte boundary: Triton compiles a kernel variant per pointer
    alignment, so an unaligned view would compile new variants mid-run (measured: a 1.2 s step on the H200)
    and lose vectorised loads. On the CPU the views are of the packed buffer itself."""
    groups: dict[np.dtype, list[int]] = {}
    for i, array in enumerate(arrays):
        groups.setdefault(array.dtype, []).append(i)
    # Element counts padded to 16 bytes: each array of a region starts aligned.
    padded = {dtype: [-(-arrays[i].size * dtype.itemsize // 16) * 16 // dtype.itemsize for i in members] for dtype, members in groups.items()}
    sizes = [sum(counts) * dtype.itemsize for dtype, counts in padded.items()]
    host = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=device.type == "cuda")
    packed, offset = host.numpy(), 0
    for (dtype, members), size in zip(groups.items(), sizes):
        region = packed[offset : offset + size].view(dtype)
        start = 0
        for i, count in zip(members, padded[dtype]):
            region[start : start + arrays[i].size] = arrays[i].reshape(-1)
            start += count
        offset += size
    tensors: list[torch.Tensor] = [None] * len(arrays)
    pieces = host.to(device, non_blocking=True).split(sizes)
    for (dtype, members), piece in zip(groups.items(), pieces):
        for i, view in zip(members, piece.view(_TORCH_DTYPES[dtype]).split(padded[dtype])):
            array = arrays[i]
            if view.shape[0] != array.size:
                view = view[: array.size]
            tensors[i] = view if array.ndim == 1 else view.view(array.shape)
    return tensors


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32}


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array -> device tensor through pinned memory, without waiting for the device."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor
