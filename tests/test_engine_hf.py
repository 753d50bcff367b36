"""The engine's greedy tokens equal HF transformers' on the tiny checkpoint (CPU, fp32)."""
from __future__ import annotations

import random

from conftest import assert_invariants, make_llm, random_prompts

from nanovllm import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def check_against_hf(llm, hf, prompts, params=GREEDY) -> None:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outputs) == len(prompts)
    for prompt, output in zip(prompts, outputs):
        expected = hf.greedy(prompt, params.max_tokens, params.ignore_eos)
        assert output["token_ids"] == expected, f"prompt of {len(prompt)} tokens diverged"
    assert_invariants(llm)


def test_mixed_lengths_match_hf(tiny_model, hf, vocab_ids):
    prompts = random_prompts(18, 1, 300, vocab_ids, seed=1)
    prompts[0], prompts[1] = prompts[0][:1], prompts[1][:300]
    llm = make_llm(tiny_model)
    check_against_hf(llm, hf, prompts)


def test_string_prompts_match_hf(tiny_model, hf):
    llm = make_llm(tiny_model)
    texts = ["The scheduler batches requests.", "你好，世界！推理引擎", "a"]
    outputs = llm.generate(texts, GREEDY, use_tqdm=False)
    for text, output in zip(texts, outputs):
        assert output["token_ids"] == hf.greedy(llm.tokenizer.encode(text), GREEDY.max_tokens)
        assert output["text"] == llm.tokenizer.decode(output["token_ids"], skip_special_tokens=True)


def test_shared_prefixes_hit_the_cache(tiny_model, hf, vocab_ids):
    rng = random.Random(2)
    prefix = [rng.randrange(3, vocab_ids) for _ in range(100)]
    prompts = [prefix + [rng.randrange(3, vocab_ids) for _ in range(rng.randint(1, 40))] for _ in range(10)]
    llm = make_llm(tiny_model, max_num_seqs=2)
    check_against_hf(llm, hf, prompts)
    assert llm.scheduler.block_manager.num_hit_tokens >= 8 * 96


def test_fully_cached_prompt_still_computes_last_token(tiny_model, hf, vocab_ids):
    llm = make_llm(tiny_model)
    aligned, ragged = random_prompts(2, 64, 64, vocab_ids, seed=3)
    ragged = ragged[:57]
    for prompt in (aligned, ragged):
        check_against_hf(llm, hf, [prompt])
        hits_before = llm.scheduler.block_manager.num_hit_tokens
        check_against_hf(llm, hf, [prompt, prompt])
        hits = llm.scheduler.block_manager.num_hit_tokens - hits_before
        assert hits >= 2 * ((len(prompt) - 1) // 16) * 16


def test_preemption_matches_hf(tiny_model, hf, vocab_ids):
    prompts = random_prompts(12, 20, 120, vocab_ids, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    llm = make_llm(tiny_model, max_model_len=256, max_num_batched_tokens=256, num_kvcache_blocks=16)
    seqs = [llm.add_request(prompt, params, i) for i, prompt in enumerate(prompts)]
    while not llm.is_finished():
        llm.step()
        assert_invariants(llm)
    assert llm.scheduler.num_preemptions > 0
    for prompt, seq in zip(prompts, seqs):
        assert seq.completion_token_ids == hf.greedy(prompt, 40, ignore_eos=True)
        llm.requests.pop(seq.request_id)
    assert llm.scheduler.block_manager.num_free_blocks == 16


def test_stops_at_max_model_len(tiny_model, hf, vocab_ids):
    prompt = random_prompts(1, 100, 100, vocab_ids, seed=5)[0]
    llm = make_llm(tiny_model, max_model_len=128, max_num_batched_tokens=128, num_kvcache_blocks=8)
    [output] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True), use_tqdm=False)
    assert output["finish_reason"] == "length"
    assert output["token_ids"] == hf.greedy(prompt, 28, ignore_eos=True)
