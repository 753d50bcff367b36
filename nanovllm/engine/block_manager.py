"""Paged KV block allocation with an xxhash prefix cache over full, computed blocks."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence


def chain_hash(token_ids: list[int], prefix_hash: int = -1) -> int:
    """xxh64 of a full block's token ids, chained on the hash of the block before it (-1 for the first)."""
    h = xxhash.xxh64()
    if prefix_hash != -1:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = -1
    token_ids: list[int] = field(default_factory=list)


class BlockManager:
    """Owns every block; sequences only hold block ids in `seq.block_table`.

    A block is *used* while some block table references it (ref_count > 0) and *free* otherwise.
    A free block keeps its hash and tokens so a later prompt can still hit it, until it is handed
    out again (free blocks are reused oldest-freed first). Only full blocks whose KV has been
    computed are hashed (`commit_computed`), so a hit never reads KV that is still being written.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.used_block_ids: set[int] = set()
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _take_free_block(self) -> int:
        block_id = self.free_block_ids.popleft()
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids, block.ref_count = -1, [], 1
        self.used_block_ids.add(block_id)
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.used_block_ids.remove(block_id)
            self.free_block_ids.append(block_id)

    def match_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Cached blocks (ids, hashes) for the longest computed prefix of an unallocated sequence.

        At most `num_tokens - 1` tokens can hit: the last token must be computed to get logits.
        None hit for a sequence that computes prompt logprobs: it needs every prompt position's logits.
        """
        if not self.enable_prefix_caching or seq.computes_prompt_logprobs:
            return [], []
        ids: list[int] = []
        hashes: list[int] = []
        prefix_hash = -1
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = seq.block_tokens(i)
            prefix_hash = chain_hash(tokens, prefix_hash)
            block_id = self.hash_to_block_id.get(prefix_hash, -1)
            if block_id == -1 or self.blocks[block_id].token_ids != tokens:
                break
            ids.append(block_id)
            hashes.append(prefix_hash)
        return ids, hashes

    def _blocks_to_take(self, seq: Sequence, hit_ids: list[int], num_new_tokens: int) -> int:
        """Free blocks consumed by allocating `num_new_tokens` past the cached prefix `hit_ids`."""
        num_positions = len(hit_ids) * self.block_size + num_new_tokens
        revived = sum(1 for block_id in hit_ids if self.blocks[block_id].ref_count == 0)
        return seq.num_blocks_for(num_positions) - len(hit_ids) + revived

    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix: tuple[list[int], list[int]] | None = None) -> bool:
        """Whether a waiting sequence (no blocks yet) can get its cached prefix plus `num_new_tokens` slots.

        `prefix` is `match_prefix(seq)` when the caller already has it (nothing changed since).
        """
        hit_ids, _ = prefix or self.match_prefix(seq)
        return self._blocks_to_take(seq, hit_ids, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: tuple[list[int], list[int]] | None = None) -> None:
        """Give a waiting sequence its cached prefix and room for `num_new_tokens` more positions.

        Precondition: `can_allocate(seq, num_new_tokens)`; `prefix` as there. Sets
        `num_cached_tokens` and `num_computed_tokens` to the hit length.
        """
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        hit_ids, hit_hashes = prefix or self.match_prefix(seq)
        if self._blocks_to_take(seq, hit_ids, num_new_tokens) > self.num_free_blocks:
            raise RuntimeError(f"not enough free KV blocks for sequence {seq.seq_id}")
        for block_id in hit_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free_block_ids.remove(block_id)
                self.used_block_ids.add(block_id)
            block.ref_count += 1
        seq.block_table = list(hit_ids)
        seq.block_hashes = list(hit_hashes)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hit_ids) * self.block_size
        self.num_hit_tokens += seq.num_cached_tokens
        seq.block_table.extend(self._take_free_block() for _ in range(self._blocks_missing(seq, num_new_tokens)))

    def _blocks_missing(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` lacks to cover `num_computed_tokens + num_new_tokens` positions (<= 0: none).
        Runs for every sequence of every step: the ceiling division is written out, not a method call."""
        return -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) - len(seq.block_table)

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        """Whether a running sequence can get slots for `num_new_tokens` more positions."""
        return self._blocks_missing(seq, num_new_tokens) <= len(self.free_block_ids)

    def may_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        """Grow the block table to cover `num_computed_tokens + num_new_tokens` positions, if the free
        blocks allow (the answer `can_append` gives); False when they do not, and nothing changed.
        Called before the step that computes them.
        """
        needed = self._blocks_missing(seq, num_new_tokens)
        if needed <= 0:
            return True
        if needed > len(self.free_block_ids):
            return False
        seq.block_table.extend(self._take_free_block() for _ in range(needed))
        return True

    def commit_computed(self, seq: Sequence) -> None:
        """Hash the blocks that became full and computed; called after `num_computed_tokens` advanced."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            tokens = seq.block_tokens(i)
            prefix_hash = seq.block_hashes[-1] if seq.block_hashes else -1
            h = chain_hash(tokens, prefix_hash)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash == -1:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block_id.setdefault(h, block.block_id)

    def deallocate(self, seq: Sequence) -> None:
        """Return the sequence's blocks (newest first, so shared prefixes stay cached longest)."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_cached_tokens = seq.num_computed_tokens = 0

    def check_invariants(self, seqs: list[Sequence] = ()) -> None:
        """Raise AssertionError if block accounting is inconsistent.

        free + used == total; free and used are disjoint; a block's ref_count equals the number
        of block-table references among `seqs` (pass every live sequence); cached hashes point
        at blocks holding that hash.
        """
        total = len(self.blocks)
        free = set(self.free_block_ids)
        assert len(free) == len(self.free_block_ids), "a block is on the free list twice"
        assert not free & self.used_block_ids, "a block is both free and used"
        assert len(free) + len(self.used_block_ids) == total, "free + used != total"
        refs = [0] * total
        for seq in seqs:
            for block_id in seq.block_table:
                refs[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], f"block {block.block_id}: ref_count {block.ref_count} != {refs[block.block_id]} references"
            assert (block.ref_count > 0) == (block.block_id in self.used_block_ids), f"block {block.block_id} misfiled"
        for h, block_id in self.hash_to_block_id.items():
            assert self.blocks[block_id].hash == h, f"hash map points at block {block_id} with another hash"
