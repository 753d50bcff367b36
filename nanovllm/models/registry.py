"""Which model class serves which `config.architectures` entry; modules are imported on use.

`check_supported` reads names and config fields only (no torch import), so `Config` can refuse an
unsupported checkpoint before any process or device is touched.
"""
from __future__ import annotations

import importlib

# HF architecture name -> (module under nanovllm.models, class name).
MODELS: dict[str, tuple[str, str]] = {
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
}


def architecture(hf_config: object) -> str:
    """The one supported architecture the config names; ValueError naming it and listing the supported ones."""
    names = getattr(hf_config, "architectures", None) or []
    for name in names:
        if name in MODELS:
            return name
    raise ValueError(f"model architecture {names or None} is not supported; supported architectures: {', '.join(sorted(MODELS))}")


def sliding_window_layers(hf_config: object) -> list[int]:
    """Indices of the layers HF runs with sliding-window attention (none when it is off)."""
    window = getattr(hf_config, "sliding_window", None)
    if not window:
        return []
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        return [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    if getattr(hf_config, "use_sliding_window", True) is False:
        return []
    return list(range(hf_config.num_hidden_layers))


def check_supported(hf_config: object, max_model_len: int) -> str:
    """The architecture name, after refusing configs this engine would run differently from HF.

    The MLPs (dense and experts) are SiLU-gated only. Sliding-window attention is not implemented:
    a layer that would need it (its window shorter than max_model_len) is refused; a window >=
    max_model_len never masks anything, so it runs.
    """
    name = architecture(hf_config)
    hidden_act = getattr(hf_config, "hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"{name} with hidden_act {hidden_act!r} is not supported (only 'silu')")
    layers = sliding_window_layers(hf_config)
    window = getattr(hf_config, "sliding_window", None)
    if layers and window < max_model_len:
        raise ValueError(
            f"{name} uses sliding-window attention (window {window}) in {len(layers)} layer(s), which is not supported; "
            f"set max_model_len <= {window} to run it with full attention"
        )
    return name


def resolve_model_class(hf_config: object) -> type:
    """The model class for the config's architecture (imports its module)."""
    module, cls = MODELS[architecture(hf_config)]
    return getattr(importlib.import_module(f"nanovllm.models.{module}"), cls)
