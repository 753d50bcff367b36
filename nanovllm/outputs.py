"""What the engine hands back: vLLM's output shapes, still readable as nano-vLLM's dicts."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Logprob:
    """One token's log-probability under the model's raw logits, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One of a request's `n` continuations.

    finish_reason: "stop" (EOS, a stop token or a stop string), "length" (max_tokens or
    max_model_len) or "abort"; None while it runs. stop_reason: the stop string or stop token id
    that ended it (None for EOS and length). logprobs: one {token id: Logprob} per generated token
    (the top `logprobs` tokens plus the sampled one) when asked, else None.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# nano-vLLM's dict keys, served by RequestOutput from its first completion.
_DICT_KEYS = ("text", "token_ids", "finish_reason", "logprobs")


@dataclass
class RequestOutput:
    """One prompt's result. `out["text"]`, `out["token_ids"]`, `out["finish_reason"]` and
    `out["logprobs"]` read the first completion, so nano-vLLM scripts keep working.

    prompt is None for token-id prompts. num_cached_tokens: prompt tokens whose KV came from
    the prefix cache, summed over the n completions (sibling completions hit the first one's blocks).
    prompt_logprobs (when SamplingParams.prompt_logprobs was set): one entry per prompt token, None
    for the first, else {token id: Logprob} for that token and the top `prompt_logprobs` tokens at
    its position.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def __getitem__(self, key: str) -> object:
        if key not in _DICT_KEYS:
            raise KeyError(f"{key!r}: a RequestOutput reads {_DICT_KEYS} of its first completion as dict keys")
        return getattr(self.outputs[0], key)


@dataclass
class StreamChunk:
    """What one completion produced in one step: new text and token ids. Its last chunk has `finished`.

    request_id names the request (unique per engine); index is the prompt's position in the call
    that queued it; completion_index tells the n continuations of one prompt apart.
    """

    index: int
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    request_id: str = ""
    completion_index: int = 0
