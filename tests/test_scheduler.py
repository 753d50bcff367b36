"""Scheduler policy alone: the model is replaced by fake sampled tokens fed to `postprocess`."""
from __future__ import annotations

import random

import pytest

from nanovllm.config import Config
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

BS = 16
EOS = 2
POLICIES = ["prefill_first", "chunked"]


@pytest.fixture
def make_scheduler(tiny_model):
    def make(num_blocks: int = 64, eos: int | None = EOS, **kwargs: object) -> Scheduler:
        settings = dict(kvcache_block_size=BS, max_model_len=256, max_num_batched_tokens=256, max_num_seqs=8)
        settings.update(kwargs)
        return Scheduler(Config(tiny_model, **settings), num_blocks, frozenset() if eos is None else frozenset({eos}))

    return make


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(n)]


def add(sched: Scheduler, tokens: list[int], **params: object) -> Sequence:
    seq = Sequence(tokens, SamplingParams(**params), BS)
    sched.add(seq)
    return seq


def filler(seq: Sequence) -> int:
    """A fake sampled token that is never EOS."""
    return 3 + (seq.seq_id * 31 + seq.num_tokens) % 1000


def check_batch(sched: Scheduler, batch: ScheduledBatch) -> None:
    assert batch.seqs and len(batch.seqs) == len(batch.num_new_tokens)
    assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs)
    assert len(batch.seqs) <= sched.max_num_seqs
    assert batch.num_tokens <= sched.max_num_batched_tokens
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        assert seq.status == SequenceStatus.RUNNING and seq in sched.running
        assert 1 <= n <= seq.num_uncomputed_tokens
        assert len(seq.block_table) >= seq.num_blocks_for(seq.num_computed_tokens + n)


def schedule(sched: Scheduler) -> ScheduledBatch:
    batch = sched.schedule()
    check_batch(sched, batch)
    return batch


def feed(sched: Scheduler, batch: ScheduledBatch, token=filler) -> None:
    """Postprocess with `token(seq)` for each sequence that reached its last token; check the blocks."""
    sampled = [token(s) if s.num_computed_tokens + n == s.num_tokens else None for s, n in zip(batch.seqs, batch.num_new_tokens)]
    sched.postprocess(batch, sampled)
    sched.block_manager.check_invariants(sched.live_sequences())


def step(sched: Scheduler, token=filler) -> ScheduledBatch:
    batch = schedule(sched)
    feed(sched, batch, token)
    return batch


def run_to_end(sched: Scheduler, max_steps: int = 5000, token=filler) -> list[ScheduledBatch]:
    batches = []
    while not sched.is_finished():
        assert len(batches) < max_steps, "scheduler made no progress"
        batches.append(step(sched, token))
    assert sched.block_manager.num_free_blocks == len(sched.block_manager.blocks)
    return batches


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("max_num_seqs, budget, num_prompts, length", [(2, 256, 6, 20), (512, 64, 100, 1)])
def test_running_set_fits_one_decode_step(make_scheduler, policy, max_num_seqs, budget, num_prompts, length):
    """At most min(max_num_seqs, max_num_batched_tokens) sequences run, so a decode step covers them all."""
    sched = make_scheduler(num_blocks=128, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=64,
                           scheduling_policy=policy)
    seqs = [add(sched, prompt(length, i), max_tokens=5) for i in range(num_prompts)]
    cap = min(max_num_seqs, budget)
    while not sched.is_finished():
        running_before = set(sched.running)
        batch = step(sched)
        assert len(sched.running) <= cap
        assert running_before <= set(batch.seqs), "a running sequence was left out of the step"
    assert all(s.finish_reason == "length" and s.num_completion_tokens == 5 for s in seqs)


def test_prefill_first_respects_the_token_budget_in_order(make_scheduler):
    sched = make_scheduler(scheduling_policy="prefill_first")
    seqs = [add(sched, prompt(n, i), max_tokens=3) for i, n in enumerate([100, 100, 100, 50, 6])]
    first = step(sched)
    assert first.seqs == seqs[:2] and first.num_new_tokens == [100, 100]
    second = step(sched)
    assert second.seqs == seqs[2:] and second.num_new_tokens == [100, 50, 6]
    assert step(sched).num_new_tokens == [1] * 5
    exact = make_scheduler(scheduling_policy="prefill_first")
    pair = [add(exact, prompt(128, 10 + i), max_tokens=1) for i in range(3)]
    assert step(exact).seqs == pair[:2], "prompts filling the budget exactly fit one step"


def test_chunked_fills_the_budget_with_chunks(make_scheduler):
    sched = make_scheduler(max_num_batched_tokens=64, max_model_len=1024, num_blocks=128, scheduling_policy="chunked")
    seqs = [add(sched, prompt(n, 20 + i), max_tokens=4, ignore_eos=True) for i, n in enumerate([150, 30, 1, 90])]
    while not sched.is_finished():
        outstanding = sum(s.num_uncomputed_tokens for s in sched.running) + sum(s.num_tokens for s in sched.waiting)
        batch = step(sched)
        assert batch.num_tokens == min(64, outstanding)
    assert all(s.num_completion_tokens == 4 for s in seqs)


def test_prefill_first_steps_are_all_prefill_or_all_decode(make_scheduler):
    rng = random.Random(1)
    sched = make_scheduler(num_blocks=16, max_num_seqs=4, scheduling_policy="prefill_first")
    seqs = [add(sched, prompt(rng.randint(1, 200), 30 + i), max_tokens=rng.randint(1, 60)) for i in range(14)]
    kinds = set()
    while not sched.is_finished():
        running_before = set(sched.running)
        batch = schedule(sched)
        if running_before.isdisjoint(batch.seqs):
            kinds.add("prefill")
            assert all(n == s.num_uncomputed_tokens for s, n in zip(batch.seqs, batch.num_new_tokens)), "prefill computes whole prompts"
            feed(sched, batch)
        else:
            feed(sched, batch)
            kinds.add("decode")
            assert set(batch.seqs) <= running_before and batch.num_new_tokens == [1] * len(batch.seqs)
            unscheduled = [s for s in running_before if s not in batch.seqs and not s.is_finished]
            assert all(s.status == SequenceStatus.WAITING for s in unscheduled), "a decode step runs every running sequence"
    assert kinds == {"prefill", "decode"}
    assert sched.num_preemptions > 0
    assert all(s.num_completion_tokens == s.sampling_params.max_tokens for s in seqs)


def test_preemption_takes_the_newest_and_recomputes_it_later(make_scheduler):
    sched = make_scheduler(num_blocks=4, max_model_len=64, max_num_batched_tokens=64)
    a, b, c = (add(sched, prompt(15, 40 + i), max_tokens=20) for i in range(3))
    assert step(sched).seqs == [a, b, c]
    step(sched)
    assert [len(s.block_table) for s in (a, b, c)] == [1, 1, 1] and sched.num_preemptions == 0
    c_tokens = list(c.token_ids)
    # Every sequence now needs a second block but only one is free: C, admitted last, is preempted.
    batch = step(sched)
    assert batch.seqs == [a, b]
    assert list(sched.waiting) == [c] and c.status == SequenceStatus.WAITING
    assert c.block_table == [] and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert c.token_ids == c_tokens and c.num_completion_tokens == 2
    while b.status == SequenceStatus.RUNNING:
        step(sched)
    assert list(sched.waiting) == [b, c], "a preempted sequence goes to the head of the queue"
    assert sched.num_preemptions == 2 and list(sched.running) == [a]
    b_tokens = list(b.token_ids)
    while a.status == SequenceStatus.RUNNING:
        batch = step(sched)
        assert batch.seqs == [a]
    batch = sched.schedule()
    assert batch.seqs == [b], "B and C together need 5 blocks; B (older) comes back first"
    assert b.num_cached_tokens == 16, "B's first freed block still hits (A reused its second)"
    assert batch.num_new_tokens == [len(b_tokens) - 16] and b.token_ids == b_tokens
    sched.postprocess(batch, [filler(b)])
    run_to_end(sched)
    for seq in (a, b, c):
        assert seq.finish_reason == "length" and seq.num_completion_tokens == 20
    assert c.token_ids[:17] == c_tokens


@pytest.mark.parametrize("policy", POLICIES)
def test_pool_of_one_max_model_len_request_never_deadlocks(make_scheduler, policy):
    budget = 64 if policy == "prefill_first" else 16
    sched = make_scheduler(num_blocks=4, max_model_len=64, max_num_batched_tokens=budget, scheduling_policy=policy)
    seqs = [add(sched, prompt(n, 50 + i), max_tokens=1000, ignore_eos=True) for i, n in enumerate([10, 30, 50, 63, 1, 17])]
    run_to_end(sched)
    assert sched.num_preemptions > 0
    assert all(s.finish_reason == "length" and s.num_tokens == 64 for s in seqs)


def test_pool_too_small_for_a_request_schedules_nothing(make_scheduler):
    """The scheduler returns an empty batch (the engine turns that into an error when no step is in flight)."""
    sched = make_scheduler(num_blocks=2)
    seq = add(sched, prompt(40, 60))
    batch = sched.schedule()
    assert batch.seqs == [] and list(sched.waiting) == [seq]
    sched.block_manager.check_invariants(sched.live_sequences())


@pytest.mark.parametrize("policy", POLICIES)
def test_stop_reasons(make_scheduler, policy):
    sched = make_scheduler(max_model_len=64, max_num_batched_tokens=64, scheduling_policy=policy)
    cases = {
        "eos": (dict(max_tokens=10), [5, EOS, 5], "stop", 2),
        "ignore_eos": (dict(max_tokens=3, ignore_eos=True), [EOS, EOS, EOS, EOS], "length", 3),
        "stop_token_ids": (dict(max_tokens=10, stop_token_ids=[7, 9]), [5, 6, 9, 5], "stop", 3),
        "min_tokens": (dict(max_tokens=10, min_tokens=2, stop_token_ids=[9]), [EOS, 9, EOS, 5], "stop", 3),
        "max_tokens": (dict(max_tokens=4), [5, 6, 7, 8, 9], "length", 4),
    }
    seqs = {name: add(sched, prompt(10, 70 + i), **params) for i, (name, (params, _, _, _)) in enumerate(cases.items())}
    long = add(sched, prompt(60, 80), max_tokens=100)
    scripts = {seqs[name].seq_id: iter(script) for name, (_, script, _, _) in cases.items()}
    run_to_end(sched, token=lambda s: next(scripts[s.seq_id]) if s.seq_id in scripts else 5)
    for name, (_, script, reason, count) in cases.items():
        seq = seqs[name]
        assert (seq.finish_reason, seq.completion_token_ids) == (reason, script[:count]), name
    assert long.finish_reason == "length" and long.num_tokens == 64
    no_eos = make_scheduler(eos=None)
    seq = add(no_eos, prompt(5, 90), max_tokens=3)
    run_to_end(no_eos, token=lambda s: EOS)
    assert seq.finish_reason == "length" and seq.completion_token_ids == [EOS] * 3


@pytest.mark.parametrize("policy", POLICIES)
def test_abort_waiting_and_running(make_scheduler, policy):
    budget = 128 if policy == "prefill_first" else 32
    sched = make_scheduler(max_model_len=128, max_num_batched_tokens=budget, scheduling_policy=policy)
    running = add(sched, prompt(100, 100), max_tokens=5)
    waiting = add(sched, prompt(100, 101), max_tokens=5)
    kept = add(sched, prompt(20, 102), max_tokens=5)
    step(sched)
    assert running.status == SequenceStatus.RUNNING and running.block_table
    assert waiting.status == SequenceStatus.WAITING
    tokens_at_abort = list(running.token_ids)
    for seq in (running, waiting):
        sched.abort(seq)
        assert seq.status == SequenceStatus.FINISHED and seq.finish_reason == "abort"
        assert seq.block_table == [] and seq not in sched.live_sequences()
        sched.block_manager.check_invariants(sched.live_sequences())
    run_to_end(sched)
    assert kept.finish_reason == "length" and running.token_ids == tokens_at_abort
