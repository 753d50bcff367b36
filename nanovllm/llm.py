"""The user-facing entry point."""
from __future__ import annotations

from nanovllm.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    """`LLM(model_dir, **config)`: see `nanovllm.config.Config` for the settings and
    `generate` / `stream` for the API."""
