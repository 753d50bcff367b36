"""SamplingInputs: per-row sampling tensors kept while the rows stay the same sequences, rebuilt when they change."""
from __future__ import annotations

import random

import numpy as np
import torch

from nanovllm import SamplingParams
from nanovllm.engine.sampling_inputs import SamplingInputs
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import Penalties, SamplingTensors

VOCAB = 50
EOS = frozenset({2})


class CountingCopies:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        self.count += 1
        return torch.from_numpy(array)


def seq(params: SamplingParams, prompt: tuple[int, ...] = (5, 6, 7), index: int = 0) -> Sequence:
    return Sequence(list(prompt), params, 16, completion_index=index)


def as_values(tensors: SamplingTensors) -> dict:
    """Every field as plain values (tensors as lists), to compare two builds."""
    def value(x):
        if isinstance(x, torch.Tensor):
            return x.tolist()
        if isinstance(x, Penalties):
            return {k: value(v) for k, v in vars(x).items()}
        return x
    return {name: value(v) for name, v in vars(tensors).items()}


def build(inputs: SamplingInputs, seqs: list[Sequence]) -> SamplingTensors:
    return inputs.build(seqs, EOS, torch.zeros(0, dtype=torch.int64), {})


def test_same_rows_reuse_the_tensors_without_copies():
    copies = CountingCopies()
    inputs = SamplingInputs(VOCAB, copies)
    a, b = seq(SamplingParams(temperature=0.5, top_k=3)), seq(SamplingParams(temperature=1.0))
    first = build(inputs, [a, b])
    made = copies.count
    a.token_ids.append(9)  # a decode step: the rows' parameters are unchanged
    again = build(inputs, [a, b])
    assert again is first and copies.count == made
    assert first.temperatures.tolist() == [0.5, 1.0] and first.top_k.tolist() == [3, VOCAB]


def test_changed_rows_give_the_new_values():
    inputs = SamplingInputs(VOCAB, torch.from_numpy)
    a, b = seq(SamplingParams(temperature=0.5, top_k=3)), seq(SamplingParams(temperature=1.0))
    c = seq(SamplingParams(temperature=0.7, top_p=0.9, logprobs=2))
    assert build(inputs, [a, b]).temperatures.tolist() == [0.5, 1.0]
    swapped = build(inputs, [b, a])
    assert swapped.temperatures.tolist() == [1.0, 0.5] and swapped.top_k.tolist() == [VOCAB, 3]
    replaced = build(inputs, [b, c])
    assert torch.allclose(replaced.temperatures, torch.tensor([1.0, 0.7]))
    assert replaced.top_k is None and replaced.top_p.tolist() == [1.0, torch.tensor(0.9).item()] and replaced.max_logprobs == 2
    fewer = build(inputs, [b])
    assert fewer.temperatures.tolist() == [1.0] and fewer.top_p is None and fewer.max_logprobs == -1
    greedy = build(inputs, [seq(SamplingParams(temperature=0.0))])
    assert greedy.all_greedy and greedy.temperatures.tolist() == [0.0]


def test_moving_parts_follow_the_sequences_on_reused_rows():
    inputs = SamplingInputs(VOCAB, torch.from_numpy)
    seeded = seq(SamplingParams(temperature=1.0, seed=11))
    bounded = seq(SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[4]))
    first = build(inputs, [seeded, bounded])
    assert first.positions.tolist() == [3] and sorted(map(tuple, first.banned.T.tolist())) == [(1, 2), (1, 4)]
    for s in (seeded, bounded):
        s.token_ids.append(9)
    second = build(inputs, [seeded, bounded])
    assert second.temperatures is first.temperatures and second.seeds is first.seeds
    assert second.positions.tolist() == [4] and second.banned is not None
    for s in (seeded, bounded):
        s.token_ids.append(9)
    third = build(inputs, [seeded, bounded])
    assert third.positions.tolist() == [5] and third.banned is None, "min_tokens reached: nothing banned"


def test_every_step_equals_a_fresh_build():
    rng = random.Random(0)
    choices = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.6, top_k=5, top_p=0.8, min_p=0.1),
        SamplingParams(temperature=1.0, seed=3, min_tokens=3, logprobs=1),
        SamplingParams(temperature=1.0, repetition_penalty=1.2, presence_penalty=0.5, logit_bias={7: 2.0}),
        SamplingParams(temperature=0.9, stop_token_ids=[8], min_tokens=2, ignore_eos=True),
    ]
    pool = [seq(rng.choice(choices), tuple(rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 6))), rng.randrange(3)) for _ in range(12)]
    cached = SamplingInputs(VOCAB, torch.from_numpy)
    rows = pool[:6]
    for step in range(40):
        if rng.random() < 0.3:
            rows = rng.sample(pool, rng.randint(1, 8))
        for s in rows:
            s.token_ids.append(rng.randrange(3, VOCAB))
        assert as_values(build(cached, rows)) == as_values(build(SamplingInputs(VOCAB, torch.from_numpy), rows)), f"step {step}"


def test_temperature_only_rows_build_temperatures_alone():
    """Rows that need only a temperature (one pass over the rows) get their temperatures (0 for greedy, i.e. 0 and
    below 1e-5), the greedy flags, and nothing else; any other option sends a row down the general build."""
    for temperatures in ([0.0, 1e-6], [0.7, 1.3], [0.0, 0.6, 1e-6, 2.0]):
        seqs = [seq(SamplingParams(temperature=t, max_tokens=5)) for t in temperatures]
        assert all(s.sampling_params.temperature_only for s in seqs)
        built = as_values(SamplingInputs(VOCAB, CountingCopies()).build(seqs, EOS, torch.zeros(0, dtype=torch.int64), []))
        greedy = [t < 1e-5 for t in temperatures]
        expected = as_values(SamplingTensors(torch.tensor([0.0 if g else t for g, t in zip(greedy, temperatures)]),
                                             all_greedy=all(greedy), any_greedy=any(greedy)))
        assert built == expected
    for option in (dict(top_k=3), dict(top_p=0.5), dict(min_p=0.1), dict(seed=1), dict(temperature=0.0, seed=1),
                   dict(presence_penalty=0.5), dict(frequency_penalty=-0.5), dict(repetition_penalty=1.2), dict(min_tokens=2),
                   dict(logit_bias={3: 1.0}), dict(logprobs=0)):
        assert not SamplingParams(**{"temperature": 0.8, **option}).temperature_only, option
