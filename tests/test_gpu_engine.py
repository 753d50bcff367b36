"""The engine on CUDA: fp32 greedy equals HF, CUDA graphs equal eager, Triton equals the torch backend."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_invariants, random_prompts

from nanovllm import LLM, SamplingParams

pytestmark = pytest.mark.cuda

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def cuda_llm(path: str, **kwargs: object) -> LLM:
    settings = dict(device="cuda", dtype="float32", kvcache_block_size=16, max_model_len=1024, max_num_batched_tokens=2048,
                    num_kvcache_blocks=512, max_num_seqs=64)
    settings.update(kwargs)
    return LLM(path, **settings)


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert_invariants(llm)
    return outputs


@pytest.fixture(scope="module")
def prompts(vocab_ids: int) -> list[list[int]]:
    return random_prompts(20, 1, 300, vocab_ids, seed=11)


def test_triton_fp32_matches_hf(tiny_model, hf, prompts):
    llm = cuda_llm(tiny_model, attention_backend="triton")
    assert llm.runtime.attention_backend == "triton" and llm.runtime.cuda_graphs
    for prompt, tokens in zip(prompts, greedy_tokens(llm, prompts)):
        assert tokens == hf.greedy(prompt, 32, ignore_eos=True)
    llm.exit()


def test_cuda_graphs_equal_eager_and_prefix_hits(tiny_model, prompts):
    shared = [prompts[0][:1] * 40 + p for p in prompts[:8]]
    graphed = cuda_llm(tiny_model, attention_backend="triton")
    first = greedy_tokens(graphed, prompts + shared)
    again = greedy_tokens(graphed, shared)
    assert graphed.scheduler.block_manager.num_hit_tokens > 0
    graphed.exit()
    eager = cuda_llm(tiny_model, attention_backend="triton", enforce_eager=True)
    assert not eager.runtime.cuda_graphs
    assert greedy_tokens(eager, prompts + shared) == first
    assert first[len(prompts):] == again
    eager.exit()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_triton_matches_torch_backend_low_precision(tiny_model, prompts, dtype):
    """Half-precision runs of the two backends agree on almost every token (rounding may flip rare near-ties)."""
    outputs = []
    for backend in ("triton", "torch"):
        llm = cuda_llm(tiny_model, attention_backend=backend, dtype=dtype, enforce_eager=backend == "torch")
        outputs.append(greedy_tokens(llm, prompts))
        llm.exit()
    same_first = sum(a[0] == b[0] for a, b in zip(*outputs))
    assert same_first >= len(prompts) - 1


def test_preemption_on_gpu(tiny_model, hf, prompts):
    llm = cuda_llm(tiny_model, attention_backend="triton", num_kvcache_blocks=70)
    outputs = greedy_tokens(llm, prompts)
    assert llm.scheduler.num_preemptions > 0
    for prompt, tokens in zip(prompts, outputs):
        assert tokens == hf.greedy(prompt, 32, ignore_eos=True)
    llm.exit()


def test_kv_cache_sized_from_gpu_memory(tiny_model):
    llm = LLM(tiny_model, device="cuda", max_model_len=1024, gpu_memory_utilization=0.3, enforce_eager=True)
    free, total = torch.cuda.mem_get_info()
    kv_bytes = llm.model_runner.kv_cache.nbytes
    assert 0.2 * total < kv_bytes < 0.3 * total
    llm.exit()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_tensor_parallel_two_gpus_matches_tp1(tiny_model, hf, prompts, enforce_eager):
    """NCCL TP=2 (overlap on, so rank 0 broadcasts sampled tokens) equals HF; nothing left after exit."""
    import multiprocessing
    import os

    llm = cuda_llm(tiny_model, attention_backend="triton", tensor_parallel_size=2, enforce_eager=enforce_eager)
    assert llm.runtime.overlap and llm.runtime.cuda_graphs != enforce_eager
    for prompt, tokens in zip(prompts, greedy_tokens(llm, prompts)):
        assert tokens == hf.greedy(prompt, 32, ignore_eos=True)
    llm.exit()
    assert not multiprocessing.active_children()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"nanovllm-{os.getpid()}-")]
