"""The engine process of the server: one LLMEngine stepped while any request is live, fed through a
pipe from the API process (EngineClient) and drained through a socket to it (update_channel.py), so
HTTP, JSON and SSE work never holds the GIL the step loop needs. Requests that arrive while others
decode join the next step (continuous batching).

A reader thread moves the pipe's messages (Commands: lists, one per event-loop turn of the client)
into an inbox; the main thread applies them in order between steps
and hands one Update per turn to the UpdateSender, which never blocks the step loop (a slow API
process gets merged Updates). A request with SamplingParams.n > 1 is one engine request (its prompt
is prefilled once) whose n completions each deliver their own Outputs.
"""
from __future__ import annotations

import pickle
import queue
import signal
import socket
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection

from nanovllm.engine.core_messages import (Accepted, AddRequest, Commands, EngineStopped, Failed, LoopStats, Output, QueueFull,
                                           Ready, Refused, Stop, Update)
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.update_channel import UpdateSender, send_message

# How long the engine waits at exit for the API process to take its last Update.
FLUSH_TIMEOUT_S = 10.0


@dataclass
class _Live:
    request_id: int  # the client's id
    seq: Sequence  # the first completion's
    num_logprobs_sent: list[int]  # per completion
    unfinished: set[int]  # completion indices still running


class EngineCore:
    """Owns `engine`, `commands` (read by its reader thread) and `updates` (written by its sender):
    only this process's main thread touches the engine, and run() calls engine.exit() when it ends
    (Stop, the API process gone, or a failure)."""

    def __init__(self, engine: LLMEngine, commands: Connection, updates: socket.socket, max_waiting: int | None) -> None:
        """max_waiting: None (unbounded) or an int >= 1, checked by EngineClient."""
        self.engine = engine
        self.commands = commands
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue[Commands] = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}  # by the engine's request id (seq.request_id)
        self._engine_ids: dict[int, str] = {}  # the engine's request id of each live request, by the client's id
        self._update = Update(self._stats())
        self._sent_stats: LoopStats | None = None
        self._sender = UpdateSender(updates, on_gone=lambda: self._inbox.put([Stop()]))  # nobody reads outputs any more
        threading.Thread(target=self._read, name="nanovllm-core-reader", daemon=True).start()

    def _read(self) -> None:
        """Pipe -> inbox; the API process going away (EOF) is a Stop."""
        try:
            while True:
                self._inbox.put(pickle.loads(self.commands.recv_bytes()))
        except (EOFError, OSError):
            self._inbox.put([Stop()])

    def run(self) -> None:
        try:
            self._send_update()  # the first stats
            while self._handle_messages(block=self.engine.is_finished()):
                if not self.engine.is_finished():
                    self._step()
                self._send_update()
        except Exception as error:
            self._sender.put(Failed(f"the engine failed: {error!r}"))
            raise
        else:
            self._finish_all()
        finally:
            self._sender.close(FLUSH_TIMEOUT_S)
            self.engine.exit()

    # ---- messages -------------------------------------------------------------------------

    def _handle_messages(self, block: bool) -> bool:
        """Apply every queued command in order (waiting for some when `block`); False once Stop arrives."""
        try:
            commands = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            for command in commands:
                if isinstance(command, Stop):
                    return False
                if isinstance(command, AddRequest):
                    self._add(command)
                else:
                    self._abort(command.request_id)
            try:
                commands = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, message: AddRequest) -> None:
        waiting = len(self.engine.scheduler.waiting)
        if self.max_waiting is not None and waiting >= self.max_waiting:
            error = QueueFull(f"{waiting} requests are waiting, the limit is max_waiting={self.max_waiting}")
            self._update.refused.append(Refused(message.request_id, error))
            return
        try:
            seq = self.engine.add_request(message.prompt, message.params, stream=True)
        except (ValueError, TypeError) as error:
            self._update.refused.append(Refused(message.request_id, error))
            return
        n = message.params.n
        self._live[seq.request_id] = _Live(message.request_id, seq, [0] * n, set(range(n)))
        self._engine_ids[message.request_id] = seq.request_id
        self._update.accepted.append(Accepted(message.request_id, seq.num_prompt_tokens))

    def _forget(self, engine_id: str) -> _Live:
        live = self._live.pop(engine_id)
        del self._engine_ids[live.request_id]
        return live

    def _abort(self, request_id: int) -> None:
        engine_id = self._engine_ids.get(request_id)
        if engine_id is not None:
            self._forget(engine_id)
            self.engine.abort(engine_id)

    # ---- stepping -------------------------------------------------------------------------

    def _step(self) -> None:
        chunks, _, _ = self.engine.step()
        outputs = self._update.outputs
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
            outputs.append(Output(live.request_id, index, chunk.text, chunk.token_ids, logprobs, chunk.finished, chunk.finish_reason))

    def _stats(self) -> LoopStats:
        scheduler = self.engine.scheduler
        blocks = scheduler.block_manager
        return LoopStats(len(scheduler.running), len(scheduler.waiting), len(blocks.used_block_ids), len(blocks.blocks))

    def _send_update(self) -> None:
        """Send what this turn produced, if anything (or if the stats changed)."""
        update = self._update
        update.stats = self._stats()
        if update.accepted or update.refused or update.outputs or update.stats != self._sent_stats:
            self._sender.put(update)
            self._sent_stats = update.stats
            self._update = Update(update.stats)

    def _finish_all(self) -> None:
        """End every live request ("abort") and refuse every add still queued; the last Update."""
        while True:
            try:
                commands = self._inbox.get_nowait()
            except queue.Empty:
                break
            for command in commands:
                if isinstance(command, AddRequest):
                    self._update.refused.append(Refused(command.request_id, EngineStopped("the engine is stopped")))
        for engine_id, live in list(self._live.items()):
            self.engine.abort(engine_id)
            asked = live.seq.sampling_params.logprobs is not None  # then logprobs is a list, as in every other Output
            for index in sorted(live.unfinished):
                self._update.outputs.append(Output(live.request_id, index, "", [], [] if asked else None, True, "abort"))
        self._live.clear()
        self._engine_ids.clear()
        self._sent_stats = None
        self._send_update()


def run_engine_core(model: str, engine_kwargs: dict, max_waiting: int | None, commands: Connection, updates: socket.socket) -> None:
    """The engine process's target: build the engine, say Ready (or Failed) on `updates`, run until
    Stop or EOF on `commands`.

    Ctrl-C reaches the whole process group: the engine ignores SIGINT and stops when the API process
    says so (or exits). SIGTERM sent to it alone unwinds it, so its workers and shared memory are freed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_exit)
    try:
        engine = LLMEngine(model, **engine_kwargs)
    except Exception as error:
        send_message(updates, Failed(f"the engine failed to start: {error!r}"))
        raise SystemExit(1) from error
    try:
        config = engine.config
        send_message(updates, Ready(config.model, config.max_model_len, engine.tokenizer is not None))
    except BaseException:
        engine.exit()
        raise
    EngineCore(engine, commands, updates, max_waiting).run()  # an exception escapes: printed, exit code 1


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)
