"""Config, SamplingParams and LLM(...) reject bad settings with errors that name the setting."""
from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config

BAD_CONFIG_VALUES = [
    ("max_num_batched_tokens", 0, ValueError),
    ("max_num_batched_tokens", -5, ValueError),
    ("max_num_batched_tokens", 1024.0, TypeError),
    ("max_num_batched_tokens", "1024", TypeError),
    ("max_num_batched_tokens", True, TypeError),
    ("max_num_seqs", 0, ValueError),
    ("max_num_seqs", None, TypeError),
    ("max_num_seqs", 2.5, TypeError),
    ("max_model_len", 1, ValueError),
    ("max_model_len", 4097, ValueError),
    ("max_model_len", "512", TypeError),
    ("gpu_memory_utilization", 0, ValueError),
    ("gpu_memory_utilization", 1.01, ValueError),
    ("gpu_memory_utilization", -0.5, ValueError),
    ("gpu_memory_utilization", math.nan, ValueError),
    ("gpu_memory_utilization", "0.9", ValueError),
    ("gpu_memory_utilization", True, ValueError),
    ("tensor_parallel_size", 0, ValueError),
    ("tensor_parallel_size", 9, ValueError),
    ("tensor_parallel_size", 3, ValueError),
    ("tensor_parallel_size", 2.0, TypeError),
    ("enforce_eager", 1, TypeError),
    ("enforce_eager", "yes", TypeError),
    ("kvcache_block_size", 8, ValueError),
    ("kvcache_block_size", 24, ValueError),
    ("kvcache_block_size", 0, ValueError),
    ("kvcache_block_size", 16.0, TypeError),
    ("num_kvcache_blocks", 0, ValueError),
    ("num_kvcache_blocks", -2, ValueError),
    ("num_kvcache_blocks", 10.0, TypeError),
    ("device", "gpu", ValueError),
    ("device", "CPU", ValueError),
    ("device", None, ValueError),
    ("dtype", "fp16", ValueError),
    ("dtype", torch.float16, ValueError),
    ("attention_backend", "flash", ValueError),
    ("attention_backend", "", ValueError),
    ("cpu_kvcache_space_gib", 0, ValueError),
    ("cpu_kvcache_space_gib", -1.0, ValueError),
    ("cpu_kvcache_space_gib", math.nan, ValueError),
    ("cpu_kvcache_space_gib", math.inf, ValueError),
    ("cpu_kvcache_space_gib", "4", ValueError),
    ("cpu_kvcache_space_gib", True, ValueError),
    ("enable_prefix_caching", 0, TypeError),
    ("enable_prefix_caching", "false", TypeError),
    ("scheduling_policy", "fcfs", ValueError),
    ("scheduling_policy", "Chunked", ValueError),
]


@pytest.mark.parametrize("name, value, error", BAD_CONFIG_VALUES)
def test_bad_config_values_raise_naming_the_field(tiny_model, name, value, error):
    with pytest.raises(error, match=name):
        Config(tiny_model, **{name: value})


def test_good_config_is_kept_as_given_and_frozen(tiny_model):
    config = Config(tiny_model, max_num_batched_tokens=64, max_model_len=4096, scheduling_policy="chunked",
                    gpu_memory_utilization=1, cpu_kvcache_space_gib=0.5, kvcache_block_size=16, num_kvcache_blocks=1)
    assert (config.max_num_batched_tokens, config.max_model_len, config.scheduling_policy) == (64, 4096, "chunked")
    assert config.hf_config.num_hidden_layers == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_num_seqs = 4


def test_prefill_first_needs_a_budget_of_max_model_len(tiny_model):
    with pytest.raises(ValueError, match="max_num_batched_tokens.*max_model_len.*chunked"):
        Config(tiny_model, max_num_batched_tokens=511, max_model_len=512, scheduling_policy="prefill_first")
    Config(tiny_model, max_num_batched_tokens=512, max_model_len=512, scheduling_policy="prefill_first")
    # The default policy (chunked, as nano-vLLM's current default) prefills a longer prompt in pieces.
    assert Config(tiny_model, max_num_batched_tokens=511, max_model_len=512).scheduling_policy == "chunked"


def test_model_folder_problems(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="model"):
        Config(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="model"):
        Config(None)
    with pytest.raises(ValueError, match="config.json"):
        Config(str(tmp_path))


def test_unknown_arguments_are_named_with_the_valid_ones(tiny_model):
    with pytest.raises(TypeError) as info:
        Config.from_kwargs(tiny_model, max_num_seq=4, block_size=16)
    message = str(info.value)
    assert "max_num_seq'" in message and "block_size" in message
    assert all(name in message for name in ("max_num_seqs", "kvcache_block_size", "scheduling_policy", "enable_prefix_caching"))
    assert "hf_config" not in message
    with pytest.raises(TypeError, match="hf_config"):
        Config.from_kwargs(tiny_model, hf_config=None)
    with pytest.raises(TypeError, match="tensor_parallel.*valid arguments.*tensor_parallel_size"):
        LLM(tiny_model, tensor_parallel=2)


def test_llm_rejects_unusable_folders(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="model"):
        LLM(str(tmp_path / "missing"), device="cpu")
    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_model, no_config, ignore=shutil.ignore_patterns("config.json"))
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(no_config), device="cpu")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_model, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(no_weights), device="cpu", num_kvcache_blocks=64)


def test_llm_rejects_a_kv_pool_smaller_than_one_request(tiny_model):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_model, device="cpu", kvcache_block_size=16, max_model_len=512, num_kvcache_blocks=31)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_model, device="cpu", kvcache_block_size=16, max_model_len=512, cpu_kvcache_space_gib=2**-20)
    llm = LLM(tiny_model, device="cpu", kvcache_block_size=16, max_model_len=512, num_kvcache_blocks=32)
    assert len(llm.scheduler.block_manager.blocks) == 32


BAD_SAMPLING_VALUES = [
    ("temperature", -0.1, ValueError),
    ("temperature", math.nan, ValueError),
    ("temperature", "0.7", TypeError),
    ("temperature", None, TypeError),
    ("temperature", True, TypeError),
    ("top_k", 0, ValueError),
    ("top_k", -2, ValueError),
    ("top_k", 5.0, TypeError),
    ("top_p", 0.0, ValueError),
    ("top_p", 1.5, ValueError),
    ("top_p", math.nan, ValueError),
    ("top_p", "0.9", TypeError),
    ("min_p", -0.1, ValueError),
    ("min_p", 1.1, ValueError),
    ("min_p", math.nan, ValueError),
    ("seed", -1, ValueError),
    ("seed", 1.0, TypeError),
    ("seed", "7", TypeError),
    ("max_tokens", 0, ValueError),
    ("max_tokens", 16.0, TypeError),
    ("max_tokens", None, TypeError),
    ("min_tokens", -1, ValueError),
    ("min_tokens", 65, ValueError),
    ("min_tokens", 1.0, TypeError),
    ("ignore_eos", 1, TypeError),
    ("ignore_eos", None, TypeError),
    ("stop_token_ids", 2, TypeError),
    ("stop_token_ids", [2, -1], ValueError),
    ("stop_token_ids", [2.0], TypeError),
    ("stop_token_ids", [True], TypeError),
    ("logprobs", -1, ValueError),
    ("logprobs", 2.0, TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD_SAMPLING_VALUES)
def test_bad_sampling_values_raise_naming_the_field(name, value, error):
    with pytest.raises(error, match=name):
        SamplingParams(**{name: value})


@pytest.mark.parametrize("value", ["", [""], ["ok", 3], 5, None])
def test_bad_stop_strings(value):
    with pytest.raises((ValueError, TypeError), match="stop"):
        SamplingParams(stop=value)


def test_good_sampling_params():
    params = SamplingParams(temperature=0, top_k=1, top_p=1, min_p=0, seed=0, max_tokens=1, min_tokens=1,
                            stop_token_ids=(5, 6), stop="x", logprobs=0)
    assert params.greedy and params.stop == ["x"] and params.stop_token_ids == [5, 6]
    assert not SamplingParams(temperature=0.7).greedy
    with pytest.raises(TypeError, match="temprature"):
        SamplingParams(temprature=0.5)
