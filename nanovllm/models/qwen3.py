"""Qwen3 (dense): the generic decoder with per-head q/k RMSNorm before the rotation."""
from __future__ import annotations

from transformers import PretrainedConfig

from nanovllm.models.llama import DecoderForCausalLM, DenseSwitches


class Qwen3ForCausalLM(DecoderForCausalLM):
    @staticmethod
    def switches(config: PretrainedConfig) -> DenseSwitches:
        bias = bool(getattr(config, "attention_bias", False))
        return DenseSwitches(qkv_bias=bias, o_bias=bias, qk_norm=True)
