"""The per-row sampling tensors of one step, built on the host from the sequences that sample.

Tensors for a filter, seeds, penalties or biases exist only when some row uses them, so the
usual batch pays for nothing. Copies to the device never block the host (a blocking copy would
wait for the step in flight under overlap scheduling).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from nanovllm.engine.inputs import rows_among
from nanovllm.engine.sequence import PENDING, Sequence
from nanovllm.layers.sampler import Penalties, SamplingTensors
from nanovllm.sampling_params import MAX_SEED, SamplingParams

# Sibling completions of one request (n > 1) draw from distinct seeds derived from the request's.
_SIBLING_SEED_STRIDE = 0x9E3779B97F4A7C15
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def sibling_seed(seed: int, completion_index: int) -> int:
    """The seed of continuation `completion_index` of a request seeded with `seed` (index 0 keeps `seed`)."""
    return (seed + completion_index * _SIBLING_SEED_STRIDE) % (MAX_SEED + 1)


class PromptTokenTable:
    """The padded prompt-token table of the penalised rows, on the device, kept while the rows stay the
    same: a prompt never changes, so steady decoding of the same batch builds and copies it once.
    Any change of the rows (a sequence joins, leaves or moves) rebuilds it; a step without penalties
    drops it."""

    def __init__(self) -> None:
        self._rows: tuple[int, ...] | None = None
        self._table: torch.Tensor | None = None

    def get(self, seqs: list[Sequence], active: list[bool], vocab_size: int, device_array: Callable) -> torch.Tensor:
        rows = tuple(s.seq_id if on else -1 for s, on in zip(seqs, active))
        if rows != self._rows:
            self._table = device_array(_padded([s.prompt_token_ids if on else [] for s, on in zip(seqs, active)], vocab_size), np.int64)
            self._rows = rows
        return self._table

    def clear(self) -> None:
        self._rows = self._table = None


class SamplingInputs:
    """Builds each step's SamplingTensors for the rows that sample (the sequences `seqs`, in row order).

    A row's temperature, filters, seed, logit bias and logprobs depend only on its sequence, so while the
    rows are the same sequences in the same order (steady decoding) those device tensors are kept, not
    rebuilt and copied every step. What moves every step is rebuilt when some row uses it: the positions
    of seeded rows, the tokens banned below min_tokens, the penalties' token tables.
    """

    def __init__(self, vocab_size: int, to_device: Callable[[np.ndarray], torch.Tensor]) -> None:
        self.vocab_size = vocab_size
        self.to_device = to_device
        self.prompt_tokens = PromptTokenTable()
        self._rows: list[int] | None = None
        self._fixed: SamplingTensors | None = None
        self._seeded: list[int] = []
        self._min_tokens_rows: list[int] = []
        self._penalised = False

    def _device_array(self, values: list, dtype: type) -> torch.Tensor:
        return self.to_device(np.asarray(values, dtype=dtype))

    def build(self, seqs: list[Sequence], eos_token_ids: frozenset[int], last_sampled: torch.Tensor,
              sampled_ids: list[int]) -> SamplingTensors:
        """`last_sampled` / `sampled_ids`: the previous step's sampled tokens on the device and the sequence of
        each row; they fill the PENDING token a penalised sequence may still have in flight."""
        rows = [s.seq_id for s in seqs]
        if rows != self._rows:
            params = [s.sampling_params for s in seqs]
            self._rows = rows
            if all(p.temperature_only for p in params):  # the usual batch: one pass instead of a dozen
                self._seeded, self._min_tokens_rows, self._penalised = [], [], False
                self._fixed = self._temperature_tensors([p.sampling_temperature for p in params])
            else:
                self._seeded = [i for i, p in enumerate(params) if p.seed is not None and not p.greedy]
                self._min_tokens_rows = [i for i, p in enumerate(params) if p.min_tokens > 0]
                self._penalised = any(p.has_penalties for p in params)
                self._fixed = self._fixed_tensors(seqs, params)
        moving = {}
        if self._seeded:
            moving["positions"] = self._device_array([seqs[i].num_tokens for i in self._seeded], np.int64)
        # Below min_tokens, the EOS ids and the stop tokens cannot be sampled.
        banned = [
            (row, token)
            for row in self._min_tokens_rows
            if seqs[row].num_completion_tokens < seqs[row].sampling_params.min_tokens
            for token in ([] if seqs[row].sampling_params.ignore_eos else sorted(eos_token_ids)) + list(seqs[row].sampling_params.stop_token_ids)
        ]
        if banned:
            moving["banned"] = self._device_array(banned, np.int64).T
        if self._penalised:
            moving["penalties"] = _penalties(seqs, self.vocab_size, self._device_array, last_sampled, sampled_ids, self.prompt_tokens)
        else:
            self.prompt_tokens.clear()
        return replace(self._fixed, **moving) if moving else self._fixed

    def _temperature_tensors(self, temperatures: list[float]) -> SamplingTensors:
        """Rows that need only their temperatures (0.0: greedy)."""
        return SamplingTensors(self._device_array(temperatures, np.float32), all_greedy=not any(temperatures), any_greedy=0.0 in temperatures)

    def _fixed_tensors(self, seqs: list[Sequence], params: list[SamplingParams]) -> SamplingTensors:
        """The tensors that depend only on which sequences the rows are."""
        device_array, vocab_size = self._device_array, self.vocab_size
        tensors = self._temperature_tensors([p.sampling_temperature for p in params])
        if not tensors.all_greedy:
            # top_k beyond the vocabulary keeps it all (and need not fit in int64); a top_p below float32's
            # smallest normal number would round to 0 and drop even the top token.
            if any(p.top_k > 0 for p in params):
                tensors.top_k = device_array([min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params], np.int64)
            if any(p.top_p < 1 for p in params):
                tensors.top_p = device_array([max(p.top_p, FLOAT32_TINY) for p in params], np.float32)
            if any(p.min_p > 0 for p in params):
                tensors.min_p = device_array([p.min_p for p in params], np.float32)
            if self._seeded:
                tensors.seed_rows = device_array(self._seeded, np.int64)
                tensors.seeds = device_array([sibling_seed(params[i].seed, seqs[i].completion_index) for i in self._seeded], np.int64)
        biased = [(row, token, bias) for row, p in enumerate(params) if p.logit_bias for token, bias in p.logit_bias.items()]
        if biased:
            tensors.bias_index = device_array([(row, token) for row, token, _ in biased], np.int64).T
            tensors.bias_values = device_array([bias for _, _, bias in biased], np.float32)
        requested = [p.logprobs for p in params if p.logprobs is not None]
        tensors.max_logprobs = max(requested) if requested else -1
        return tensors


def _padded(rows: list[list[int]], vocab_size: int) -> np.ndarray:
    table = np.full((len(rows), max(1, max(map(len, rows)))), vocab_size, dtype=np.int64)
    for i, row in enumerate(rows):
        table[i, : len(row)] = row
    return table


def _penalties(seqs: list[Sequence], vocab_size: int, device_array: Callable, last_sampled: torch.Tensor,
               sampled_ids: list[int], prompt_tokens: PromptTokenTable) -> Penalties:
    """Penalty values per row and each row's prompt and output tokens, padded with `vocab_size`
    (rows without penalties get neutral values and no tokens)."""
    active = [s.sampling_params.has_penalties for s in seqs]
    outputs = [s.token_ids[s.num_prompt_tokens :] if on else [] for s, on in zip(seqs, active)]
    output_table = _padded(outputs, vocab_size)
    pending = np.argwhere(output_table == PENDING)
    output_tokens = device_array(output_table, np.int64)
    if len(pending):
        sources = device_array(rows_among([seqs[row].seq_id for row in pending[:, 0].tolist()], sampled_ids), np.int64)
        output_tokens[device_array(pending[:, 0], np.int64), device_array(pending[:, 1], np.int64)] = last_sampled[sources]
    return Penalties(
        repetition=device_array([s.sampling_params.repetition_penalty for s in seqs], np.float32),
        frequency=device_array([s.sampling_params.frequency_penalty for s in seqs], np.float32),
        presence=device_array([s.sampling_params.presence_penalty for s in seqs], np.float32),
        prompt_tokens=prompt_tokens.get(seqs, active, vocab_size, device_array),
        output_tokens=output_tokens,
    )
