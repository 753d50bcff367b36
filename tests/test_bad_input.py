"""Inputs found by a robustness audit that used to crash, hang or silently mis-sample: each now gets a
clear ValueError / TypeError (or is served as its meaning says), and the engine keeps working after it."""
from __future__ import annotations

import re
import time

import pytest
from conftest import assert_invariants, make_llm

from nanovllm import SamplingParams
from nanovllm.entrypoints.protocol import ApiError, ChatCompletionRequest, CompletionRequest

PROMPT = [3, 4, 5, 6]


def sample(**fields: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": 7, "max_tokens": 6, "ignore_eos": True, **fields})


def tokens(llm, params: SamplingParams) -> list[int]:
    return llm.generate([PROMPT], params, use_tqdm=False)[0]["token_ids"]


def assert_clean(llm) -> None:
    assert_invariants(llm)
    assert llm.is_finished() and not llm.requests
    assert llm.scheduler.block_manager.num_free_blocks == llm.runtime.num_kvcache_blocks


@pytest.mark.parametrize("top_k", [2**63, 10**30])
def test_top_k_beyond_the_vocabulary_keeps_it_all(llm, top_k):
    """Was an OverflowError inside the step (in the server: the engine process died)."""
    assert tokens(llm, sample(top_k=top_k)) == tokens(llm, sample())
    assert_clean(llm)


def test_top_p_below_the_float32_range_keeps_the_top_token(llm):
    """top_p=1e-300 rounded to 0 in float32 and masked every token: the rows sampled token 0."""
    greedy = tokens(llm, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert tokens(llm, sample(top_p=1e-300)) == greedy
    assert tokens(llm, sample(top_p=1e-300, seed=None)) == greedy


@pytest.mark.parametrize("penalty", [1e-300, 1e-40, 0.0099, 100.01, 1e300])
def test_repetition_penalty_outside_the_float32_safe_range_is_refused(penalty):
    """Far below 1 (or above) it overflowed the float32 logits: NaN probabilities, token 0 sampled every step."""
    with pytest.raises(ValueError, match=re.escape(f"repetition_penalty must be a finite number in [0.01, 100.0], got {penalty}")):
        SamplingParams(repetition_penalty=penalty)


def test_repetition_penalty_at_its_limits_samples_real_tokens(llm):
    for penalty in (0.01, 100.0):
        assert tokens(llm, sample(repetition_penalty=penalty, max_tokens=12)) != [0] * 12


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "repetition_penalty"])
def test_an_int_beyond_the_float_range_is_a_value_error(field):
    """math.isfinite raised a bare OverflowError."""
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        SamplingParams(**{field: 10**400})


def test_n_above_max_num_seqs_is_refused_at_once(tiny_model):
    """n=10**9 built a billion sequences before anything ran (a hang)."""
    llm = make_llm(tiny_model, max_num_seqs=4)
    start = time.perf_counter()
    for n in (5, 10**9):
        with pytest.raises(ValueError, match=f"n must be <= max_num_seqs=4 .*got {n}"):
            llm.generate([PROMPT], SamplingParams(n=n, max_tokens=2), use_tqdm=False)
    assert time.perf_counter() - start < 5
    [out] = llm.generate([PROMPT], SamplingParams(n=4, max_tokens=2), use_tqdm=False)
    assert len(out.outputs) == 4
    assert_clean(llm)
    llm.exit()


def test_step_without_live_requests_does_nothing(llm):
    """It raised "scheduler could not schedule any sequence (KV pool smaller than one request?)"."""
    assert llm.step() == ([], 0, 0)
    seq = llm.add_request(PROMPT, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), stream=True)
    chunks = []
    for _ in range(4):
        chunks += llm.step()[0]
    assert [t for chunk in chunks for t in chunk.token_ids] == tokens(llm, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    assert chunks[-1].finished and llm.step() == ([], 0, 0)
    llm.abort(seq.request_id)
    assert_clean(llm)


USER = {"role": "user", "content": "hello"}
BAD_CHATS = [
    ([{}], TypeError, "messages[0]['role'] must be a string, got None"),
    ([{"role": "user"}], TypeError, "messages[0]['content'] must be a string or a list of text parts, got None"),
    ([USER, {"role": "user", "content": 5}], TypeError, "messages[1]['content'] must be a string or a list of text parts, got 5"),
    ([{"role": None, "content": "x"}], TypeError, "messages[0]['role'] must be a string, got None"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], ValueError, "messages[0]['content']: only text parts"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], ValueError, "messages[0]['content']: only text parts"),
    ([[USER], []], ValueError, "messages[1] is an empty conversation"),
    ([[USER], [USER, "hi"]], TypeError, "messages[1][1] must be a dict"),
    ([USER, [USER]], TypeError, "messages[1] must be a dict"),
    ([{"role": "user", "content": "\ud800"}], ValueError, "messages[0]['content'] contains a lone surrogate"),
]


@pytest.mark.parametrize("messages, error, message", BAD_CHATS)
def test_malformed_chat_messages_are_named(llm, messages, error, message):
    """They failed inside the chat template with jinja2's UndefinedError or `can only concatenate str`."""
    with pytest.raises(error, match=re.escape(message)):
        llm.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False)
    assert_clean(llm)


def test_chat_template_failures_are_value_errors(llm):
    params = SamplingParams(temperature=0.0, max_tokens=3)
    for template, words in [("{% for %}", "TemplateSyntaxError"), ("{{ raise_exception('no system role') }}", "no system role"),
                            ("{{ messages[5]['content'] }}", "UndefinedError")]:
        with pytest.raises(ValueError, match=f"the chat template failed on conversation 0: .*{words}"):
            llm.chat([USER], params, use_tqdm=False, chat_template=template)
    with pytest.raises(TypeError, match="chat_template_kwargs must be a dict"):
        llm.chat([USER], params, use_tqdm=False, chat_template_kwargs=[("a", 1)])
    parts = llm.chat([{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}], params, use_tqdm=False)
    assert parts[0].outputs == llm.chat([USER], params, use_tqdm=False)[0].outputs, "text parts are joined"
    assert_clean(llm)


@pytest.mark.parametrize("key", ["--5", "\u00b2", "\u0663", " 5", "5.0"])
def test_logit_bias_keys_that_are_not_ascii_token_ids_get_a_400(key):
    """"--5" and "²" passed str.isdigit and then failed int() (an HTTP 500); "٣" became token 3."""
    with pytest.raises(ApiError, match="logit_bias token id must be an int") as raised:
        CompletionRequest(prompt="hi", logit_bias={key: 1.0}).sampling_params(16)
    assert raised.value.status == 400
    assert CompletionRequest(prompt="hi", logit_bias={"-0": 1.0, "17": 2.0}).sampling_params(16).logit_bias == {0: 1.0, 17: 2.0}


def test_fields_asking_for_missing_behaviour_get_a_400():
    """best_of, tools and structured output were silently ignored."""
    with pytest.raises(ApiError, match="best_of=3 is not supported") as raised:
        CompletionRequest(prompt="hi", best_of=3).prompts()
    assert raised.value.param == "best_of"
    assert CompletionRequest(prompt="hi", n=2, best_of=2).prompts() == ["hi"]
    tool = {"type": "function", "function": {"name": "f"}}
    for fields, param in [({"tools": [tool]}, "tools"), ({"response_format": {"type": "json_object"}}, "response_format")]:
        with pytest.raises(ApiError) as raised:
            ChatCompletionRequest(messages=[USER], **fields).conversation()
        assert raised.value.status == 400 and raised.value.param == param
    for fields in [{"tools": [tool], "tool_choice": "none"}, {"tools": []}, {"response_format": {"type": "text"}}]:
        assert ChatCompletionRequest(messages=[USER], **fields).conversation() == [USER]


def test_logprob_counts_above_20_get_a_400():
    """The cap was the vocabulary: logprobs=V decodes V tokens a step (10x the step time on the tiny model,
    hours for a 150k vocabulary), stalling the engine loop for every client."""
    for request, param in [(CompletionRequest(prompt="hi", logprobs=21), "logprobs"),
                           (ChatCompletionRequest(messages=[USER], logprobs=True, top_logprobs=2048), "top_logprobs"),
                           (ChatCompletionRequest(messages=[USER], logprobs=True, top_logprobs=-1), "top_logprobs")]:
        with pytest.raises(ApiError, match=re.escape(f"{param} must be in [0, 20], got")) as raised:
            request.sampling_params(16)
        assert (raised.value.status, raised.value.param) == (400, param)
    assert CompletionRequest(prompt="hi", logprobs=20).sampling_params(16).logprobs == 20
    assert ChatCompletionRequest(messages=[USER], logprobs=True, top_logprobs=20).sampling_params(16).logprobs == 20


def test_stop_lists_beyond_their_caps_get_a_400():
    """Each step checks every completion against every stop string: 100k of them (within the body limit)
    cost ~40 ms per completion per step, stalling the engine loop for every client."""
    for fields, param, count, limit in [({"stop": ["zz"] * 65}, "stop", 65, 64), ({"stop_token_ids": [5] * 1025}, "stop_token_ids", 1025, 1024)]:
        with pytest.raises(ApiError, match=re.escape(f"{param} has {count} entries; at most {limit} are allowed")) as raised:
            CompletionRequest(prompt="hi", **fields).sampling_params(16)
        assert (raised.value.status, raised.value.param) == (400, param)
    params = CompletionRequest(prompt="hi", stop=["zz"] * 64, stop_token_ids=[5] * 1024).sampling_params(16)
    assert len(params.stop) == 64 and len(params.stop_token_ids) == 1024
    assert CompletionRequest(prompt="hi", stop="zz").sampling_params(16).stop == ("zz",)


@pytest.mark.parametrize("field, value", [("max_tokens", True), ("max_tokens", "5"), ("n", 2.0), ("seed", "1"), ("temperature", "0.5"),
                                          ("temperature", True), ("stream", "yes"), ("ignore_eos", 1), ("logprobs", True),
                                          ("stop_token_ids", [True]), ("logit_bias", {"5": True}), ("stream_options", {"include_usage": "yes"})])
def test_wrongly_typed_sampling_fields_get_a_400_not_a_coercion(field, value):
    """pydantic's lax mode turned `"max_tokens": true` into 1 and `"stream": "yes"` into True."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        CompletionRequest.model_validate({"prompt": "hi", field: value})
    request = CompletionRequest.model_validate({"prompt": "hi", "temperature": 1, "top_p": 1, "max_tokens": 3, "logit_bias": {"5": 2}})
    assert request.sampling_params(16).temperature == 1.0 and request.sampling_params(16).logit_bias == {5: 2}, "an int is a valid float"
    with pytest.raises(ValidationError, match="logprobs"):
        ChatCompletionRequest.model_validate({"messages": [USER], "logprobs": "yes"})
