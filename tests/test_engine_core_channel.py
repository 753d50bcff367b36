"""The engine -> API channel (update_channel.py): framing survives any split of the bytes, Updates
queued while a send waits are merged without losing or reordering anything, and the engine keeps
stepping while the API side reads nothing. The API -> engine pipe: one message's commands apply in
order, each add answered on its own."""
from __future__ import annotations

import multiprocessing as mp
import pickle
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection

from conftest import make_llm
from nanovllm import SamplingParams
from nanovllm.engine.core_messages import (AbortRequest, Accepted, AddRequest, LoopStats, Output, QueueFull, Refused, Stop,
                                           Update, merge_outputs)
from nanovllm.engine.engine_core import EngineCore
from nanovllm.engine.update_channel import FrameDecoder, UpdateSender, send_message


def read_all(sock: socket.socket) -> list:
    """Every message until the peer closes."""
    decoder, messages = FrameDecoder(), []
    while data := sock.recv(1 << 16):
        messages += decoder.feed(data)
    return messages


def test_frames_split_anywhere_decode_to_the_same_messages() -> None:
    messages = [Update(LoopStats(i, 0, 0, 1), outputs=[Output(i, 0, "é" * i, [i] * i, None, i == 5, "stop" if i == 5 else None)])
                for i in range(6)]
    ours, theirs = socket.socketpair()
    for message in messages:
        send_message(ours, message)
    ours.close()
    data = theirs.recv(1 << 20)
    theirs.close()
    decoder = FrameDecoder()
    decoded = [m for i in range(len(data)) for m in decoder.feed(data[i : i + 1])]  # byte by byte
    assert decoded == messages
    assert FrameDecoder().feed(data[:-1]) == messages[:-1]  # an incomplete last frame waits for its rest


def test_updates_queued_behind_a_blocked_send_are_merged_in_order() -> None:
    """The first Update is too large for the socket: the sender blocks until the peer reads, and the
    100 Updates put meanwhile arrive as ONE Update: every completion's text and tokens in order, its
    finish last, every answer, the latest stats."""
    ours, theirs = socket.socketpair()
    sender = UpdateSender(ours, on_gone=lambda: None)
    sender.put(Update(LoopStats(), outputs=[Output(99, 0, "x" * (8 << 20), [], None, False, None)]))
    while sender._queue:  # until the sender has taken it (and blocks sending it)
        time.sleep(0.001)
    expected: dict[tuple[int, int], list[Output]] = {}
    for step in range(100):
        outputs = [Output(request, completion, f"<{request}.{completion}.{step}>", [step], None, step == 99, "length" if step == 99 else None)
                   for request in range(3) for completion in range(2)]
        for output in outputs:
            expected.setdefault((output.request_id, output.completion_index), []).append(output)
        sender.put(Update(LoopStats(num_running=step), accepted=[Accepted(step, step)], refused=[Refused(1000 + step, ValueError(step))],
                          outputs=outputs))
    sender.close(timeout=0)  # returns at once: the sender still waits for the peer
    received = []
    reader = threading.Thread(target=lambda: received.extend(read_all(theirs)))
    reader.start()
    sender.close(timeout=30)
    ours.close()
    reader.join(30)
    assert len(received) == 2
    merged = received[1]
    assert merged.stats == LoopStats(num_running=99)
    assert [a.request_id for a in merged.accepted] == list(range(100))
    assert [r.request_id for r in merged.refused] == list(range(1000, 1100)) and str(merged.refused[-1].error) == "99"
    assert [(o.request_id, o.completion_index) for o in merged.outputs] == list(expected)
    for output in merged.outputs:
        [want] = merge_outputs(expected[output.request_id, output.completion_index])
        assert (output.text, output.token_ids, output.finished, output.finish_reason) == (want.text, want.token_ids, True, "length")
        assert output.text.startswith(f"<{output.request_id}.{output.completion_index}.0>")


def test_the_engine_keeps_stepping_while_the_api_side_reads_nothing(tiny_model) -> None:
    """With a socket that holds a few KB, the core steps a request to its end while nobody reads;
    what arrives afterwards is the whole generation (equal to offline generate)."""
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True, logprobs=2)
    offline = make_llm(tiny_model)
    [expected] = offline.generate([[7] * 10], params, use_tqdm=False)
    offline.exit()
    engine = make_llm(tiny_model)
    commands, send_command = mp.Pipe(duplex=False)
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    core = EngineCore(engine, commands, ours, max_waiting=None)
    with core_thread(core, send_command, theirs) as stop_and_read:
        send_command.send_bytes(pickle.dumps([AddRequest(0, [7] * 10, params)]))
        wait_until_idle(core, lambda: bool(core._live))
        assert engine.is_finished() and not core._live, "the engine stopped stepping while its output was not read"
        messages = stop_and_read()
    outputs = [o for m in messages for o in m.outputs]
    [merged] = merge_outputs(outputs)
    assert (merged.text, merged.token_ids, merged.finish_reason) == (expected["text"], expected["token_ids"], "length")
    assert len(merged.logprobs) == 120
    assert len(messages) < 120, "the Updates queued while the socket was full were merged"


@contextmanager
def core_thread(core: EngineCore, send_command: Connection, theirs: socket.socket) -> Iterator[Callable[[], list]]:
    """Run `core` on a thread; yields `stop_and_read`: send Stop, then read every Update until the thread ends.
    Whatever happens, the pipe is closed (a Stop for the core), the thread joined and the socket closed."""
    runner = threading.Thread(target=core.run)
    runner.start()

    def stop_and_read() -> list:
        send_command.send_bytes(pickle.dumps([Stop()]))
        return read_all_until_stopped(theirs, runner)

    try:
        yield stop_and_read
    finally:
        send_command.close()
        runner.join(30)
        theirs.close()


def wait_until_idle(core: EngineCore, started: Callable[[], bool]) -> None:
    """Wait (60 s at most in all) until the core has taken up what was sent (`started`), then until it has no
    live request."""
    deadline = time.monotonic() + 60
    while not started() and time.monotonic() < deadline:
        time.sleep(0.001)
    while core._live and time.monotonic() < deadline:
        time.sleep(0.01)


def read_all_until_stopped(sock: socket.socket, runner: threading.Thread) -> list:
    decoder, messages = FrameDecoder(), []
    sock.settimeout(0.2)
    while runner.is_alive():
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            continue
        messages += decoder.feed(data)
    sock.setblocking(False)
    try:
        while data := sock.recv(1 << 16):
            messages += decoder.feed(data)
    except BlockingIOError:
        pass
    return messages


def test_one_message_of_adds_and_aborts_applies_in_order_each_add_on_its_own(tiny_model) -> None:
    """One pipe message: a refused add (too long) leaves the others alone, an abort after its add in
    the same message ends that request before it runs, and max_waiting counts the waiting requests
    at each add (the abort made room for one more; the last two find the queue full)."""
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine = make_llm(tiny_model)
    commands, send_command = mp.Pipe(duplex=False)
    ours, theirs = socket.socketpair()
    core = EngineCore(engine, commands, ours, max_waiting=2)
    with core_thread(core, send_command, theirs) as stop_and_read:
        send_command.send_bytes(pickle.dumps([AddRequest(0, [5] * 10, params), AddRequest(1, [5] * 600, params), AddRequest(2, [6] * 10, params),
                                              AbortRequest(0), AddRequest(3, [7] * 10, params), AddRequest(4, [8] * 10, params),
                                              AddRequest(5, [9] * 10, params)]))
        wait_until_idle(core, lambda: bool(core._live or core._update.refused))
        messages = stop_and_read()
    assert [a.request_id for m in messages for a in m.accepted] == [0, 2, 3]
    refused = [r for m in messages for r in m.refused]
    assert [r.request_id for r in refused] == [1, 4, 5]
    assert isinstance(refused[0].error, ValueError) and "max_model_len" in str(refused[0].error)
    assert all(isinstance(r.error, QueueFull) and "max_waiting=2" in str(r.error) for r in refused[1:])
    finished = {o.request_id: o for o in merge_outputs([o for m in messages for o in m.outputs])}
    assert sorted(finished) == [2, 3] and all(len(o.token_ids) == 3 and o.finish_reason == "length" for o in finished.values())
    assert not engine.scheduler.block_manager.used_block_ids
