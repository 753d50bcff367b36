"""The step loop: tokenize, schedule, run the model, postprocess, detokenize."""
from __future__ import annotations

import atexit
import time
from collections.abc import Iterator, Sequence as SequenceType
from dataclasses import dataclass, field

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm.config import Config
from nanovllm.engine.detokenizer import IncrementalDetokenizer, find_stop
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import SamplerOutput
from nanovllm.sampling_params import SamplingParams

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


class LLMEngine:
    def __init__(self, model: str, **kwargs: object) -> None:
        self.config = Config.from_kwargs(model, **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        self.eos_token_id = self.tokenizer.eos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = getattr(self.config.hf_config, "eos_token_id", None)
        self.model_runner = ModelRunner(self.config)
        self.runtime = self.model_runner.info
        self.scheduler = Scheduler(self.config, self.runtime.num_kvcache_blocks, self.eos_token_id)
        self.requests: dict[int, Request] = {}
        self._closed = False
        atexit.register(self.exit)

    def exit(self) -> None:
        """Release the model and the KV cache; idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.exit)
        del self.model_runner

    # ---- requests -------------------------------------------------------------------------

    def _tokenize(self, prompt: object) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is an empty string")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt is an empty list of token ids")
        vocab = self.config.hf_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return list(prompt)

    def _check_length(self, token_ids: list[int]) -> None:
        if len(token_ids) >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens; it must be shorter than max_model_len={self.config.max_model_len} "
                "to leave room for at least one generated token"
            )

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams, index: int = 0, stream: bool = False) -> Sequence:
        """Tokenize and queue one request. Generation stops at max_tokens or when prompt + output reach max_model_len."""
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        token_ids = self._tokenize(prompt)
        self._check_length(token_ids)
        seq = Sequence(token_ids, sampling_params, self.config.kvcache_block_size)
        self.requests[seq.seq_id] = Request(index, seq, IncrementalDetokenizer(self.tokenizer), stream)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a request that has not finished, freeing its blocks."""
        self.scheduler.abort(seq)
        self.requests.pop(seq.seq_id, None)

    # ---- the step loop --------------------------------------------------------------------

    def step(self) -> tuple[list[StreamChunk], int, int]:
        """One scheduler step. Returns the streamed chunks / finished requests, and (prefill, decode) token counts."""
        batch = self.scheduler.schedule()
        sampled, output = self.model_runner.run(batch, self.eos_token_id)
        self._record_logprobs(batch.seqs, sampled, output)
        advanced = self.scheduler.postprocess(batch, sampled)
        chunks = [chunk for seq in advanced if (chunk := self._emit(self.requests[seq.seq_id])) is not None]
        num_decode = batch.num_tokens if batch.is_decode else 0
        return chunks, batch.num_tokens - num_decode, num_decode

    def _record_logprobs(self, seqs: list[Sequence], sampled: list[int | None], output: SamplerOutput) -> None:
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
        """Detokenize a request that got a token; apply stop strings; build its stream chunk."""
        seq = request.seq
        params = seq.sampling_params
        if request.needs_text_each_step or seq.is_finished:
            detok = request.detokenizer
            old_len = len(detok.text)
            detok.add(seq.completion_token_ids[len(detok.token_ids) :], final=seq.is_finished)
            if params.stop:
                at = find_stop(detok.text, params.stop, old_len)
                if at != -1:
                    detok.text = detok.text[:at]
                    if not seq.is_finished:
                        self.scheduler.finish(seq, "stop")
        if not request.stream:
            return StreamChunk(request.index, "", [], True, seq.finish_reason) if seq.is_finished else None
        text = request.detokenizer.text
        visible = len(text) if seq.is_finished else max(request.num_streamed_chars, len(text) - max((len(s) for s in params.stop), default=1) + 1)
        chunk = StreamChunk(
            request.index,
            text[request.num_streamed_chars : visible],
            seq.completion_token_ids[request.num_streamed_tokens :],
            seq.is_finished,
            seq.finish_reason,
        )
        request.num_streamed_chars = visible
        request.num_streamed_tokens = seq.num_completion_tokens
        return chunk

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    # ---- batch APIs -----------------------------------------------------------------------

    def _add_all(self, prompts: SequenceType[Prompt], sampling_params: SamplingParams | SequenceType[SamplingParams], stream: bool) -> list[Sequence]:
        """Validate every request first, so a bad one leaves the engine untouched."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of str or a list of token-id lists, got {type(prompts).__name__}")
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif not isinstance(sampling_params, (list, tuple)):
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(sampling_params).__name__}")
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} sampling params")
        for params in sampling_params:
            if not isinstance(params, SamplingParams):
                raise TypeError(f"sampling_params entries must be SamplingParams, got {type(params).__name__}")
        token_lists = [self._tokenize(p) for p in prompts]
        for token_ids in token_lists:
            self._check_length(token_ids)
        return [self.add_request(t, sp, i, stream) for i, (t, sp) in enumerate(zip(token_lists, sampling_params))]

    def _run(self, seqs: list[Sequence], use_tqdm: bool) -> Iterator[StreamChunk]:
        """Step until every sequence of `seqs` finished; abort the unfinished ones if interrupted."""
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

    def _result(self, seq: Sequence) -> dict:
        request = self.requests.pop(seq.seq_id)
        result = {"text": request.detokenizer.text, "token_ids": seq.completion_token_ids, "finish_reason": seq.finish_reason}
        if seq.sampling_params.logprobs is not None:
            result["logprobs"] = request.logprobs
        return result

    def generate(self, prompts: SequenceType[Prompt], sampling_params: SamplingParams | SequenceType[SamplingParams], use_tqdm: bool = True) -> list[dict]:
        """Run prompts to completion; return one dict per prompt, in input order:
        {"text", "token_ids", "finish_reason"} (+ "logprobs" when requested)."""
        seqs = self._add_all(prompts, sampling_params, stream=False)
        for _ in self._run(seqs, use_tqdm):
            pass
        return [self._result(seq) for seq in seqs]

    def stream(self, prompts: SequenceType[Prompt], sampling_params: SamplingParams | SequenceType[SamplingParams]) -> Iterator[StreamChunk]:
        """Yield StreamChunks as tokens are produced; each request's last chunk has finished=True.

        The texts of one request's chunks concatenate to its `generate` text.
        """
        seqs = self._add_all(prompts, sampling_params, stream=True)
        for chunk in self._run(seqs, use_tqdm=False):
            if chunk.finished:
                self.requests.pop(seqs[chunk.index].seq_id, None)
            yield chunk
