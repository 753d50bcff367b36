"""CUDA graphs of the model's forward pass for every step shape: decode batches and token buckets.

An eager step of a small model costs far more host time (hundreds of kernel launches through
Python) than device time, so every step that fits a captured shape replays a graph instead:

* decode graphs, keyed by batch size (1, 2, 4, 8, 16, 32, ... up to max_num_seqs): one token
  per sequence, attention by the split-KV decode kernel;
* token graphs, keyed by a token budget T (16, 32, ..., up to `MAX_GRAPH_TOKENS`): any mix of
  prefills, prefill chunks and decodes of at most min(T, max_num_seqs) sequences, attention by
  the backend's mixed path, which reads every sequence's query start and length from the device.

A step is padded to its graph's shape: padding tokens have slot -1 (never stored) and belong to
no sequence; padding sequences have no query tokens and no KV. Steps beyond the largest token
graph run eagerly: their device time already dwarfs the host's launch cost.

On one rank the graphs also compute the logits of one row per sequence (every token of a decode
graph; the rows a token graph's step names, padded with row 0): an eager LM head each step cost
the host a gather and a cuBLAS call with a new row count almost every step (measured with py-spy
on the H200: about a tenth of the host's time per step of the short workload).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nanovllm.engine.inputs import StepInputs, to_device_packed
from nanovllm.layers.attention import AttentionBackend, AttentionMetadata

# Beyond this many tokens a step's matmuls take longer than launching it eagerly (~20 ms of host time
# for Qwen3-0.6B against ~15 ms of device time for 8192 tokens on an H200).
MAX_GRAPH_TOKENS = 8192


def decode_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes of the decode graphs: 1, 2, 4, 8, then every multiple of 16, up to max_num_seqs."""
    sizes = [bs for bs in (1, 2, 4, 8) if bs <= max_num_seqs] + list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def token_sizes(max_tokens: int) -> list[int]:
    """Token budgets of the mixed graphs: powers of two from 16 to 256, then steps of a quarter of the
    enclosing power of two (so padding wastes at most a fifth of a step), and max_tokens itself."""
    sizes, size = [], 16
    while size < max_tokens:
        sizes.append(size)
        size = 2 * size if size < 256 else size + max(64, 1 << (size.bit_length() - 3))
    return sizes + [max_tokens]


@dataclass(frozen=True)
class GraphShape:
    """A captured shape: `num_tokens` token rows and `num_seqs` sequence rows; decode graphs have one token per sequence."""

    num_tokens: int
    num_seqs: int
    is_decode: bool


class GraphRunner:
    """Captures and replays the forward pass (`model(input_ids, positions)` -> hidden states, and with
    `vocab_size` the logits of one row per sequence) for a ladder of step shapes. Owns the static input
    buffers every graph reads, the output buffers, and one memory pool.

    Preconditions: the KV cache is allocated (the graphs capture its addresses); steps have at most
    max_num_seqs sequences; block tables are at most `max_blocks_per_seq` wide.
    """

    def __init__(self, model: nn.Module, backend: AttentionBackend, max_num_seqs: int, max_num_batched_tokens: int,
                 max_blocks_per_seq: int, max_model_len: int, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 vocab_size: int | None = None) -> None:
        self.model = model
        self.backend = backend
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.decode_sizes = decode_sizes(max_num_seqs)
        self.token_sizes = token_sizes(min(max_num_batched_tokens, MAX_GRAPH_TOKENS))
        max_tokens = max(self.token_sizes[-1], self.decode_sizes[-1])
        max_seqs = max_num_seqs

        def zeros(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.input_ids = zeros(max_tokens, dtype=torch.int64)
        self.positions = zeros(max_tokens, dtype=torch.int64)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self.cu_seqlens_q = zeros(max_seqs + 1)
        self.seq_lens = zeros(max_seqs)
        self.block_tables = zeros(max_seqs, max_blocks_per_seq)
        self.hidden = zeros(max_tokens, hidden_size, dtype=dtype)
        self.logits_indices = zeros(max_seqs, dtype=torch.int64)
        self.logits = None if vocab_size is None else zeros(max_seqs, vocab_size, dtype=dtype)
        self.graphs: dict[GraphShape, torch.cuda.CUDAGraph] = {}

    def shape_for(self, num_tokens: int, num_seqs: int, is_decode: bool) -> GraphShape | None:
        """The smallest captured shape that holds a step, or None (run it eagerly)."""
        if is_decode:
            size = next((bs for bs in self.decode_sizes if bs >= num_seqs), None)
            return None if size is None else GraphShape(size, size, True)
        size = next((t for t in self.token_sizes if t >= num_tokens), None)
        if size is None or num_seqs > self._seqs_for(size):
            return None
        return GraphShape(size, self._seqs_for(size), False)

    def _seqs_for(self, num_tokens: int) -> int:
        return min(num_tokens, self.max_num_seqs)

    def _metadata(self, shape: GraphShape) -> AttentionMetadata:
        n, b = shape.num_tokens, shape.num_seqs
        return AttentionMetadata(self.cu_seqlens_q[: b + 1], self.seq_lens[:b], self.slot_mapping[:n], self.block_tables[:b],
                                 max_seqlen_q=1 if shape.is_decode else n, max_seqlen_k=self.max_model_len, is_decode=shape.is_decode)

    def _forward(self, shape: GraphShape) -> None:
        n = shape.num_tokens
        self.backend.begin_step(self._metadata(shape))
        try:
            self.hidden[:n] = self.model(self.input_ids[:n], self.positions[:n])
        finally:
            self.backend.end_step()
        if self.logits is not None:
            b = shape.num_seqs
            rows = None if shape.is_decode else self.logits_indices[:b]
            self.model.compute_logits(self.hidden[:n], rows, out=self.logits[:b])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every shape, largest first so that the smaller graphs reuse the pool's memory.
        Each shape runs once eagerly before its capture (compiling its kernels)."""
        shapes = [GraphShape(t, self._seqs_for(t), False) for t in self.token_sizes]
        shapes += [GraphShape(bs, bs, True) for bs in self.decode_sizes]
        # A valid empty step: every sequence has no tokens and no KV, every token is padding.
        self.cu_seqlens_q.zero_()
        self.seq_lens.zero_()
        self.slot_mapping.fill_(-1)
        pool = None
        for shape in sorted(shapes, key=lambda s: (-s.num_tokens, s.is_decode)):
            self._forward(shape)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self._forward(shape)
            pool = pool or graph.pool()
            self.graphs[shape] = graph
            torch.cuda.synchronize()

    def replay(self, shape: GraphShape, inputs: StepInputs, input_ids: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Load one step into the static buffers and replay its graph; returns the hidden states [N, hidden_size]
        and, when the graphs compute them, the logits [S, vocab] of the step's S `logits_indices` rows (views
        of the static output buffers, valid until the next replay). input_ids, positions: the step's device
        tensors [N] (pending ids already filled in)."""
        self.load(shape, inputs, input_ids, positions)
        self.graphs[shape].replay()
        logits = None if self.logits is None else self.logits[: len(inputs.logits_indices)]
        return self.hidden[: inputs.num_tokens], logits

    def load(self, shape: GraphShape, inputs: StepInputs, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Copy one step's inputs into the static buffers, padded to `shape`: padding tokens get slot -1,
        padding sequences no query tokens (cu_seqlens_q repeats its last value) and no KV (seq_len 0). A token
        graph's logits rows are the step's `logits_indices`, padded with row 0 (a decode graph's are every row)."""
        n, b, t, s = inputs.num_tokens, inputs.num_seqs, shape.num_tokens, shape.num_seqs
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        host = [
            np.pad(inputs.slot_mapping, (0, t - n), constant_values=-1),
            np.pad(inputs.cu_seqlens_q, (0, s - b), mode="edge"),
            np.pad(inputs.seq_lens, (0, s - b)),
            inputs.block_tables,
        ]
        if self.logits is not None and not shape.is_decode:
            host.append(np.pad(inputs.logits_indices, (0, s - len(inputs.logits_indices))))
        slot_mapping, cu_seqlens_q, seq_lens, block_tables, *logits_indices = to_device_packed(host, self.device)
        if logits_indices:
            self.logits_indices[:s] = logits_indices[0]
        self.slot_mapping[:t] = slot_mapping
        self.cu_seqlens_q[: s + 1] = cu_seqlens_q
        self.seq_lens[:s] = seq_lens
        self.block_tables[:b, : inputs.block_tables.shape[1]] = block_tables

    def close(self) -> None:
        """Drop every graph (a graph that captured NCCL collectives holds a reference on the communicator)."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
