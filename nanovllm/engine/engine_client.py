"""The API process's handle on the engine process (engine_core.py): spawn it, send it typed messages,
and route its per-step Updates to the asyncio streams that wait for them.

The event loop reads the Updates itself (a reader callback on the channel's socket takes every
complete message that has arrived), so no thread has to win the GIL from the busy loop per message;
each output goes to its stream's buffer. A stream's consumer takes everything buffered at once,
merged per completion, so a consumer that falls behind gets fewer, larger outputs, never a backlog.
"""
from __future__ import annotations

import asyncio
import atexit
import itertools
import multiprocessing as mp
import multiprocessing.util  # noqa: F401 (its exit hook, which joins child processes, must be registered before ours)
import pickle
import socket
import threading
from collections.abc import AsyncIterator, Callable

from nanovllm.engine.core_messages import (Accepted, AbortRequest, AddRequest, Commands, EngineStopped, Failed, LoopStats, Output,
                                           QueueFull, Ready, Stop, Update, merge_outputs)
from nanovllm.engine.engine_core import run_engine_core
from nanovllm.engine.update_channel import FrameDecoder, recv_message
from nanovllm.engine.requests import Prompt
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.validation import require_int

__all__ = ["EngineClient", "EngineStopped", "Output", "OutputStream", "QueueFull", "merge_outputs"]

# How long close() waits for the engine process to stop before terminating it.
JOIN_TIMEOUT_S = 30.0
# The most bytes the event loop reads from the channel per wake-up.
READ_CHUNK_BYTES = 1 << 20


class EngineClient:
    """One engine process. Build it (blocks until the model is loaded; raises RuntimeError if it
    fails), `bind` it to the event loop that will use it, open OutputStreams, `close` it at the end.

    If the engine process dies or fails, every open stream raises EngineStopped, later adds raise it,
    and `on_death(reason)` is called on the event loop (the server exits non-zero).
    """

    def __init__(self, model: str, engine_kwargs: dict | None = None, max_waiting: int | None = None) -> None:
        if max_waiting is not None:
            require_int("max_waiting", max_waiting, 1)
        context = mp.get_context("spawn")
        commands, self._commands = context.Pipe(duplex=False)
        self._updates, updates = socket.socketpair()
        self.process = context.Process(target=run_engine_core, args=(model, engine_kwargs or {}, max_waiting, commands, updates),
                                       name="nanovllm-engine")
        self.process.start()
        commands.close()
        updates.close()
        atexit.register(self.close)  # runs before multiprocessing's exit hook, which would wait for the engine forever
        self.stats = LoopStats()
        self.error: EngineStopped | None = None  # why the engine stopped, once it has
        self.on_death: Callable[[str], None] | None = None
        self._streams: dict[int, OutputStream] = {}  # by request id, until the request's last output is routed
        self._accepting: dict[int, asyncio.Future] = {}
        self._outbox: Commands = []  # this event-loop turn's adds and aborts, sent as one message at the turn's end
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._closing = False
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._decoder = FrameDecoder()
        self._chunk = bytearray(READ_CHUNK_BYTES)
        self._reading = False  # the event loop watches the channel (from bind until its end)
        self._channel_ended = threading.Event()  # the event loop has read the channel to its end
        self.ready: Ready | None = None
        try:
            self.ready = self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> Ready:
        try:
            message = recv_message(self._updates)
        except EOFError:
            self.process.join(JOIN_TIMEOUT_S)
            raise RuntimeError(f"the engine process exited with code {self.process.exitcode} while loading the model") from None
        if isinstance(message, Failed):
            self.process.join(JOIN_TIMEOUT_S)  # it exits on its own: let it unwind before close() would terminate it
            raise RuntimeError(message.reason)
        return message

    def bind(self, event_loop: asyncio.AbstractEventLoop) -> None:
        """Route outputs to streams on `event_loop` from now on (call once, before the first stream,
        from the loop's thread or before it runs)."""
        self._event_loop = event_loop
        self._updates.setblocking(False)
        event_loop.add_reader(self._updates.fileno(), self._on_readable)
        self._reading = True

    def is_alive(self) -> bool:
        return self.error is None and self.process.is_alive()

    # ---- the event loop -------------------------------------------------------------------

    def _on_readable(self) -> None:
        """Every complete message that has arrived, routed in order; at the end of the channel, wait
        (on a thread) for the engine process to exit, then fail what is left."""
        try:
            received = self._updates.recv_into(self._chunk)
        except BlockingIOError:
            return
        except OSError:
            received = 0
        if received:
            self._dispatch(self._decoder.feed(memoryview(self._chunk)[:received]))
            return
        self._stop_reading()
        threading.Thread(target=self._await_exit, name="nanovllm-client-exit", daemon=True).start()

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._event_loop.remove_reader(self._updates.fileno())
        self._channel_ended.set()

    def _await_exit(self) -> None:
        self.process.join(JOIN_TIMEOUT_S)
        try:
            self._event_loop.call_soon_threadsafe(self._ended, self.process.exitcode)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more

    def _dispatch(self, messages: list[Update | Failed]) -> None:
        woken = set()
        failed = None
        for message in messages:
            if isinstance(message, Failed):
                failed = message
                break
            self.stats = message.stats
            for accepted in message.accepted:
                self._resolve(accepted.request_id, accepted)
            for refused in message.refused:
                if (stream := self._streams.pop(refused.request_id, None)) is not None:
                    stream._forget(refused.request_id)
                self._resolve(refused.request_id, refused.error)
            for output in message.outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                if stream._receive(output):
                    del self._streams[output.request_id]
                woken.add(stream)
        for stream in woken:
            stream._wakeup.set()
        if failed is not None:
            self._fail(failed.reason)

    def _resolve(self, request_id: int, result: Accepted | Exception) -> None:
        future = self._accepting.pop(request_id, None)
        if future is None or future.done():
            return
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)

    def _ended(self, exitcode: int | None) -> None:
        self._fail("the engine is stopped" if self._closing else f"the engine process exited unexpectedly with code {exitcode}")

    def _fail(self, reason: str) -> None:
        """The engine is gone: every waiting add and open stream gets EngineStopped; on_death unless we closed it."""
        if self.error is not None:
            return
        self.error = EngineStopped(reason)
        for future in self._accepting.values():
            if not future.done():
                future.set_exception(self.error)
        for stream in set(self._streams.values()):
            stream._fail(self.error)
        self._accepting.clear()
        self._streams.clear()
        if not self._closing and self.on_death is not None:
            self.on_death(reason)

    def _send(self, commands: Commands) -> None:
        """One pipe message (plain pickle: commands hold no handles; multiprocessing's pickler costs
        more per message); OSError once the engine process is gone."""
        payload = pickle.dumps(commands, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self._commands.send_bytes(payload)

    def _queue(self, command: AddRequest | AbortRequest) -> None:
        """Send `command` at the end of this event-loop turn, with every other command queued in it, in order (event loop)."""
        if not self._outbox:
            self._event_loop.call_soon(self._flush)
        self._outbox.append(command)

    def _flush(self) -> None:
        commands, self._outbox = self._outbox, []
        if self.error is not None:
            return  # _fail has answered every add
        try:
            self._send(commands)
        except OSError as error:
            stopped = EngineStopped(f"the engine process is gone ({error!r})")
            for command in commands:
                if isinstance(command, AddRequest):
                    if (stream := self._streams.pop(command.request_id, None)) is not None:
                        stream._forget(command.request_id)
                    self._resolve(command.request_id, stopped)

    async def _add(self, stream: OutputStream, prompt: Prompt, params: SamplingParams) -> Accepted:
        if self.error is not None:
            raise self.error
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._queue(AddRequest(request_id, prompt, params))
        self._accepting[request_id] = future
        self._streams[request_id] = stream
        stream._live[request_id] = params.n
        try:
            return await future
        except asyncio.CancelledError:
            self.abort(request_id)  # the engine may accept it after all
            raise

    def abort(self, request_id: int) -> None:
        """Drop a request (all its completions) and free its blocks; a no-op once it has finished (event loop)."""
        self._accepting.pop(request_id, None)
        if (stream := self._streams.pop(request_id, None)) is not None:
            stream._forget(request_id)
        if self.error is None and not self._closing:  # once closing, Stop ends every request
            self._queue(AbortRequest(request_id))

    def close(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Stop the engine process (live requests end with finish_reason "abort") and wait for it;
        terminate it if it does not stop in `timeout` (at once while it is still loading). Idempotent;
        any thread. While the bound event loop runs in another thread, waits until it has read the
        engine's last Update (its streams end), and leaves the channel's socket to it."""
        if self._closing:
            return
        self._closing = True
        atexit.unregister(self.close)
        try:
            self._send([Stop()])
        except OSError:
            pass
        self.process.join(timeout if self.ready is not None else 0)
        for stop in (self.process.terminate, self.process.kill):
            if self.process.is_alive():
                stop()
                self.process.join(timeout)
        self._commands.close()
        if self._reading and self._event_loop.is_running() and not self._on_loop_thread():
            self._channel_ended.wait(timeout)  # the loop stops reading at the channel's end
        if self._reading and not self._event_loop.is_closed():
            self._stop_reading()  # the loop is not running, or this is its thread
        self._updates.close()

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._event_loop
        except RuntimeError:
            return False


class OutputStream:
    """The outputs of one caller's engine requests (e.g. an HTTP request's prompts), inside an asyncio
    event loop. `await add(...)` each request, iterate the batches, and `close()` in a finally: closing
    aborts the requests that have not finished."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client
        self._live: dict[int, int] = {}  # completions whose last output is not routed yet, by request id
        self._buffer: list[Output] = []
        self._wakeup = asyncio.Event()
        self._error: EngineStopped | None = None

    async def add(self, prompt: Prompt, params: SamplingParams) -> Accepted:
        """Queue a request and wait until the engine accepted it (raises what refused it: ValueError,
        TypeError, QueueFull, EngineStopped). Its outputs carry `Accepted.request_id`."""
        return await self.client._add(self, prompt, params)

    def _receive(self, output: Output) -> bool:
        """Buffer an output (event loop); True when it was its request's last."""
        self._buffer.append(output)
        if output.finished:
            self._live[output.request_id] -= 1
            if not self._live[output.request_id]:
                del self._live[output.request_id]
                return True
        return False

    def _forget(self, request_id: int) -> None:
        self._live.pop(request_id, None)

    def _fail(self, error: EngineStopped) -> None:
        self._error = error
        self._live.clear()
        self._wakeup.set()

    async def batches(self) -> AsyncIterator[list[Output]]:
        """Everything that arrived since the previous batch, one merged Output per completion, until
        every request has finished; raises EngineStopped (after what had arrived) if the engine stops."""
        while True:
            if self._buffer:
                taken, self._buffer = self._buffer, []
                yield merge_outputs(taken)
            elif self._error is not None:
                raise self._error
            elif not self._live:
                return
            else:
                self._wakeup.clear()
                await self._wakeup.wait()

    def close(self) -> list[int]:
        """Abort the requests that have not finished; returns their ids."""
        unfinished = list(self._live)
        for request_id in unfinished:
            self.client.abort(request_id)
        return unfinished

