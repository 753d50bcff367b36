"""Config, SamplingParams and LLM(...) reject bad settings with errors that name the setting."""
from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config

# Every bad setting of Config and SamplingParams (one shared validation helper): the error names the
# setting (and, through the helper, the value and the limit).
BAD_VALUES = [
    (Config, {"max_num_batched_tokens": 0}, ValueError),
    (Config, {"max_num_batched_tokens": -5}, ValueError),
    (Config, {"max_num_batched_tokens": 1024.0}, TypeError),
    (Config, {"max_num_batched_tokens": "1024"}, TypeError),
    (Config, {"max_num_batched_tokens": True}, TypeError),
    (Config, {"max_num_seqs": 0}, ValueError),
    (Config, {"max_num_seqs": None}, TypeError),
    (Config, {"max_num_seqs": 2.5}, TypeError),
    (Config, {"max_num_seqs": 65536}, ValueError),
    (Config, {"max_model_len": 1}, ValueError),
    (Config, {"max_model_len": 4097}, ValueError),
    (Config, {"max_model_len": "512"}, TypeError),
    (Config, {"gpu_memory_utilization": 0}, ValueError),
    (Config, {"gpu_memory_utilization": 1.01}, ValueError),
    (Config, {"gpu_memory_utilization": -0.5}, ValueError),
    (Config, {"gpu_memory_utilization": math.nan}, ValueError),
    (Config, {"gpu_memory_utilization": "0.9"}, TypeError),
    (Config, {"gpu_memory_utilization": True}, TypeError),
    (Config, {"tensor_parallel_size": 0}, ValueError),
    (Config, {"tensor_parallel_size": 9}, ValueError),
    (Config, {"tensor_parallel_size": 3}, ValueError),
    (Config, {"tensor_parallel_size": 2.0}, TypeError),
    (Config, {"enforce_eager": 1}, TypeError),
    (Config, {"enforce_eager": "yes"}, TypeError),
    (Config, {"kvcache_block_size": 8}, ValueError),
    (Config, {"kvcache_block_size": 24}, ValueError),
    (Config, {"kvcache_block_size": 0}, ValueError),
    (Config, {"kvcache_block_size": 16.0}, TypeError),
    (Config, {"num_kvcache_blocks": 0}, ValueError),
    (Config, {"num_kvcache_blocks": -2}, ValueError),
    (Config, {"num_kvcache_blocks": 10.0}, TypeError),
    (Config, {"device": "gpu"}, ValueError),
    (Config, {"device": "CPU"}, ValueError),
    (Config, {"device": None}, ValueError),
    (Config, {"dtype": "fp16"}, ValueError),
    (Config, {"dtype": torch.float16}, ValueError),
    (Config, {"attention_backend": "flash"}, ValueError),
    (Config, {"attention_backend": ""}, ValueError),
    (Config, {"cpu_kvcache_space_gib": 0}, ValueError),
    (Config, {"cpu_kvcache_space_gib": -1.0}, ValueError),
    (Config, {"cpu_kvcache_space_gib": math.nan}, ValueError),
    (Config, {"cpu_kvcache_space_gib": math.inf}, ValueError),
    (Config, {"cpu_kvcache_space_gib": "4"}, TypeError),
    (Config, {"cpu_kvcache_space_gib": True}, TypeError),
    (Config, {"enable_prefix_caching": 0}, TypeError),
    (Config, {"enable_prefix_caching": "false"}, TypeError),
    (Config, {"scheduling_policy": "fcfs"}, ValueError),
    (Config, {"scheduling_policy": "Chunked"}, ValueError),
    (SamplingParams, {"temperature": -0.1}, ValueError),
    (SamplingParams, {"temperature": math.nan}, ValueError),
    (SamplingParams, {"temperature": "0.7"}, TypeError),
    (SamplingParams, {"temperature": None}, TypeError),
    (SamplingParams, {"temperature": True}, TypeError),
    (SamplingParams, {"top_k": 0}, ValueError),
    (SamplingParams, {"top_k": -2}, ValueError),
    (SamplingParams, {"top_k": 5.0}, TypeError),
    (SamplingParams, {"top_p": 0.0}, ValueError),
    (SamplingParams, {"top_p": 1.5}, ValueError),
    (SamplingParams, {"top_p": math.nan}, ValueError),
    (SamplingParams, {"top_p": "0.9"}, TypeError),
    (SamplingParams, {"min_p": -0.1}, ValueError),
    (SamplingParams, {"min_p": 1.1}, ValueError),
    (SamplingParams, {"min_p": math.nan}, ValueError),
    (SamplingParams, {"seed": -1}, ValueError),
    (SamplingParams, {"seed": 1.0}, TypeError),
    (SamplingParams, {"seed": "7"}, TypeError),
    (SamplingParams, {"max_tokens": 0}, ValueError),
    (SamplingParams, {"max_tokens": 16.0}, TypeError),
    (SamplingParams, {"max_tokens": None}, TypeError),
    (SamplingParams, {"min_tokens": -1}, ValueError),
    (SamplingParams, {"min_tokens": 65}, ValueError),
    (SamplingParams, {"min_tokens": 1.0}, TypeError),
    (SamplingParams, {"ignore_eos": 1}, TypeError),
    (SamplingParams, {"ignore_eos": None}, TypeError),
    (SamplingParams, {"stop_token_ids": 2}, TypeError),
    (SamplingParams, {"stop_token_ids": [2, -1]}, ValueError),
    (SamplingParams, {"stop_token_ids": [2.0]}, TypeError),
    (SamplingParams, {"stop_token_ids": [True]}, TypeError),
    (SamplingParams, {"logprobs": -1}, ValueError),
    (SamplingParams, {"logprobs": 2.0}, TypeError),
    (SamplingParams, {"prompt_logprobs": -1}, ValueError),
    (SamplingParams, {"prompt_logprobs": True}, TypeError),
    (SamplingParams, {"temperature": math.inf}, ValueError),
    (SamplingParams, {"seed": 2**63}, ValueError),
    (SamplingParams, {"min_tokens": 10, "max_tokens": 5}, ValueError),
    (SamplingParams, {"stop": ["ok", ""]}, ValueError),
    (SamplingParams, {"stop": [1]}, TypeError),
    (SamplingParams, {"stop": None}, TypeError),
    (SamplingParams, {"stop": "\ud800"}, ValueError),
    (SamplingParams, {"n": 0}, ValueError),
    (SamplingParams, {"n": 2.0}, TypeError),
    (SamplingParams, {"presence_penalty": 2.5}, ValueError),
    (SamplingParams, {"presence_penalty": math.nan}, ValueError),
    (SamplingParams, {"frequency_penalty": -3}, ValueError),
    (SamplingParams, {"frequency_penalty": "1"}, TypeError),
    (SamplingParams, {"repetition_penalty": 0}, ValueError),
    (SamplingParams, {"repetition_penalty": math.inf}, ValueError),
    (SamplingParams, {"logit_bias": [(1, 2.0)]}, TypeError),
    (SamplingParams, {"logit_bias": {-1: 1.0}}, ValueError),
    (SamplingParams, {"logit_bias": {"5": 1.0}}, TypeError),
    (SamplingParams, {"logit_bias": {5: 101.0}}, ValueError),
    (SamplingParams, {"logit_bias": {5: math.nan}}, ValueError),
    (SamplingParams, {"include_stop_str_in_output": 1}, TypeError),
    (SamplingParams, {"skip_special_tokens": None}, TypeError),
    (Config, {"skip_tokenizer_init": 1}, TypeError),
]


@pytest.mark.parametrize("cls, fields, error", BAD_VALUES, ids=lambda x: repr(x) if isinstance(x, dict) else getattr(x, "__name__", None))
def test_bad_values_raise_naming_the_setting(tiny_model, cls, fields, error):
    args = (tiny_model,) if cls is Config else ()
    with pytest.raises(error) as caught:
        cls(*args, **fields)
    message = str(caught.value)
    assert any(name in message for name in fields), message
    for value in fields.values():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(fields) == 1:
            assert repr(value) in message or str(value) in message, message


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
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        LLM(str(no_weights), device="cpu", num_kvcache_blocks=64)


def test_llm_rejects_a_kv_pool_smaller_than_one_request(tiny_model):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_model, device="cpu", kvcache_block_size=16, max_model_len=512, num_kvcache_blocks=31)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_model, device="cpu", kvcache_block_size=16, max_model_len=512, cpu_kvcache_space_gib=2**-20)
    llm = LLM(tiny_model, device="cpu", kvcache_block_size=16, max_model_len=512, num_kvcache_blocks=32)
    assert len(llm.scheduler.block_manager.blocks) == 32


@pytest.mark.parametrize("value", ["", [""], ["ok", 3], 5, None])
def test_bad_stop_strings(value):
    with pytest.raises((ValueError, TypeError), match="stop"):
        SamplingParams(stop=value)


def test_good_sampling_params():
    params = SamplingParams(temperature=0, top_k=1, top_p=1, min_p=0, seed=0, max_tokens=1, min_tokens=1,
                            stop_token_ids=(5, 6), stop="x", logprobs=0)
    assert params.greedy and params.stop == ("x",) and params.stop_token_ids == (5, 6)
    assert not SamplingParams(temperature=0.7).greedy
    with pytest.raises(TypeError, match="temprature"):
        SamplingParams(temprature=0.5)
