"""prompt_logprobs: every prompt position's logprobs, equal to HF's log_softmax of the prompt's logits, across
chunked-prefill chunks and beside a cached prefix, without changing what is generated."""
from __future__ import annotations

import pytest
import torch
from conftest import make_llm, random_prompts

from nanovllm import SamplingParams


def greedy(**fields: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, **fields)


@torch.inference_mode()
def assert_prompt_logprobs(entries: list, prompt: list[int], hf, k: int, tokenizer) -> None:
    """Entry p (p >= 1) holds prompt[p] and the top k tokens of HF's fp32 log_softmax at position p - 1."""
    expected = hf.model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    assert len(entries) == len(prompt) and entries[0] is None
    for position, entry in enumerate(entries[1:], 1):
        row = expected[position - 1]
        assert set(entry) == set(row.topk(k).indices.tolist()) | {prompt[position]} if k else set(entry) == {prompt[position]}
        for token_id, logprob in entry.items():
            assert logprob.logprob == pytest.approx(row[token_id].item(), abs=1e-4)
            assert logprob.rank == 1 + int((row > row[token_id]).sum())
            assert logprob.decoded_token == tokenizer.decode([token_id])


def test_prompt_logprobs_across_chunks_and_beside_a_cached_prefix(tiny_model, hf, vocab_ids):
    llm = make_llm(tiny_model, scheduling_policy="chunked", max_num_batched_tokens=32, max_num_seqs=4)
    prompt, other = random_prompts(2, 70, 70, vocab_ids, seed=31)
    plain = llm.generate([prompt], greedy(), use_tqdm=False)[0]  # leaves the prompt's full blocks in the prefix cache
    assert plain["token_ids"] == hf.greedy(prompt, 6, ignore_eos=True)
    assert plain.prompt_logprobs is None
    asked, beside = llm.generate([prompt, other], [greedy(prompt_logprobs=5), greedy()], use_tqdm=False)
    assert asked.num_cached_tokens == 0, "a request with prompt_logprobs computes its whole prompt"
    assert_prompt_logprobs(asked.prompt_logprobs, prompt, hf, 5, llm.tokenizer)
    assert asked["token_ids"] == plain["token_ids"]
    assert beside["token_ids"] == hf.greedy(other, 6, ignore_eos=True) and beside.prompt_logprobs is None
    assert llm.generate([prompt], greedy(), use_tqdm=False)[0].num_cached_tokens == 64, "the cached prefix was there"
    [zero] = llm.generate([prompt[:20]], greedy(prompt_logprobs=0, logprobs=1), use_tqdm=False)
    assert_prompt_logprobs(zero.prompt_logprobs, prompt[:20], hf, 0, llm.tokenizer)
    assert zero["token_ids"] == hf.greedy(prompt[:20], 6, ignore_eos=True) and len(zero["logprobs"]) == 6
    [single] = llm.generate([prompt[:1]], greedy(prompt_logprobs=3), use_tqdm=False)
    assert single.prompt_logprobs == [None]


def test_prompt_logprobs_whole_prompt_steps_and_n_continuations(tiny_model, hf, vocab_ids):
    llm = make_llm(tiny_model, scheduling_policy="prefill_first")
    [prompt] = random_prompts(1, 40, 40, vocab_ids, seed=32)
    sampling = SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=4, ignore_eos=True, prompt_logprobs=2)
    [out] = llm.generate([prompt], sampling, use_tqdm=False)
    assert_prompt_logprobs(out.prompt_logprobs, prompt, hf, 2, llm.tokenizer)
    assert len(out.outputs) == 2 and out.outputs[0].token_ids != out.outputs[1].token_ids
    assert out.num_cached_tokens == 32, "the second continuation still takes the prompt's blocks from the cache"
