"""The engine process -> API process channel: pickled messages over a socket, each framed by its
8-byte length, so the API process can read them on its event loop (no reader thread that must win
the GIL from a busy loop for every message).

The engine's step loop never waits for the API process: UpdateSender sends on its own thread, and
the Updates queued while a send is in progress are merged into one. A slow API process gets fewer,
larger Updates; the engine keeps stepping.
"""
from __future__ import annotations

import pickle
import socket
import struct
import threading
from collections.abc import Callable

from nanovllm.engine.core_messages import Failed, Ready, Update, merge_outputs

_HEADER = struct.Struct("!Q")

Message = Ready | Update | Failed


def send_message(sock: socket.socket, message: Message) -> None:
    """Blocking; OSError once the peer is gone."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def recv_message(sock: socket.socket) -> Message:
    """Blocking read of one message from a blocking socket; EOFError once the peer is gone."""
    size = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))[0]
    return pickle.loads(_recv_exactly(sock, size))


def _recv_exactly(sock: socket.socket, size: int) -> bytearray:
    data = bytearray(size)
    view = memoryview(data)
    while view:
        received = sock.recv_into(view)
        if not received:
            raise EOFError("the engine process closed its channel")
        view = view[received:]
    return data


class FrameDecoder:
    """Bytes as they arrive (any split) -> the complete messages among them, in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> list[Message]:
        buffer = self._buffer
        buffer += data
        messages = []
        start = 0
        while len(buffer) - start >= _HEADER.size:
            size = _HEADER.unpack_from(buffer, start)[0]
            end = start + _HEADER.size + size
            if len(buffer) < end:
                break
            messages.append(pickle.loads(memoryview(buffer)[start + _HEADER.size : end]))
            start = end
        del buffer[:start]
        return messages


class UpdateSender:
    """Owns the engine's end of the channel once the core runs. `put` never blocks: a thread sends
    the queue in order, and an Update put while the previous one still waits is merged into it
    (answers and outputs appended, outputs merged per completion before sending, the latest stats).
    `on_gone` is called (on the sender thread) if the API process has gone away."""

    def __init__(self, sock: socket.socket, on_gone: Callable[[], None]) -> None:
        self.sock = sock
        self.on_gone = on_gone
        self._queue: list[list] = []  # [message, merged?]
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="nanovllm-core-sender", daemon=True)
        self._thread.start()

    def put(self, message: Update | Failed) -> None:
        with self._ready:
            last = self._queue[-1] if self._queue else None
            if last is not None and isinstance(last[0], Update) and isinstance(message, Update):
                pending = last[0]
                pending.accepted += message.accepted
                pending.refused += message.refused
                pending.outputs += message.outputs
                pending.stats = message.stats
                last[1] = True
            else:
                self._queue.append([message, False])
            self._ready.notify()

    def close(self, timeout: float) -> None:
        """Send what is queued (waiting at most `timeout` for the API process to take it), then stop."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                message, merged = self._queue.pop(0)
            if merged:
                message.outputs = merge_outputs(message.outputs)
            try:
                send_message(self.sock, message)
            except OSError:
                self.on_gone()
                return
