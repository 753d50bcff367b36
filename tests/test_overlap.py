"""Overlap scheduling (the host launches step N+1 before reading step N's tokens) gives the same
outputs as the synchronous loop: forced on here, on the CPU, where it is otherwise off."""
from __future__ import annotations

import pytest
from conftest import assert_invariants, make_llm, random_prompts

from nanovllm import SamplingParams


@pytest.fixture(scope="module")
def engines(tiny_model):
    on, off = make_llm(tiny_model, overlap_scheduling=True), make_llm(tiny_model, overlap_scheduling=False)
    assert on.runtime.overlap and not off.runtime.overlap
    return on, off


@pytest.fixture(scope="module")
def prompts(vocab_ids):
    return random_prompts(16, 1, 200, vocab_ids, seed=21)


def run_stepwise(llm, prompts, params):
    """Drive the loop by hand, checking block invariants after every step."""
    requests = llm._add_all(prompts, params, stream=False)
    while not llm.is_finished():
        llm.step()
        assert_invariants(llm)
    return [llm.requests.pop(request.request_id).output() for request in requests]


def test_stops_at_different_steps_match_the_synchronous_loop(engines, prompts, hf):
    on, off = engines
    lengths = [SamplingParams(temperature=0.0, max_tokens=1 + 3 * i) for i in range(len(prompts))]
    reference = off.generate(prompts, lengths, use_tqdm=False)
    for prompt, out, params in zip(prompts, reference, lengths):
        assert out["token_ids"] == hf.greedy(prompt, params.max_tokens)
    stop_ids = [SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, stop_token_ids=[r["token_ids"][len(r["token_ids"]) // 2]])
                for r in reference]
    texts = off.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True), use_tqdm=False)
    stop_strings = [SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, stop=[t["text"][len(t["text"]) // 2:][:3]])
                    if len(t["text"]) > 6 else SamplingParams(temperature=0.0, max_tokens=5) for t in texts]
    for params in (lengths, stop_ids, stop_strings):
        expected = off.generate(prompts, params, use_tqdm=False)
        assert [out.outputs for out in run_stepwise(on, prompts, params)] == [out.outputs for out in expected]
    assert sum(r["finish_reason"] == "stop" for r in off.generate(prompts, stop_ids, use_tqdm=False)) == len(prompts)
    assert on.scheduler.block_manager.num_free_blocks == 256


def test_eos_seeds_and_streaming_match(engines, prompts):
    on, off = engines
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=30, top_p=0.9) for i in range(len(prompts))]
    assert [o.outputs for o in on.generate(prompts, params, use_tqdm=False)] == [o.outputs for o in off.generate(prompts, params, use_tqdm=False)]
    streamed = {}
    for chunk in on.stream(prompts, params):
        streamed[chunk.index] = streamed.get(chunk.index, "") + chunk.text
    assert [streamed[i] for i in range(len(prompts))] == [o["text"] for o in off.generate(prompts, params, use_tqdm=False)]


def test_preemption_and_prefix_hits_under_overlap(tiny_model, vocab_ids, hf):
    shared = random_prompts(1, 64, 64, vocab_ids, seed=22)[0]
    prompts = [shared + p for p in random_prompts(10, 5, 80, vocab_ids, seed=23)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for policy in ("prefill_first", "chunked"):
        llm = make_llm(tiny_model, overlap_scheduling=True, max_model_len=256, max_num_batched_tokens=256,
                       num_kvcache_blocks=18, scheduling_policy=policy)
        outputs = run_stepwise(llm, prompts, params)
        assert llm.scheduler.num_preemptions > 0
        assert llm.scheduler.block_manager.num_hit_tokens > 0
        for prompt, out in zip(prompts, outputs):
            assert out["token_ids"] == hf.greedy(prompt, 40, ignore_eos=True)
        assert llm.scheduler.block_manager.num_free_blocks == 18


def test_tensor_parallel_overlap_matches_hf(tiny_model, prompts, hf):
    llm = make_llm(tiny_model, overlap_scheduling=True, tensor_parallel_size=2)
    assert llm.model_runner.share_sampled
    outputs = llm.generate(prompts[:6], SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        assert out["token_ids"] == hf.greedy(prompt, 20)
    llm.exit()
