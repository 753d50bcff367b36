"""The generic dense decoder (Llama shape), tensor-parallel aware, and the families that are just its switches.

Qwen3, Qwen2/2.5, Llama 3.x and Mistral differ only in `DenseSwitches` (q/k/v and o biases, per-head
q/k RMSNorm); the head size, tied LM head, rope scaling and norms come from the HF config.
Qwen3-MoE reuses the skeleton with another MLP per layer (`mlp_factory`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.attention import Attention
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.rotary_embedding import RotaryEmbedding, get_rope


@dataclass(frozen=True)
class DenseSwitches:
    """What a family changes in the dense decoder (as HF's modeling file for it builds its layers)."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DenseAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding, switches: DenseSwitches) -> None:
        super().__init__()
        self.head_dim = head_dim(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads, config.num_key_value_heads, bias=switches.qkv_bias)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=switches.o_bias)
        self.rotary_emb = rotary
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads)
        if switches.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.qk_norm = switches.qk_norm

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q, k = q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim)
        norms = (self.q_norm, self.k_norm) if self.qk_norm else ()
        o = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim), positions, self.rotary_emb, norms)
        return self.o_proj(o.flatten(1, -1))


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        """SiLU-gated (the registry refuses any other hidden_act)."""
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


# Builds layer `index`'s MLP from the config (dense here; Qwen3-MoE picks experts for some layers).
MLPFactory = Callable[[PretrainedConfig, int], nn.Module]


def dense_mlp(switches: DenseSwitches) -> MLPFactory:
    return lambda config, index: DenseMLP(config.hidden_size, config.intermediate_size, switches.mlp_bias)


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding, switches: DenseSwitches, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = DenseAttention(config, rotary, switches)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden_states, residual = self.input_layernorm(hidden_states), hidden_states
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class DecoderModel(nn.Module):
    def __init__(self, config: PretrainedConfig, max_positions: int, switches: DenseSwitches, mlp_factory: MLPFactory) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary = get_rope(config, head_dim(config), max_positions)
        self.layers = nn.ModuleList(
            [DecoderLayer(config, rotary, switches, mlp_factory(config, i)) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


# Checkpoint module names that load into a part (shard) of one of our stacked parameters.
STACKED_PARAMS: dict[str, tuple[str, object]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class DecoderForCausalLM(nn.Module):
    """A decoder plus the LM head (tied to the embedding when the config says so).

    Subclasses set `switches` from the config; `weight_target` maps a checkpoint tensor name to
    the parameter (and shard of a stacked one) it loads into, by whole name components.
    """

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        switches = self.switches(config)
        self.model = DecoderModel(config, max_positions, switches, self.mlp_factory(config, switches))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def switches(config: PretrainedConfig) -> DenseSwitches:
        return DenseSwitches()

    def mlp_factory(self, config: PretrainedConfig, switches: DenseSwitches) -> MLPFactory:
        return dense_mlp(switches)

    def weight_target(self, name: str) -> tuple[str, object]:
        """(parameter name, shard id or None) for checkpoint tensor `name`."""
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in STACKED_PARAMS:
                packed, shard_id = STACKED_PARAMS[part]
                return ".".join(parts[:i] + [packed] + parts[i + 1 :]), shard_id
        return name, None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor, logits_indices: torch.Tensor | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.lm_head(hidden_states, logits_indices, out)


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama 3 / 3.1 / 3.2 (llama3 rope scaling, tied head in 3.2)."""

    @staticmethod
    def switches(config: PretrainedConfig) -> DenseSwitches:
        bias = bool(getattr(config, "attention_bias", False))
        return DenseSwitches(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False)))


class MistralForCausalLM(DecoderForCausalLM):
    """Mistral: Llama without biases; its sliding window is refused by the registry when it would mask."""


class Qwen2ForCausalLM(DecoderForCausalLM):
    """Qwen2 and Qwen2.5: biases on q, k and v only."""

    @staticmethod
    def switches(config: PretrainedConfig) -> DenseSwitches:
        return DenseSwitches(qkv_bias=True)

