"""Which sequences run in the next step, and how many of their tokens."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import PENDING, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: sequence i computes `num_new_tokens[i]` (>= 1) tokens starting at its `num_computed_tokens`.

    A sequence samples a token when this step reaches its last token. `is_decode` means every
    sequence computes exactly one token (the shape CUDA graphs and the decode kernel serve).
    """

    seqs: list[Sequence]
    num_new_tokens: list[int]

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == len(self.num_new_tokens)  # every count is at least 1: all are 1

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    """Continuous batching over waiting and running queues, with preemption by recompute.

    `prefill_first` (nano-vLLM): a step either prefills whole prompts or decodes every running
    sequence. `chunked` (vLLM v1): running sequences go first (one decode token, or the next chunk
    of an unfinished prompt), then waiting prompts fill the rest of the token budget in chunks.
    `max_num_seqs` bounds the running set (sequences holding blocks), hence every step's batch;
    `max_num_batched_tokens` bounds a step's tokens. When blocks run out, the most recently
    admitted running sequence is preempted: its blocks
    are freed and it waits at the head of the queue to be recomputed (its full blocks usually
    still hit the prefix cache).
    """

    def __init__(self, config: Config, num_blocks: int, eos_token_ids: frozenset[int]) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.chunked = config.scheduling_policy == "chunked"
        self.eos_token_ids = eos_token_ids
        self.block_manager = BlockManager(num_blocks, config.kvcache_block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def live_sequences(self) -> list[Sequence]:
        return [*self.waiting, *self.running]

    def schedule(self) -> ScheduledBatch:
        """Pick the next step's batch. It is empty only when every running sequence awaits a pending
        token that will end it (overlap scheduling) or when nothing fits (the caller reports that)."""
        batch = ScheduledBatch([], [])
        if self.chunked:
            self._schedule_running(batch)
            self._schedule_waiting(batch)
        else:
            self._schedule_waiting(batch)
            if not batch.seqs:
                self._schedule_running(batch)
        return batch

    def _schedule_waiting(self, batch: ScheduledBatch) -> None:
        budget = self.max_num_batched_tokens - batch.num_tokens
        bm = self.block_manager
        # Cap the running set, not just this batch: a prefill_first decode step must be able to run
        # every running sequence (at most max_num_seqs, one token each within the token budget).
        max_running = min(self.max_num_seqs, self.max_num_batched_tokens)
        while self.waiting and budget > 0 and len(self.running) < max_running:
            seq = self.waiting[0]
            if seq.num_pending_tokens:
                break  # preempted while its token was in flight: recompute once the token is known
            prefix = bm.match_prefix(seq)
            remaining = seq.num_tokens - len(prefix[0]) * bm.block_size
            if remaining > budget and not self.chunked:
                break
            num_new = min(remaining, budget)
            if not bm.can_allocate(seq, num_new, prefix):
                break
            bm.allocate(seq, num_new, prefix)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

    def _schedule_running(self, batch: ScheduledBatch) -> None:
        # The hot loop of every step (up to max_num_seqs sequences): sequence properties read inline.
        budget = self.max_num_batched_tokens - batch.num_tokens
        bm, seqs, num_new_tokens = self.block_manager, batch.seqs, batch.num_new_tokens
        block_size = bm.block_size
        i = 0
        while i < len(self.running) and budget > 0 and len(seqs) < self.max_num_seqs:
            seq = self.running[i]
            num_tokens = len(seq.token_ids)
            if num_tokens - seq.num_prompt_tokens >= seq.sampling_params.max_tokens or num_tokens >= self.max_model_len:
                i += 1  # at max_tokens or max_model_len: its pending token ends it; nothing more to compute
                continue
            num_computed = seq.num_computed_tokens
            num_new = min(num_tokens - num_computed, budget)
            # may_append (inline check first) only when its blocks do not cover the new tokens: rare, a block holds many.
            if -(-(num_computed + num_new) // block_size) > len(seq.block_table) and not bm.may_append(seq, num_new):
                if not self._make_room(seq, num_new):
                    break  # seq itself was preempted
                bm.may_append(seq, num_new)
            seqs.append(seq)
            num_new_tokens.append(num_new)
            budget -= num_new
            i += 1

    def _make_room(self, seq: Sequence, num_new: int) -> bool:
        """Preempt running sequences from the most recently admitted until `seq` can append `num_new`
        tokens; False when `seq` itself had to go."""
        while not self.block_manager.can_append(seq, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """`advance` then `resolve`: the whole step when the host waits for each step's tokens."""
        self.advance(batch)
        return self.resolve(batch, sampled)

    def advance(self, batch: ScheduledBatch) -> list[Sequence]:
        """Mark the step's tokens computed and give each sequence that samples a PENDING token.
        Returns the sequences whose first generated token that is.

        Called once the step is launched (its inputs were built from the state before this call).
        """
        starting = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
            if seq.num_computed_tokens == len(seq.token_ids):
                if seq.num_computed_tokens == seq.num_prompt_tokens:
                    starting.append(seq)
                seq.token_ids.append(PENDING)
                seq.num_pending_tokens += 1
        return starting

    def resolve(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """Fill in the step's sampled tokens, hash blocks that became full, apply the stop rules.

        `sampled[i]` is the token drawn for `batch.seqs[i]`, or None when the step did not reach its
        last token (a partial prefill chunk). Precondition: `advance(batch)` ran, and every step
        advanced before this one was resolved (placeholders fill oldest first). Sequences that
        finished while the step was in flight are skipped. Returns those that got a new token.
        """
        advanced = []
        bm = self.block_manager
        commit_computed, block_size = (bm.commit_computed if bm.enable_prefix_caching else None), bm.block_size
        for seq, token_id in zip(batch.seqs, sampled):
            if seq.status is SequenceStatus.FINISHED:  # seq.is_finished, inline (hot)
                continue
            if token_id is not None:
                seq.token_ids[len(seq.token_ids) - seq.num_pending_tokens] = token_id
                seq.num_pending_tokens -= 1
            if commit_computed is not None and seq.num_computed_tokens // block_size > len(seq.block_hashes):
                commit_computed(seq)  # a block became full (the check is commit_computed's own, inline: hot)
            if token_id is None:
                continue
            advanced.append(seq)
            reason = self._stop_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
        return advanced

    def _stop_reason(self, seq: Sequence, token_id: int) -> str | None:
        """Why `seq` ends after its newest known token `token_id`: any EOS id or a stop token past min_tokens
        ("stop"), max_tokens or max_model_len ("length")."""
        params = seq.sampling_params
        num_output = len(seq.token_ids) - seq.num_prompt_tokens - seq.num_pending_tokens  # seq.num_output_tokens, inline (hot)
        if num_output > params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return "stop"
            if token_id in params.stop_token_ids:
                return "stop"
        if num_output >= params.max_tokens or seq.num_prompt_tokens + num_output >= self.max_model_len:
            return "length"
        return None

    def abort(self, seq: Sequence) -> None:
        """Remove an unfinished sequence from whichever queue holds it and free its blocks (no-op once finished).
        A sequence never queued (held back by the engine until a sibling computed the prompt) is only marked finished."""
        if seq.is_finished:
            return
        if seq.status == SequenceStatus.WAITING and seq not in self.waiting:
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
            return
        self.finish(seq, "abort")

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence after its newest known token: free its blocks and drop tokens still pending
        (computed speculatively by a step in flight; their outputs are discarded). On a sequence
        that already finished, only the reason changes (a stop string found in its last text)."""
        if seq.is_finished:
            seq.finish_reason = reason
            return
        queue = self.running if seq.status == SequenceStatus.RUNNING else self.waiting
        queue.remove(seq)
        self.block_manager.deallocate(seq)
        del seq.token_ids[seq.num_tokens - seq.num_pending_tokens :]
        seq.num_pending_tokens = 0
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
