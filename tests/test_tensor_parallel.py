"""Tensor parallelism on CPU (gloo, fp32): TP=2 equals TP=1 and HF, two engines coexist, and
every way an engine ends (exit, garbage collection, interpreter exit, a failure, a dead worker,
a dead parent) leaves no shared-memory segment, process or listening port behind."""
from __future__ import annotations

import gc
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from conftest import HFOracle, assert_invariants, make_llm, random_prompts

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from nanovllm.engine import llm_engine, rpc
from nanovllm.utils import parallel

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_rank() -> Iterator[None]:
    """Rank 0 runs in this process; like the workers, give it one thread so the ranks' OpenMP
    threads do not spin against each other on a small CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def store_ports(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ports of the stores that engines built in this test listen on."""
    ports: list[int] = []

    def create_store(size: int) -> torch.distributed.TCPStore:
        store = parallel.create_store(size)
        ports.append(store.port)
        return store

    monkeypatch.setattr(llm_engine, "create_store", create_store)
    return ports


def resources(llm: LLM) -> tuple[str, list[int]]:
    """An engine's segment-name prefix and worker pids."""
    return llm.workers.prefix, [p.pid for p in llm.workers.processes]


def leftovers(prefix: str, pids: Sequence[int], ports: Sequence[int] = ()) -> list[str]:
    """What is still there: /dev/shm segments named `prefix*`, worker processes, listening ports."""
    found = [f"/dev/shm/{name}" for name in os.listdir("/dev/shm") if name.startswith(prefix)]
    found += [f"process {pid}" for pid in pids if process_running(pid)]
    found += [f"child {child.name}" for child in multiprocessing.active_children() if child.pid in pids]
    for port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener is not
            try:
                probe.bind((parallel.HOST, port))
            except OSError:
                found.append(f"port {port}")
    return found


def process_running(pid: int) -> bool:
    """True unless the process is gone or a zombie (an orphan's zombie may wait for a slow reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def check_against_hf(llm: LLM, hf: HFOracle, prompts: list[list[int]]) -> list[list[int]]:
    outputs = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    for prompt, tokens in zip(prompts, outputs):
        assert tokens == hf.greedy(prompt, GREEDY.max_tokens), f"prompt of {len(prompt)} tokens diverged"
    assert_invariants(llm)
    return outputs


def raise_once(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> None:
    """Make `obj.name` raise RuntimeError('injected') on its next call only."""
    original = getattr(obj, name)

    def failing(*args: object, **kwargs: object) -> None:
        monkeypatch.setattr(obj, name, original)
        raise RuntimeError("injected")

    monkeypatch.setattr(obj, name, failing)


@pytest.fixture(scope="module")
def prompts(vocab_ids: int) -> list[list[int]]:
    """8 prompts; the last 3 share a 40-token prefix (2 full blocks of 16)."""
    rng = random.Random(7)
    prefix = [rng.randrange(3, vocab_ids) for _ in range(40)]
    return random_prompts(5, 1, 150, vocab_ids, seed=7) + [prefix + [rng.randrange(3, vocab_ids) for _ in range(n)] for n in (1, 9, 30)]


def test_config_accepts_replicated_kv_heads_only(tiny_model):
    """The tiny model has 4 query heads and 2 KV heads: TP=4 replicates each KV head on 2 ranks."""
    assert Config(tiny_model, tensor_parallel_size=4).tensor_parallel_size == 4
    for tp in (3, 8):
        with pytest.raises(ValueError, match="must divide num_attention_heads"):
            Config(tiny_model, tensor_parallel_size=tp)


def test_tp2_matches_tp1_and_hf_then_exit_releases_everything(tiny_model, hf, prompts, store_ports, monkeypatch):
    monkeypatch.setattr(rpc, "INITIAL_SIZE", 4096)  # the first prefill outgrows it: everyone moves to a bigger segment
    expected = make_llm(tiny_model).generate(prompts, GREEDY, use_tqdm=False)
    llm = make_llm(tiny_model, tensor_parallel_size=2)
    prefix, pids = resources(llm)
    outputs = check_against_hf(llm, hf, prompts)
    assert outputs == [o["token_ids"] for o in expected]
    hits_before = llm.scheduler.block_manager.num_hit_tokens
    assert check_against_hf(llm, hf, prompts[-3:]) == outputs[-3:]
    assert llm.scheduler.block_manager.num_hit_tokens - hits_before >= 3 * 32
    assert llm.workers.generation > 0
    assert sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix)) == [llm.workers.segment.name]
    llm.exit()
    llm.exit()
    assert leftovers(prefix, pids, store_ports) == []


def test_tp4_replicates_kv_heads(tiny_model, hf, prompts, store_ports):
    llm = make_llm(tiny_model, tensor_parallel_size=4)
    prefix, pids = resources(llm)
    assert llm.model_runner.kv_shape[2] == 1  # one KV head per rank
    check_against_hf(llm, hf, prompts[:4])
    llm.exit()
    assert leftovers(prefix, pids, store_ports) == []


def test_two_engines_at_once_then_garbage_collection_releases_one(tiny_model, hf, prompts, store_ports):
    first = make_llm(tiny_model, tensor_parallel_size=2)
    second = make_llm(tiny_model, tensor_parallel_size=2, max_num_seqs=3)
    assert len(set(store_ports)) == 2 and first.workers.prefix != second.workers.prefix
    check_against_hf(first, hf, prompts[:4])
    check_against_hf(second, hf, prompts[4:])
    check_against_hf(first, hf, prompts[4:])
    prefix, pids = resources(first)
    del first
    gc.collect()
    assert leftovers(prefix, pids, store_ports[:1]) == []
    check_against_hf(second, hf, prompts[:4])
    prefix, pids = resources(second)
    second.exit()
    assert leftovers(prefix, pids, store_ports) == []


def test_failures_inside_generate(tiny_model, hf, prompts, store_ports, monkeypatch):
    llm = make_llm(tiny_model, tensor_parallel_size=2)
    prefix, pids = resources(llm)
    runner = llm.model_runner
    # Before the step reaches the workers, or after every rank ran it: the engine stays usable.
    for obj, name in ((runner, "prepare"), (runner.sampler, "forward")):
        raise_once(monkeypatch, obj, name)
        with pytest.raises(RuntimeError, match="injected"):
            llm.generate(prompts[:3], GREEDY, use_tqdm=False)
        assert not llm.requests and llm.is_finished()
        check_against_hf(llm, hf, prompts[:3])
    # Inside rank 0's forward, after the workers started it: they are stopped at once.
    raise_once(monkeypatch, runner, "execute")
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(prompts[:3], GREEDY, use_tqdm=False)
    assert leftovers(prefix, pids) == []
    with pytest.raises(RuntimeError, match="rank 0 failed during a tensor-parallel step.*create a new LLM"):
        llm.generate(prompts[:3], GREEDY, use_tqdm=False)
    llm.exit()
    assert leftovers(prefix, pids, store_ports) == []


def test_killed_worker_fails_the_next_generate_quickly(tiny_model, prompts, store_ports):
    llm = make_llm(tiny_model, tensor_parallel_size=2)
    prefix, pids = resources(llm)
    os.kill(pids[0], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        llm.generate(prompts[:3], GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 10
    with pytest.raises(RuntimeError, match="create a new LLM"):
        llm.generate(prompts[:3], GREEDY, use_tqdm=False)
    assert leftovers(prefix, pids) == []
    llm.exit()
    assert leftovers(prefix, pids, store_ports) == []


def start_script(tiny_model: str, tail: str) -> subprocess.Popen:
    """A Python process that builds a TP=2 engine, prints its resources as JSON, then runs `tail`."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {TESTS_DIR!r})
        torch.set_num_threads(1)
        from conftest import make_llm
        from nanovllm import SamplingParams

        if __name__ == "__main__":
            llm = make_llm({tiny_model!r}, tensor_parallel_size=2)
            llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
            print(json.dumps([llm.workers.prefix, [p.pid for p in llm.workers.processes]]), flush=True)
    """) + textwrap.indent(textwrap.dedent(tail), " " * 4)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_interpreter_exit_without_exit_call_releases_everything(tiny_model):
    process = start_script(tiny_model, "")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    prefix, pids = json.loads(stdout)
    assert leftovers(prefix, pids) == []
    assert "leaked" not in stderr and "Traceback" not in stderr, stderr


def test_workers_exit_when_the_parent_is_killed(tiny_model):
    process = start_script(tiny_model, "import time; time.sleep(600)")
    try:
        prefix, pids = json.loads(process.stdout.readline())
    finally:
        process.kill()
        process.communicate(timeout=60)
    # The workers see their command pipe close; rank 0's resource tracker then unlinks the segment.
    assert wait_until(lambda: not leftovers(prefix, pids), timeout=20), leftovers(prefix, pids)


def test_nccl_teardown_is_bounded_when_a_peer_never_joins(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A non-gloo backend (NCCL) is shut down in a daemon thread: a teardown that waits for a dead
    peer costs SHUTDOWN_TIMEOUT and a warning, never a hung exit; a finished one returns at once."""
    import threading
    from datetime import timedelta

    class Backend:
        def __init__(self, blocks: bool) -> None:
            self.blocks, self.called = blocks, threading.Event()

        def shutdown(self) -> None:
            self.called.set()
            if self.blocks:
                threading.Event().wait(5)  # a peer that never comes (bounded, so a regression fails instead of hanging)

    monkeypatch.setattr(parallel, "SHUTDOWN_TIMEOUT", timedelta(seconds=0.3))
    for blocks in (False, True):
        backend = Backend(blocks)
        group = parallel.TPGroup(1, 2, backend)
        start = time.monotonic()
        group.close()
        group.close()
        elapsed = time.monotonic() - start
        assert backend.called.is_set() and group.backend is None
        assert (0.3 <= elapsed < 2) if blocks else elapsed < 0.3, elapsed
    assert "did not shut down within" in caplog.text
