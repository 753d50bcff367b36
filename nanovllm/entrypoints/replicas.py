"""Engine replicas as Ray actors, fed batches of rows from one queue on the driver.

Each replica is an engine in an actor on its own placement group: one bundle of
tensor_parallel_size GPUs (a bundle never spans nodes, and the TP workers are the actor's child
processes on the GPUs Ray gave it), or CPUs only. Each replica holds one batch at a time and gets
the next one the moment it returns a result, so fast replicas take more batches. A replica that
dies is replaced (up to `max_restarts` times a run); the replacement takes batches once loaded.

Why actors and a queue here rather than Ray Data's map_batches: exactly-once is then one loop's
property. A batch is handed to one live replica at a time and its result is accepted once; a
replica that dies (or is killed for overrunning `batch_timeout_s`) is dropped and its batch goes
back to the queue for the next free replica, so no row is lost or written twice, and the output
order is the writer's business (`batch.OrderedWriter`), not the cluster's.

Ray is imported here only, and this module only when a run asks for Ray.
"""
from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nanovllm.entrypoints.batch import BatchDone, Row, run_rows
from nanovllm.llm import LLM

# Placing every replica and loading its model may take this long before the run gives up.
STARTUP_TIMEOUT_S = 600.0
# How often the driver looks for batches past batch_timeout_s while it waits for results.
POLL_S = 1.0
# How long close() lets replicas shut their engines down before killing them.
EXIT_TIMEOUT_S = 30.0


class Replica:
    """One engine, built once and run batch after batch (the Ray actor's class)."""

    def __init__(self, model: str, engine_kwargs: dict, num_threads: int | None) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)  # CPU replicas share the node's cores: their own share each, no oversubscription.
        self.llm = LLM(model, **engine_kwargs)

    def ready(self) -> bool:
        return True

    def run(self, rows: list[Row]) -> tuple[list[dict], float, float]:
        started = time.time()
        records = run_rows(self.llm, rows)
        return records, started, time.time()

    def exit(self) -> None:
        self.llm.exit()
        ray.actor.exit_actor()


@dataclass
class _Member:
    name: str
    group: PlacementGroup
    actor: ray.actor.ActorHandle


class ReplicaPool:
    """`replicas` engines on a Ray cluster: `address`, the one this process already joined, or a
    local one started here (and shut down by `close`). Arguments are checked by `batch.run_batch`."""

    def __init__(self, model: str, engine_kwargs: dict, replicas: int, address: str | None, cpus_per_replica: float,
                 batch_timeout_s: float | None, max_restarts: int) -> None:
        self.batch_timeout_s = batch_timeout_s
        self.restarts_left = max_restarts
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            ray.init(address=address)
        tp = engine_kwargs.get("tensor_parallel_size", 1)
        device = engine_kwargs.get("device", "auto")
        self.gpus = tp if device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0) else 0
        self.bundle = {"CPU": cpus_per_replica, **({"GPU": self.gpus} if self.gpus else {})}
        self.actor_args = (model, engine_kwargs, None if self.gpus else max(1, int(cpus_per_replica)))
        self.run_id = f"nanovllm-batch-{uuid.uuid4().hex[:8]}"
        self.live: list[_Member] = []
        self.starting: dict[ray.ObjectRef, tuple[_Member, float]] = {}  # replacements loading: ready() -> deadline
        self.dead_replicas: list[str] = []
        self.rerun_batches = 0
        self.launched = 0
        try:
            for _ in range(replicas):
                self.live.append(self._launch())
            self._wait_started(replicas)
        except BaseException:
            self.close()
            raise

    def _launch(self) -> _Member:
        """A new replica on a new placement group (the actor waits for the group to be placed)."""
        name = f"{self.run_id}-{self.launched}"
        self.launched += 1
        group = placement_group([self.bundle], strategy="STRICT_PACK", name=name)
        actor = ray.remote(Replica).options(
            name=name,
            num_cpus=self.bundle["CPU"],
            num_gpus=self.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
        ).remote(*self.actor_args)
        return _Member(name, group, actor)

    def _wait_started(self, replicas: int) -> None:
        """Fail fast, with the reason, if the first replicas cannot be placed or loaded."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        try:
            ray.get([member.group.ready() for member in self.live], timeout=STARTUP_TIMEOUT_S)
        except GetTimeoutError:
            raise RuntimeError(
                f"the cluster could not place {replicas} replicas of {self.bundle} within {STARTUP_TIMEOUT_S:.0f} s; "
                f"it has {ray.cluster_resources()}"
            ) from None
        ray.get([member.actor.ready.remote() for member in self.live], timeout=max(deadline - time.monotonic(), 1.0))

    def run(self, batches: Iterable[list[Row]]) -> Iterator[BatchDone]:
        """Every batch's result exactly once, in completion order. Each replica's next batch is sent
        before its result is yielded. Raises RuntimeError once every replica is dead and none is loading."""
        source = iter(batches)
        retry: deque[list[Row]] = deque()
        in_flight: dict[ray.ObjectRef, tuple[_Member, list[Row], float]] = {}
        exhausted = False

        def send(member: _Member) -> None:
            nonlocal exhausted
            rows = retry.popleft() if retry else None if exhausted else next(source, None)
            if rows is None:
                exhausted = True
                return
            in_flight[member.actor.run.remote(rows)] = (member, rows, time.monotonic())

        while True:
            busy = {member.name for member, _, _ in in_flight.values()}
            for member in self.live:
                if member.name not in busy:
                    send(member)
            if not in_flight:
                if not retry and exhausted:
                    return
                if not self.starting:
                    raise RuntimeError(f"all replicas died ({self.dead_replicas}) and no restarts are left; the run cannot finish")
            done, _ = ray.wait([*in_flight, *self.starting], num_returns=1, timeout=POLL_S)
            for ref in done:
                if ref in self.starting:
                    member, _ = self.starting.pop(ref)
                    try:
                        ray.get(ref)
                        self.live.append(member)
                    except RayActorError:
                        self._drop(member)
                    continue
                member, rows, _ = in_flight.pop(ref)
                try:
                    records, started, finished = ray.get(ref)
                except RayActorError:
                    self._drop(member)
                    retry.append(rows)
                    self.rerun_batches += 1
                    continue
                send(member)
                yield BatchDone(member.name, records, started, finished)
            self._kill_overdue(in_flight)

    def _kill_overdue(self, in_flight: dict[ray.ObjectRef, tuple[_Member, list[Row], float]]) -> None:
        """Kill a replica whose batch outran batch_timeout_s, or a replacement that did not load in
        STARTUP_TIMEOUT_S; `run` then sees it die (and re-runs its batch)."""
        now = time.monotonic()
        overdue = [member for member, deadline in self.starting.values() if now > deadline]
        if self.batch_timeout_s is not None:
            overdue += [member for member, _, sent in in_flight.values() if now - sent > self.batch_timeout_s]
        for member in overdue:
            ray.kill(member.actor)

    def _drop(self, member: _Member) -> None:
        """Forget a dead replica, free its placement group, and launch a replacement if restarts are left."""
        if member in self.live:
            self.live.remove(member)
        self.dead_replicas.append(member.name)
        ray.kill(member.actor)
        remove_placement_group(member.group)
        if self.restarts_left > 0:
            self.restarts_left -= 1
            replacement = self._launch()
            self.starting[replacement.actor.ready.remote()] = (replacement, time.monotonic() + STARTUP_TIMEOUT_S)

    def close(self) -> None:
        """Shut every live replica's engine down (killing the ones that do not exit in time, and the ones
        still loading), free the placement groups, and stop the local cluster if this pool started it.
        Idempotent."""
        members, self.live = self.live, []
        loading = [member for member, _ in self.starting.values()]
        self.starting.clear()
        exits = [member.actor.exit.remote() for member in members]
        if exits:
            ray.wait(exits, num_returns=len(exits), timeout=EXIT_TIMEOUT_S)
        for member in members + loading:
            ray.kill(member.actor)
            remove_placement_group(member.group)
        if self.owns_ray:
            self.owns_ray = False
            ray.shutdown()
