"""Argument checks shared by Config, SamplingParams and the prompts: each error names the argument, the value and the limit."""
from __future__ import annotations

import math


def is_number(value: object) -> bool:
    """An int or float, but not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """`value` is an int (not a bool) in [low, high] (high=None: no upper limit)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        limit = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {limit}, got {value}")


def require_number(name: str, value: object, low: float, high: float | None = None, low_open: bool = False) -> None:
    """`value` is a finite int or float in [low, high] ((low, high] with low_open; high=None: no upper limit)."""
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or (high is not None and value > high):
        bracket = "(" if low_open else "["
        upper = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name} must be a finite number in {bracket}{low}, {upper}, got {value}")


def require_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def require_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def require_text(name: str, text: str) -> None:
    """Reject text that cannot be encoded as UTF-8 (a lone surrogate such as '\\ud800')."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{name} contains a lone surrogate {text[exc.start]!r} at index {exc.start}, which is not valid Unicode text"
        ) from None


def token_id_keys(mapping: dict) -> dict:
    """A JSON object keyed by token ids (`logit_bias`): JSON keys are strings, so digit strings become ints;
    any other key is kept, for SamplingParams to refuse with its own clear error."""
    return {int(key) if isinstance(key, str) and key.lstrip("-").isdigit() else key: value for key, value in mapping.items()}
