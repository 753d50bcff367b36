"""Argument checks shared by Config, SamplingParams and the prompts (chat messages included): each error
names the argument, the value and the limit."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

TOKEN_ID_KEY = re.compile(r"-?[0-9]+")


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
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        finite = False
    too_low = value <= low if low_open else value < low
    if not finite or too_low or (high is not None and value > high):
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
    """A JSON object keyed by token ids (`logit_bias`): JSON keys are strings, so strings of ASCII digits (with
    an optional "-") become ints; any other key ("--5", "²", "٣") is kept, for SamplingParams to refuse with
    its own clear error."""
    return {int(key) if isinstance(key, str) and TOKEN_ID_KEY.fullmatch(key) else key: value for key, value in mapping.items()}


def chat_messages(conversation: object, name: str = "messages") -> list[dict]:
    """One conversation as chat templates take it: a non-empty list of message dicts, each with a str "role"
    and a str "content" (OpenAI's list of text parts is joined into one string; other keys are kept).
    Without this, a malformed message fails inside the template with jinja2's or Python's own error."""
    if not isinstance(conversation, (list, tuple)):
        raise TypeError(f"{name} must be a list of message dicts, got {conversation!r}")
    if not conversation:
        raise ValueError(f"{name} is an empty conversation; it needs at least one message")
    messages = []
    for i, message in enumerate(conversation):
        where = f"{name}[{i}]"
        if not isinstance(message, Mapping):
            raise TypeError(f"{where} must be a dict with a 'role' and a 'content', got {message!r}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise TypeError(f"{where}['role'] must be a string, got {role!r}")
        if isinstance(content, (list, tuple)):
            if not all(isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
                raise ValueError(f"{where}['content']: only text parts {{'type': 'text', 'text': str}} are supported, got {content!r}")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise TypeError(f"{where}['content'] must be a string or a list of text parts, got {content!r}")
        require_text(f"{where}['content']", content)
        messages.append({**message, "content": content})
    return messages
