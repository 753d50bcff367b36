"""nanovllm: a small, fast, readable offline LLM inference engine."""
from nanovllm.engine.llm_engine import StreamChunk
from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "StreamChunk"]
