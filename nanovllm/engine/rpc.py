"""Rank 0 -> tensor-parallel worker commands, through one shared-memory segment.

Rank 0 pickles a message into the segment as `[8-byte little-endian length][pickle]` and
writes one byte to each worker's "ready" pipe. A worker copies the message out, then writes
one byte to its "ack" pipe; rank 0 writes the next message only once every worker has
acknowledged the previous one, so a slow reader never sees a half-overwritten segment.
Acknowledgements are collected lazily (just before the next write), letting rank 0 start its
own forward pass while the workers wake up. A message too big for the segment moves everyone
to a bigger one, announced by a `Remap` through the old segment.

Pipes rather than semaphores: a worker blocked on its ready pipe gets EOF when rank 0 dies,
and rank 0 polls its ack pipes while checking that every worker process is alive.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

HEADER = 8
INITIAL_SIZE = 1 << 20
# How long rank 0 waits for an acknowledgement of a command (workers ack right after reading it).
ACK_TIMEOUT_S = 60.0
# How often rank 0 re-checks worker liveness while waiting.
POLL_S = 0.05
# How long workers get to exit after a `Shutdown` before they are terminated.
JOIN_TIMEOUT_S = 10.0
SPAWN_HINT = (
    "tensor-parallel workers are spawned processes that re-import the main script: a script that creates "
    'LLM(tensor_parallel_size > 1) at module level must guard that code with `if __name__ == "__main__":` '
    "(the worker's own traceback is printed above)"
)


@dataclass(frozen=True)
class Call:
    """Run `getattr(runner, method)(*args)` on every worker."""

    method: str
    args: tuple = ()


@dataclass(frozen=True)
class Remap:
    """Later messages are in the segment called `name` (the current one is too small)."""

    name: str


@dataclass(frozen=True)
class Shutdown:
    """Leave the command loop."""


@dataclass(frozen=True)
class WorkerEnd:
    """What a worker needs to listen (picklable, passed to the spawned process)."""

    segment: str
    ready: Connection
    ack: Connection


def _attach(name: str) -> SharedMemory:
    """Open an existing segment without making this process its owner.

    Python >= 3.13: `track=False`. Older: spawned workers share rank 0's resource tracker, whose
    registry is a set, so the attach's duplicate registration is a no-op and rank 0's `unlink`
    removes it. (Unregistering here would instead drop rank 0's own registration.)
    """
    if sys.version_info >= (3, 13):
        return SharedMemory(name, track=False)
    return SharedMemory(name)


class Workers:
    """Ranks 1..size-1 of one engine: daemonic spawned processes and the channel that commands them.

    After a failure (a worker died or hung, a command was interrupted half-way, rank 0 failed in
    the middle of a step) the workers are stopped (`abort`) and every later command raises RuntimeError.
    """

    def __init__(self, size: int, target: Callable[..., None], args: tuple) -> None:
        """Start `target(*args, rank, WorkerEnd)` for every rank in 1..size-1."""
        ctx = mp.get_context("spawn")
        self.prefix = f"nanovllm-{os.getpid()}-{secrets.token_hex(4)}"
        self.generation = 0
        self.segment: SharedMemory | None = SharedMemory(f"{self.prefix}-0", create=True, size=INITIAL_SIZE)
        self.processes: list[mp.process.BaseProcess] = []
        self.ready: list[Connection] = []
        self.acks: list[Connection] = []
        # Workers acknowledge once when their process runs, once after start-up, then once per message.
        self.unacked: set[int] = set()
        self.error: str | None = None
        try:
            for rank in range(1, size):
                ready_reader, ready_writer = ctx.Pipe(duplex=False)
                ack_reader, ack_writer = ctx.Pipe(duplex=False)
                end = WorkerEnd(self.segment.name, ready_reader, ack_writer)
                process = ctx.Process(target=target, args=(*args, rank, end), name=f"nanovllm-tp{rank}", daemon=True)
                process.start()
                ready_reader.close()
                ack_writer.close()
                self.processes.append(process)
                self.ready.append(ready_writer)
                self.acks.append(ack_reader)
                self.unacked.add(rank - 1)
        except BaseException:
            self._stop(grace_s=0.0)
            raise

    # ---- commands -------------------------------------------------------------------------

    def wait_spawned(self) -> None:
        """Block until every worker process has started its target, so that one dying while the
        interpreter starts (typically: the main script is re-imported and fails) is reported within
        seconds, before rank 0 waits for it in a collective."""
        try:
            self._wait_acks(None)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}. {SPAWN_HINT}") from None
        self.unacked.update(range(len(self.processes)))

    def wait_started(self) -> None:
        """Block until every worker has built its model (no time limit: loading can be slow)."""
        self._wait_acks(None)

    def call(self, method: str, *args: object) -> None:
        """Start `method(*args)` on every worker's ModelRunner; returns once the command is written."""
        self._send(Call(method, args))

    def _send(self, message: Call | Remap | Shutdown) -> None:
        self._wait_acks(ACK_TIMEOUT_S)
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        if HEADER + len(data) > self.segment.size:
            self._grow(HEADER + len(data))
        try:
            self.segment.buf[:HEADER] = len(data).to_bytes(HEADER, "little")
            self.segment.buf[HEADER : HEADER + len(data)] = data
            for ready in self.ready:
                ready.send_bytes(b"\x01")
            self.unacked.update(range(len(self.processes)))
        except BaseException as exc:
            # Some workers may have the message and others not: they can no longer run in step.
            self.abort(f"sending a command to the tensor-parallel workers was interrupted ({exc!r})")
            raise

    def _grow(self, needed: int) -> None:
        """Move everyone to a segment of at least twice the size, then unlink the old one."""
        self.generation += 1
        bigger = SharedMemory(f"{self.prefix}-{self.generation}", create=True, size=max(needed, 2 * self.segment.size))
        old = self.segment
        try:
            self._send(Remap(bigger.name))
            self._wait_acks(ACK_TIMEOUT_S)
        except BaseException:
            bigger.close()
            bigger.unlink()
            raise
        self.segment = bigger
        old.close()
        old.unlink()

    def _wait_acks(self, timeout: float | None) -> None:
        """Collect the outstanding acknowledgements, checking worker liveness every POLL_S."""
        self.check_alive()
        deadline = None if timeout is None else time.monotonic() + timeout
        for i in sorted(self.unacked):
            while not self.acks[i].poll(POLL_S):
                self.check_alive()
                if deadline is not None and time.monotonic() > deadline:
                    self.abort(f"tensor-parallel worker {i + 1} did not acknowledge a command within {timeout:.0f} s")
                    self.check_alive()
            try:
                self.acks[i].recv_bytes()
            except EOFError:
                process = self.processes[i]
                process.join(POLL_S * 20)  # it closed its end by exiting: let it be reaped for its exit code
                self.abort(f"tensor-parallel worker {i + 1} (pid {process.pid}) exited with code {process.exitcode}")
                self.check_alive()
            self.unacked.discard(i)

    # ---- health and shutdown ----------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise RuntimeError if the workers were stopped or one of them has exited."""
        if self.error is None:
            for rank, process in enumerate(self.processes, start=1):
                if not process.is_alive():
                    self.abort(f"tensor-parallel worker {rank} (pid {process.pid}) exited with code {process.exitcode}")
        if self.error is not None:
            raise RuntimeError(self.error)

    def abort(self, reason: str) -> None:
        """Stop every worker at once (they may be blocked in a collective); every later command raises RuntimeError."""
        if self.error is None:
            self.error = f"{reason}; the tensor-parallel workers were stopped and this engine cannot run any more (create a new LLM)"
            self._stop(grace_s=0.0)

    def request_shutdown(self) -> None:
        """Ask the workers to leave their command loop and release their share of the process group,
        without waiting for them (rank 0 releases its share meanwhile). No-op after a failure. Idempotent."""
        if self.error is not None:
            return
        try:
            self._send(Shutdown())
        except RuntimeError:
            return  # abort() has already stopped everything
        self.error = "the engine has been shut down"

    def close(self) -> None:
        """Request the shutdown if not done yet, wait for the workers (terminating stragglers) and unlink the segment. Idempotent."""
        self.request_shutdown()
        self._stop(grace_s=JOIN_TIMEOUT_S)

    def _stop(self, grace_s: float) -> None:
        for process in self.processes:
            process.join(grace_s)
            if process.is_alive():
                process.terminate()
                process.join(JOIN_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
            process.close()
        for connection in self.ready + self.acks:
            connection.close()
        self.processes, self.ready, self.acks = [], [], []
        self.unacked.clear()
        if self.segment is not None:
            self.segment.close()
            self.segment.unlink()
            self.segment = None


class CommandReader:
    """A worker's end of the channel."""

    def __init__(self, end: WorkerEnd) -> None:
        self.ready = end.ready
        self.ack = end.ack
        self.segment = _attach(end.segment)

    def acknowledge(self) -> None:
        self.ack.send_bytes(b"\x01")

    def receive(self) -> Call | Shutdown:
        """Block for the next command; a `Shutdown` also when rank 0 has gone away."""
        while True:
            try:
                self.ready.recv_bytes()
            except EOFError:
                return Shutdown()
            size = int.from_bytes(self.segment.buf[:HEADER], "little")
            message = pickle.loads(bytes(self.segment.buf[HEADER : HEADER + size]))
            if isinstance(message, Remap):
                self.segment.close()
                self.segment = _attach(message.name)
            try:
                self.acknowledge()
            except BrokenPipeError:
                return Shutdown()
            if not isinstance(message, Remap):
                return message

    def close(self) -> None:
        self.segment.close()
        self.ready.close()
        self.ack.close()
