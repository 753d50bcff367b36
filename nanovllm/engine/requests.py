"""Engine-side state of a request between add and output: its n completions, their text and logprobs,
and the chunks waiting for the caller that owns it. Also: loading the tokenizer, and tokenizing and checking
a batch of requests before any is queued."""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Integral

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nanovllm.config import Config
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import SamplerOutput
from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput, StreamChunk
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.validation import require_text

Prompt = str | list[int]

# Files a Hugging Face tokenizer is loaded from (one of them must exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tiktoken.model")


def load_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    """The folder's tokenizer; a clear error when there is none (transformers would build an empty one)."""
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in TOKENIZER_FILES):
        raise ValueError(
            f"model folder {model_dir!r} has no tokenizer (none of {TOKENIZER_FILES}); add the tokenizer files, "
            "or pass skip_tokenizer_init=True to give prompts as token-id lists only (outputs then carry no text)"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if len(tokenizer) < 2:
        raise ValueError(f"the tokenizer of {model_dir!r} is empty ({len(tokenizer)} tokens)")
    return tokenizer


def tokenize(tokenizer: PreTrainedTokenizerBase | None, prompt: object, vocab_size: int) -> list[int]:
    """A str prompt -> its token ids; a list of token ids -> itself, checked against the vocabulary."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is an empty string")
        if tokenizer is None:
            raise ValueError("this LLM was created with skip_tokenizer_init=True: prompts must be token-id lists, got a str")
        require_text("prompt", prompt)
        return tokenizer.encode(prompt)
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("prompt is an empty list of token ids")
    if set(map(type, prompt)) == {int} and 0 <= min(prompt) and max(prompt) < vocab_size:
        return list(prompt)  # the common case at C speed (the server admits hundreds of long prompts at once)
    for token_id in prompt:
        if isinstance(token_id, bool) or not isinstance(token_id, Integral):
            raise TypeError(f"a token id must be an int, got {token_id!r} ({type(token_id).__name__})")
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
    return [int(token_id) for token_id in prompt]


def check_params(params: object, config: Config, has_tokenizer: bool) -> SamplingParams:
    """Check what SamplingParams cannot know alone: n against max_num_seqs, token ids and logprobs against
    the vocabulary, and that text-based settings have a tokenizer."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    if params.n > config.max_num_seqs:
        raise ValueError(f"n must be <= max_num_seqs={config.max_num_seqs} (a request's continuations decode together), got {params.n}")
    vocab = config.hf_config.vocab_size
    for name, token_ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or ())):
        for token_id in token_ids:
            if token_id >= vocab:
                raise ValueError(f"{name} entry {token_id} is outside the vocabulary [0, {vocab})")
    for name in ("logprobs", "prompt_logprobs"):
        if (k := getattr(params, name)) is not None and k > vocab:
            raise ValueError(f"{name} must be <= the vocabulary size {vocab}, got {k}")
    if params.stop and not has_tokenizer:
        raise ValueError("stop strings need a tokenizer; this LLM was created with skip_tokenizer_init=True (use stop_token_ids)")
    return params


def validate_requests(prompts: object, sampling_params: object, defaults: SamplingParams, config: Config,
                      tokenizer: PreTrainedTokenizerBase | None) -> list[tuple[Prompt, list[int], SamplingParams]]:
    """Tokenize and check a batch of requests as a whole (nothing is queued here).

    `sampling_params`: one SamplingParams for all prompts, a list of one per prompt, or None (`defaults`,
    the checkpoint's). Returns (prompt, token ids, params) per prompt, in order. Raises TypeError for a
    prompt or params of the wrong type, ValueError for a bad value (e.g. an empty prompt, a token id or
    logprobs count outside the vocabulary, a prompt not shorter than max_model_len, stop strings without
    a tokenizer, a params list of another length)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of str or a list of token-id lists, got {type(prompts).__name__}")
    if sampling_params is None:
        sampling_params = defaults
    if isinstance(sampling_params, SamplingParams):
        sampling_params = [sampling_params] * len(prompts)
    elif not isinstance(sampling_params, (list, tuple)):
        raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(sampling_params).__name__}")
    if len(sampling_params) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} sampling params")
    params_list = [check_params(params, config, tokenizer is not None) for params in sampling_params]
    token_lists = [tokenize(tokenizer, prompt, config.hf_config.vocab_size) for prompt in prompts]
    for token_ids in token_lists:
        if len(token_ids) >= config.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens; it must be shorter than max_model_len={config.max_model_len} "
                "to leave room for at least one generated token"
            )
    return list(zip(prompts, token_lists, params_list))


class Completion:
    """One continuation: its sequence (owned by the scheduler), text, logprobs and stream position."""

    def __init__(self, seq: Sequence, tokenizer: PreTrainedTokenizerBase | None) -> None:
        params = seq.sampling_params
        self.seq = seq
        self.detokenizer = None if tokenizer is None else IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.logprobs: list[dict[int, Logprob]] = []
        self.cumulative_logprob = 0.0
        self.stop_reason: int | str | None = None
        self.num_streamed_tokens = 0
        self.num_streamed_chars = 0

    @property
    def index(self) -> int:
        return self.seq.completion_index

    @property
    def text(self) -> str:
        return "" if self.detokenizer is None else self.detokenizer.text

    def output(self) -> CompletionOutput:
        asked = self.seq.sampling_params.logprobs is not None
        return CompletionOutput(
            self.index,
            self.text,
            self.seq.completion_token_ids,
            self.cumulative_logprob if asked else None,
            self.logprobs if asked else None,
            self.seq.finish_reason,
            self.stop_reason,
        )


@dataclass
class Request:
    """A prompt and its n completions. `held`: sequences 2..n, queued once the first has computed the
    prompt; `outbox`: chunks produced for this request that its caller has not taken yet (shared by the requests of one
    generate/stream call);
    `prompt_logprobs`: the entries recorded so far ([None] at the start) when asked, else None."""

    request_id: str
    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool
    completions: list[Completion]
    held: list[Sequence] = field(default_factory=list)
    outbox: deque[StreamChunk] = field(default_factory=deque)
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return not self.held and all(c.seq.is_finished for c in self.completions)

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, [c.output() for c in self.completions],
                             self.finished, self.num_cached_tokens, self.prompt_logprobs)


class LogprobEntries:
    """A step's logprob rows (sampled or prompt tokens) read to the host once, turned into vLLM's entries."""

    def __init__(self, output: SamplerOutput, token_text: Callable[[int], str | None]) -> None:
        self.chosen = output.token_ids.tolist()
        self.chosen_logprobs = output.sampled_logprobs.tolist()
        self.chosen_ranks = output.sampled_ranks.tolist()
        self.top_ids = output.top_ids.tolist() if output.top_ids is not None else None
        self.top_logprobs = output.top_logprobs.tolist() if output.top_logprobs is not None else None
        self.token_text = token_text

    def entry(self, row: int, k: int) -> dict[int, Logprob]:
        """Row `row`'s {token id: Logprob}: its `k` most likely tokens, then its chosen token."""
        ranked = zip(self.top_ids[row][:k], self.top_logprobs[row][:k]) if k else ()
        result = {token: Logprob(lp, rank, self.token_text(token)) for rank, (token, lp) in enumerate(ranked, 1)}
        token = self.chosen[row]
        result[token] = Logprob(self.chosen_logprobs[row], self.chosen_ranks[row], self.token_text(token))
        return result
