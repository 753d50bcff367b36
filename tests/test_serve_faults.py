"""Who may call the server, a full queue, SIGTERM under load (one two-rank server for the module; its
last test stops it), and the engine process dying under load (a server of its own)."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx
import openai
import pytest

from serving import Server, descendant_pids, engine_pid, pid_alive

API_KEY = "sesame-123"


@pytest.fixture(scope="module")
def server(tiny_model: str):
    server = Server(tiny_model, "--api-key", API_KEY, "--max-num-seqs", "1", "--max-waiting", "1", "--shutdown-timeout", "1",
                    "--max-model-len", "4096", "--num-kvcache-blocks", "1024", "--tensor-parallel-size", "2")
    yield server
    server.kill()


def client(server: Server, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


LONG = dict(prompt=[11, 12, 13], max_tokens=3000, temperature=0, stream=True, extra_body={"ignore_eos": True})


def test_api_key_is_required_on_v1_only(server: Server, tiny_model: str) -> None:
    for key in ("wrong", API_KEY + "x", API_KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as raised:
            client(server, key).completions.create(model=tiny_model, prompt="hi", max_tokens=2)
        assert raised.value.status_code == 401 and raised.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    assert client(server).completions.create(model=tiny_model, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_full_queue_answers_503_and_recovers(server: Server, tiny_model: str) -> None:
    """max_num_seqs=1, max_waiting=1: one request runs, one waits, the third is refused."""
    api = client(server)
    running = api.completions.create(model=tiny_model, **LONG)
    next(iter(running))
    waiting = api.completions.create(model=tiny_model, **LONG)
    with pytest.raises(openai.InternalServerError) as raised:
        api.completions.create(model=tiny_model, prompt="one too many", max_tokens=2)
    assert raised.value.status_code == 503 and "max_waiting=1" in raised.value.body["message"]
    running.close()
    waiting.close()
    deadline = time.monotonic() + 10
    while server.metrics()["nanovllm_kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metrics()["nanovllm_num_requests_waiting"] == 0
    assert api.completions.create(model=tiny_model, prompt="room again", max_tokens=2).usage.completion_tokens >= 1


def test_values_that_failed_the_engine_or_the_handler_are_served_or_refused(server: Server, tiny_model: str) -> None:
    """top_k above int64 raised OverflowError inside the engine's step: the engine process died and the server
    exited. A logit_bias key "--5" failed int() in the handler (a 500); a malformed message failed in the chat template."""
    api = client(server)
    sampled = dict(model=tiny_model, prompt="hi", max_tokens=4, temperature=1.0, seed=1, extra_body={"ignore_eos": True})
    unfiltered = api.completions.create(**sampled).choices[0].text
    for top_k in (2**63, 10**30):
        assert api.completions.create(**{**sampled, "extra_body": {"ignore_eos": True, "top_k": top_k}}).choices[0].text == unfiltered
    with pytest.raises(openai.BadRequestError, match="logit_bias token id must be an int, got '--5'"):
        api.completions.create(model=tiny_model, prompt="hi", max_tokens=2, logit_bias={"--5": 1})
    for content, words in [(None, "messages[0]['content'] must be a string"), ([{"type": "text", "text": 5}], "only text parts")]:
        with pytest.raises(openai.BadRequestError, match=re.escape(words)) as raised:
            api.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": content}], max_tokens=2)
        assert raised.value.body["param"] == "messages"
    assert server.process.poll() is None and httpx.get(f"{server.url}/health").status_code == 200
    assert api.completions.create(model=tiny_model, prompt="still there", max_tokens=2).usage.completion_tokens >= 1


def test_sigterm_under_load_exits_0_and_leaves_nothing(server: Server, tiny_model: str) -> None:
    pid = server.process.pid
    engine = engine_pid(pid)
    processes = descendant_pids(pid)
    assert len(descendant_pids(engine)) == 1, "a two-rank engine process has a worker process"
    segments = lambda: [name for name in os.listdir("/dev/shm") if name.startswith(f"nanovllm-{engine}-")]
    assert segments()
    streams = [client(server).completions.create(model=tiny_model, **LONG) for _ in range(2)]
    next(iter(streams[0]))
    ended = []
    readers = [threading.Thread(target=lambda s=s: ended.append([c.choices[0].finish_reason for c in s][-1])) for s in streams]
    for reader in readers:
        reader.start()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0, server.output()[-3000:]
    for reader in readers:
        reader.join(30)
    assert ended == ["abort", "abort"], "both in-flight streams were ended by the server, and ended cleanly"
    deadline = time.monotonic() + 10
    while any(pid_alive(process) for process in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [process for process in processes if pid_alive(process)]
    assert segments() == []


def test_engine_process_killed_under_load_fails_requests_and_exits_nonzero(tiny_model: str) -> None:
    server = Server(tiny_model, "--max-model-len", "4096", "--num-kvcache-blocks", "1024", "--tensor-parallel-size", "2")
    try:
        pid = server.process.pid
        engine = engine_pid(pid)
        processes = descendant_pids(pid)
        body = {"prompt": [11, 12, 13], "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(engine, signal.SIGKILL)
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][6:])["error"]
        assert "engine process exited unexpectedly" in error["message"] and error["type"] == "server_error"
        assert server.process.wait(60) == 1, server.output()[-3000:]
        deadline = time.monotonic() + 10
        while any(pid_alive(process) for process in processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [process for process in processes if pid_alive(process)]
        assert not [name for name in os.listdir("/dev/shm") if name.startswith(f"nanovllm-{engine}-")]
    finally:
        server.kill()
