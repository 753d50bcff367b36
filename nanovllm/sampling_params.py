"""Per-request sampling settings, validated at construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# Temperatures below this are treated as greedy (dividing logits by them would overflow).
GREEDY_TEMPERATURE = 1e-5
MAX_SEED = 2**63 - 1


def _check_number(name: str, value: object, low: float, high: float | None = None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or (high is not None and value > high):
        bracket = "(" if low_open else "["
        upper = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name} must be a finite number in {bracket}{low}, {upper}, got {value}")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        limit = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {limit}, got {value}")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature=0 (or below 1e-5) is greedy: the exact argmax. top_k=-1, top_p=1 and min_p=0
    disable those filters. `seed` makes one request's samples reproducible whatever else is in
    the batch. Generation ends after `max_tokens`, or earlier at EOS (unless `ignore_eos`), at a
    token of `stop_token_ids` (both kept in token_ids), or when the text contains a `stop` string
    (the text is cut before it). None of these can end it before `min_tokens` tokens.
    `logprobs=n` returns, for each generated token, the log-probabilities of the n most likely
    tokens and of the sampled one, from the model's raw logits.
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 64
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, 0.0)
        _check_int("top_k", self.top_k, -1)
        if self.top_k == 0:
            raise ValueError("top_k must be -1 (disabled) or >= 1, got 0")
        _check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_number("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)):
            raise TypeError(f"stop must be a string or a list of strings, got {self.stop!r}")
        for stop in self.stop:
            if not isinstance(stop, str):
                raise TypeError(f"stop entries must be strings, got {stop!r}")
            if not stop:
                raise ValueError(f"stop entries must be non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise TypeError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids entry", token_id, 0)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
