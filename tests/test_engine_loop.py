"""EngineLoop: requests added and aborted from other threads while the engine steps."""
from __future__ import annotations

import threading
import time

import pytest

from conftest import make_llm, random_prompts
from nanovllm import SamplingParams
from nanovllm.engine.engine_loop import EngineLoop, EngineStopped, Output, QueueFull


class Collector:
    """A deliver callback that keeps a request's outputs and signals its end."""

    def __init__(self) -> None:
        self.outputs: list[Output] = []
        self.done = threading.Event()

    def __call__(self, item: Output) -> None:
        self.outputs.append(item)
        if item.finished:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(output.text for output in self.outputs)


def wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_requests_from_many_threads_equal_offline_generate(tiny_model, vocab_ids) -> None:
    prompts = random_prompts(12, 3, 60, vocab_ids, seed=5)
    params = SamplingParams(temperature=0, max_tokens=12)
    offline = make_llm(tiny_model)
    expected = offline.generate(prompts, params, use_tqdm=False)
    offline.exit()
    loop = EngineLoop(make_llm(tiny_model))
    collectors = [Collector() for _ in prompts]

    def submit(i: int) -> None:
        time.sleep(0.002 * i)  # arrive while earlier requests are decoding
        loop.add(prompts[i], params, collectors[i]).accepted.result(10)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for collector in collectors:
        assert collector.done.wait(30)
    assert [c.text for c in collectors] == [e["text"] for e in expected]
    assert [sum(len(o.token_ids) for o in c.outputs) for c in collectors] == [len(e["token_ids"]) for e in expected]
    wait_until(lambda: loop.stats.num_blocks_used == 0)
    assert loop.engine.requests == {}
    loop.close()


def test_abort_frees_blocks_and_close_ends_live_requests(tiny_model) -> None:
    loop = EngineLoop(make_llm(tiny_model, max_model_len=4096, num_kvcache_blocks=1024, max_num_batched_tokens=4096))
    long = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)
    first, second = Collector(), Collector()
    message = loop.add([7] * 40, long, first)
    assert message.accepted.result(10).num_prompt_tokens == 40
    wait_until(lambda: len(first.outputs) >= 2)
    assert loop.stats.num_blocks_used >= 3
    loop.abort(message.request_id)
    wait_until(lambda: loop.stats.num_blocks_used == 0 and loop.stats.num_running == 0)
    count = len(first.outputs)
    time.sleep(0.05)
    assert len(first.outputs) == count and not first.done.is_set(), "an aborted request gets nothing more"
    loop.add([8] * 40, long, second).accepted.result(10)
    wait_until(lambda: second.outputs)
    loop.close()
    assert second.outputs[-1].finished and second.outputs[-1].finish_reason == "abort"
    assert loop.stats.num_blocks_used == 0 and not loop.is_alive()
    with pytest.raises(EngineStopped):
        loop.add([1, 2], long, Collector())


def test_n_completions_stream_apart_and_one_abort_frees_them_all(tiny_model) -> None:
    loop = EngineLoop(make_llm(tiny_model, max_model_len=4096, num_kvcache_blocks=1024, max_num_batched_tokens=4096))
    params = SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=3000, ignore_eos=True)
    collector = Collector()
    message = loop.add([7] * 40, params, collector)
    wait_until(lambda: {o.completion_index for o in collector.outputs if o.token_ids} == {0, 1, 2})
    assert loop.stats.num_running == 3
    loop.abort(message.request_id)
    wait_until(lambda: loop.stats.num_blocks_used == 0 and loop.stats.num_running == 0)
    assert not collector.done.is_set()
    loop.close()
    assert loop.engine.requests == {}


def test_abort_of_n_completions_before_the_siblings_are_scheduled(tiny_model) -> None:
    """Siblings 2..n wait for the first to prefill the prompt; aborting then frees what was queued."""
    llm = make_llm(tiny_model)
    seq = llm.add_request([7] * 40, SamplingParams(n=3, temperature=1.0, max_tokens=4))
    llm.abort(seq.request_id)
    assert llm.scheduler.is_finished() and not llm.scheduler.block_manager.used_block_ids
    [out] = llm.generate([[7] * 40], SamplingParams(n=2, temperature=0, max_tokens=4), use_tqdm=False)
    assert [len(c.token_ids) for c in out.outputs] == [4, 4]
    llm.exit()


def test_refusals_come_back_through_the_future(tiny_model) -> None:
    loop = EngineLoop(make_llm(tiny_model, max_num_seqs=1), max_waiting=1)
    with pytest.raises(ValueError, match="max_model_len"):
        loop.add([5] * 600, SamplingParams(), Collector()).accepted.result(10)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    running, waiting = Collector(), Collector()
    loop.add([5] * 10, long, running).accepted.result(10)
    wait_until(lambda: running.outputs)
    loop.add([6] * 10, long, waiting).accepted.result(10)
    with pytest.raises(QueueFull, match="max_waiting=1"):
        loop.add([7] * 10, long, Collector()).accepted.result(10)
    loop.close()
    assert running.outputs[-1].finish_reason == waiting.outputs[-1].finish_reason == "abort"
    assert waiting.outputs == [Output("", [], None, True, "abort")]
