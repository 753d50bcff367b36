"""The engine process (EngineCore) through its client: requests added and aborted from asyncio tasks
while the engine steps, outputs routed per request and merged for a consumer that falls behind."""
from __future__ import annotations

import asyncio
import os
import time
from unittest import mock

import pytest

from conftest import make_llm, random_prompts
from nanovllm import SamplingParams
from nanovllm.engine.engine_client import EngineClient, EngineStopped, Output, OutputStream, QueueFull, merge_outputs

LONG = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)


def start_client(model: str, max_waiting: int | None = None, **settings) -> tuple[EngineClient, asyncio.AbstractEventLoop]:
    """A client on the CPU with one intra-op thread (as the tests' own process), bound to a new event loop."""
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):
        client = EngineClient(model, {"device": "cpu", **settings}, max_waiting)
    event_loop = asyncio.new_event_loop()
    client.bind(event_loop)
    return client, event_loop


@pytest.fixture(scope="module")
def engine(tiny_model: str):
    client, event_loop = start_client(tiny_model, max_model_len=4096, num_kvcache_blocks=1024, max_num_batched_tokens=4096)
    yield client, event_loop.run_until_complete
    client.close()
    event_loop.close()


async def collect(stream: OutputStream) -> list[Output]:
    return [output async for batch in stream.batches() for output in batch]


async def until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_requests_arriving_while_others_decode_equal_offline_generate(engine, tiny_model, vocab_ids) -> None:
    client, run = engine
    prompts = random_prompts(12, 3, 60, vocab_ids, seed=5)
    params = SamplingParams(temperature=0, max_tokens=12)
    offline = make_llm(tiny_model, max_model_len=4096, num_kvcache_blocks=1024, max_num_batched_tokens=4096)
    expected = offline.generate(prompts, params, use_tqdm=False)
    offline.exit()

    async def one(i: int) -> list[Output]:
        await asyncio.sleep(0.01 * i)  # arrive while earlier requests are decoding
        stream = OutputStream(client)
        assert (await stream.add(prompts[i], params)).num_prompt_tokens == len(prompts[i])
        return await collect(stream)

    async def all_requests() -> list[list[Output]]:
        return await asyncio.gather(*[one(i) for i in range(len(prompts))])

    results = run(all_requests())
    assert ["".join(o.text for o in outputs) for outputs in results] == [e["text"] for e in expected]
    assert [[t for o in outputs for t in o.token_ids] for outputs in results] == [e["token_ids"] for e in expected]
    assert all(outputs[-1].finished and not any(o.finished for o in outputs[:-1]) for outputs in results)
    run(until(lambda: client.stats.num_blocks_used == 0 and client.stats.num_running == 0))


def test_a_consumer_that_falls_behind_gets_one_merged_output(engine, tiny_model) -> None:
    client, run = engine
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True, logprobs=1)
    offline = make_llm(tiny_model)
    [expected] = offline.generate([[7] * 20], params, use_tqdm=False)
    offline.exit()

    async def late() -> list[list[Output]]:
        stream = OutputStream(client)
        await stream.add([7] * 20, params)
        await until(lambda: client.stats.num_running == 0)  # every step's Update has been routed, none consumed
        return [batch async for batch in stream.batches()]

    [batch] = run(late())
    assert sorted(o.completion_index for o in batch) == [0, 1]
    for output in batch:
        completion = expected.outputs[output.completion_index]
        assert (output.text, output.token_ids, output.finished, output.finish_reason) == (completion.text, completion.token_ids, True, "length")
        assert [entry.keys() for entry in output.logprobs] == [entry.keys() for entry in completion.logprobs]


def test_closing_a_stream_aborts_its_n_completions_and_frees_their_blocks(engine) -> None:
    client, run = engine

    async def abort_midway() -> None:
        stream = OutputStream(client)
        await stream.add([7] * 40, SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=3000, ignore_eos=True))
        seen: set[int] = set()
        async for batch in stream.batches():
            seen |= {o.completion_index for o in batch if o.token_ids}
            if seen == {0, 1, 2}:
                break
        assert client.stats.num_running == 3 and client.stats.num_blocks_used >= 3
        assert len(stream.close()) == 1
        await until(lambda: client.stats.num_blocks_used == 0 and client.stats.num_running == 0)

    run(abort_midway())


def test_abort_of_n_completions_before_the_siblings_are_scheduled(tiny_model) -> None:
    """Siblings 2..n wait for the first to prefill the prompt; aborting then frees what was queued."""
    llm = make_llm(tiny_model)
    seq = llm.add_request([7] * 40, SamplingParams(n=3, temperature=1.0, max_tokens=4))
    request = llm.requests[seq.request_id]
    assert len(request.held) == 2
    llm.abort(seq.request_id)
    assert llm.scheduler.is_finished() and not llm.scheduler.block_manager.used_block_ids
    # The held siblings end too: a generate/stream call waiting on this request sees it finished.
    assert request.finished and [c.seq.finish_reason for c in request.completions] == ["abort"] * 3
    [out] = llm.generate([[7] * 40], SamplingParams(n=2, temperature=0, max_tokens=4), use_tqdm=False)
    assert [len(c.token_ids) for c in out.outputs] == [4, 4]
    llm.exit()


def test_refusals_a_full_queue_and_close(tiny_model) -> None:
    client, event_loop = start_client(tiny_model, max_waiting=1, max_num_seqs=1, max_model_len=512)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True, logprobs=1)

    async def scenario() -> tuple[list[Output], list[Output]]:
        with pytest.raises(ValueError, match="max_model_len"):
            await OutputStream(client).add([5] * 600, SamplingParams())
        running, waiting = OutputStream(client), OutputStream(client)
        await running.add([5] * 10, long)
        await until(lambda: running._buffer)
        await waiting.add([6] * 10, long)
        with pytest.raises(QueueFull, match="max_waiting=1"):
            await OutputStream(client).add([7] * 10, long)
        ends = asyncio.gather(collect(running), collect(waiting))
        await asyncio.to_thread(client.close)
        results = await ends
        with pytest.raises(EngineStopped):
            await OutputStream(client).add([1, 2], long)
        return results

    running, waiting = event_loop.run_until_complete(scenario())
    event_loop.close()
    assert running[-1].finish_reason == waiting[-1].finish_reason == "abort"
    assert [(o.text, o.token_ids, o.logprobs, o.finished, o.finish_reason) for o in waiting] == [("", [], [], True, "abort")]
    [merged] = merge_outputs(running)
    assert len(merged.logprobs) == len(merged.token_ids) > 0, "the abort output keeps the logprobs asked for (a list, empty)"
    assert client.process.exitcode == 0


def test_bad_settings_fail_before_or_while_starting(tiny_model) -> None:
    """A failed start is waited for: the engine process unwinds and exits 1 (not terminated midway)."""
    processes = []

    class Recording(EngineClient):
        def _wait_ready(self):
            processes.append(self.process)
            return super()._wait_ready()

    with pytest.raises(ValueError, match="max_waiting"):
        EngineClient(tiny_model, {"device": "cpu"}, max_waiting=0)
    with pytest.raises(RuntimeError, match="max_model_len"), mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):
        Recording(tiny_model, {"device": "cpu", "max_model_len": -1})
    assert processes[0].exitcode == 1


def test_a_refusal_that_arrives_after_its_add_was_cancelled_harms_no_other_request(engine) -> None:
    """The engine answers both adds in one Update while a long request decodes; the refused one was
    cancelled (aborted) meanwhile: the others' outputs in that Update still reach them."""
    client, run = engine

    async def scenario() -> list[Output]:
        running = OutputStream(client)
        await running.add([7] * 20, LONG)
        await until(lambda: running._buffer)
        refused = asyncio.ensure_future(OutputStream(client).add([5] * 5000, SamplingParams()))
        short = OutputStream(client)
        accepted = asyncio.ensure_future(short.add([8] * 20, SamplingParams(temperature=0, max_tokens=1)))
        await asyncio.sleep(0)
        refused.cancel()
        await accepted
        try:
            return await asyncio.wait_for(collect(short), 20)
        finally:
            running.close()

    outputs = run(scenario())
    assert len(outputs) == 1 and len(outputs[0].token_ids) == 1 and outputs[0].finish_reason == "length"
    run(until(lambda: client.stats.num_blocks_used == 0))


def test_adds_of_one_event_loop_turn_go_as_one_message_each_answered_on_its_own(engine) -> None:
    """Five streams add in the same turn: one pipe message carries the five adds; the bad one is
    refused alone, the others run to their end; a cancelled add's abort follows in the next message."""
    client, run = engine
    sent = []
    send = client._send

    def recording(commands):
        sent.append([type(c).__name__ for c in commands])
        send(commands)

    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    async def one(prompt: list[int]) -> list[Output]:
        stream = OutputStream(client)
        await stream.add(prompt, params)
        return await collect(stream)

    async def scenario():
        tasks = [asyncio.ensure_future(one(prompt)) for prompt in ([5] * 10, [6] * 10, [5] * 5000, [7] * 10, [8] * 10)]
        cancelled = asyncio.ensure_future(one([9] * 10))
        await asyncio.sleep(0)  # every task has queued its add
        cancelled.cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    with mock.patch.object(client, "_send", recording):
        results = run(scenario())
    assert sent[:2] == [["AddRequest"] * 6, ["AbortRequest"]]
    assert isinstance(results[2], ValueError) and "max_model_len" in str(results[2])
    for outputs in results[:2] + results[3:]:
        [merged] = merge_outputs(outputs)
        assert len(merged.token_ids) == 2 and merged.finish_reason == "length"
    run(until(lambda: client.stats.num_blocks_used == 0 and client.stats.num_running == 0))
