"""The step loop: tokenize, schedule, run the model, postprocess, detokenize."""
from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Sequence as SequenceType
from dataclasses import dataclass, field
from numbers import Integral

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm.config import Config
from nanovllm.engine.detokenizer import IncrementalDetokenizer, find_stop
from nanovllm.engine.model_runner import ModelRunner, StepHandle, run_worker
from nanovllm.engine.rpc import Workers
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import SamplerOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.generation_config import eos_token_ids
from nanovllm.utils.parallel import create_store

Prompt = str | list[int]


@dataclass
class StreamChunk:
    """What one request produced in one step: new text and token ids; the last chunk has `finished`."""

    index: int
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class Request:
    """Engine-side output state of one sequence (text, logprobs); the sequence itself stays in the scheduler."""

    index: int
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stream: bool
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_streamed_tokens: int = 0
    num_streamed_chars: int = 0

    @property
    def needs_text_each_step(self) -> bool:
        return self.stream or bool(self.seq.sampling_params.stop)


def _shut_down_tp(runner: ModelRunner, workers: Workers | None) -> None:
    """Release the process group on every rank at once (NCCL's teardown is collective), then stop the workers."""
    if workers is not None:
        workers.request_shutdown()
    runner.close()
    if workers is not None:
        workers.close()


class LLMEngine:
    def __init__(self, model: str, **kwargs: object) -> None:
        self.config = Config.from_kwargs(model, **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        self.eos_token_ids = eos_token_ids(self.config.model, self.tokenizer.eos_token_id, getattr(self.config.hf_config, "eos_token_id", None))
        self.model_runner = self._start_model_runners()
        # Runs once: on exit(), when the engine is garbage-collected, or at interpreter exit.
        # It holds what must be released, never the engine itself.
        self._shut_down = weakref.finalize(self, _shut_down_tp, self.model_runner, self.workers)
        self.runtime = self.model_runner.info
        self.scheduler = Scheduler(self.config, self.runtime.num_kvcache_blocks, self.eos_token_ids)
        self.requests: dict[int, Request] = {}
        self._in_flight: tuple[ScheduledBatch, StepHandle] | None = None
        self._closed = False

    def _start_model_runners(self) -> ModelRunner:
        """Rank 0's runner, here; with tensor_parallel_size > 1 also ranks 1..N-1 in spawned processes."""
        tp = self.config.tensor_parallel_size
        self.workers: Workers | None = None
        if tp == 1:
            return ModelRunner(self.config)
        store = create_store(tp)
        self.workers = Workers(tp, run_worker, (self.config, store.port))
        try:
            runner = ModelRunner(self.config, 0, store, self.workers)
            self.workers.wait_started()
        except BaseException:
            self.workers.abort("the engine failed to start")
            raise
        return runner

    def exit(self) -> None:
        """Stop the tensor-parallel workers; release the model, the KV cache and the process group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._shut_down()
        del self.model_runner

    # ---- requests -------------------------------------------------------------------------

    def _tokenize(self, prompt: object) -> list[int]:
        """A str prompt -> its token ids; a list of token ids -> itself, checked against the vocabulary."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is an empty string")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)):
            raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt is an empty list of token ids")
        vocab = self.config.hf_config.vocab_size
        for token_id in prompt:
            if isinstance(token_id, bool) or not isinstance(token_id, Integral):
                raise TypeError(f"a token id must be an int, got {token_id!r} ({type(token_id).__name__})")
            if not 0 <= token_id < vocab:
                raise ValueError(f"token id {token_id} is outside the vocabulary [0, {vocab})")
        return [int(token_id) for token_id in prompt]

    def _check_length(self, token_ids: list[int]) -> None:
        """A prompt must leave room for at least one generated token; longer outputs are cut at max_model_len."""
        if len(token_ids) >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens; it must be shorter than max_model_len={self.config.max_model_len} "
                "to leave room for at least one generated token"
            )

    def _check_params(self, params: object) -> SamplingParams:
        """Check what SamplingParams cannot know alone: its token ids and logprobs count against the vocabulary."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        vocab = self.config.hf_config.vocab_size
        for token_id in params.stop_token_ids:
            if token_id >= vocab:
                raise ValueError(f"stop_token_ids entry {token_id} is outside the vocabulary [0, {vocab})")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"logprobs must be <= the vocabulary size {vocab}, got {params.logprobs}")
        return params

    def _validate(self, prompts: object, sampling_params: object) -> list[tuple[list[int], SamplingParams]]:
        """Tokenize and check every request before any is queued, so a bad one leaves the engine untouched."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of str or a list of token-id lists, got {type(prompts).__name__}")
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif not isinstance(sampling_params, (list, tuple)):
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(sampling_params).__name__}")
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} sampling params")
        params_list = [self._check_params(params) for params in sampling_params]
        token_lists = [self._tokenize(prompt) for prompt in prompts]
        for token_ids in token_lists:
            self._check_length(token_ids)
        return list(zip(token_lists, params_list))

    def _enqueue(self, token_ids: list[int], params: SamplingParams, index: int, stream: bool) -> Sequence:
        """Queue one validated request."""
        seq = Sequence(token_ids, params, self.config.kvcache_block_size)
        self.requests[seq.seq_id] = Request(index, seq, IncrementalDetokenizer(self.tokenizer), stream)
        self.scheduler.add(seq)
        return seq

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams, index: int = 0, stream: bool = False) -> Sequence:
        """Validate, tokenize and queue one request (see `generate` for when it stops)."""
        [(token_ids, params)] = self._validate([prompt], sampling_params)
        return self._enqueue(token_ids, params, index, stream)

    def abort(self, seq: Sequence) -> None:
        """Drop a request that has not finished, freeing its blocks."""
        self.scheduler.abort(seq)
        self.requests.pop(seq.seq_id, None)

    # ---- the step loop --------------------------------------------------------------------

    def step(self) -> tuple[list[StreamChunk], int, int]:
        """One scheduler step. Returns the streamed chunks / finished requests, and the (prefill,
        decode) token counts of the step launched.

        With overlap scheduling the step launched here is completed by the next call: the host
        schedules and launches step N+1 before it reads step N's tokens, so the device never waits
        for the host's bookkeeping. Without it, each step is completed before returning.
        """
        batch = self.scheduler.schedule()
        if not batch.seqs and self._in_flight is None:
            raise RuntimeError("scheduler could not schedule any sequence (KV pool smaller than one request?)")
        launched = None
        if batch.seqs:
            launched = (batch, self.model_runner.launch(batch, self.eos_token_ids))
            self.scheduler.advance(batch)
        if self.runtime.overlap:
            done, self._in_flight = self._in_flight, launched
        else:
            done = launched
        chunks = self._complete(*done) if done is not None else []
        num_decode = batch.num_tokens if batch.is_decode else 0
        return chunks, batch.num_tokens - num_decode, num_decode

    def _complete(self, batch: ScheduledBatch, handle: StepHandle) -> list[StreamChunk]:
        """Read a launched step's tokens, resolve them in the scheduler, detokenize and emit."""
        sampled = handle.sampled()
        self._record_logprobs(batch.seqs, sampled, handle.output)
        advanced = self.scheduler.resolve(batch, sampled)
        return [chunk for seq in advanced if (chunk := self._emit(self.requests[seq.seq_id])) is not None]

    def _record_logprobs(self, seqs: list[Sequence], sampled: list[int | None], output: SamplerOutput) -> None:
        """Append {token id: logprob} (top-n plus the sampled token) for each sequence that sampled and asked for logprobs."""
        if output.sampled_logprobs is None:
            return
        rows = [seq for seq, token in zip(seqs, sampled) if token is not None]
        sampled_ids = output.token_ids.tolist()
        sampled_lp = output.sampled_logprobs.tolist()
        top_ids = output.top_ids.tolist() if output.top_ids is not None else None
        top_lp = output.top_logprobs.tolist() if output.top_logprobs is not None else None
        for row, seq in enumerate(rows):
            n = seq.sampling_params.logprobs
            if n is None:
                continue
            entry = dict(zip(top_ids[row][:n], top_lp[row][:n])) if n else {}
            entry[sampled_ids[row]] = sampled_lp[row]
            self.requests[seq.seq_id].logprobs.append(entry)

    def _emit(self, request: Request) -> StreamChunk | None:
        """Detokenize a request that got a token; apply stop strings; build its stream chunk.

        A stream holds back the last len(longest stop string) - 1 characters until the request
        ends, so a stop string never leaks into it.
        """
        seq = request.seq
        params = seq.sampling_params
        detok = request.detokenizer
        if request.needs_text_each_step or seq.is_finished:
            old_len = len(detok.text)
            detok.add(seq.completion_token_ids[len(detok.token_ids) :], final=seq.is_finished)
            if params.stop and seq.num_output_tokens >= params.min_tokens:
                at = find_stop(detok.text, params.stop, old_len)
                if at != -1:
                    detok.text = detok.text[:at]
                    self.scheduler.finish(seq, "stop")
        if not request.stream:
            return StreamChunk(request.index, "", [], True, seq.finish_reason) if seq.is_finished else None
        text = detok.text
        held_back = max((len(s) for s in params.stop), default=1) - 1
        visible = len(text) if seq.is_finished else max(request.num_streamed_chars, len(text) - held_back)
        chunk = StreamChunk(
            request.index,
            text[request.num_streamed_chars : visible],
            seq.completion_token_ids[request.num_streamed_tokens :],
            seq.is_finished,
            seq.finish_reason,
        )
        request.num_streamed_chars = visible
        request.num_streamed_tokens = seq.num_output_tokens
        return chunk

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and self._in_flight is None

    # ---- batch APIs -----------------------------------------------------------------------

    def _add_all(self, prompts: SequenceType[Prompt], sampling_params: SamplingParams | SequenceType[SamplingParams], stream: bool) -> list[Sequence]:
        """Validate every request, then queue them all."""
        requests = self._validate(prompts, sampling_params)
        return [self._enqueue(token_ids, params, i, stream) for i, (token_ids, params) in enumerate(requests)]

    def _run(self, seqs: list[Sequence], use_tqdm: bool) -> Iterator[StreamChunk]:
        """Step until the scheduler is empty, yielding chunks; abort the unfinished `seqs` if interrupted."""
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        try:
            while not self.is_finished():
                start = time.perf_counter()
                chunks, num_prefill, num_decode = self.step()
                elapsed = time.perf_counter() - start
                if num_prefill:
                    prefill_tps = num_prefill / elapsed
                if num_decode:
                    decode_tps = num_decode / elapsed
                bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s")
                for chunk in chunks:
                    bar.update(chunk.finished)
                    yield chunk
        finally:
            bar.close()
            for seq in seqs:
                if not seq.is_finished:
                    self.abort(seq)

    def _result(self, request: Request) -> dict:
        seq = request.seq
        result = {"text": request.detokenizer.text, "token_ids": seq.completion_token_ids, "finish_reason": seq.finish_reason}
        if seq.sampling_params.logprobs is not None:
            result["logprobs"] = request.logprobs
        return result

    def generate(self, prompts: SequenceType[Prompt], sampling_params: SamplingParams | SequenceType[SamplingParams], use_tqdm: bool = True) -> list[dict]:
        """Run prompts to completion; return one dict per prompt, in input order:
        {"text", "token_ids", "finish_reason"} (+ "logprobs" when requested).

        finish_reason is "stop" (EOS, a stop token or a stop string) or "length" (max_tokens, or
        prompt + output reached max_model_len). Every request is validated before any work; a
        ValueError / TypeError names the bad value and leaves the engine as it was.
        """
        seqs = self._add_all(prompts, sampling_params, stream=False)
        try:
            for _ in self._run(seqs, use_tqdm):
                pass
        finally:
            requests = [self.requests.pop(seq.seq_id, None) for seq in seqs]
        return [self._result(request) for request in requests]

    def stream(self, prompts: SequenceType[Prompt], sampling_params: SamplingParams | SequenceType[SamplingParams]) -> Iterator[StreamChunk]:
        """Validate every request now, then, as the iterator is consumed, yield StreamChunks as tokens are produced.

        `chunk.index` is the prompt's position. The texts of one request's chunks concatenate to
        its `generate` text, and its last chunk has finished=True and a finish_reason. Closing the
        iterator early aborts the unfinished requests. Don't interleave with other generate/stream calls.
        """
        return self._stream(self._validate(prompts, sampling_params))

    def _stream(self, requests: list[tuple[list[int], SamplingParams]]) -> Iterator[StreamChunk]:
        """Queue validated requests when first iterated; forget them when done or closed."""
        seqs = [self._enqueue(token_ids, params, i, True) for i, (token_ids, params) in enumerate(requests)]
        try:
            yield from self._run(seqs, use_tqdm=False)
        finally:
            for seq in seqs:
                self.requests.pop(seq.seq_id, None)
