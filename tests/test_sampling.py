"""Sampling: the Sampler on hand-made logits (filters, frequencies, seeded noise, logprobs) and the engine's
greedy / seeded / logprobs behaviour against HF transformers on the tiny checkpoint."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_llm, random_prompts

from nanovllm import SamplingParams
from nanovllm.layers.sampler import Sampler, SamplingTensors, seeded_exponentials

MASK32 = 0xFFFFFFFF


def chi2_bound(df: int, z: float = 4.26) -> float:
    """Chi-square quantile at standard-normal quantile z (Wilson-Hilferty); z = 4.26 is p = 1e-5."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic of sampled `tokens` against `probs` [V] over tokens with p > 0; fails on any p = 0 draw."""
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    allowed = probs > 0
    assert counts[~allowed].sum() == 0, f"sampled tokens outside the support: {counts[~allowed].nonzero().flatten().tolist()}"
    expected = probs.double()[allowed] * len(tokens)
    return float(((counts[allowed] - expected) ** 2 / expected).sum()), int(allowed.sum()) - 1


def params(rows: int, temperature: float = 1.0, **fields: object) -> SamplingTensors:
    """SamplingTensors for `rows` rows sharing one temperature; other fields given as tensors."""
    return SamplingTensors(torch.full((rows,), temperature), **fields)


def seeded(seeds: torch.Tensor, positions: torch.Tensor, temperature: float = 1.0) -> SamplingTensors:
    rows = len(seeds)
    return params(rows, temperature, seed_rows=torch.arange(rows), seeds=seeds, positions=positions)


# A fixed distribution over 12 tokens, stored under shuffled ids so the filters must sort.
PROBS = torch.tensor([0.22, 0.16, 0.13, 0.11, 0.09, 0.08, 0.06, 0.05, 0.04, 0.03, 0.02, 0.01])
PERMUTATION = torch.tensor([7, 2, 11, 0, 5, 9, 1, 10, 3, 8, 6, 4])
LOGITS = torch.empty(12).index_put_((PERMUTATION,), PROBS.log())


def probs_of(logits: torch.Tensor) -> torch.Tensor:
    return logits.double().softmax(-1)


# ---- the Sampler on hand-made logits ----------------------------------------------------------


def test_greedy_rows_are_exact_argmax():
    torch.manual_seed(0)
    logits = torch.randn(64, 1000) * 3
    greedy = logits.argmax(-1)
    assert torch.equal(Sampler()(logits, params(64, 0.0, all_greedy=True)).token_ids, greedy)
    temperatures = torch.tensor([0.0, 1.5] * 32)
    mixed = Sampler()(logits, SamplingTensors(temperatures, top_p=torch.full((64,), 0.9))).token_ids
    assert torch.equal(mixed[0::2], greedy[0::2])
    assert not torch.equal(mixed[1::2], greedy[1::2])


def test_unseeded_frequencies_match_probabilities():
    torch.manual_seed(1)
    tokens = Sampler()(LOGITS.expand(40000, -1).clone(), params(40000)).token_ids
    stat, df = chi2(tokens, probs_of(LOGITS))
    assert stat < chi2_bound(df), stat


def test_temperature_flattens_the_distribution():
    torch.manual_seed(2)
    entropies = []
    for temperature in (0.5, 1.0, 2.0):
        tokens = Sampler()(LOGITS.expand(30000, -1).clone(), params(30000, temperature)).token_ids
        expected = probs_of(LOGITS / temperature)
        stat, df = chi2(tokens, expected)
        assert stat < chi2_bound(df), (temperature, stat)
        freq = torch.bincount(tokens, minlength=12).double() / len(tokens)
        entropies.append(float(-(freq[freq > 0] * freq[freq > 0].log()).sum()))
    assert entropies[0] < entropies[1] < entropies[2], entropies


def allowed_probs(top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """The distribution the filters should leave, computed from PROBS independently of the Sampler:
    min_p on the full distribution, then top-k, then the top-p nucleus of what top-k kept."""
    keep = PROBS >= min_p * PROBS[0]
    if top_k > 0:
        keep &= torch.arange(12) < top_k
    kept = PROBS * keep / (PROBS * keep).sum()
    mass_before = kept.cumsum(0) - kept
    if top_p < 1:
        assert (mass_before - top_p).abs().min() > 1e-3, "top_p too close to a cumulative sum for a clean test"
        keep &= mass_before < top_p
    probs = PROBS * keep
    return torch.empty(12, dtype=torch.float64).index_put_((PERMUTATION,), (probs / probs.sum()).double())


FILTERS = [
    dict(top_k=1),
    dict(top_k=4),
    dict(top_p=0.55),
    dict(top_p=0.87),
    dict(min_p=0.3),
    dict(min_p=0.05),
    dict(top_k=6, top_p=0.5),
    dict(top_k=8, top_p=0.8, min_p=0.2),
    dict(),
]


def test_filters_never_sample_outside_the_allowed_set_and_keep_its_proportions():
    """4096 rows per filter setting, all settings in one batch (per-row parameters)."""
    torch.manual_seed(3)
    per, n = 4096, len(FILTERS)
    rows = per * n
    top_k = torch.tensor([f.get("top_k", 12) for f in FILTERS]).repeat_interleave(per)
    top_p = torch.tensor([f.get("top_p", 1.0) for f in FILTERS]).repeat_interleave(per)
    min_p = torch.tensor([f.get("min_p", 0.0) for f in FILTERS]).repeat_interleave(per)
    tokens = Sampler()(LOGITS.expand(rows, -1).clone(), params(rows, top_k=top_k, top_p=top_p, min_p=min_p)).token_ids
    for i, setting in enumerate(FILTERS):
        expected = allowed_probs(**setting)
        drawn = tokens[i * per : (i + 1) * per]
        stat, df = chi2(drawn, expected)
        assert set(drawn.tolist()) == set(expected.nonzero().flatten().tolist()), setting
        if df:
            assert stat < chi2_bound(df), (setting, stat)


def test_filters_on_a_large_vocabulary():
    """top-k / top-p / min-p on 1024 rows of one random 2048-token distribution: support only."""
    torch.manual_seed(4)
    logits = torch.randn(2048) * 2
    probs = logits.double().softmax(-1)
    order = probs.argsort(descending=True)
    sorted_probs = probs[order]
    rows = 1024
    batch = logits.expand(rows, -1).clone()
    top_k = Sampler()(batch, params(rows, top_k=torch.full((rows,), 20))).token_ids
    assert set(top_k.tolist()) <= set(order[:20].tolist())
    nucleus = int(((sorted_probs.cumsum(0) - sorted_probs) < 0.3).sum())
    top_p = Sampler()(batch, params(rows, top_p=torch.full((rows,), 0.3))).token_ids
    assert set(top_p.tolist()) <= set(order[:nucleus].tolist())
    min_p = Sampler()(batch, params(rows, min_p=torch.full((rows,), 0.1))).token_ids
    assert set(min_p.tolist()) <= set((probs >= 0.1 * probs.max()).nonzero().flatten().tolist())


def test_banned_tokens_are_never_sampled():
    torch.manual_seed(5)
    rows = 2000
    banned_ids = PERMUTATION[:3]
    banned = torch.stack([torch.arange(rows).repeat_interleave(3), banned_ids.repeat(rows)])
    temperatures = torch.tensor([0.0, 1.0]).repeat(rows // 2)
    tokens = Sampler()(LOGITS.expand(rows, -1).clone(), SamplingTensors(temperatures, banned=banned)).token_ids
    assert not set(tokens.tolist()) & set(banned_ids.tolist())
    assert (tokens[0::2] == PERMUTATION[3]).all()


def test_logprobs_are_log_softmax_of_the_raw_logits():
    torch.manual_seed(6)
    logits = torch.randn(8, 300) * 4
    banned = torch.tensor([[0, 1], [int(logits[0].argmax()), 7]])
    out = Sampler()(logits.clone(), params(8, 0.7, banned=banned, max_logprobs=5))
    expected = logits.log_softmax(-1)
    torch.testing.assert_close(out.sampled_logprobs, expected.gather(1, out.token_ids[:, None]).squeeze(1))
    top = expected.topk(5, -1)
    torch.testing.assert_close(out.top_logprobs, top.values)
    assert torch.equal(out.top_ids, top.indices)
    assert out.token_ids[0] != logits[0].argmax()
    zero = Sampler()(logits.clone(), params(8, 0.0, all_greedy=True, max_logprobs=0))
    assert zero.top_ids is None and zero.sampled_logprobs is not None


# ---- the seeded noise ---------------------------------------------------------------------------


def lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def reference_exponential(seed: int, position: int, token: int) -> float:
    """Pure-Python model of seeded_exponentials (documents the hash; checks the int64 tensor arithmetic)."""
    row = lowbias32(lowbias32(seed & MASK32) ^ (seed >> 32))
    row = lowbias32((row + position * 0x9E3779B9) & MASK32)
    bits = lowbias32(row ^ ((token * 0x85EBCA6B) & MASK32))
    return -math.log(((bits >> 9) + 0.5) / (1 << 23))


def test_seeded_noise_matches_the_reference_hash():
    seeds = torch.tensor([0, 1, 12345, 2**32 + 7, 2**63 - 1])
    positions = torch.tensor([0, 5, 4095, 1, 123456])
    noise = seeded_exponentials(seeds, positions, 2048)
    for row, (seed, position) in enumerate(zip(seeds.tolist(), positions.tolist())):
        for token in (0, 1, 777, 2047):
            assert noise[row, token].item() == pytest.approx(reference_exponential(seed, position, token), rel=1e-5, abs=1e-6)


def test_the_top_hash_value_draws_the_smallest_exponential_not_zero():
    """Seed 4503 at position 0 hashes token 541 to the top value of 24 bits. Its draw is about 2**-24, the
    smallest; a zero (u = (2**24 - 0.5) / 2**24 rounds to 1.0 in float32) made it win at any probability."""
    row = lowbias32(lowbias32(4503))
    assert lowbias32(lowbias32(row) ^ ((541 * 0x85EBCA6B) & MASK32)) >> 8 == 2**24 - 1
    noise = seeded_exponentials(torch.tensor([4503]), torch.tensor([0]), 600)
    assert noise[0, 541].item() == pytest.approx(2.0**-24, rel=1e-3) and noise.min() == noise[0, 541]
    logits = torch.zeros(1, 600)
    logits[0, 541] = -40.0
    assert Sampler()(logits, seeded(torch.tensor([4503]), torch.tensor([0]))).token_ids.item() != 541


@pytest.mark.parametrize("vary", ["seed", "position"])
def test_seeded_noise_is_exponential_and_uncorrelated(vary):
    n = 20000
    index = torch.arange(n)
    seeds = index * 7919 + 3 if vary == "seed" else torch.full((n,), 99)
    positions = torch.full((n,), 17) if vary == "seed" else index
    noise = seeded_exponentials(seeds, positions, 64).double()
    # Exp(1) bins of equal probability 1/16, over all n * 64 draws.
    edges = -torch.log1p(-torch.arange(1, 16, dtype=torch.float64) / 16)
    counts = torch.bincount(torch.bucketize(noise.flatten(), edges), minlength=16).double()
    expected = noise.numel() / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < chi2_bound(15)
    # Neighbouring tokens, and neighbouring seeds / positions, are uncorrelated.
    bound = 5 / math.sqrt(n)
    assert abs(torch.corrcoef(torch.stack([noise[:, 0], noise[:, 1]]))[0, 1]) < bound
    assert abs(torch.corrcoef(torch.stack([noise[:-1, 5], noise[1:, 5]]))[0, 1]) < bound


@pytest.mark.parametrize("vary", ["seed", "position"])
def test_seeded_frequencies_match_probabilities(vary):
    """Each row has its own seed (or one seed at its own position): together they draw from p."""
    n = 40000
    index = torch.arange(n)
    seeds = index + 1000 if vary == "seed" else torch.full((n,), 2024)
    positions = torch.full((n,), 3) if vary == "seed" else index
    tokens = Sampler()(LOGITS.expand(n, -1).clone(), seeded(seeds, positions)).token_ids
    stat, df = chi2(tokens, probs_of(LOGITS))
    assert stat < chi2_bound(df), stat
    nucleus = SamplingTensors(torch.ones(n), top_p=torch.full((n,), 0.55), seed_rows=index, seeds=seeds, positions=positions)
    filtered = Sampler()(LOGITS.expand(n, -1).clone(), nucleus).token_ids
    stat, df = chi2(filtered, allowed_probs(top_p=0.55))
    assert stat < chi2_bound(df), stat


def test_seeded_rows_ignore_the_rest_of_the_batch():
    torch.manual_seed(7)
    logits = torch.randn(6, 500) * 2
    seeds, positions = torch.tensor([11, 12, 13]), torch.tensor([40, 41, 42])
    alone = Sampler()(logits[:3].clone(), seeded(seeds, positions)).token_ids
    rows = torch.tensor([4, 0, 2])
    mixed = SamplingTensors(torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0, 1.0]), seed_rows=rows, seeds=seeds, positions=positions,
                            top_k=torch.tensor([500, 500, 500, 3, 500, 500]))
    batch = torch.stack([logits[1], logits[3], logits[2], logits[4], logits[0], logits[5]])
    out = Sampler()(batch, mixed).token_ids
    assert out[rows].tolist() == alone.tolist()
    same = Sampler()(logits[:1].expand(200, -1).clone(), seeded(torch.full((200,), 5), torch.full((200,), 9))).token_ids
    assert len(set(same.tolist())) == 1


# ---- the engine -----------------------------------------------------------------------------------


def test_greedy_top_k_1_and_tiny_temperature_match_hf(llm, hf, vocab_ids):
    prompts = random_prompts(6, 1, 80, vocab_ids, seed=20)
    settings = [dict(temperature=0.0), dict(temperature=1.0, top_k=1), dict(temperature=1e-6), dict(temperature=0.8, top_k=1, seed=3)]
    for sampling in (SamplingParams(max_tokens=16, **fields) for fields in settings):
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        for prompt, output in zip(prompts, outputs):
            assert output["token_ids"] == hf.greedy(prompt, 16), sampling


def test_seeded_request_is_independent_of_the_batch(tiny_model, llm, hf, vocab_ids):
    prompts = random_prompts(33, 2, 70, vocab_ids, seed=21)
    target = SamplingParams(temperature=0.9, top_k=200, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([prompts[0]], target, use_tqdm=False)[0]["token_ids"]
    others = [
        SamplingParams(temperature=0.0 if i % 8 == 0 else 0.5 + 0.05 * i, seed=i if i % 2 else None, min_p=0.02 * (i % 3),
                       max_tokens=6 + i % 13, ignore_eos=True)
        for i in range(32)
    ]
    batch_prompts = prompts[1:17] + [prompts[0]] + prompts[17:]
    batch_params = others[:16] + [target] + others[16:]
    outputs = llm.generate(batch_prompts, batch_params, use_tqdm=False)
    assert outputs[16]["token_ids"] == alone
    for prompt, sampling, output in zip(batch_prompts, batch_params, outputs):
        if sampling.greedy:
            assert output["token_ids"] == hf.greedy(prompt, sampling.max_tokens, ignore_eos=True)
    chunked = make_llm(tiny_model, scheduling_policy="chunked", max_num_batched_tokens=48, max_num_seqs=5)
    assert chunked.generate(batch_prompts, batch_params, use_tqdm=False)[16]["token_ids"] == alone
    assert alone != hf.greedy(prompts[0], 16, ignore_eos=True)
    reseeded = SamplingParams(temperature=0.9, top_k=200, top_p=0.95, seed=1235, max_tokens=16, ignore_eos=True)
    assert llm.generate([prompts[0]], reseeded, use_tqdm=False)[0]["token_ids"] != alone


@torch.inference_mode()
def test_logprobs_match_hf_logits(llm, hf, vocab_ids):
    prompt = random_prompts(1, 12, 12, vocab_ids, seed=22)[0]
    ids = torch.tensor([prompt])
    reference = hf.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10, eos_token_id=None,
                                  pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    [greedy] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=5), use_tqdm=False)
    assert greedy["token_ids"] == reference.sequences[0, len(prompt):].tolist()
    assert len(greedy["logprobs"]) == 10
    for step, (token, entry) in enumerate(zip(greedy["token_ids"], greedy["logprobs"])):
        expected = reference.logits[step][0].double().log_softmax(-1)
        assert set(entry) == set(expected.topk(5).indices.tolist()) | {token}
        for token_id, logprob in entry.items():
            assert logprob.logprob == pytest.approx(expected[token_id].item(), abs=1e-4)
            assert logprob.rank == 1 + int((expected > expected[token_id]).sum())
            assert logprob.decoded_token == llm.tokenizer.decode([token_id])
    # A sampled run whose likeliest tokens are banned (min_tokens): logprobs still come from the raw logits.
    banned = sorted(set(greedy["token_ids"]))
    sampling = SamplingParams(temperature=1.3, seed=8, max_tokens=10, min_tokens=10, stop_token_ids=banned, logprobs=3)
    [sampled] = llm.generate([prompt], sampling, use_tqdm=False)
    assert not set(sampled["token_ids"]) & set(banned)
    full = torch.tensor([prompt + sampled["token_ids"]])
    expected = hf.model(full).logits[0, len(prompt) - 1 : -1].double().log_softmax(-1)
    for step, (token, entry) in enumerate(zip(sampled["token_ids"], sampled["logprobs"])):
        assert set(entry) == set(expected[step].topk(3).indices.tolist()) | {token}
        for token_id, logprob in entry.items():
            assert logprob.logprob == pytest.approx(expected[step, token_id].item(), abs=1e-4)
        assert entry[token].rank == 1 + int((expected[step] > expected[step, token]).sum())
    assert set(sampled["logprobs"][0]) & set(banned), "the banned greedy token still shows in the top logprobs"
    [zero] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, logprobs=0), use_tqdm=False)
    assert [list(entry) for entry in zero["logprobs"]] == [[token] for token in zero["token_ids"]]
    assert sampled.outputs[0].cumulative_logprob == pytest.approx(sum(entry[t].logprob for t, entry in zip(sampled["token_ids"], sampled["logprobs"])))
    unasked = llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert unasked["logprobs"] is None and unasked.outputs[0].cumulative_logprob is None
