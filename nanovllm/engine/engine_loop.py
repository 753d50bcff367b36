"""An engine that takes requests while it runs: one thread owns the LLMEngine and steps it while any
request is live; other threads add and abort requests through a thread-safe inbox of typed messages.

Requests that arrive while others decode join the next step (continuous batching across callers).
A request with SamplingParams.n > 1 is one engine request (its prompt is prefilled once) whose n
completions each deliver their own Outputs. Each request's outputs go to its own `deliver` callback, called on the engine thread; `RequestStream`
turns that into an async iterator for asyncio code (the HTTP server).
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from nanovllm.engine.llm_engine import LLMEngine, Prompt
from nanovllm.engine.sequence import Sequence
from nanovllm.outputs import Logprob
from nanovllm.sampling_params import SamplingParams


class QueueFull(RuntimeError):
    """The engine already holds `max_waiting` requests that wait for a place in a batch."""


class EngineStopped(RuntimeError):
    """The engine loop was closed, or failed; it takes no more requests."""


@dataclass
class Output:
    """What one completion of a request produced since its previous Output; its last one has `finished`."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None  # as the engine recorded them (decoded token text included)
    finished: bool
    finish_reason: str | None
    completion_index: int = 0


@dataclass(frozen=True)
class Accepted:
    """The engine validated and queued a request."""

    request_id: int
    num_prompt_tokens: int


@dataclass(frozen=True)
class LoopStats:
    """A snapshot the engine thread publishes after every step (read by metrics from any thread)."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks_used: int = 0
    num_blocks_total: int = 0


Deliver = Callable[[Output | EngineStopped], None]


@dataclass
class AddRequest:
    request_id: int
    prompt: Prompt
    params: SamplingParams
    deliver: Deliver
    accepted: Future = field(default_factory=Future)


@dataclass
class AbortRequest:
    request_id: int


@dataclass
class Stop:
    pass


@dataclass
class _Live:
    request_id: int
    seq: Sequence  # the first completion's
    deliver: Deliver
    num_logprobs_sent: list[int]  # per completion
    unfinished: set[int]  # completion indices still running


class EngineLoop:
    """Owns `engine` from construction on: only the loop's thread touches it, and it calls engine.exit() when the loop ends."""

    def __init__(self, engine: LLMEngine, max_waiting: int | None = None) -> None:
        if max_waiting is not None and (isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 1):
            raise ValueError(f"max_waiting must be None (unbounded) or an int >= 1, got {max_waiting!r}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.stats = LoopStats(num_blocks_total=len(engine.scheduler.block_manager.blocks))
        self._inbox: queue.SimpleQueue[AddRequest | AbortRequest | Stop] = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}  # by the engine's request id (seq.request_id)
        self._engine_ids: dict[int, str] = {}  # the engine's request id of each live request, by the loop's id
        self._ids = itertools.count()
        self._lock = threading.Lock()  # orders `add` against the loop's final drain, so no add is left unanswered
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine-loop", daemon=True)
        self._thread.start()

    # ---- any thread -----------------------------------------------------------------------

    def add(self, prompt: Prompt, params: SamplingParams, deliver: Deliver) -> AddRequest:
        """Queue a request; `message.accepted` resolves to Accepted, or to the ValueError / TypeError /
        QueueFull / EngineStopped that refused it. `deliver` then gets Outputs until each of the
        `params.n` completions has had a finished one (or EngineStopped if the engine fails)."""
        message = AddRequest(next(self._ids), prompt, params, deliver)
        with self._lock:
            if self._stopped:
                raise EngineStopped("the engine loop is stopped")
            self._inbox.put(message)
        return message

    def abort(self, request_id: int) -> None:
        """Drop a request (all its completions) and free its blocks; a no-op once it has finished."""
        self._inbox.put(AbortRequest(request_id))

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Abort every live request (each gets a finished Output with finish_reason "abort"), stop the thread, exit the engine."""
        self._inbox.put(Stop())
        self._thread.join(timeout)

    # ---- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        failure: EngineStopped | None = None
        try:
            while self._handle_messages(block=self.engine.is_finished()):
                if not self.engine.is_finished():
                    self._step()
                self._publish_stats()
        except Exception as error:
            failure = EngineStopped(f"the engine failed: {error!r}")
            failure.__cause__ = error
            raise
        finally:
            self._finish_all(failure)
            self.engine.exit()

    def _handle_messages(self, block: bool) -> bool:
        """Apply every queued message (waiting for one when `block`); False once Stop arrives."""
        try:
            message = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            if isinstance(message, Stop):
                return False
            if isinstance(message, AddRequest):
                self._add(message)
            else:
                self._abort(message.request_id)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, message: AddRequest) -> None:
        waiting = len(self.engine.scheduler.waiting)
        if self.max_waiting is not None and waiting >= self.max_waiting:
            message.accepted.set_exception(QueueFull(f"{waiting} requests are waiting, the limit is max_waiting={self.max_waiting}"))
            return
        try:
            seq = self.engine.add_request(message.prompt, message.params, stream=True)
        except (ValueError, TypeError) as error:
            message.accepted.set_exception(error)
            return
        n = message.params.n
        self._live[seq.request_id] = _Live(message.request_id, seq, message.deliver, [0] * n, set(range(n)))
        self._engine_ids[message.request_id] = seq.request_id
        message.accepted.set_result(Accepted(message.request_id, seq.num_prompt_tokens))

    def _forget(self, engine_id: str) -> _Live:
        live = self._live.pop(engine_id)
        del self._engine_ids[live.request_id]
        return live

    def _abort(self, request_id: int) -> None:
        engine_id = self._engine_ids.get(request_id)
        if engine_id is not None:
            self._forget(engine_id)
            self.engine.abort(engine_id)

    def _step(self) -> None:
        chunks, _, _ = self.engine.step()
        for chunk in chunks:
            live = self._live.get(chunk.request_id)
            if live is None:
                continue
            index = chunk.completion_index
            logprobs = None
            if live.seq.sampling_params.logprobs is not None:
                recorded = self.engine.requests[chunk.request_id].completions[index].logprobs
                sent = live.num_logprobs_sent[index]
                logprobs = recorded[sent : sent + len(chunk.token_ids)]
                live.num_logprobs_sent[index] += len(logprobs)
            if chunk.finished:
                live.unfinished.discard(index)
                if not live.unfinished:
                    self._forget(chunk.request_id)
                    self.engine.abort(chunk.request_id)  # forgets the finished request (its sequences are already done)
            live.deliver(Output(chunk.text, chunk.token_ids, logprobs, chunk.finished, chunk.finish_reason, index))

    def _publish_stats(self) -> None:
        scheduler = self.engine.scheduler
        blocks = scheduler.block_manager
        self.stats = LoopStats(len(scheduler.running), len(scheduler.waiting), len(blocks.used_block_ids), len(blocks.blocks))

    def _finish_all(self, failure: EngineStopped | None) -> None:
        """End every live request and refuse every add still queued; no add can be queued after this."""
        with self._lock:
            self._stopped = True
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(message, AddRequest):
                message.accepted.set_exception(failure or EngineStopped("the engine loop is stopped"))
        for engine_id, live in list(self._live.items()):
            if failure is None:
                self.engine.abort(engine_id)
                for index in sorted(live.unfinished):
                    live.deliver(Output("", [], None, True, "abort", index))
            else:
                live.deliver(failure)
        self._live.clear()
        self._engine_ids.clear()
        self._publish_stats()


class RequestStream:
    """One request's Outputs (of all its n completions, interleaved) inside an asyncio event loop. Use
    `await RequestStream.open(...)`, iterate, and `close()` in a finally: closing a request that has not
    finished aborts it."""

    def __init__(self, engine_loop: EngineLoop, message: AddRequest, outputs: asyncio.Queue) -> None:
        self.engine_loop = engine_loop
        self.request_id = message.request_id
        self.accepted: Accepted | None = None
        self._num_unfinished = message.params.n
        self._outputs = outputs

    @property
    def finished(self) -> bool:
        return self._num_unfinished == 0

    @classmethod
    async def open(cls, engine_loop: EngineLoop, prompt: Prompt, params: SamplingParams) -> RequestStream:
        """Queue the request and wait until the engine accepted it (raises what refused it)."""
        event_loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def deliver(item: Output | EngineStopped) -> None:
            try:
                event_loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:
                pass  # the event loop is closed: nobody is listening any more

        message = engine_loop.add(prompt, params, deliver)
        stream = cls(engine_loop, message, outputs)
        try:
            stream.accepted = await asyncio.wrap_future(message.accepted)
        except BaseException:
            stream.close()  # cancelled while waiting: the engine may still accept it
            raise
        return stream

    def __aiter__(self) -> AsyncIterator[Output]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Output]:
        while not self.finished:
            item = await self._outputs.get()
            if isinstance(item, EngineStopped):
                self._num_unfinished = 0
                raise item
            self._num_unfinished -= item.finished
            yield item

    def close(self) -> bool:
        """Abort the request if it has not finished; True when it did abort it."""
        if self.finished:
            return False
        self._num_unfinished = 0
        self.engine_loop.abort(self.request_id)
        return True
