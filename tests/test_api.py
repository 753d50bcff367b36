"""The user-facing API on the tiny checkpoint: finish reasons, stop strings and tokens, min_tokens, the
max_model_len clamp, streaming (incl. multi-byte characters split across tokens) and input validation."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import make_llm, random_prompts

from nanovllm import SamplingParams, StreamChunk
from nanovllm.engine.detokenizer import IncrementalDetokenizer

VOCAB = 2048  # the tiny preset's vocab_size


def greedy(max_tokens: int = 40, **fields: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **fields)


def run(llm, prompt, params: SamplingParams) -> dict:
    return llm.generate([prompt], params, use_tqdm=False)[0]


@torch.inference_mode()
def hf_generate(hf, prompt: list[int], max_new_tokens: int, eos: list[int], min_new_tokens: int) -> list[int]:
    """HF greedy tokens that stop at any of `eos`, which are suppressed for the first min_new_tokens tokens."""
    ids = torch.tensor([prompt])
    out = hf.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                            eos_token_id=eos, min_new_tokens=min_new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def by_request(chunks: list[StreamChunk]) -> dict[int, list[StreamChunk]]:
    grouped: dict[int, list[StreamChunk]] = {}
    for chunk in chunks:
        grouped.setdefault(chunk.index, []).append(chunk)
    return grouped


def assert_clean(llm) -> None:
    """Nothing queued or remembered: the engine is as it was before the call."""
    assert llm.is_finished() and not llm.requests
    assert llm.scheduler.block_manager.num_free_blocks == llm.runtime.num_kvcache_blocks


@pytest.fixture(scope="module")
def eos_prompt(hf) -> list[int]:
    """A 6-token prompt after which HF's greedy next token is EOS (found among 4096 random prompts)."""
    candidates = torch.randint(3, 1900, (4096, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        next_tokens = hf.model(candidates).logits[:, -1].argmax(-1)
    hits = (next_tokens == hf.eos_token_id).nonzero().flatten()
    assert len(hits), "no random prompt makes the tiny model emit EOS"
    return candidates[hits[0]].tolist()


# ---- finish reasons, stop tokens, min_tokens ------------------------------------------------------


def test_eos_stops_and_min_tokens_suppresses_it(llm, hf, eos_prompt):
    eos = hf.eos_token_id
    out = run(llm, eos_prompt, SamplingParams(temperature=0.0, max_tokens=8))
    assert (out["text"], out["token_ids"], out["finish_reason"]) == ("", [eos], "stop")
    ignored = run(llm, eos_prompt, greedy(8))
    assert ignored["token_ids"] == hf.greedy(eos_prompt, 8, ignore_eos=True) and ignored["finish_reason"] == "length"
    for min_tokens in (1, 3):
        held = run(llm, eos_prompt, SamplingParams(temperature=0.0, max_tokens=12, min_tokens=min_tokens))
        assert held["token_ids"] == hf_generate(hf, eos_prompt, 12, [eos], min_tokens)
        assert eos not in held["token_ids"][:min_tokens]
        assert held["finish_reason"] == ("stop" if held["token_ids"][-1] == eos else "length")
    [chunk] = list(llm.stream([eos_prompt], SamplingParams(temperature=0.0, max_tokens=8)))
    assert (chunk.text, chunk.token_ids, chunk.finished, chunk.finish_reason) == ("", [eos], True, "stop")


def test_stop_token_ids_and_min_tokens(llm, hf, vocab_ids):
    prompt = random_prompts(1, 10, 10, vocab_ids, seed=30)[0]
    ids = run(llm, prompt, greedy(24))["token_ids"]
    j = next(i for i in range(4, 24) if ids.index(ids[i]) == i)
    stopped = run(llm, prompt, greedy(24, stop_token_ids=[ids[j]]))
    assert stopped["token_ids"] == ids[: j + 1] and stopped["finish_reason"] == "stop"
    assert stopped["text"] == llm.tokenizer.decode(ids[: j + 1], skip_special_tokens=True)
    held = run(llm, prompt, greedy(24, stop_token_ids=[ids[j]], min_tokens=j + 1))
    assert held["token_ids"] == hf_generate(hf, prompt, 24, [ids[j]], j + 1)
    assert held["token_ids"][:j] == ids[:j] and held["token_ids"][j] != ids[j]


def test_max_tokens_gives_length(llm, vocab_ids):
    prompts = random_prompts(3, 5, 30, vocab_ids, seed=31)
    for out in llm.generate(prompts, SamplingParams(temperature=0.7, seed=1, max_tokens=7, ignore_eos=True), use_tqdm=False):
        assert len(out["token_ids"]) == 7 and out["finish_reason"] == "length"


def test_generation_is_clamped_at_max_model_len(tiny_model, hf, vocab_ids):
    small = make_llm(tiny_model, max_model_len=64)
    p60, p63, p64 = (random_prompts(1, n, n, vocab_ids, seed=32)[0] for n in (60, 63, 64))
    outs = small.generate([p60, p63], greedy(20), use_tqdm=False)
    assert outs[0]["token_ids"] == hf.greedy(p60, 4, ignore_eos=True) and outs[0]["finish_reason"] == "length"
    assert len(outs[1]["token_ids"]) == 1 and outs[1]["finish_reason"] == "length"
    with pytest.raises(ValueError, match="prompt has 64 tokens.*max_model_len=64"):
        small.generate([p64], greedy(1), use_tqdm=False)
    assert_clean(small)


# ---- stop strings ------------------------------------------------------------------------------


def token_boundaries(tokenizer, ids: list[int]) -> set[int]:
    """Character offsets in the decoded text where a token ends on a complete character."""
    texts = (tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(1, len(ids)))
    return {len(text) for text in texts if not text.endswith("\ufffd")}


def pick_stop(text: str, start: int, boundaries: set[int]) -> tuple[str, int]:
    """A 3-character stop string first occurring at index >= start, straddling a token boundary, free of U+FFFD."""
    for i in range(start, len(text) - 3):
        stop = text[i : i + 3]
        if "\ufffd" not in stop and text.find(stop) == i and (i + 1 in boundaries or i + 2 in boundaries):
            return stop, i
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings_cut_the_text(llm, vocab_ids):
    prompt = random_prompts(1, 12, 12, vocab_ids, seed=35)[0]
    full = run(llm, prompt, greedy(40))
    text, ids = full["text"], full["token_ids"]
    stop, at = pick_stop(text, 8, token_boundaries(llm.tokenizer, ids))
    out = run(llm, prompt, greedy(40, stop=stop))
    assert out["text"] == text[:at] and out["finish_reason"] == "stop"
    n = len(out["token_ids"])
    assert out["token_ids"] == ids[:n], "stops at the token that completes the stop string"
    assert stop in llm.tokenizer.decode(ids[:n]) and stop not in llm.tokenizer.decode(ids[: n - 1])
    later, later_at = pick_stop(text, at + 4, set(range(len(text))))
    assert run(llm, prompt, greedy(40, stop=[later, stop]))["text"] == text[:at]
    assert run(llm, prompt, greedy(40, stop=[later]))["text"] == text[:later_at]
    not_yet = run(llm, prompt, greedy(40, stop=[stop], min_tokens=n + 1))
    assert not_yet["token_ids"][:n] == ids[:n] and stop in not_yet["text"]


def test_stop_strings_never_leak_into_the_stream(llm, vocab_ids):
    prompts = random_prompts(4, 5, 40, vocab_ids, seed=34)
    fulls = llm.generate(prompts, greedy(40), use_tqdm=False)
    params = []
    for prompt, full in zip(prompts, fulls):
        stop, _ = pick_stop(full["text"], 10, token_boundaries(llm.tokenizer, full["token_ids"]))
        params.append(greedy(40, stop=[stop, "\u2603\u2603"]))
    expected = llm.generate(prompts, params, use_tqdm=False)
    streamed = by_request(list(llm.stream(prompts, params)))
    for i, (sampling, out) in enumerate(zip(params, expected)):
        assert out["finish_reason"] == "stop"
        assert "".join(chunk.text for chunk in streamed[i]) == out["text"]
        assert all(sampling.stop[0] not in chunk.text for chunk in streamed[i])
        assert streamed[i][-1].finished and streamed[i][-1].finish_reason == "stop"
    assert_clean(llm)


# ---- streaming and incremental detokenization ------------------------------------------------------


def split_characters(tokenizer, ids: list[int]) -> int:
    """How many times a multi-byte character of the final text was split between two tokens."""
    final = tokenizer.decode(ids, skip_special_tokens=True)
    count = 0
    for k in range(1, len(ids)):
        head = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if head.endswith("\ufffd") and final.startswith(head[:-1]) and final[len(head) - 1] != "\ufffd":
            count += 1
    return count


def test_detokenizer_holds_back_partial_characters(llm):
    tokenizer = llm.tokenizer
    text = "你好，世界！推理引擎把训练好的语言模型变成服务。KV cache: 键值缓存。"
    ids = tokenizer.encode(text)
    assert split_characters(tokenizer, ids) > 0
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([token]) for token in ids]
    assert "".join(deltas) == detok.text == text
    assert not any("\ufffd" in delta for delta in deltas)
    partial = next(token for token in ids if tokenizer.decode([token]).endswith("\ufffd"))
    tail = IncrementalDetokenizer(tokenizer)
    assert tail.add([partial]) == ""
    assert tail.add([], final=True) == tokenizer.decode([partial]), "final flushes what is left"


def test_stream_concatenates_to_generate(llm, vocab_ids):
    texts = ["你好，世界！推理引擎", "键值缓存被切分成固定大小的块。", "The scheduler batches requests."]
    prompts = [*texts, *random_prompts(5, 3, 40, vocab_ids, seed=35)]
    params = [greedy(32) if i % 2 else SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=32) for i in range(len(prompts))]
    expected = llm.generate(prompts, params, use_tqdm=False)
    streamed = by_request(list(llm.stream(prompts, params)))
    assert sorted(streamed) == list(range(len(prompts)))
    splits = 0
    for i, out in enumerate(expected):
        chunks = streamed[i]
        assert "".join(chunk.text for chunk in chunks) == out["text"]
        assert out["text"] == llm.tokenizer.decode(out["token_ids"], skip_special_tokens=True)
        assert [t for chunk in chunks for t in chunk.token_ids] == out["token_ids"]
        assert [chunk.finished for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
        assert [chunk.finish_reason for chunk in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1].finish_reason == out["finish_reason"]
        splits += split_characters(llm.tokenizer, out["token_ids"])
    assert splits > 0, "no output split a multi-byte character: the test lost its point"
    assert_clean(llm)


def test_closing_a_stream_early_leaves_the_engine_usable(llm, hf, vocab_ids):
    prompts = random_prompts(4, 5, 30, vocab_ids, seed=36)
    stream = llm.stream(prompts, greedy(20))
    next(stream)
    stream.close()
    assert_clean(llm)
    outs = llm.generate(prompts, greedy(20), use_tqdm=False)
    assert [out["token_ids"] for out in outs] == [hf.greedy(p, 20, ignore_eos=True) for p in prompts]


# ---- input validation ------------------------------------------------------------------------------


BAD_PROMPTS = [
    ("", ValueError, "prompt is an empty string"),
    ([], ValueError, "prompt is an empty list"),
    ([5, -1], ValueError, f"token id -1 is outside the vocabulary [0, {VOCAB})"),
    ([5, VOCAB], ValueError, f"token id {VOCAB} is outside the vocabulary [0, {VOCAB})"),
    ([5, "7"], TypeError, "'7'"),
    ([5, 1.0], TypeError, "1.0"),
    ([True], TypeError, "True"),
    (None, TypeError, "NoneType"),
    (7, TypeError, "int"),
    ([3] * 512, ValueError, "prompt has 512 tokens; it must be shorter than max_model_len=512"),
    (" word" * 600, ValueError, "max_model_len=512"),
]


@pytest.mark.parametrize("prompt, error, message", BAD_PROMPTS)
def test_bad_prompt_is_rejected_before_any_work(llm, prompt, error, message):
    good = [3, 4, 5]
    with pytest.raises(error, match=re.escape(message)):
        llm.generate([good, prompt], greedy(4), use_tqdm=False)
    assert_clean(llm)
    with pytest.raises(error, match=re.escape(message)):
        llm.stream([good, prompt], greedy(4))
    with pytest.raises(error, match=re.escape(message)):
        llm.add_request(prompt, greedy(4))
    assert_clean(llm)


BAD_CALLS = [
    (dict(prompts="hello"), TypeError, "prompts must be a list"),
    (dict(prompts=None), TypeError, "NoneType"),
    (dict(sampling_params=[greedy(4)] * 3), ValueError, "got 2 prompts but 3 sampling params"),
    (dict(sampling_params=[greedy(4)]), ValueError, "got 2 prompts but 1 sampling params"),
    (dict(sampling_params={"temperature": 0}), TypeError, "dict"),
    (dict(sampling_params=[greedy(4), None]), TypeError, "NoneType"),
    (dict(sampling_params=greedy(4, stop_token_ids=[VOCAB + 5])), ValueError, f"stop_token_ids entry {VOCAB + 5} is outside"),
    (dict(sampling_params=SamplingParams(logprobs=VOCAB + 1)), ValueError, f"got {VOCAB + 1}"),
    (dict(sampling_params=SamplingParams(prompt_logprobs=VOCAB + 1)), ValueError, f"prompt_logprobs must be <= the vocabulary size {VOCAB}"),
]


@pytest.mark.parametrize("call, error, message", BAD_CALLS)
def test_bad_call_is_rejected_before_any_work(llm, call, error, message):
    arguments = dict(prompts=[[3, 4, 5], "hi"], sampling_params=greedy(4)) | call
    with pytest.raises(error, match=re.escape(message)):
        llm.generate(arguments["prompts"], arguments["sampling_params"], use_tqdm=False)
    with pytest.raises(error, match=re.escape(message)):
        llm.stream(arguments["prompts"], arguments["sampling_params"])
    assert_clean(llm)


def test_rejections_leave_results_and_engine_intact(llm, hf, vocab_ids):
    prompts = random_prompts(3, 4, 50, vocab_ids, seed=37)
    before = llm.generate(prompts, greedy(12), use_tqdm=False)
    snapshot = copy.deepcopy(before)
    for prompt, error, _ in BAD_PROMPTS:
        with pytest.raises(error):
            llm.generate([*prompts, prompt], greedy(12), use_tqdm=False)
    for call, error, _ in BAD_CALLS:
        with pytest.raises(error):
            llm.generate(call.get("prompts", prompts[:2]), call.get("sampling_params", greedy(12)), use_tqdm=False)
    assert before == snapshot
    after = llm.generate(prompts, greedy(12), use_tqdm=False)
    assert [out.outputs for out in after] == [out.outputs for out in before]
    assert [out["token_ids"] for out in after] == [hf.greedy(p, 12, ignore_eos=True) for p in prompts]
    assert llm.generate([], greedy(12), use_tqdm=False) == []


def test_good_sampling_params_edge_values():
    assert SamplingParams(stop="abc").stop == ("abc",)
    assert SamplingParams(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy
    SamplingParams(top_k=1, top_p=1.0, min_p=1.0, seed=0, max_tokens=1, min_tokens=1, logprobs=0)
