"""Engine configuration: validated once at construction, never mutated afterwards."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from glob import escape as glob_escape, glob

from transformers import AutoConfig, PretrainedConfig

from nanovllm.models.registry import check_supported
from nanovllm.utils.validation import require_bool, require_choice, require_int, require_number

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTENTION_BACKENDS = ("auto", "flash_attn", "triton", "torch")
SCHEDULING_POLICIES = ("prefill_first", "chunked")
# "dummy": random weights on the target device from config.json alone (benchmarks of a model's shape).
LOAD_FORMATS = ("auto", "dummy")


@dataclass(frozen=True)
class Config:
    """User-facing engine settings (nano-vLLM's names and defaults).

    `hf_config` is read from `model/config.json` during construction. Values derived at run
    time (the KV block count actually allocated, the resolved device) live elsewhere.
    """

    model: str
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "auto"
    cpu_kvcache_space_gib: float = 4.0
    enable_prefix_caching: bool = True
    scheduling_policy: str = "chunked"
    overlap_scheduling: bool | None = None
    skip_tokenizer_init: bool = False
    load_format: str = "auto"
    hf_config: PretrainedConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)) or not os.path.isdir(self.model):
            raise ValueError(f"model must be a local Hugging Face folder, got {self.model!r} (not a directory)")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"model folder {self.model!r} has no config.json")
        require_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        # At most 65535: the Triton decode kernel puts a step's sequences on CUDA's grid y axis.
        require_int("max_num_seqs", self.max_num_seqs, 1, 65535)
        require_int("max_model_len", self.max_model_len, 2)
        require_int("tensor_parallel_size", self.tensor_parallel_size, 1, 8)
        require_int("kvcache_block_size", self.kvcache_block_size, 16)
        if self.kvcache_block_size & (self.kvcache_block_size - 1):
            raise ValueError(f"kvcache_block_size must be a power of two >= 16, got {self.kvcache_block_size}")
        require_int("num_kvcache_blocks", self.num_kvcache_blocks, -1)
        if self.num_kvcache_blocks == 0:
            raise ValueError("num_kvcache_blocks must be -1 (size from memory) or >= 1, got 0")
        require_number("gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, low_open=True)
        require_number("cpu_kvcache_space_gib", self.cpu_kvcache_space_gib, 0.0, low_open=True)
        if self.overlap_scheduling is not None and not isinstance(self.overlap_scheduling, bool):
            raise TypeError(f"overlap_scheduling must be None (on for CUDA, off for CPU) or a bool, got {self.overlap_scheduling!r}")
        for name in ("enforce_eager", "enable_prefix_caching", "skip_tokenizer_init"):
            require_bool(name, getattr(self, name))
        require_choice("device", self.device, DEVICES)
        require_choice("dtype", self.dtype, DTYPES)
        require_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        require_choice("scheduling_policy", self.scheduling_policy, SCHEDULING_POLICIES)
        require_choice("load_format", self.load_format, LOAD_FORMATS)
        if self.load_format == "auto" and not glob(os.path.join(glob_escape(self.model), "*.safetensors")):
            raise ValueError(f"model folder {self.model!r} has no *.safetensors weights; load_format='dummy' runs its config.json with random weights")
        if self.scheduling_policy == "prefill_first" and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) with scheduling_policy='prefill_first'; use 'chunked' to prefill long prompts in pieces"
            )
        hf_config = AutoConfig.from_pretrained(self.model)
        object.__setattr__(self, "hf_config", hf_config)
        check_supported(hf_config, self.max_model_len)
        max_positions = getattr(hf_config, "max_position_embeddings", None)
        if max_positions is not None and self.max_model_len > max_positions:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's max_position_embeddings ({max_positions})")
        tp = self.tensor_parallel_size
        for name in ("num_attention_heads", "num_key_value_heads", "vocab_size", "intermediate_size", "moe_intermediate_size"):
            size = getattr(hf_config, name, None)
            if size is None:
                continue
            # With fewer KV heads than ranks, each KV head is replicated on tp / num_key_value_heads ranks.
            if size % tp and not (name == "num_key_value_heads" and tp % size == 0):
                raise ValueError(f"tensor_parallel_size ({tp}) must divide {name} ({size})")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: object) -> Config:
        """Build a Config, rejecting unknown keyword arguments with a TypeError that lists the valid ones."""
        valid = sorted(f.name for f in fields(cls) if f.init and f.name != "model")
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; valid arguments are {valid}")
        return cls(model, **kwargs)
