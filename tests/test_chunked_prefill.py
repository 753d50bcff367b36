"""Chunked prefill (scheduling_policy="chunked"): scheduling properties and token-exact outputs.

The first tests replace the model with a fake paged KV cache (fast, thousands of steps); the
others run the tiny checkpoint and compare with HF transformers and with the prefill_first engine.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import xxhash
from conftest import assert_invariants, make_llm, random_prompts

from nanovllm import SamplingParams
from nanovllm.config import Config
from nanovllm.engine.inputs import build_step_inputs
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus

BS = 16


def fake_next_token(token_ids: list[int]) -> int:
    """The fake model's output: a function of the whole context, never EOS (2)."""
    return 3 + xxhash.xxh64(np.asarray(token_ids, dtype=np.int64).tobytes()).intdigest() % 1997


class FakeModel:
    """Stands in for the model runner.

    Each step writes every new token (and its position) into a fake paged KV cache through the
    slot mapping that `build_step_inputs` builds, then reads each sequence's whole context back
    through its block table, as attention does, and checks it against the sequence's tokens.
    Reusing a block whose KV is stale (a bad prefix-cache hit, a block shared too early) fails here.
    """

    def __init__(self, num_blocks: int) -> None:
        self.kv_tokens = np.full(num_blocks * BS, -1, dtype=np.int64)
        self.kv_positions = np.full(num_blocks * BS, -1, dtype=np.int64)

    def run(self, batch: ScheduledBatch) -> list[int | None]:
        inputs = build_step_inputs(batch, BS, [], share_sampled=False)
        expected_ids = [t for s, n in zip(batch.seqs, batch.num_new_tokens) for t in s.token_ids[s.num_computed_tokens : s.num_computed_tokens + n]]
        assert inputs.input_ids.tolist() == expected_ids
        assert inputs.cu_seqlens_q.tolist() == np.cumsum([0, *batch.num_new_tokens]).tolist()
        assert (inputs.slot_mapping >= 0).all()
        assert len(set(inputs.slot_mapping.tolist())) == len(inputs.slot_mapping), "two new tokens share a slot"
        self.kv_tokens[inputs.slot_mapping] = inputs.input_ids
        self.kv_positions[inputs.slot_mapping] = inputs.positions
        sampled: list[int | None] = []
        for i, seq in enumerate(batch.seqs):
            seq_len = int(inputs.seq_lens[i])
            assert seq_len == seq.num_computed_tokens + batch.num_new_tokens[i]
            positions = np.arange(seq_len)
            slots = inputs.block_tables[i][positions // BS].astype(np.int64) * BS + positions % BS
            assert self.kv_tokens[slots].tolist() == seq.token_ids[:seq_len], f"sequence {seq.seq_id} reads stale KV"
            assert (self.kv_positions[slots] == positions).all()
            sampled.append(fake_next_token(seq.token_ids) if seq_len == seq.num_tokens else None)
        assert len(inputs.logits_indices) == sum(t is not None for t in sampled)
        return sampled


def expected_completion(prompt: list[int], max_tokens: int, max_model_len: int) -> list[int]:
    tokens = list(prompt)
    while len(tokens) - len(prompt) < max_tokens and len(tokens) < max_model_len:
        tokens.append(fake_next_token(tokens))
    return tokens[len(prompt) :]


def check_chunked_step(sched: Scheduler, batch: ScheduledBatch, decoding: list[Sequence]) -> None:
    """A chunked step: within budget; every decode that was running (and not preempted) runs one
    token; at most one sequence gets a partial chunk, and it is the batch's last."""
    assert batch.num_tokens <= sched.max_num_batched_tokens
    scheduled = dict(zip(batch.seqs, batch.num_new_tokens))
    for seq in decoding:
        if seq.status == SequenceStatus.WAITING:
            assert seq.num_preemptions > 0
        else:
            assert scheduled.get(seq) == 1, "a running decode was left out of the step"
    partial = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)) if s.num_computed_tokens + n < s.num_tokens]
    assert partial in ([], [len(batch.seqs) - 1])


def simulate(tiny_model: str, policy: str, budget: int, num_blocks: int, seed: int, max_model_len: int) -> tuple[Scheduler, list[Sequence]]:
    """24 requests (a third sharing prefixes) arriving over the first 60 steps, run to completion."""
    rng = random.Random(seed)
    config = Config(tiny_model, kvcache_block_size=BS, max_model_len=max_model_len, max_num_batched_tokens=budget,
                    max_num_seqs=6, scheduling_policy=policy)
    sched = Scheduler(config, num_blocks, frozenset({2}))
    model = FakeModel(num_blocks)
    prefixes = [[rng.randrange(3, 2000) for _ in range(rng.randint(1, 300))] for _ in range(3)]
    requests = []
    for i in range(24):
        body = [rng.randrange(3, 2000) for _ in range(rng.randint(1, 200))]
        prompt = (rng.choice(prefixes) + body if i % 3 else body)[: max_model_len - 1]
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 40))
        requests.append((rng.randrange(60), Sequence(prompt, params, BS)))
    seqs = [seq for _, seq in requests]
    steps = 0
    while requests or not sched.is_finished():
        for arrival, seq in requests:
            if arrival <= steps:
                sched.add(seq)
        requests = [(a, s) for a, s in requests if a > steps]
        steps += 1
        assert steps < 20000
        if sched.is_finished():
            continue
        decoding = [s for s in sched.running if s.num_uncomputed_tokens == 1]
        batch = sched.schedule()
        if policy == "chunked":
            check_chunked_step(sched, batch, decoding)
        sched.postprocess(batch, model.run(batch))
        sched.block_manager.check_invariants(sched.live_sequences())
    return sched, seqs


@pytest.mark.parametrize("policy, budget, num_blocks", [
    ("chunked", 64, 2000),
    ("chunked", 64, 40),
    ("chunked", 40, 48),
    ("chunked", 7, 40),
    ("chunked", 1024, 40),
    ("prefill_first", 640, 40),
])
def test_fake_model_outputs_do_not_depend_on_scheduling(tiny_model, policy, budget, num_blocks):
    """Random arrivals, shared prefixes, tight or roomy pools; max_model_len=640 is 40 blocks."""
    sched, seqs = simulate(tiny_model, policy, budget, num_blocks, seed=budget + num_blocks, max_model_len=640)
    for seq in seqs:
        assert seq.is_finished
        assert seq.completion_token_ids == expected_completion(seq.prompt_token_ids, seq.sampling_params.max_tokens, 640)
    assert sched.block_manager.num_hit_tokens > 0
    assert sched.block_manager.num_free_blocks == num_blocks
    assert (sched.num_preemptions > 0) == (num_blocks < 100)


# ---- the tiny model vs HF ---------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
LENGTHS = [1, 2, 15, 16, 17, 63, 64, 65, 127, 500, 1000, 2000]


def run_recording(llm, prompts, params, check_step=None) -> list[Sequence]:
    """Drive the engine step by step, checking block invariants after each.

    `check_step(batch, decoding, work)` sees every scheduled batch, the sequences that were
    decoding before it was scheduled, and the tokens left to compute then (ignoring cache hits).
    """
    sched = llm.scheduler
    schedule = sched.schedule

    def recording_schedule():
        decoding = [s for s in sched.running if s.num_uncomputed_tokens == 1]
        work = sum(s.num_uncomputed_tokens for s in sched.running) + sum(s.num_tokens for s in sched.waiting)
        batch = schedule()
        if check_step is not None:
            check_step(batch, decoding, work)
        return batch

    sched.schedule = recording_schedule
    seqs = [llm.add_request(p, params, i) for i, p in enumerate(prompts)]
    while not llm.is_finished():
        llm.step()
        assert_invariants(llm)
    assert sched.block_manager.num_free_blocks == len(sched.block_manager.blocks)
    return seqs


@pytest.fixture(scope="module")
def long_prompts(vocab_ids):
    rng = random.Random(7)
    return [[rng.randrange(3, vocab_ids) for _ in range(n)] for n in LENGTHS]


def test_chunked_matches_hf_and_prefill_first(tiny_model, hf, long_prompts):
    chunked = make_llm(tiny_model, max_model_len=4096, max_num_batched_tokens=64, num_kvcache_blocks=512, scheduling_policy="chunked")

    def check(batch, decoding, work):
        check_chunked_step(chunked.scheduler, batch, decoding)
        assert batch.num_tokens == min(64, work), "the token budget is not filled"

    seqs = run_recording(chunked, long_prompts, GREEDY, check)
    unchunked = make_llm(tiny_model, max_model_len=4096, max_num_batched_tokens=4096, num_kvcache_blocks=512, scheduling_policy="prefill_first")
    reference = unchunked.generate(long_prompts, GREEDY, use_tqdm=False)
    for prompt, seq, ref in zip(long_prompts, seqs, reference):
        expected = hf.greedy(prompt, GREEDY.max_tokens)
        assert seq.completion_token_ids == expected, f"chunked: prompt of {len(prompt)} tokens diverged from HF"
        assert ref["token_ids"] == expected, f"prefill_first: prompt of {len(prompt)} tokens diverged from HF"


def test_chunk_boundaries_inside_blocks_keep_prefix_caching_exact(tiny_model, hf, vocab_ids):
    rng = random.Random(8)
    prefix = [rng.randrange(3, vocab_ids) for _ in range(300)]
    prompts = [prefix + [rng.randrange(3, vocab_ids) for _ in range(rng.randint(1, 50))] for _ in range(5)]
    prompts += [prompts[0], prefix[:160], prefix[:173]]
    llm = make_llm(tiny_model, max_model_len=1024, max_num_batched_tokens=40, max_num_seqs=3, scheduling_policy="chunked")
    mid_block_ends = []
    cached_at_admission = {}

    def check(batch, decoding, work):
        check_chunked_step(llm.scheduler, batch, decoding)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            cached_at_admission.setdefault(seq.seq_id, seq.num_cached_tokens)
            end = seq.num_computed_tokens + n
            if end < seq.num_prompt_tokens and end % BS:
                mid_block_ends.append(end)

    seqs = run_recording(llm, prompts, GREEDY, check)
    assert mid_block_ends, "no chunk ended inside a block"
    assert llm.scheduler.block_manager.num_hit_tokens >= 7 * 144
    assert cached_at_admission[seqs[5].seq_id] == (len(prompts[0]) - 1) // BS * BS, "a repeated prompt hits all but its last token"
    assert cached_at_admission[seqs[6].seq_id] == 144 and cached_at_admission[seqs[7].seq_id] == 160
    for prompt, seq in zip(prompts, seqs):
        assert seq.completion_token_ids == hf.greedy(prompt, GREEDY.max_tokens)


def test_chunked_with_preemption_matches_hf(tiny_model, hf, vocab_ids):
    prompts = random_prompts(12, 20, 120, vocab_ids, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    llm = make_llm(tiny_model, max_model_len=256, max_num_batched_tokens=64, num_kvcache_blocks=16, scheduling_policy="chunked")
    seqs = run_recording(llm, prompts, params, lambda batch, decoding, work: check_chunked_step(llm.scheduler, batch, decoding))
    assert llm.scheduler.num_preemptions > 0
    for prompt, seq in zip(prompts, seqs):
        assert seq.completion_token_ids == hf.greedy(prompt, 40, ignore_eos=True)


def test_long_prompt_does_not_stall_running_decodes(tiny_model, hf, long_prompts, vocab_ids):
    llm = make_llm(tiny_model, max_model_len=4096, max_num_batched_tokens=64, num_kvcache_blocks=512, scheduling_policy="chunked")
    sched = llm.scheduler
    batches = []
    schedule = sched.schedule
    sched.schedule = lambda: batches.append(schedule()) or batches[-1]
    short = random_prompts(4, 10, 30, vocab_ids, seed=9)
    decode_params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    decoders = [llm.add_request(p, decode_params, i) for i, p in enumerate(short)]
    while any(s.num_completion_tokens == 0 for s in decoders):
        llm.step()
    long = llm.add_request(long_prompts[-1], GREEDY, len(short))
    assert long.num_prompt_tokens == 2000
    first = len(batches)
    while long.num_completion_tokens == 0:
        llm.step()
        assert_invariants(llm)
        batch = batches[-1]
        assert batch.seqs[:4] == decoders and batch.num_new_tokens[:4] == [1] * 4, "the long prompt stalled a decode"
        assert batch.seqs[4:] == [long] and batch.num_new_tokens[4] == min(60, 2000 - (len(batches) - 1 - first) * 60)
    assert len(batches) - first == -(-2000 // 60)
    while not llm.is_finished():
        llm.step()
    for prompt, seq in zip(short, decoders):
        assert seq.completion_token_ids == hf.greedy(prompt, 48, ignore_eos=True)
    assert long.completion_token_ids == hf.greedy(long_prompts[-1], GREEDY.max_tokens)
