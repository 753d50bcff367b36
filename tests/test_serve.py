"""The HTTP server against offline generate, through the real openai client (one server process for the module)."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from conftest import make_llm, random_prompts
from nanovllm import SamplingParams
from serving import Server

SETTINGS = dict(max_model_len=4096, num_kvcache_blocks=1024, max_num_batched_tokens=4096)
MAX_BODY_BYTES = 65536


@pytest.fixture(scope="module")
def server(tiny_model: str):
    server = Server(tiny_model, "--max-model-len", "4096", "--num-kvcache-blocks", "1024", "--max-body-bytes", str(MAX_BODY_BYTES))
    yield server
    server.kill()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def offline(tiny_model: str):
    llm = make_llm(tiny_model, **SETTINGS)
    yield llm
    llm.exit()


@pytest.fixture(scope="module")
def tokenizer(tiny_model: str):
    return AutoTokenizer.from_pretrained(tiny_model)


def streamed_texts(stream) -> tuple[dict[int, str], dict[int, str], dict | None]:
    """Concatenated text and finish reason per choice index, and the usage chunk, of a completion or chat stream."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


def test_models_lists_the_served_model(client: openai.OpenAI, tiny_model: str) -> None:
    assert [model.id for model in client.models.list().data] == [tiny_model]


def test_completion_equals_offline_streamed_or_not(client, offline, tokenizer, tiny_model) -> None:
    prompt = "the quick brown fox"
    [expected] = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    response = client.completions.create(model=tiny_model, prompt=prompt, max_tokens=12, temperature=0)
    assert response.choices[0].text == expected["text"]
    assert response.choices[0].finish_reason == expected["finish_reason"]
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert response.usage.completion_tokens == len(expected["token_ids"])
    stream = client.completions.create(model=tiny_model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    texts, reasons, usage = streamed_texts(stream)
    assert texts == {0: expected["text"]} and reasons == {0: expected["finish_reason"]}
    assert usage.completion_tokens == response.usage.completion_tokens and usage.prompt_tokens == response.usage.prompt_tokens


def test_chat_completion_applies_the_chat_template(client, offline, tokenizer, tiny_model) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a cache?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    [expected] = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    response = client.chat.completions.create(model=tiny_model, messages=messages, max_tokens=10, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected["text"]
    assert response.usage.prompt_tokens == len(prompt) and response.usage.completion_tokens == len(expected["token_ids"])
    stream = client.chat.completions.create(model=tiny_model, messages=messages, max_tokens=10, temperature=0, stream=True)
    texts, reasons, _ = streamed_texts(stream)
    assert texts == {0: expected["text"]} and reasons == {0: expected["finish_reason"]}


def test_n_choices_are_offline_n_samples(client, offline, tiny_model) -> None:
    """n=2 with a seed: the choices are the completions of offline generate with the same n and seed."""
    prompt = [5, 6, 7, 8, 9]
    [expected] = offline.generate([prompt], SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True), use_tqdm=False)
    expected_texts = [completion.text for completion in expected.outputs]
    response = client.completions.create(model=tiny_model, prompt=prompt, n=2, seed=11, max_tokens=8, temperature=1.0,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == expected_texts
    assert response.usage.prompt_tokens == len(prompt) and response.usage.completion_tokens == 16
    stream = client.completions.create(model=tiny_model, prompt=prompt, n=2, seed=11, max_tokens=8, temperature=1.0,
                                       extra_body={"ignore_eos": True}, stream=True)
    texts, _, _ = streamed_texts(stream)
    assert texts == dict(enumerate(expected_texts))


def test_stop_string_cuts_the_text(client, offline, tiny_model) -> None:
    prompt = [40, 41, 42, 43]
    [full] = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    stop = full["text"][8:11]
    assert len(stop) == 3 and stop not in full["text"][:10]
    cut = full["text"][: full["text"].index(stop)]
    extra = {"ignore_eos": True}
    response = client.completions.create(model=tiny_model, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], extra_body=extra)
    assert (response.choices[0].text, response.choices[0].finish_reason) == (cut, "stop")
    stream = client.completions.create(model=tiny_model, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], extra_body=extra, stream=True)
    assert streamed_texts(stream)[:2] == ({0: cut}, {0: "stop"})


def test_streamed_logprobs_and_role_equal_the_whole_response(client, tiny_model) -> None:
    """The streamed events (their JSON assembled from pre-encoded parts) carry what the whole response does."""
    extra = {"ignore_eos": True}
    whole = client.completions.create(model=tiny_model, prompt=[5, 6, 7], max_tokens=6, temperature=0, logprobs=2, extra_body=extra).choices[0]
    chunks = [c for event in client.completions.create(model=tiny_model, prompt=[5, 6, 7], max_tokens=6, temperature=0, logprobs=2,
                                                        extra_body=extra, stream=True) for c in event.choices]
    assert "".join(c.text for c in chunks) == whole.text and chunks[-1].finish_reason == whole.finish_reason == "length"
    for name in ("tokens", "text_offset"):
        assert [x for c in chunks for x in getattr(c.logprobs, name)] == getattr(whole.logprobs, name), name
    assert [x for c in chunks for x in c.logprobs.token_logprobs] == pytest.approx(whole.logprobs.token_logprobs, abs=1e-4)
    assert [list(top) for c in chunks for top in c.logprobs.top_logprobs] == [list(top) for top in whole.logprobs.top_logprobs]
    messages = [{"role": "user", "content": 'say "hi"\n'}]
    whole = client.chat.completions.create(model=tiny_model, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                           extra_body=extra).choices[0]
    chunks = [c for event in client.chat.completions.create(model=tiny_model, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                                             top_logprobs=2, extra_body=extra, stream=True) for c in event.choices]
    assert [c.delta.role for c in chunks] == ["assistant"] + [None] * (len(chunks) - 1)
    assert "".join(c.delta.content for c in chunks) == whole.message.content and chunks[-1].finish_reason == "length"
    streamed = [item for c in chunks for item in c.logprobs.content]
    assert [(i.token, i.bytes, [top.token for top in i.top_logprobs]) for i in streamed] == \
        [(i.token, i.bytes, [top.token for top in i.top_logprobs]) for i in whole.logprobs.content]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in whole.logprobs.content], abs=1e-4)


def test_32_concurrent_greedy_clients_equal_offline_generate(server, offline, tiny_model, vocab_ids) -> None:
    prompts = random_prompts(32, 4, 80, vocab_ids, seed=3)
    expected = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as client:
            responses = await asyncio.gather(*[client.completions.create(model=tiny_model, prompt=p, max_tokens=16, temperature=0) for p in prompts])
        return [r.choices[0].text for r in responses]

    assert asyncio.run(ask_all()) == [e["text"] for e in expected]


def test_logprobs_equal_offline(client, offline, tiny_model) -> None:
    prompt = [70, 71, 72]
    [expected] = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=2), use_tqdm=False)
    response = client.completions.create(model=tiny_model, prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    got = response.choices[0].logprobs
    sampled = [entry[t].logprob for t, entry in zip(expected["token_ids"], expected["logprobs"])]
    assert got.token_logprobs == pytest.approx(sampled, abs=1e-4)
    assert got.tokens == [entry[t].decoded_token for t, entry in zip(expected["token_ids"], expected["logprobs"])]
    assert "".join(got.tokens) == response.choices[0].text
    assert [len(top) for top in got.top_logprobs] == [len(entry) for entry in expected["logprobs"]]
    chat = client.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy: the sampled token is the most likely


def assert_one_more_abort_and_blocks_freed(server: Server, before: dict[str, float]) -> dict[str, float]:
    deadline = time.monotonic() + 10
    while (after := server.metrics())["nanovllm_kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after["nanovllm_kv_blocks_used"] == 0 and after["nanovllm_num_requests_running"] == 0
    aborted = 'nanovllm_requests_total{finish_reason="abort"}'
    assert after[aborted] == before.get(aborted, 0) + 1
    return after


def test_disconnect_mid_stream_aborts_and_frees_blocks(server, tiny_model) -> None:
    before = server.metrics()
    body = {"model": tiny_model, "prompt": [9] * 40, "max_tokens": 4000, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data: ")) >= 3
        assert server.metrics()["nanovllm_kv_blocks_used"] > 0
    after = assert_one_more_abort_and_blocks_freed(server, before)
    assert after["nanovllm_generation_tokens_total"] - before["nanovllm_generation_tokens_total"] < 4000


def test_disconnect_before_a_full_response_aborts(server, tiny_model) -> None:
    before = server.metrics()
    body = {"model": tiny_model, "prompt": [9] * 40, "max_tokens": 4000, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    assert_one_more_abort_and_blocks_freed(server, before)


BAD_REQUESTS = {
    "bad json": ("/v1/completions", b'{"prompt": "hi",', 400, "json"),
    "unknown model": ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 400, "gpt-4"),
    "prompt too long": ("/v1/completions", {"prompt": [5] * 4200}, 400, "max_model_len"),
    "negative temperature": ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    "top_p zero": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    "n zero": ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n must"),
    "token id outside vocabulary": ("/v1/completions", {"prompt": [10**6]}, 400, "vocabulary"),
    "missing prompt": ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    "messages not a list": ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    "logit_bias key not a token id": ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1.0}}, 400, "logit_bias"),
    "unsupported echo": ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    "body too large": ("/v1/completions", {"prompt": "a" * (MAX_BODY_BYTES + 1)}, 413, str(MAX_BODY_BYTES)),
    "unknown route": ("/v1/engines", {}, 404, "Not Found"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, client, tiny_model, case) -> None:
    path, body, status, mention = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else None
    response = httpx.post(f"{server.url}{path}", content=content, json=None if content else body,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and mention.lower() in error["message"].lower()
    assert client.completions.create(model=tiny_model, prompt="still there", max_tokens=2).usage.completion_tokens >= 1


def test_build_app_refuses_an_engine_without_a_tokenizer(tiny_model) -> None:
    from nanovllm.engine.engine_client import EngineClient
    from nanovllm.entrypoints.serve import build_app

    client = EngineClient(tiny_model, dict(device="cpu", skip_tokenizer_init=True))
    try:
        with pytest.raises(ValueError, match="skip_tokenizer_init"):
            build_app(client, "tiny")
    finally:
        client.close()
    assert client.process.exitcode == 0
