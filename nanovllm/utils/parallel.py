"""Tensor-parallel groups: one per engine, so that two engines can live in one process.

torch.distributed has a single default process group per process, which rank 0 (the user's
process) cannot share between two engines. Each engine therefore builds its own backend
(gloo on CPU, NCCL on CUDA) from its own TCPStore, and calls the backend directly. Layers
capture the group that is current while the model is built (`building_with`).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch._C._distributed_c10d import Backend

HOST = "127.0.0.1"
# Store connection and collective timeout. Dead workers are normally noticed much sooner,
# by the liveness checks of `nanovllm.engine.rpc.Workers`.
TIMEOUT = timedelta(seconds=60)
# How long a rank waits for the other ranks in NCCL's collective teardown.
SHUTDOWN_TIMEOUT = timedelta(seconds=15)

logger = logging.getLogger("nanovllm")


def create_store(size: int, port: int = 0) -> dist.TCPStore:
    """The rendezvous of one engine: rank 0 serves it on `port` (0: a free port, see `.port`), workers connect."""
    return dist.TCPStore(HOST, port, size, is_master=port == 0, timeout=TIMEOUT, wait_for_workers=False)


def _wait(work: dist.Work | None) -> None:
    """Complete a collective: gloo returns a Work to wait on; NCCL with asyncOp=False has already
    ordered it on the current stream and returns None."""
    if work is not None:
        work.wait()


class TPGroup:
    """The ranks of one engine and the backend joining them; `size == 1` needs no backend."""

    def __init__(self, rank: int = 0, size: int = 1, backend: Backend | None = None) -> None:
        self.rank = rank
        self.size = size
        self.backend = backend

    @classmethod
    def join(cls, store: dist.Store, rank: int, size: int, device: torch.device) -> TPGroup:
        """Connect to the other ranks; gloo blocks until all have joined, NCCL connects at its first collective."""
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = TIMEOUT
            backend = dist.ProcessGroupNCCL(store, rank, size, options)
        else:
            backend = dist.ProcessGroupGloo(store, rank, size, TIMEOUT)
        return cls(rank, size, backend)

    def _live_backend(self) -> Backend:
        if self.backend is None:
            raise RuntimeError("the tensor-parallel process group has been shut down")
        return self.backend

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
        """Reduce `x` in place across the ranks."""
        options = dist.AllreduceOptions()
        options.reduceOp = op
        options.asyncOp = False
        _wait(self._live_backend().allreduce([x], options))

    def broadcast(self, x: torch.Tensor) -> None:
        """Overwrite `x` on every rank with rank 0's `x`."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.rootTensor = 0
        options.asyncOp = False
        _wait(self._live_backend().broadcast([x], options))

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's `x` concatenated along the last dim on rank 0; None on the other ranks."""
        options = dist.GatherOptions()
        options.rootRank = 0
        options.asyncOp = False
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else []
        _wait(self._live_backend().gather([parts] if self.rank == 0 else [], [x], options))
        return torch.cat(parts, -1) if self.rank == 0 else None

    def close(self) -> None:
        """Shut the backend down: its connections, and with them the store and its port, are released. Idempotent.

        NCCL's teardown is collective: every rank calls this at about the same time. It would block
        for ever if a peer is gone, so it runs in a daemon thread given SHUTDOWN_TIMEOUT to finish.
        """
        backend, self.backend = self.backend, None
        if backend is None:
            return
        if isinstance(backend, dist.ProcessGroupGloo):
            backend.shutdown()
            return
        teardown = threading.Thread(target=backend.shutdown, name="nanovllm-nccl-shutdown", daemon=True)
        teardown.start()
        teardown.join(SHUTDOWN_TIMEOUT.total_seconds())
        if teardown.is_alive():
            logger.warning("rank %d: the NCCL process group did not shut down within %s (a peer is gone?); left behind", self.rank, SHUTDOWN_TIMEOUT)


_current: ContextVar[TPGroup] = ContextVar("tp_group", default=TPGroup())


@contextmanager
def building_with(group: TPGroup) -> Iterator[None]:
    """Make `group` the one that layers built inside this block capture."""
    token = _current.set(group)
    try:
        yield
    finally:
        _current.reset(token)


def tp_group() -> TPGroup:
    return _current.get()


def tp_size() -> int:
    return _current.get().size
