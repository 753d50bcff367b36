"""Per-request sampling settings, validated at construction and frozen afterwards."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from types import MappingProxyType

from nanovllm.utils.validation import require_bool, require_int, require_number, require_text

# Temperatures below this are treated as greedy (dividing logits by them would overflow).
GREEDY_TEMPERATURE = 1e-5
MAX_SEED = 2**63 - 1
# vLLM's limits: penalties in [-2, 2], a logit bias in [-100, 100].
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
# Logits are divided (or multiplied) by repetition_penalty in float32: far outside [1/100, 100] that
# overflows to inf (or rounds the penalty to 0), and the row's probabilities become NaN.
MAX_REPETITION_PENALTY = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop (vLLM's names and semantics).

    temperature=0 (or below 1e-5) is greedy: the exact argmax. top_k=-1, top_p=1 and min_p=0
    disable those filters. `seed` makes one request's samples reproducible whatever else is in
    the batch. `n` continuations share the prompt (it is prefilled once).
    Before sampling, `logit_bias` {token id: bias} is added to the logits, then the penalties:
    `repetition_penalty` (in [0.01, 100], 1 = off; HF/vLLM: a positive logit of a token seen in the prompt or
    output is divided by it, a negative one multiplied), `frequency_penalty` (times how often the
    token was generated) and `presence_penalty` (once if it was generated) are subtracted.
    Generation ends after `max_tokens`, or earlier at EOS (unless `ignore_eos`), at a token of
    `stop_token_ids` (both kept in token_ids), or when the text contains a `stop` string (the
    text is cut before it, or after it with `include_stop_str_in_output`). None of these can end
    it before `min_tokens` tokens. `logprobs=k` returns, for each generated token, the k most
    likely tokens and the sampled one, with their ranks, from the model's raw logits.
    `prompt_logprobs=k` returns, for each prompt token after the first, the k most likely tokens
    at that position and the actual prompt token (vLLM's RequestOutput.prompt_logprobs). Every
    prompt position then needs its logits, so such a request computes its whole prompt: it does
    not take prompt blocks from the prefix cache (it still leaves its blocks there for others).
    The lists are stored as tuples and logit_bias as a read-only mapping: a SamplingParams
    cannot change after it was checked.
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 64
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    stop: tuple[str, ...] = field(default_factory=tuple)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        require_int("n", self.n, 1)
        require_number("temperature", self.temperature, 0.0)
        require_int("top_k", self.top_k, -1)
        if self.top_k == 0:
            raise ValueError("top_k must be -1 (disabled) or >= 1, got 0")
        require_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        require_number("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            require_int("seed", self.seed, 0, MAX_SEED)
        require_number("presence_penalty", self.presence_penalty, -MAX_PENALTY, MAX_PENALTY)
        require_number("frequency_penalty", self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY)
        require_number("repetition_penalty", self.repetition_penalty, 1 / MAX_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        require_int("max_tokens", self.max_tokens, 1)
        require_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            require_bool(name, getattr(self, name))
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)):
            raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
        for text in stop:
            if not isinstance(text, str):
                raise TypeError(f"stop entries must be strings, got {text!r}")
            if not text:
                raise ValueError(f"stop entries must be non-empty strings, got {stop!r}")
            require_text("a stop string", text)
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise TypeError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
        for token_id in self.stop_token_ids:
            require_int("stop_token_ids entry", token_id, 0)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise TypeError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}")
            for token_id, bias in self.logit_bias.items():
                require_int("logit_bias token id", token_id, 0)
                require_number(f"logit_bias[{token_id}]", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
            object.__setattr__(self, "logit_bias", MappingProxyType(dict(self.logit_bias)))
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                require_int(name, getattr(self, name), 0)

    def __reduce__(self) -> tuple:
        """Pickle through the constructor (a read-only mapping cannot be pickled; this also re-checks)."""
        values = [getattr(self, f.name) for f in fields(self)]
        return SamplingParams, tuple(dict(v) if isinstance(v, MappingProxyType) else v for v in values)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @cached_property
    def sampling_temperature(self) -> float:
        """The temperature a sampler row gets: 0.0 when greedy. Computed once (the engine reads it for every
        row of every step whose rows changed)."""
        return 0.0 if self.greedy else self.temperature

    @cached_property
    def temperature_only(self) -> bool:
        """Whether sampling needs nothing but the temperature: no filter, seed, penalty, bias, min_tokens or
        logprobs. Computed once, as `sampling_temperature`."""
        return not (self.top_k > 0 or self.top_p < 1 or self.min_p > 0 or self.seed is not None or self.has_penalties
                    or self.min_tokens > 0 or self.logit_bias or self.logprobs is not None)
