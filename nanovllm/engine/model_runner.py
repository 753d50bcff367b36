"""Turns a scheduled batch into tensors, runs the model on one device (one TP rank), samples."""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import numpy as np
import torch

from nanovllm.config import Config
from nanovllm.engine.rpc import Call, CommandReader, WorkerEnd, Workers
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import PENDING, Sequence
from nanovllm.layers.attention import Attention, select_backend
from nanovllm.layers.sampler import Sampler, SamplerOutput, SamplingTensors
from nanovllm.models.registry import resolve_model_class
from nanovllm.utils.context import Context, reset_context, set_context
from nanovllm.utils.loader import load_model
from nanovllm.utils.parallel import TPGroup, building_with, create_store

logger = logging.getLogger("nanovllm")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class StepInputs:
    """Host arrays for one forward pass: the whole message a TP worker needs (B seqs, N tokens, S sampled).

    input_ids/positions int64 [N]; slot_mapping int32 [N]; cu_seqlens_q int32 [B+1];
    seq_lens int32 [B]; block_tables int32 [B, W] padded with -1; logits_indices int64 [S].
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
    logits_indices: np.ndarray
    max_seqlen_q: int
    max_seqlen_k: int
    is_decode: bool
    pending_rows: np.ndarray
    pending_src: np.ndarray
    share_sampled: bool = False


@dataclass(frozen=True)
class RuntimeInfo:
    """What the runner resolved at start-up (Config stays as the user gave it)."""

    device: torch.device
    dtype: torch.dtype
    num_kvcache_blocks: int
    attention_backend: str
    cuda_graphs: bool
    overlap: bool


@dataclass
class StepHandle:
    """A launched step whose sampled tokens may still be on their way to the host."""

    samples: list[bool]
    output: SamplerOutput
    host_tokens: torch.Tensor
    done: torch.cuda.Event | None

    def sampled(self) -> list[int | None]:
        """Wait for the step; the token drawn for each batch row (None for a partial prefill chunk)."""
        if self.done is not None:
            self.done.synchronize()
        tokens = iter(self.host_tokens.tolist())
        return [next(tokens) if samples else None for samples in self.samples]


def resolve_device(config: Config, rank: int) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch.cuda.is_available() is False")
        if config.tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} needs as many GPUs, found {torch.cuda.device_count()}")
        return torch.device("cuda", rank)
    return torch.device("cpu")


def resolve_dtype(config: Config, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if device.type != "cuda":
        return torch.float32
    checkpoint = getattr(config.hf_config, "dtype", None) or getattr(config.hf_config, "torch_dtype", None) or "bfloat16"
    return checkpoint if isinstance(checkpoint, torch.dtype) else _DTYPES[str(checkpoint).removeprefix("torch.")]


class ModelRunner:
    """Owns the model, the paged KV cache `[2, layers, blocks, block_size, kv_heads, head_dim]` and CUDA graphs.

    With tensor parallelism every rank has one, joined by `store`; rank 0's also gets the `workers`
    (ranks 1..N-1, other processes) and starts each step on them before running it itself.
    """

    def __init__(self, config: Config, rank: int = 0, store: torch.distributed.Store | None = None, workers: Workers | None = None) -> None:
        self.config = config
        self.rank = rank
        self.workers = workers
        self.block_size = config.kvcache_block_size
        self.device = resolve_device(config, rank)
        self.dtype = resolve_dtype(config, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.group = TPGroup() if store is None else TPGroup.join(store, rank, config.tensor_parallel_size, self.device)
        hf = config.hf_config
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with self.device, building_with(self.group):
                self.model = resolve_model_class(hf)(hf, config.max_model_len)
        finally:
            torch.set_default_dtype(default_dtype)
        load_model(self.model, config.model)
        self.sampler = Sampler()
        self.vocab_size = hf.vocab_size
        self.max_blocks_per_seq = (config.max_model_len + self.block_size - 1) // self.block_size
        self.backend = select_backend(config.attention_backend, self.device, self.block_size)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for layer in self.attention_layers:
            layer.backend = self.backend
        first = self.attention_layers[0]
        self.kv_shape = (len(self.attention_layers), self.block_size, first.num_kv_heads, first.head_dim)
        self.overlap = self.device.type == "cuda" if config.overlap_scheduling is None else config.overlap_scheduling
        self.share_sampled = self.overlap and self.group.size > 1
        self.last_sampled = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.sample_rows: dict[int, int] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.kv_cache = self._allocate_kv_cache(self._num_kv_blocks())
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_cuda_graphs()
        self.info = RuntimeInfo(self.device, self.dtype, self.kv_cache.shape[2], self.backend.name, bool(self.graphs), self.overlap)

    # ---- KV cache -------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        layers, block_size, kv_heads, head_dim = self.kv_shape
        return 2 * layers * block_size * kv_heads * head_dim * self.dtype.itemsize

    def _allocate_kv_cache(self, num_blocks: int) -> torch.Tensor:
        layers, block_size, kv_heads, head_dim = self.kv_shape
        kv_cache = torch.empty(2, layers, num_blocks, block_size, kv_heads, head_dim, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attention_layers):
            layer.k_cache, layer.v_cache = kv_cache[0, i], kv_cache[1, i]
        return kv_cache

    def _num_kv_blocks(self) -> int:
        """Blocks in the pool: the user's count, else a CPU memory budget, else nano-vLLM's GPU formula."""
        config = self.config
        if config.num_kvcache_blocks > 0:
            num_blocks = config.num_kvcache_blocks
        elif self.device.type != "cuda":
            num_blocks = int(config.cpu_kvcache_space_gib * 2**30) // self.block_bytes
        else:
            num_blocks = self._profile_gpu_blocks()
        if num_blocks < self.max_blocks_per_seq:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens, fewer than the "
                f"{self.max_blocks_per_seq} one max_model_len={config.max_model_len} request needs; "
                "lower max_model_len or give the cache more memory"
            )
        return num_blocks

    def _profile_gpu_blocks(self) -> int:
        """Run the largest prefill against a temporary cache, then size the pool from what is left."""
        config = self.config
        num_seqs = max(1, min(config.max_num_batched_tokens // config.max_model_len, config.max_num_seqs))
        seq_len = min(config.max_model_len, config.max_num_batched_tokens)
        temp_blocks = num_seqs * ((seq_len + self.block_size - 1) // self.block_size)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.kv_cache = self._allocate_kv_cache(temp_blocks)
        self.execute(self._warmup_inputs(num_seqs, seq_len))
        torch.cuda.synchronize()
        self.kv_cache = self._allocate_kv_cache(0)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        peak = stats["allocated_bytes.all.peak"] - temp_blocks * self.block_bytes
        available = total * config.gpu_memory_utilization - (total - free) - peak + stats["allocated_bytes.all.current"]
        num_blocks = torch.tensor([int(available) // self.block_bytes], device=self.device)
        if self.group.size > 1:
            self.group.all_reduce(num_blocks, op=torch.distributed.ReduceOp.MIN)
        return int(num_blocks.item())

    def _warmup_inputs(self, num_seqs: int, seq_len: int) -> StepInputs:
        blocks_per_seq = (seq_len + self.block_size - 1) // self.block_size
        block_tables = np.arange(num_seqs * blocks_per_seq, dtype=np.int32).reshape(num_seqs, blocks_per_seq)
        positions = np.tile(np.arange(seq_len, dtype=np.int64), num_seqs)
        return StepInputs(
            input_ids=np.zeros(num_seqs * seq_len, dtype=np.int64),
            positions=positions,
            slot_mapping=(np.repeat(np.arange(num_seqs), seq_len) * blocks_per_seq * self.block_size + positions).astype(np.int32),
            cu_seqlens_q=np.arange(0, (num_seqs + 1) * seq_len, seq_len, dtype=np.int32),
            seq_lens=np.full(num_seqs, seq_len, dtype=np.int32),
            block_tables=block_tables,
            logits_indices=np.arange(seq_len - 1, num_seqs * seq_len, seq_len, dtype=np.int64),
            max_seqlen_q=seq_len,
            max_seqlen_k=seq_len,
            is_decode=False,
            pending_rows=np.zeros(0, dtype=np.int64),
            pending_src=np.zeros(0, dtype=np.int64),
        )

    # ---- inputs ---------------------------------------------------------------------------

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Build the step's host arrays from sequence state (before `Scheduler.advance`)."""
        bs = self.block_size
        num_seqs = len(batch.seqs)
        block_tables = np.full((num_seqs, max(len(s.block_table) for s in batch.seqs)), -1, dtype=np.int32)
        for i, seq in enumerate(batch.seqs):
            block_tables[i, : len(seq.block_table)] = seq.block_table
        starts = np.fromiter((s.num_computed_tokens for s in batch.seqs), dtype=np.int64, count=num_seqs)
        counts = np.asarray(batch.num_new_tokens, dtype=np.int64)
        ends = starts + counts
        cu_seqlens_q = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(counts, out=cu_seqlens_q[1:])
        if batch.is_decode:
            input_ids = np.fromiter((s.token_ids[e - 1] for s, e in zip(batch.seqs, ends.tolist())), dtype=np.int64, count=num_seqs)
            positions = starts
        else:
            input_ids = np.concatenate([np.asarray(s.token_ids[b:e], dtype=np.int64) for s, b, e in zip(batch.seqs, starts.tolist(), ends.tolist())])
            positions = np.concatenate([np.arange(b, e, dtype=np.int64) for b, e in zip(starts.tolist(), ends.tolist())])
        seq_index = np.repeat(np.arange(num_seqs), counts)
        slot_mapping = (block_tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs).astype(np.int32)
        samples = np.fromiter((e == s.num_tokens for s, e in zip(batch.seqs, ends.tolist())), dtype=bool, count=num_seqs)
        pending_rows = np.flatnonzero(input_ids == PENDING)
        pending_src = np.fromiter((self.sample_rows[batch.seqs[i].seq_id] for i in seq_index[pending_rows].tolist()), dtype=np.int64, count=len(pending_rows))
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            cu_seqlens_q=cu_seqlens_q,
            seq_lens=ends.astype(np.int32),
            block_tables=block_tables,
            logits_indices=(cu_seqlens_q[1:][samples] - 1).astype(np.int64),
            max_seqlen_q=int(counts.max()),
            max_seqlen_k=int(ends.max()),
            is_decode=batch.is_decode,
            pending_rows=pending_rows,
            pending_src=pending_src,
            share_sampled=self.share_sampled,
        )

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """Host array -> device tensor through pinned memory, without waiting for the device."""
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def sampling_tensors(self, seqs: list[Sequence], eos_token_ids: frozenset[int]) -> SamplingTensors:
        """Per-row sampling parameters for the sequences that sample this step (filters only where some row
        uses them), copied without blocking the host (a blocking copy would wait for the step in flight)."""
        params = [s.sampling_params for s in seqs]

        def device_array(values: list, dtype: type) -> torch.Tensor:
            return self._to_device(np.asarray(values, dtype=dtype))

        temperatures = device_array([0.0 if p.greedy else p.temperature for p in params], np.float32)
        greedy = [p.greedy for p in params]
        tensors = SamplingTensors(temperatures, all_greedy=all(greedy), any_greedy=any(greedy))
        if not tensors.all_greedy:
            if any(p.top_k > 0 for p in params):
                tensors.top_k = device_array([p.top_k if p.top_k > 0 else self.vocab_size for p in params], np.int64)
            if any(p.top_p < 1 for p in params):
                tensors.top_p = device_array([p.top_p for p in params], np.float32)
            if any(p.min_p > 0 for p in params):
                tensors.min_p = device_array([p.min_p for p in params], np.float32)
            seeded = [i for i, p in enumerate(params) if p.seed is not None and not p.greedy]
            if seeded:
                tensors.seed_rows = device_array(seeded, np.int64)
                tensors.seeds = device_array([params[i].seed for i in seeded], np.int64)
                tensors.positions = device_array([seqs[i].num_tokens for i in seeded], np.int64)
        # Below min_tokens, the EOS ids and the stop tokens cannot be sampled.
        banned = [
            (row, token)
            for row, (seq, p) in enumerate(zip(seqs, params))
            if seq.num_completion_tokens < p.min_tokens
            for token in ([] if p.ignore_eos else sorted(eos_token_ids)) + p.stop_token_ids
        ]
        if banned:
            tensors.banned = device_array(banned, np.int64).T
        requested = [p.logprobs for p in params if p.logprobs is not None]
        tensors.max_logprobs = max(requested) if requested else -1
        return tensors

    # ---- execution ------------------------------------------------------------------------

    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Forward pass; returns logits [S, V] for the sampled rows on rank 0 (None on other ranks)."""
        graph_bs = self._graph_batch_size(inputs)
        if graph_bs:
            hidden = self._replay(inputs, graph_bs)
        else:
            set_context(Context(
                is_decode=inputs.is_decode,
                cu_seqlens_q=self._to_device(inputs.cu_seqlens_q),
                seq_lens=self._to_device(inputs.seq_lens),
                slot_mapping=self._to_device(inputs.slot_mapping),
                block_tables=self._to_device(inputs.block_tables),
                max_seqlen_q=inputs.max_seqlen_q,
                max_seqlen_k=inputs.max_seqlen_k,
            ))
            hidden = self.model(self._input_ids(inputs, self._to_device(inputs.input_ids)), self._to_device(inputs.positions))
        reset_context()
        return self.model.compute_logits(hidden, self._to_device(inputs.logits_indices))

    def _input_ids(self, inputs: StepInputs, input_ids: torch.Tensor) -> torch.Tensor:
        """Fill PENDING input ids from the previous step's sampled tokens, on the device (no host sync)."""
        if len(inputs.pending_rows):
            input_ids[self._to_device(inputs.pending_rows)] = self.last_sampled[self._to_device(inputs.pending_src)]
        return input_ids

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, eos_token_ids: frozenset[int]) -> StepHandle:
        """Rank 0: run one step and sample, without waiting for the device; the tokens stay on the
        device for the next step's PENDING inputs and are copied to the host behind the step."""
        inputs = self.prepare(batch)
        logits = self._execute_on_all_ranks(inputs)
        samples = [s.num_computed_tokens + n == s.num_tokens for s, n in zip(batch.seqs, batch.num_new_tokens)]
        sampling_seqs = [s for s, sampled in zip(batch.seqs, samples) if sampled]
        output = self.sampler(logits, self.sampling_tensors(sampling_seqs, eos_token_ids))
        if inputs.share_sampled:
            self.group.broadcast(output.token_ids)
        self.last_sampled = output.token_ids
        self.sample_rows = {seq.seq_id: row for row, seq in enumerate(sampling_seqs)}
        if self.device.type != "cuda":
            return StepHandle(samples, output, output.token_ids, None)
        host_tokens = torch.empty(output.token_ids.shape, dtype=output.token_ids.dtype, pin_memory=True)
        host_tokens.copy_(output.token_ids, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return StepHandle(samples, output, host_tokens, done)

    def worker_step(self, inputs: StepInputs) -> None:
        """A tensor-parallel worker's step: the forward pass, then rank 0's sampled tokens if shared."""
        self.execute(inputs)
        if inputs.share_sampled:
            self.last_sampled = torch.empty(len(inputs.logits_indices), dtype=torch.int64, device=self.device)
            self.group.broadcast(self.last_sampled)

    def _execute_on_all_ranks(self, inputs: StepInputs) -> torch.Tensor:
        """Rank 0: start the step on the tensor-parallel workers, then run it here."""
        if self.workers is None:
            return self.execute(inputs)
        self.workers.call("worker_step", inputs)
        try:
            return self.execute(inputs)
        except BaseException as exc:
            # The workers may be blocked in a collective this rank never reached: they cannot be brought back in step.
            self.workers.abort(f"rank 0 failed during a tensor-parallel step ({exc!r})")
            raise

    def close(self) -> None:
        """Release this rank's process group (its connections and, on rank 0, the store's port).

        The CUDA graphs go first: a graph that captured NCCL collectives holds a reference on the
        communicator, and NCCL's teardown waits for every such reference to be dropped.
        """
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.group.close()

    # ---- CUDA graphs ------------------------------------------------------------------------

    def _graph_batch_size(self, inputs: StepInputs) -> int:
        if not self.graphs or not inputs.is_decode:
            return 0
        num_seqs = len(inputs.seq_lens)
        return next((bs for bs in self.graph_sizes if bs >= num_seqs), 0)

    @torch.inference_mode()
    def _capture_cuda_graphs(self) -> None:
        """Capture decode steps for batch sizes 1, 2, 4, 8, 16, 32, ... up to min(max_num_seqs, 512)."""
        max_bs = min(self.config.max_num_seqs, 512)
        self.graph_sizes = [bs for bs in (1, 2, 4, 8) if bs <= max_bs] + list(range(16, max_bs + 1, 16))
        if self.graph_sizes[-1] != max_bs:
            self.graph_sizes.append(max_bs)
        device, width = self.device, self.max_blocks_per_seq
        hidden_size = self.config.hf_config.hidden_size
        self.graph_vars = {
            "input_ids": torch.zeros(max_bs, dtype=torch.int64, device=device),
            "positions": torch.zeros(max_bs, dtype=torch.int64, device=device),
            "slot_mapping": torch.full((max_bs,), -1, dtype=torch.int32, device=device),
            "seq_lens": torch.zeros(max_bs, dtype=torch.int32, device=device),
            "block_tables": torch.zeros(max_bs, width, dtype=torch.int32, device=device),
            "cu_seqlens_q": torch.arange(max_bs + 1, dtype=torch.int32, device=device),
            "hidden": torch.zeros(max_bs, hidden_size, dtype=self.dtype, device=device),
        }
        v = self.graph_vars
        pool = None
        for bs in reversed(self.graph_sizes):
            graph = torch.cuda.CUDAGraph()
            set_context(Context(True, v["cu_seqlens_q"][: bs + 1], v["seq_lens"][:bs], v["slot_mapping"][:bs], v["block_tables"][:bs], 1, self.config.max_model_len))
            v["hidden"][:bs] = self.model(v["input_ids"][:bs], v["positions"][:bs])
            with torch.cuda.graph(graph, pool):
                v["hidden"][:bs] = self.model(v["input_ids"][:bs], v["positions"][:bs])
            pool = pool or graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()
        reset_context()

    def _replay(self, inputs: StepInputs, graph_bs: int) -> torch.Tensor:
        v = self.graph_vars
        n = len(inputs.seq_lens)
        v["input_ids"][:n] = self._to_device(inputs.input_ids)
        self._input_ids(inputs, v["input_ids"][:n])
        v["positions"][:n] = self._to_device(inputs.positions)
        v["slot_mapping"][n:graph_bs] = -1
        v["slot_mapping"][:n] = self._to_device(inputs.slot_mapping)
        v["seq_lens"][n:graph_bs] = 0
        v["seq_lens"][:n] = self._to_device(inputs.seq_lens)
        width = inputs.block_tables.shape[1]
        v["block_tables"][:n, :width] = self._to_device(inputs.block_tables)
        self.graphs[graph_bs].replay()
        return v["hidden"][:n]


def run_worker(config: Config, port: int, rank: int, end: WorkerEnd) -> None:
    """Main function of tensor-parallel rank `rank` (a spawned process): build this rank's
    ModelRunner, report ready, then run rank 0's commands until `Shutdown` or rank 0 is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process of the terminal; rank 0 handles it
    if resolve_device(config, rank).type == "cpu":
        # The ranks share the host's cores; more threads would spin against each other.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    channel = CommandReader(end)
    runner = ModelRunner(config, rank, create_store(config.tensor_parallel_size, port))
    try:
        channel.acknowledge()
        with torch.inference_mode():
            while isinstance(command := channel.receive(), Call):
                getattr(runner, command.method)(*command.args)
    finally:
        runner.close()
        channel.close()
