"""What a checkpoint's generation_config.json says about generation (read once, at engine start)."""
from __future__ import annotations

import json
import os


def read_generation_config(model: str) -> dict:
    """The checkpoint's generation_config.json as a dict ({} when the file is absent)."""
    path = os.path.join(model, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _as_ids(value: object) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def eos_token_ids(generation_config: dict, tokenizer_eos: int | None, config_eos: object = None) -> frozenset[int]:
    """Every token id that ends generation: generation_config.json's `eos_token_id` (an int or a
    list: Qwen3 and Llama 3 list several) plus the tokenizer's; config.json's only when neither has one."""
    ids = _as_ids(generation_config.get("eos_token_id")) | _as_ids(tokenizer_eos)
    return frozenset(ids or _as_ids(config_eos))


# Keys of generation_config.json that become SamplingParams defaults (vLLM does the same).
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(generation_config: dict) -> dict:
    """The SamplingParams keyword arguments the checkpoint recommends (those present and not null)."""
    return {key: generation_config[key] for key in SAMPLING_DEFAULT_KEYS if generation_config.get(key) is not None}
