"""Who may call the server, a full queue, and SIGTERM under load (one two-rank server for the module; the last test stops it)."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest

from serving import Server, child_pids, pid_alive

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


def test_sigterm_under_load_exits_0_and_leaves_nothing(server: Server, tiny_model: str) -> None:
    pid = server.process.pid
    children = child_pids(pid)
    assert children, "a two-rank engine has a worker process"
    segments = lambda: [name for name in os.listdir("/dev/shm") if name.startswith(f"nanovllm-{pid}-")]
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
    while any(pid_alive(child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [child for child in children if pid_alive(child)]
    assert segments() == []
