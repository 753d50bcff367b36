"""RoPE: each scaling type's frequencies and cos/sin factor equal transformers' own initialisers; one table per model."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from nanovllm.layers.rotary_embedding import RotaryEmbedding, get_rope, inv_freq_and_scale, rope_parameters
from nanovllm.models.registry import resolve_model_class
from nanovllm.testing import PRESETS

SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 16, "beta_slow": 2, "mscale": 0.8, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "attention_factor": 1.3, "truncate": False},
]


def llama_config(scaling: dict | None, head_dim: int = 64, theta: float = 500000.0) -> LlamaConfig:
    params = {"rope_theta": theta, **(scaling or {"rope_type": "default"})}
    return LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=4096, rope_parameters=params)


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_frequencies_equal_transformers(scaling, head_dim):
    config = llama_config(scaling, head_dim)
    expected, expected_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    inv_freq, scale = inv_freq_and_scale(head_dim, rope_parameters(config), config.max_position_embeddings, 4096)
    torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)
    assert scale == pytest.approx(expected_scale, rel=1e-12)


def test_dynamic_follows_the_cached_length_as_hf_does():
    """HF recomputes dynamic NTK from the current length once it exceeds max_position_embeddings;
    within it (where Config keeps max_model_len) the frequencies are the default ones."""
    config = llama_config({"rope_type": "dynamic", "factor": 2.0})
    params = rope_parameters(config)
    longer, _ = inv_freq_and_scale(64, params, 4096, 8192)
    torch.testing.assert_close(longer, ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=8192)[0], rtol=1e-6, atol=0)
    within, _ = inv_freq_and_scale(64, params, 4096, 2048)
    default, _ = inv_freq_and_scale(64, {"rope_type": "default", "rope_theta": 500000.0}, 4096, 2048)
    torch.testing.assert_close(within, default, rtol=1e-6, atol=0)
    assert not torch.allclose(longer, default)


def test_yarn_attention_factor_scales_cos_and_sin():
    config = llama_config({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024})
    rope = get_rope(config, 64, 16)
    _, scale = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    assert scale > 1.1
    cos, sin = rope.cos_sin.chunk(2, dim=-1)
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, scale**2))


def test_unsupported_rope_type_is_named():
    config = llama_config({"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [1.0] * 32, "original_max_position_embeddings": 1024})
    with pytest.raises(ValueError, match="rope type 'longrope' is not supported; supported types: default, linear, dynamic, llama3, yarn"):
        get_rope(config, 64, 16)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama", "tiny-qwen3-moe"])
def test_one_table_per_model(preset):
    cfg = PRESETS[preset]
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "torch_dtype"})
    model = resolve_model_class(config)(config, 128)
    tables = {id(m) for m in model.modules() if isinstance(m, RotaryEmbedding)}
    assert len(tables) == 1 and config.num_hidden_layers > 1
