"""Turns a scheduled batch into tensors, runs the model on one device (one TP rank), samples."""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import numpy as np
import torch

from nanovllm.config import Config
from nanovllm.engine.graph_runner import GraphRunner
from nanovllm.engine.inputs import StepInputs, build_step_inputs, num_prompt_logits, prefill_inputs, to_device, to_device_packed
from nanovllm.engine.rpc import Call, CommandReader, WorkerEnd, Workers
from nanovllm.engine.sampling_inputs import SamplingInputs
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.layers.attention import Attention, AttentionMetadata, select_backend
from nanovllm.layers.sampler import Sampler, SamplerOutput, SamplingTensors, gather_logprobs
from nanovllm.models.registry import resolve_model_class
from nanovllm.utils.loader import fill_dummy_weights, load_model
from nanovllm.utils.parallel import TPGroup, building_with, create_store

logger = logging.getLogger("nanovllm")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    """A launched step whose sampled tokens may still be on their way to the host.

    prompt_spans[i]: (first position, count) of the prompt positions whose logprobs batch row i got in
    `prompt_logprobs` (token_ids there are the prompt tokens scored), rows in batch order; empty when
    no row asked for prompt logprobs.
    """

    samples: list[bool]
    output: SamplerOutput
    host_tokens: torch.Tensor
    done: torch.cuda.Event | None
    prompt_spans: list[tuple[int, int]]
    prompt_logprobs: SamplerOutput | None = None

    def sampled(self) -> list[int | None]:
        """Wait for the step; the token drawn for each batch row (None for a partial prefill chunk)."""
        if self.done is not None:
            self.done.synchronize()
        tokens = self.host_tokens.tolist()
        if len(tokens) == len(self.samples):
            return tokens  # every row sampled (any decode step)
        rows = iter(tokens)
        return [next(rows) if samples else None for samples in self.samples]


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
    """Owns the model, the paged KV cache `[2, layers, blocks, block_size, kv_heads, head_dim]`, the
    attention backend and (on CUDA) the GraphRunner that replays every step shape it captured.

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
        if config.load_format == "dummy":
            fill_dummy_weights(self.model)
        else:
            load_model(self.model, config.model)
        self.sampler = Sampler()
        self.vocab_size = hf.vocab_size
        self.max_blocks_per_seq = (config.max_model_len + self.block_size - 1) // self.block_size
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        first = self.attention_layers[0]
        self.backend = select_backend(config.attention_backend, self.device, self.block_size, self.dtype, first.head_dim)
        for layer in self.attention_layers:
            layer.backend = self.backend
        self.kv_shape = (len(self.attention_layers), self.block_size, first.num_kv_heads, first.head_dim)
        self.overlap = self.device.type == "cuda" if config.overlap_scheduling is None else config.overlap_scheduling
        self.share_sampled = self.overlap and self.group.size > 1
        self.last_sampled = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.sampled_ids: list[int] = []  # the sequence of each row of last_sampled
        self.sampling_inputs = SamplingInputs(self.vocab_size, self._to_device)
        self.graph_runner: GraphRunner | None = None
        self.kv_cache = self._allocate_kv_cache(self._num_kv_blocks())
        if self.device.type == "cuda":
            self._warm_up_sampler()
            if not config.enforce_eager:
                self.graph_runner = GraphRunner(
                    self.model, self.backend, config.max_num_seqs, config.max_num_batched_tokens, self.max_blocks_per_seq,
                    config.max_model_len, hf.hidden_size, self.dtype, self.device,
                    vocab_size=self.vocab_size if self.group.size == 1 else None,
                )
                self.graph_runner.capture()
        self.info = RuntimeInfo(self.device, self.dtype, self.kv_cache.shape[2], self.backend.name, self.graph_runner is not None, self.overlap)

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
        self.execute(prefill_inputs(num_seqs, seq_len, self.block_size))
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

    def _warm_up_sampler(self) -> None:
        """Compile the sampling kernels (greedy, and a temperature row beside a greedy one) before any request."""
        logits = torch.zeros(2, self.vocab_size, dtype=self.dtype, device=self.device)
        for temperatures in ([0.0, 0.0], [0.0, 1.0]):
            greedy = [t == 0 for t in temperatures]
            tensors = SamplingTensors(self._to_device(np.asarray(temperatures, dtype=np.float32)), all_greedy=all(greedy), any_greedy=any(greedy))
            self.sampler(logits, tensors)
        torch.cuda.synchronize()

    # ---- inputs ---------------------------------------------------------------------------

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Build the step's host arrays from sequence state (before `Scheduler.advance`)."""
        return build_step_inputs(batch, self.block_size, self.sampled_ids, self.share_sampled)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return to_device(array, self.device)

    # ---- execution ------------------------------------------------------------------------

    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Forward pass (a graph replay where a captured shape holds the step); returns logits [S + R, V]
        on rank 0 (None on other ranks): the S sampled rows, then the R prompt-logprob rows.
        The step's host arrays reach the device in one copy (a graph's padded metadata in a second)."""
        shape = self.graph_runner and self.graph_runner.shape_for(inputs.num_tokens, inputs.num_seqs, inputs.is_decode)
        logits_indices = np.concatenate([inputs.logits_indices, inputs.prompt_logits_indices])
        host = [inputs.input_ids, inputs.positions, logits_indices, inputs.pending_rows, inputs.pending_src]
        if not shape:
            host += [inputs.cu_seqlens_q, inputs.seq_lens, inputs.slot_mapping, inputs.block_tables]
        input_ids, positions, logits_indices, pending_rows, pending_src, *metadata = to_device_packed(host, self.device)
        if num_pending := len(inputs.pending_rows):
            # PENDING input ids come from the previous step's sampled tokens, on the device (no host sync);
            # in steady decoding rows 0..k-1 take rows 0..k-1: one copy instead of two indexing kernels.
            if inputs.pending_rows[-1] == num_pending - 1 and np.array_equal(inputs.pending_src, inputs.pending_rows):
                input_ids[:num_pending] = self.last_sampled[:num_pending]
            else:
                input_ids[pending_rows] = self.last_sampled[pending_src]
        if shape:
            hidden, logits = self.graph_runner.replay(shape, inputs, input_ids, positions)
            if logits is not None:
                num_sampled = len(inputs.logits_indices)
                if num_sampled == len(logits_indices):
                    return logits
                return torch.cat([logits, self.model.compute_logits(hidden, logits_indices[num_sampled:])])
        else:
            cu_seqlens_q, seq_lens, slot_mapping, block_tables = metadata
            # max_seqlen_q is the token count, as in the graphs: kernel tiles then depend on the step's size
            # only, so the variants a run needs are those compiled at start-up.
            self.backend.begin_step(AttentionMetadata(
                cu_seqlens_q=cu_seqlens_q,
                seq_lens=seq_lens,
                slot_mapping=slot_mapping,
                block_tables=block_tables,
                max_seqlen_q=inputs.num_tokens,
                max_seqlen_k=inputs.max_seqlen_k,
                is_decode=inputs.is_decode,
            ))
            try:
                hidden = self.model(input_ids, positions)
            finally:
                self.backend.end_step()
        return self.model.compute_logits(hidden, logits_indices)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, eos_token_ids: frozenset[int]) -> StepHandle:
        """Rank 0: run one step and sample, without waiting for the device; the tokens stay on the
        device for the next step's PENDING inputs and are copied to the host behind the step."""
        inputs = self.prepare(batch)
        logits = self._execute_on_all_ranks(inputs)
        samples = inputs.samples.tolist()
        prompt_spans = [(s.num_computed_tokens, num_prompt_logits(s, s.num_computed_tokens, s.num_computed_tokens + n))
                        for s, n in zip(batch.seqs, batch.num_new_tokens)] if len(inputs.prompt_targets) else []
        prompt_logprobs = self._prompt_logprobs(batch, logits[len(inputs.logits_indices) :], inputs.prompt_targets)
        logits = logits[: len(inputs.logits_indices)]
        sampling_seqs = batch.seqs if all(samples) else [s for s, sampled in zip(batch.seqs, samples) if sampled]
        output = self.sampler(logits, self.sampling_inputs.build(sampling_seqs, eos_token_ids, self.last_sampled, self.sampled_ids))
        if inputs.share_sampled:
            self.group.broadcast(output.token_ids)
        self.last_sampled = output.token_ids
        self.sampled_ids = [seq.seq_id for seq in sampling_seqs]
        if self.device.type != "cuda":
            return StepHandle(samples, output, output.token_ids, None, prompt_spans, prompt_logprobs)
        host_tokens = torch.empty(output.token_ids.shape, dtype=output.token_ids.dtype, pin_memory=True)
        host_tokens.copy_(output.token_ids, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return StepHandle(samples, output, host_tokens, done, prompt_spans, prompt_logprobs)

    def _prompt_logprobs(self, batch: ScheduledBatch, logits: torch.Tensor, targets: np.ndarray) -> SamplerOutput | None:
        """Raw-logit logprobs of the prompt tokens `targets` [R] from their rows' logits [R, V], with the
        top k (the largest prompt_logprobs in the batch); None when no row asked."""
        if not len(targets):
            return None
        k = max(s.sampling_params.prompt_logprobs for s in batch.seqs if s.computes_prompt_logprobs)
        return gather_logprobs(logits.float().log_softmax(-1), self._to_device(targets), k)

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
        if self.graph_runner is not None:
            self.graph_runner.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.group.close()


def run_worker(config: Config, port: int, rank: int, end: WorkerEnd) -> None:
    """Main function of tensor-parallel rank `rank` (a spawned process): build this rank's
    ModelRunner, report ready, then run rank 0's commands until `Shutdown` or rank 0 is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process of the terminal; rank 0 handles it
    if resolve_device(config, rank).type == "cpu":
        # The ranks share the host's cores; more threads would spin against each other.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    channel = CommandReader(end)
    channel.acknowledge()  # this process runs: rank 0 may now wait for it to join the group
    runner = ModelRunner(config, rank, create_store(config.tensor_parallel_size, port))
    try:
        channel.acknowledge()
        with torch.inference_mode():
            while isinstance(command := channel.receive(), Call):
                getattr(runner, command.method)(*command.args)
    finally:
        runner.close()
        channel.close()
