"""The step loop: tokenize, schedule, run the model, postprocess, detokenize, route outputs to their requests."""
from __future__ import annotations

import gc
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence as SequenceType
from itertools import count

import torch
from tqdm.auto import tqdm

from nanovllm.config import Config
from nanovllm.engine.detokenizer import add_all, find_stop
from nanovllm.engine.model_runner import ModelRunner, StepHandle, run_worker
from nanovllm.engine.requests import Completion, LogprobEntries, Prompt, Request, load_tokenizer, validate_requests
from nanovllm.engine.rpc import Workers
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import SamplerOutput
from nanovllm.outputs import RequestOutput, StreamChunk
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.generation_config import eos_token_ids, read_generation_config, sampling_defaults
from nanovllm.utils.parallel import create_store


def _shut_down_tp(runner: ModelRunner, workers: Workers | None) -> None:
    """Release the process group on every rank at once (NCCL's teardown is collective), then stop the workers;
    give the objects frozen at start-up back to the collector."""
    gc.unfreeze()
    if workers is not None:
        workers.request_shutdown()
    runner.close()
    if workers is not None:
        workers.close()


class LLMEngine:
    """One model on one device (or a tensor-parallel group) serving any number of requests.

    Every request gets a `request_id`; its outputs go to it alone, whichever call drives the step
    loop: two streams and a generate used together each get exactly their own tokens. Calls from
    several threads are serialized step by step by one lock (each step is one batch for all of
    them). `exit()` gives the device memory back; the engine then refuses new work.
    """

    def __init__(self, model: str, **kwargs: object) -> None:
        self.config = Config.from_kwargs(model, **kwargs)
        self.tokenizer = None if self.config.skip_tokenizer_init else load_tokenizer(self.config.model)
        tokenizer_eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        generation_config = read_generation_config(self.config.model)
        self.eos_token_ids = eos_token_ids(generation_config, tokenizer_eos, getattr(self.config.hf_config, "eos_token_id", None))
        self.default_sampling_params = SamplingParams(**sampling_defaults(generation_config))
        self.model_runner = self._start_model_runners()
        # Runs once: on exit(), when the engine is garbage-collected, or at interpreter exit.
        # It holds what must be released, never the engine itself.
        self._shut_down = weakref.finalize(self, _shut_down_tp, self.model_runner, self.workers)
        self.runtime = self.model_runner.info
        self.scheduler = Scheduler(self.config, self.runtime.num_kvcache_blocks, self.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._request_ids = count()
        self._in_flight: tuple[ScheduledBatch, StepHandle, list[Sequence]] | None = None
        self._lock = threading.RLock()
        self._closed = False
        # The process now holds ~400k long-lived objects (model, tokenizer, libraries). Python's full
        # collection scans them all once the requests' objects pile up: a 0.5 s pause mid-run (measured
        # on the CPU box, short workload). Frozen, they are never scanned; _shut_down_tp unfreezes them.
        gc.collect()
        gc.freeze()

    def _start_model_runners(self) -> ModelRunner:
        """Rank 0's runner, here; with tensor_parallel_size > 1 also ranks 1..N-1 in spawned processes."""
        tp = self.config.tensor_parallel_size
        self.workers: Workers | None = None
        if tp == 1:
            return ModelRunner(self.config)
        store = create_store(tp)
        self.workers = Workers(tp, run_worker, (self.config, store.port))
        try:
            self.workers.wait_spawned()
            runner = ModelRunner(self.config, 0, store, self.workers)
            self.workers.wait_started()
        except BaseException:
            self.workers.abort("the engine failed to start")
            raise
        return runner

    def exit(self) -> None:
        """Stop the tensor-parallel workers; release the model, the KV cache, the CUDA graphs and the
        process group, and give the device memory back to the process. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            on_cuda = self.runtime.device.type == "cuda"
            self._shut_down()
            del self.model_runner
            self._in_flight = None
            for request_id in list(self.requests):
                self.abort(request_id)
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LLM has been shut down by exit(); create a new LLM to generate again")

    # ---- requests -------------------------------------------------------------------------

    def validate(self, prompts: object, sampling_params: object) -> list[tuple[Prompt, list[int], SamplingParams]]:
        """Tokenize and check every request without queueing any, so a bad one leaves the engine untouched
        (`requests.validate_requests`: what it accepts and raises). RuntimeError once the engine is shut down."""
        self._check_open()
        return validate_requests(prompts, sampling_params, self.default_sampling_params, self.config, self.tokenizer)

    def _enqueue(self, prompt: Prompt, token_ids: list[int], params: SamplingParams, index: int, stream: bool,
                 outbox: deque[StreamChunk] | None = None) -> Request:
        """Queue one validated request: its n sequences. With the prefix cache on, sequences 2..n wait
        until the first has computed the prompt, then find its blocks cached (the prompt is prefilled once).
        `outbox`: where its chunks go (one per generate/stream call, shared by the call's requests)."""
        request_id = str(next(self._request_ids))
        seqs = [Sequence(token_ids, params, self.config.kvcache_block_size, request_id, i) for i in range(params.n)]
        completions = [Completion(seq, self.tokenizer) for seq in seqs]
        request = Request(request_id, index, prompt if isinstance(prompt, str) else None, token_ids, params, stream, completions,
                          outbox=deque() if outbox is None else outbox)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        self.requests[request_id] = request
        hold = self.config.enable_prefix_caching and params.n > 1
        request.held = seqs[1:] if hold else []
        for seq in seqs[:1] if hold else seqs:
            self.scheduler.add(seq)
        return request

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None, index: int = 0, stream: bool = False) -> Sequence:
        """Validate, tokenize and queue one request; returns its first sequence (`seq.request_id` names
        the request; `stream=True` makes every step emit a chunk for it, else only its end does). The engine
        keeps the request (its output: `requests[request_id].output()`) until `abort(request_id)`."""
        with self._lock:
            [(prompt, token_ids, params)] = self.validate([prompt], sampling_params)
            return self._enqueue(prompt, token_ids, params, index, stream).completions[0].seq

    def abort(self, request: str | Sequence) -> None:
        """Drop a request (by id, or by one of its sequences), freeing its blocks if it has not finished;
        an unknown id is a no-op."""
        with self._lock:
            request_id = request.request_id if isinstance(request, Sequence) else request
            state = self.requests.pop(request_id, None)
            if state is not None:
                for completion in state.completions:
                    self.scheduler.abort(completion.seq)
                state.held = []

    # ---- the step loop --------------------------------------------------------------------

    def step(self) -> tuple[list[StreamChunk], int, int]:
        """One scheduler step. Returns the streamed chunks / finished completions, and the (prefill,
        decode) token counts of the step launched (none when no request is live).

        With overlap scheduling the step launched here is completed by the next call: the host
        schedules and launches step N+1 before it reads step N's tokens, so the device never waits
        for the host's bookkeeping. Without it, each step is completed before returning.
        """
        with self._lock:
            self._check_open()
            if self.is_finished():
                return [], 0, 0
            batch = self.scheduler.schedule()
            if not batch.seqs and self._in_flight is None:
                raise RuntimeError("scheduler could not schedule any sequence (KV pool smaller than one request?)")
            launched = None
            if batch.seqs:
                handle = self.model_runner.launch(batch, self.eos_token_ids)
                launched = (batch, handle, self.scheduler.advance(batch))
            if self.runtime.overlap:
                done, self._in_flight = self._in_flight, launched
            else:
                done = launched
            chunks = self._complete(*done) if done is not None else []
            num_decode = batch.num_tokens if batch.is_decode else 0
            return chunks, batch.num_tokens - num_decode, num_decode

    def _complete(self, batch: ScheduledBatch, handle: StepHandle, starting: list[Sequence]) -> list[StreamChunk]:
        """Read a launched step's tokens, resolve them in the scheduler, detokenize and emit. `starting`:
        the sequences whose first token the step sampled."""
        sampled = handle.sampled()
        for seq in starting:
            if (request := self.requests.get(seq.request_id)) is not None:
                request.num_cached_tokens += seq.num_cached_tokens
        self._record_logprobs(batch.seqs, sampled, handle.output)
        self._record_prompt_logprobs(batch.seqs, handle)
        emitting = []
        for seq in self.scheduler.resolve(batch, sampled):
            request = self.requests.get(seq.request_id)
            if request is None:
                continue
            if request.held and seq.completion_index == 0:
                for sibling in request.held:
                    self.scheduler.add(sibling)
                request.held = []
            # A generate() completion without stop strings has nothing to detokenize or emit until it ends.
            if request.stream or seq.sampling_params.stop or seq.is_finished:
                emitting.append((request, request.completions[seq.completion_index]))
        new_texts = self._detokenize([completion for _, completion in emitting])
        chunks = []
        for (request, completion), new_text in zip(emitting, new_texts):
            chunk = self._emit(request, completion, new_text)
            if chunk is not None:
                chunks.append(chunk)
        return chunks

    def _detokenize(self, completions: list[Completion]) -> list[str]:
        """Each completion's new text from its new tokens, decoded in one batch ("" without a tokenizer)."""
        if self.tokenizer is None:
            return [""] * len(completions)
        return add_all(
            [c.detokenizer for c in completions],
            [c.seq.completion_token_ids_from(len(c.detokenizer.token_ids)) for c in completions],
            [c.seq.is_finished for c in completions],
        )

    def _record_logprobs(self, seqs: list[Sequence], sampled: list[int | None], output: SamplerOutput) -> None:
        """Append {token id: Logprob} (top-n plus the sampled token) for each sequence that sampled and asked for logprobs."""
        if output.sampled_logprobs is None:
            return
        rows = [seq for seq, token in zip(seqs, sampled) if token is not None]
        entries = LogprobEntries(output, self._token_text)
        for row, seq in enumerate(rows):
            n = seq.sampling_params.logprobs
            request = self.requests.get(seq.request_id)
            if n is None or request is None:
                continue
            completion = request.completions[seq.completion_index]
            completion.logprobs.append(entries.entry(row, n))
            completion.cumulative_logprob += entries.chosen_logprobs[row]

    def _record_prompt_logprobs(self, seqs: list[Sequence], handle: StepHandle) -> None:
        """Append the step's prompt-logprob entries to their requests, position by position. A position
        already recorded (computed again after a preemption) keeps its first entry."""
        if handle.prompt_logprobs is None:
            return
        entries = LogprobEntries(handle.prompt_logprobs, self._token_text)
        row = 0
        for seq, (start, num_positions) in zip(seqs, handle.prompt_spans):
            request = self.requests.get(seq.request_id)
            for position in range(start, start + num_positions):
                if request is not None and position + 1 == len(request.prompt_logprobs):
                    request.prompt_logprobs.append(entries.entry(row, seq.sampling_params.prompt_logprobs))
                row += 1

    def _token_text(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _emit(self, request: Request, completion: Completion, new_text: str) -> StreamChunk | None:
        """Apply stop strings to a completion that got a token and `new_text` (its text's new end); build its
        stream chunk.

        A stream holds back the last len(longest stop string) - 1 characters until the completion
        ends, so a stop string never leaks into it.
        """
        seq = completion.seq
        params = seq.sampling_params
        finished = seq.is_finished
        detok = completion.detokenizer
        if detok is not None and params.stop and seq.num_output_tokens >= params.min_tokens:
            hit = find_stop(detok.text, params.stop, params.include_stop_str_in_output, len(detok.text) - len(new_text))
            if hit is not None:
                detok.text, completion.stop_reason = hit
                self.scheduler.finish(seq, "stop")
                finished = True
        if seq.finish_reason == "stop" and completion.stop_reason is None and seq.completion_token_ids[-1] in params.stop_token_ids:
            completion.stop_reason = seq.completion_token_ids[-1]
        if not request.stream:
            return StreamChunk(request.index, "", [], True, seq.finish_reason, request.request_id, completion.index) if finished else None
        text = completion.text
        held_back = max(map(len, params.stop)) - 1 if params.stop else 0
        visible = len(text) if finished else max(completion.num_streamed_chars, len(text) - held_back)
        chunk = StreamChunk(
            request.index,
            text[completion.num_streamed_chars : visible],
            seq.completion_token_ids_from(completion.num_streamed_tokens),
            finished,
            seq.finish_reason,
            request.request_id,
            completion.index,
        )
        completion.num_streamed_chars = visible
        completion.num_streamed_tokens = seq.num_output_tokens
        return chunk

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and self._in_flight is None

    # ---- batch APIs -----------------------------------------------------------------------

    def _add_all(self, prompts: SequenceType[Prompt], sampling_params: SamplingParams | SequenceType[SamplingParams] | None, stream: bool) -> list[Request]:
        """Validate every request, then queue them all."""
        with self._lock:
            requests, outbox = self.validate(prompts, sampling_params), deque()
            return [self._enqueue(prompt, token_ids, params, i, stream, outbox) for i, (prompt, token_ids, params) in enumerate(requests)]

    def _step_and_route(self) -> tuple[int, int, float]:
        """One step; each chunk goes to its request's outbox. Returns (prefill tokens, decode tokens, seconds)."""
        start = time.perf_counter()
        chunks, num_prefill, num_decode = self.step()
        for chunk in chunks:
            if (owner := self.requests.get(chunk.request_id)) is not None:
                owner.outbox.append(chunk)
        return num_prefill, num_decode, time.perf_counter() - start

    def _run(self, requests: list[Request], use_tqdm: bool) -> Iterator[StreamChunk]:
        """Step until `requests` (one call's, sharing one outbox) are done, yielding their chunks (other
        calls' chunks wait in their own outboxes); abort the unfinished ones and forget them all at the end.
        Work per step is proportional to the step's chunks, not to the call's requests: a request leaves
        `unfinished` with its last finished chunk (or, should none come, when the engine has nothing left)."""
        bar = tqdm(total=sum(r.params.n for r in requests), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        outbox = requests[0].outbox if requests else deque()
        unfinished = {request.request_id: request for request in requests}
        prefill_tps = decode_tps = 0.0
        try:
            while True:
                with self._lock:
                    self._check_open()
                    mine = list(outbox)
                    outbox.clear()
                    for chunk in mine:
                        if chunk.finished and (request := unfinished.get(chunk.request_id)) is not None and request.finished:
                            del unfinished[chunk.request_id]
                    if not mine:
                        if unfinished and self.is_finished():
                            unfinished = {rid: request for rid, request in unfinished.items() if not request.finished}
                        if not unfinished:
                            if self.scheduler.is_finished() and self._in_flight is not None:
                                self._step_and_route()  # complete the last speculative step: nobody else will
                            return
                        num_prefill, num_decode, elapsed = self._step_and_route()
                        if num_prefill:
                            prefill_tps = num_prefill / elapsed
                        if num_decode:
                            decode_tps = num_decode / elapsed
                        if use_tqdm:
                            bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s")
                bar.update(sum(chunk.finished for chunk in mine))
                yield from mine
        finally:
            bar.close()
            for request in requests:
                self.abort(request.request_id)

    def generate(self, prompts: SequenceType[Prompt], sampling_params: SamplingParams | SequenceType[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run prompts to completion; return one RequestOutput per prompt, in input order
        (`out["text"]`, `out["token_ids"]`, `out["finish_reason"]` read its first completion).

        Without sampling_params, the checkpoint's generation_config.json defaults apply. Every
        request is validated before any work; a ValueError / TypeError names the bad value and
        leaves the engine as it was.
        """
        requests = self._add_all(prompts, sampling_params, stream=False)
        for _ in self._run(requests, use_tqdm):
            pass
        return [request.output() for request in requests]

    def stream(self, prompts: SequenceType[Prompt], sampling_params: SamplingParams | SequenceType[SamplingParams] | None = None) -> Iterator[StreamChunk]:
        """Validate every request now, then, as the iterator is consumed, yield StreamChunks as tokens are produced.

        `chunk.index` is the prompt's position, `chunk.completion_index` its continuation (n > 1),
        `chunk.request_id` names the request. The texts of one completion's chunks concatenate to
        its `generate` text, and its last chunk has finished=True and a finish_reason. Closing the
        iterator early aborts the unfinished requests. Other streams and generate calls may run
        meanwhile: each gets exactly its own chunks.
        """
        return self._stream(self.validate(prompts, sampling_params))

    def _stream(self, validated: list[tuple[Prompt, list[int], SamplingParams]]) -> Iterator[StreamChunk]:
        """Queue validated requests when first iterated."""
        with self._lock:
            outbox = deque()
            requests = [self._enqueue(prompt, token_ids, params, i, True, outbox) for i, (prompt, token_ids, params) in enumerate(validated)]
        yield from self._run(requests, use_tqdm=False)

