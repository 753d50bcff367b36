"""vLLM's sampling options end to end on the tiny checkpoint: penalties and logit bias against HF and a
plain PyTorch reference of their formulas, n > 1 (prefilled once), stop-string and special-token options,
chat() against the template applied by hand, and generation_config.json defaults."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_llm, random_prompts

from nanovllm import SamplingParams


@pytest.fixture(scope="module")
def prompts(vocab_ids):
    return random_prompts(3, 8, 40, vocab_ids, seed=70)


@torch.inference_mode()
def reference_greedy(hf, prompt: list[int], steps: int, presence: float = 0.0, frequency: float = 0.0,
                     repetition: float = 1.0, bias: dict[int, float] | None = None) -> list[int]:
    """Greedy decoding on HF's logits with vLLM's formulas applied by hand, one token at a time."""
    tokens = list(prompt)
    for _ in range(steps):
        logits = hf.model(torch.tensor([tokens])).logits[0, -1].double()
        for token, value in (bias or {}).items():
            logits[token] += value
        output = torch.tensor(tokens[len(prompt):], dtype=torch.long)
        counts = torch.bincount(output, minlength=logits.numel()).double()
        seen = counts > 0
        seen[torch.tensor(prompt)] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
        logits = logits - frequency * counts - presence * (counts > 0).double()
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def greedy(**fields: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 16, "ignore_eos": True, **fields})


@torch.inference_mode()
def test_repetition_penalty_matches_hf_generate(llm, hf, prompts):
    changed = 0
    for prompt in prompts:
        ids = torch.tensor([prompt])
        expected = hf.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                                     repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        [out] = llm.generate([prompt], greedy(repetition_penalty=1.3), use_tqdm=False)
        assert out["token_ids"] == expected
        changed += out["token_ids"] != hf.greedy(prompt, 16, ignore_eos=True)
    assert changed, "the penalty must change some continuation"


@pytest.mark.parametrize("overlap", [False, True])
def test_penalties_and_bias_match_the_reference_formulas(tiny_model, hf, prompts, overlap):
    engine = make_llm(tiny_model, overlap_scheduling=overlap)
    plain = hf.greedy(prompts[0], 16, ignore_eos=True)
    cases = [
        dict(presence=1.5),
        dict(frequency=0.9),
        dict(presence=-0.5, frequency=0.4, repetition=1.2),
        dict(bias={plain[3]: -30.0, 7: 4.0}),
        dict(bias={11: 2.5}, frequency=0.5),
    ]
    names = {"presence": "presence_penalty", "frequency": "frequency_penalty", "repetition": "repetition_penalty", "bias": "logit_bias"}
    # All cases in one batch, next to an unpenalised row: rows must not leak into each other.
    params = [greedy(**{names[k]: v for k, v in case.items()}) for case in cases] + [greedy()]
    batch = [prompts[0]] * len(cases) + [prompts[0]]
    outputs = engine.generate(batch, params, use_tqdm=False)
    for case, out in zip(cases, outputs):
        assert out["token_ids"] == reference_greedy(hf, prompts[0], 16, **case), case
    assert outputs[-1]["token_ids"] == plain
    assert sum(out["token_ids"] != plain for out in outputs[:-1]) == len(cases)
    engine.exit()


def test_n_continuations_are_distinct_reproducible_and_prefilled_once(llm, vocab_ids):
    prompt = random_prompts(1, 70, 70, vocab_ids, seed=71)[0]
    params = SamplingParams(temperature=1.0, n=4, seed=3, max_tokens=12, ignore_eos=True)
    bm = llm.scheduler.block_manager
    runs = []
    for _ in range(2):
        before = bm.num_hit_tokens
        [out] = llm.generate([prompt], params, use_tqdm=False)
        runs.append([c.token_ids for c in out.outputs])
        assert [c.index for c in out.outputs] == [0, 1, 2, 3]
        if not runs[:-1]:
            full_blocks = (len(prompt) - 1) // 16 * 16
            assert bm.num_hit_tokens - before == out.num_cached_tokens == 3 * full_blocks, "siblings must reuse the prompt's blocks"
    assert runs[0] == runs[1], "a seeded request is reproducible"
    assert len({tuple(t) for t in runs[0]}) == 4, "the four continuations differ"
    [single] = llm.generate([prompt], SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert single["token_ids"] == runs[0][0], "continuation 0 keeps the request's seed"
    chunks = list(llm.stream([prompt], params))
    for i in range(4):
        assert [t for c in chunks if c.completion_index == i for t in c.token_ids] == runs[0][i]
    assert llm.is_finished() and not llm.requests
    assert bm.num_free_blocks == llm.runtime.num_kvcache_blocks


def test_stop_options(llm, prompts):
    full = llm.generate([prompts[1]], greedy(max_tokens=30), use_tqdm=False)[0]
    text, ids = full["text"], full["token_ids"]
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if text.find(text[i : i + 2]) == i and "\ufffd" not in text[i : i + 2])
    at = text.find(stop)
    cut = llm.generate([prompts[1]], greedy(max_tokens=30, stop=[stop]), use_tqdm=False)[0]
    kept = llm.generate([prompts[1]], greedy(max_tokens=30, stop=[stop], include_stop_str_in_output=True), use_tqdm=False)[0]
    assert (cut["text"], kept["text"]) == (text[:at], text[: at + len(stop)])
    assert cut.outputs[0].stop_reason == kept.outputs[0].stop_reason == stop
    by_token = llm.generate([prompts[1]], greedy(max_tokens=30, stop_token_ids=[ids[5]]), use_tqdm=False)[0]
    assert by_token.outputs[0].stop_reason == ids[5] and by_token["finish_reason"] == "stop"
    assert full.outputs[0].stop_reason is None and full["finish_reason"] == "length"


def test_skip_special_tokens(llm, prompts):
    im_start = llm.tokenizer.convert_tokens_to_ids("<|im_start|>")
    forced = dict(max_tokens=3, logit_bias={im_start: 100.0})
    shown = llm.generate([prompts[0]], greedy(skip_special_tokens=False, **forced), use_tqdm=False)[0]
    hidden = llm.generate([prompts[0]], greedy(**forced), use_tqdm=False)[0]
    assert shown["token_ids"] == hidden["token_ids"] == [im_start] * 3
    assert (shown["text"], hidden["text"]) == ("<|im_start|>" * 3, "")


def test_chat_equals_the_template_applied_by_hand(llm):
    conversations = [
        [{"role": "user", "content": "What does the scheduler do?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}],
    ]
    by_hand = [
        "<|im_start|>user\nWhat does the scheduler do?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a prime.<|im_end|>\n<|im_start|>assistant\n",
    ]
    params = greedy(max_tokens=12)
    chats = llm.chat(conversations, params, use_tqdm=False)
    expected = llm.generate(by_hand, params, use_tqdm=False)
    assert [c.outputs for c in chats] == [e.outputs for e in expected]
    assert [c.prompt for c in chats] == by_hand and [c.prompt_token_ids for c in chats] == [e.prompt_token_ids for e in expected]
    [single] = llm.chat(conversations[0], params, use_tqdm=False)
    assert single.outputs == chats[0].outputs
    template = "{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    [custom] = llm.chat(conversations[0], params, use_tqdm=False, chat_template=template, chat_template_kwargs={"greeting": "Hi! "})
    assert custom.prompt == "Hi! What does the scheduler do?"
    with pytest.raises(TypeError, match="messages"):
        llm.chat("hello", params)


def test_generation_config_defaults(tiny_model, hf, prompts, tmp_path):
    folder = tmp_path / "greedy_defaults"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0, "top_k": 20, "top_p": 0.8}))
    engine = make_llm(str(folder))
    defaults = engine.default_sampling_params
    assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.0, 20, 0.8)
    [out] = engine.generate([prompts[2]], use_tqdm=False)
    assert out["token_ids"] == hf.greedy(prompts[2], defaults.max_tokens)
    assert make_llm(tiny_model).default_sampling_params == SamplingParams()


def test_prompt_token_table_is_copied_once_while_the_penalised_rows_stay() -> None:
    from nanovllm.engine.sampling_inputs import PromptTokenTable
    from nanovllm.engine.sequence import Sequence

    copies = []

    def device_array(values, dtype):
        copies.append(values)
        return torch.as_tensor(values)

    a, b = Sequence([3, 4, 5], SamplingParams(), 16), Sequence([6, 7], SamplingParams(), 16)
    table = PromptTokenTable()
    first = table.get([a, b], [True, False], 100, device_array)
    assert first.tolist() == [[3, 4, 5], [100, 100, 100]]
    a.token_ids.append(9)  # a decode step: the prompt is unchanged
    assert table.get([a, b], [True, False], 100, device_array) is first and len(copies) == 1
    assert table.get([b, a], [False, True], 100, device_array).tolist() == [[100, 100, 100], [3, 4, 5]]
    assert table.get([a, b], [True, True], 100, device_array).tolist() == [[3, 4, 5], [6, 7, 100]]
    assert len(copies) == 3
