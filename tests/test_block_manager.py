"""BlockManager policy alone (no model): chain hashes, prefix hits, ref counts, eviction, block boundaries."""
from __future__ import annotations

import random

import pytest

from nanovllm.engine.block_manager import BlockManager, chain_hash
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BS = 16


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence(tokens, SamplingParams(), BS)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(n)]


def prefill(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> int:
    """Allocate a waiting sequence and mark `num_tokens` (default: all) positions computed. Returns the hit length."""
    hit_ids, _ = bm.match_prefix(seq)
    hit = len(hit_ids) * BS
    end = seq.num_tokens if num_tokens is None else num_tokens
    bm.allocate(seq, end - hit)
    assert seq.num_computed_tokens == seq.num_cached_tokens == hit
    seq.num_computed_tokens = end
    bm.commit_computed(seq)
    return hit


def run_tokens(bm: BlockManager, seq: Sequence, n: int) -> None:
    """A running sequence computes `n` more positions (a chunk, or a decode step when n == 1)."""
    assert bm.can_append(seq, n)
    assert bm.may_append(seq, n)
    seq.num_computed_tokens += n
    bm.commit_computed(seq)


def test_chain_hash_depends_on_tokens_and_prefix():
    a, b = tokens(BS, 1), tokens(BS, 2)
    assert chain_hash(a) == chain_hash(list(a))
    assert chain_hash(a, 123) == chain_hash(list(a), 123)
    assert chain_hash(a) != chain_hash(b)
    assert chain_hash(a, chain_hash(a)) != chain_hash(a)
    assert chain_hash(b, chain_hash(a)) != chain_hash(b, chain_hash(b))
    assert chain_hash(a[::-1]) != chain_hash(a)
    assert -1 not in {chain_hash(tokens(BS, s)) for s in range(50)}


def test_same_block_under_a_different_prefix_does_not_hit():
    bm = BlockManager(16, BS)
    x, y, z = tokens(BS, 1), tokens(BS, 2), tokens(BS, 3)
    a = make_seq(x + y + [7])
    prefill(bm, a)
    assert a.block_hashes == [chain_hash(x), chain_hash(y, chain_hash(x))]
    assert bm.match_prefix(make_seq(z + y + [7])) == ([], [])
    ids, hashes = bm.match_prefix(make_seq(x + z + [7]))
    assert ids == a.block_table[:1] and hashes == a.block_hashes[:1]
    ids, _ = bm.match_prefix(make_seq(x + y + [9, 9]))
    assert ids == a.block_table[:2]
    bm.check_invariants([a])


def test_only_full_computed_blocks_hit():
    bm = BlockManager(16, BS)
    prompt = tokens(40, 4)
    a = make_seq(prompt)
    bm.allocate(a, 40)
    bm.commit_computed(a)
    assert bm.match_prefix(make_seq(prompt)) == ([], []), "blocks allocated but not computed must not hit"
    a.num_computed_tokens = 20
    bm.commit_computed(a)
    assert len(a.block_hashes) == 1
    ids, _ = bm.match_prefix(make_seq(prompt))
    assert ids == a.block_table[:1]
    a.num_computed_tokens = 40
    bm.commit_computed(a)
    assert len(a.block_hashes) == 2, "the partial third block is never hashed"
    ids, _ = bm.match_prefix(make_seq(prompt))
    assert ids == a.block_table[:2]
    bm.check_invariants([a])


def test_hit_verifies_token_ids_against_hash_collisions():
    bm = BlockManager(16, BS)
    a = make_seq(tokens(33, 5))
    prefill(bm, a)
    other = tokens(33, 6)
    colliding = chain_hash(other[:BS])
    # A consistent state in which block 0 of `a` and `other` collide on the same hash.
    block = bm.blocks[a.block_table[0]]
    del bm.hash_to_block_id[block.hash]
    block.hash = colliding
    bm.hash_to_block_id[colliding] = block.block_id
    bm.check_invariants([a])
    b = make_seq(other)
    assert bm.match_prefix(b) == ([], [])
    assert prefill(bm, b) == 0
    assert bm.blocks[a.block_table[0]].ref_count == 1
    bm.check_invariants([a, b])
    # A wrong map entry (planted directly) is refused too, and check_invariants reports it.
    c_tokens = tokens(33, 7)
    bm.hash_to_block_id[chain_hash(c_tokens[:BS])] = a.block_table[1]
    assert bm.match_prefix(make_seq(c_tokens)) == ([], [])
    with pytest.raises(AssertionError, match="another hash"):
        bm.check_invariants([a, b])


def test_ref_counts_with_shared_prefixes():
    bm = BlockManager(20, BS)
    base = tokens(50, 8)
    a = make_seq(base)
    prefill(bm, a)
    shared = a.block_table[:3]
    b = make_seq(base[:48] + tokens(12, 9))
    c = make_seq(base[:32] + tokens(30, 10))
    assert prefill(bm, b) == 48
    assert prefill(bm, c) == 32
    assert b.block_table[:3] == shared and c.block_table[:2] == shared[:2]
    assert [bm.blocks[i].ref_count for i in shared] == [3, 3, 2]
    assert bm.num_hit_tokens == 80
    assert len(set(a.block_table[3:]) | set(b.block_table[3:]) | set(c.block_table[2:])) == 1 + 1 + 2
    bm.check_invariants([a, b, c])
    bm.deallocate(b)
    assert [bm.blocks[i].ref_count for i in shared] == [2, 2, 1]
    assert b.block_table == [] and b.num_computed_tokens == 0
    bm.check_invariants([a, c])
    bm.deallocate(a)
    bm.deallocate(c)
    assert bm.num_free_blocks == 20 and not bm.used_block_ids
    bm.check_invariants([])


def test_deallocate_keeps_hashes_until_the_block_is_reused():
    bm = BlockManager(8, BS)
    prompt = tokens(49, 11)
    a = make_seq(prompt)
    prefill(bm, a)
    table, hashes = list(a.block_table), list(a.block_hashes)
    assert len(table) == 4 and len(hashes) == 3
    bm.deallocate(a)
    bm.check_invariants([])
    assert bm.num_free_blocks == 8
    assert all(bm.hash_to_block_id[h] == i for h, i in zip(hashes, table))
    # Freed newest first: the shared head of a prefix is reused last.
    assert list(bm.free_block_ids)[-4:] == table[::-1]
    again = make_seq(prompt)
    assert prefill(bm, again) == 48, "freed blocks still hit; they are revived, not copied"
    assert again.block_table[:3] == table[:3]
    bm.check_invariants([again])
    bm.deallocate(again)
    # An unrelated sequence needing 6 blocks takes the 4 never-cached blocks, then table[3] and table[2].
    filler = make_seq(tokens(6 * BS, 12))
    prefill(bm, filler, 0)
    run_tokens(bm, filler, 6 * BS)
    assert table[3] in filler.block_table and table[2] in filler.block_table
    assert hashes[2] not in bm.hash_to_block_id, "reusing a block removes its stale hash"
    assert bm.blocks[table[2]].hash == filler.block_hashes[filler.block_table.index(table[2])]
    assert bm.hash_to_block_id[hashes[0]] == table[0] and bm.hash_to_block_id[hashes[1]] == table[1]
    ids, _ = bm.match_prefix(make_seq(prompt))
    assert ids == table[:2]
    bm.check_invariants([filler])


def test_allocate_counts_revived_blocks_against_the_free_pool():
    bm = BlockManager(4, BS)
    prompt = tokens(40, 13)
    a = make_seq(prompt)
    prefill(bm, a)
    bm.deallocate(a)
    hog = make_seq(tokens(2 * BS, 14))
    prefill(bm, hog)
    assert bm.num_free_blocks == 2
    # 32 cached tokens (2 free cached blocks) + 8 new tokens need 3 free blocks in all: refused.
    b = make_seq(prompt)
    assert len(bm.match_prefix(b)[0]) == 2
    assert not bm.can_allocate(b, 8)
    with pytest.raises(RuntimeError, match="not enough free KV blocks"):
        bm.allocate(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 2 and bm.num_hit_tokens == 0
    bm.check_invariants([hog])
    # A sequence ending inside the second cached block needs just those 2.
    c = make_seq(prompt[:30])
    assert bm.can_allocate(c, 30 - BS)
    assert prefill(bm, c) == BS
    assert bm.num_free_blocks == 0
    bm.check_invariants([hog, c])
    with pytest.raises(RuntimeError, match="already holds blocks"):
        bm.allocate(c, 1)


@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 31, 32, 33, 48, 64])
def test_match_prefix_never_covers_the_last_token(length):
    bm = BlockManager(16, BS)
    prompt = tokens(length, 15)
    a = make_seq(prompt + tokens(BS, 16))
    prefill(bm, a)
    assert len(a.block_hashes) == (length + BS) // BS
    b = make_seq(prompt)
    ids, _ = bm.match_prefix(b)
    assert len(ids) == (length - 1) // BS
    hit = prefill(bm, b, 0)
    assert hit == (length - 1) // BS * BS < length, "the last prompt token must still be computed"
    assert b.num_uncomputed_tokens >= 1
    bm.check_invariants([a, b])


def test_appends_at_exact_block_boundaries():
    bm = BlockManager(3, BS)
    seq = make_seq(tokens(BS, 17))
    prefill(bm, seq, BS - 1)
    assert len(seq.block_table) == 1
    assert bm.can_append(seq, 1)
    bm.may_append(seq, 1)
    assert len(seq.block_table) == 1, "position 15 still fits the first block"
    seq.num_computed_tokens = BS
    bm.commit_computed(seq)
    assert len(seq.block_hashes) == 1
    # Exactly full: one more position needs a new block, and BS + 1 positions need two.
    assert bm.can_append(seq, BS) and bm.can_append(seq, 2 * BS)
    assert not bm.can_append(seq, 2 * BS + 1)
    bm.may_append(seq, BS + 1)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 0
    assert not bm.can_append(seq, 2 * BS + 1)
    assert bm.can_append(seq, 2 * BS)
    bm.may_append(seq, 2 * BS)
    assert len(seq.block_table) == 3
    assert not bm.may_append(seq, 2 * BS + 1), "no free block left: refused"
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 0
    seq.token_ids += tokens(2 * BS, 18)
    seq.num_computed_tokens = 3 * BS
    bm.commit_computed(seq)
    assert len(seq.block_hashes) == 3
    bm.check_invariants([seq])


def test_decode_steps_hash_blocks_as_they_fill():
    bm = BlockManager(4, BS)
    seq = make_seq(tokens(10, 19))
    prefill(bm, seq)
    for step in range(30):
        seq.token_ids.append(100 + step)
        run_tokens(bm, seq, 1)
        assert len(seq.block_hashes) == seq.num_computed_tokens // BS
        assert len(seq.block_table) == seq.num_blocks_for(seq.num_computed_tokens)
        bm.check_invariants([seq])
    assert bm.match_prefix(make_seq(seq.token_ids[:33]))[0] == seq.block_table[:2]


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    prompt = tokens(40, 20)
    a = make_seq(prompt)
    prefill(bm, a)
    assert a.block_hashes == [] and bm.hash_to_block_id == {}
    assert prefill(bm, make_seq(prompt)) == 0
    assert bm.num_hit_tokens == 0


def corrupt_free_twice(bm, seqs):
    bm.free_block_ids.append(bm.free_block_ids[0])


def corrupt_free_and_used(bm, seqs):
    bm.used_block_ids.add(bm.free_block_ids[0])


def corrupt_lost_block(bm, seqs):
    bm.free_block_ids.pop()


def corrupt_ref_count(bm, seqs):
    bm.blocks[seqs[0].block_table[0]].ref_count += 1


def corrupt_forgotten_sequence(bm, seqs):
    seqs.pop()


def corrupt_used_without_reference(bm, seqs):
    block_id = bm.free_block_ids.pop()
    bm.used_block_ids.add(block_id)


def corrupt_hash_map(bm, seqs):
    bm.hash_to_block_id[12345] = seqs[0].block_table[0]


def corrupt_shared_table(bm, seqs):
    seqs[1].block_table[-1] = seqs[0].block_table[-1]


@pytest.mark.parametrize("corrupt, message", [
    (corrupt_free_twice, "free list twice"),
    (corrupt_free_and_used, "both free and used"),
    (corrupt_lost_block, "free \\+ used != total"),
    (corrupt_ref_count, "ref_count"),
    (corrupt_forgotten_sequence, "ref_count"),
    (corrupt_used_without_reference, "misfiled"),
    (corrupt_hash_map, "another hash"),
    (corrupt_shared_table, "ref_count"),
])
def test_check_invariants_catches_corruption(corrupt, message):
    bm = BlockManager(10, BS)
    base = tokens(40, 21)
    seqs = [make_seq(base), make_seq(base[:32] + tokens(20, 22))]
    for seq in seqs:
        prefill(bm, seq)
    bm.check_invariants(seqs)
    corrupt(bm, seqs)
    with pytest.raises(AssertionError, match=message):
        bm.check_invariants(seqs)


def test_random_workload_keeps_invariants():
    """Random allocate / chunk / decode / free over shared prefixes; the accounting stays exact."""
    rng = random.Random(23)
    bm = BlockManager(24, BS)
    prefixes = [tokens(rng.randint(1, 70), 100 + i) for i in range(4)]
    live: list[Sequence] = []
    for _ in range(600):
        action = rng.random()
        if action < 0.3 and len(live) < 6:
            seq = make_seq(rng.choice(prefixes) + tokens(rng.randint(1, 30), rng.randrange(10**6)))
            hit_ids, _ = bm.match_prefix(seq)
            n = rng.randint(1, seq.num_tokens - len(hit_ids) * BS)
            if bm.can_allocate(seq, n):
                bm.allocate(seq, n)
                assert seq.num_computed_tokens < seq.num_tokens
                seq.num_computed_tokens += n
                bm.commit_computed(seq)
                live.append(seq)
        elif action < 0.85 and live:
            seq = rng.choice(live)
            if seq.num_uncomputed_tokens == 0:
                seq.token_ids.append(rng.randrange(3, 2000))
            n = rng.randint(1, seq.num_uncomputed_tokens)
            if bm.can_append(seq, n):
                run_tokens(bm, seq, n)
        elif live:
            seq = live.pop(rng.randrange(len(live)))
            bm.deallocate(seq)
        bm.check_invariants(live)
        for seq in live:
            assert len(seq.block_hashes) == seq.num_computed_tokens // BS
            for i, h in enumerate(seq.block_hashes):
                assert h == chain_hash(seq.block_tokens(i), seq.block_hashes[i - 1] if i else -1)
                assert bm.blocks[seq.block_table[i]].token_ids == seq.block_tokens(i)
    assert bm.num_hit_tokens > 0
