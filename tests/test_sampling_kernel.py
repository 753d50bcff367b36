"""The fused sampling kernel (nanovllm.kernels.sampling) against a PyTorch reference and against the
distribution it must draw from. Tests take the device from the `device` fixture, so they can also be
called directly with CPU tensors under TRITON_INTERPRET=1."""
from __future__ import annotations

import pytest
import torch
from test_sampling import LOGITS, chi2, chi2_bound, probs_of

from nanovllm.layers.sampler import Sampler, SamplingTensors, seeded_exponentials

pytestmark = pytest.mark.cuda


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda")


def reference(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens the kernel must pick, and per row the gap between the two best reference scores."""
    rows, vocab_size = logits.shape
    noise = seeded_exponentials(torch.full((rows,), seed, device=logits.device), torch.arange(rows, device=logits.device), vocab_size)
    logits = logits.float()
    scores = logits / torch.where(temperatures > 0, temperatures, 1.0)[:, None] - noise.log()
    scores = torch.where(temperatures[:, None] > 0, scores, logits)
    top2 = scores.topk(2, -1).values
    return scores.argmax(-1), top2[:, 0] - top2[:, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab_size", [1000, 4096, 151936])
def test_matches_reference(dtype: torch.dtype, vocab_size: int, device: torch.device) -> None:
    from nanovllm.kernels.sampling import sample

    torch.manual_seed(vocab_size)
    rows = 48
    logits = (torch.randn(rows, vocab_size, device=device) * 4).to(dtype)
    temperatures = torch.tensor([0.0, 0.3, 1.0, 1.7] * (rows // 4), device=device)
    # A greedy tie, also between two blocks' same lane (the kernel reads 4096 tokens a block): the first index wins.
    tied = [7, vocab_size - 3] + ([7 + 4096] if vocab_size > 4096 + 7 else [])
    logits[0, tied] = logits[0].max() + 1
    logits[4, :] = float("-inf")  # everything banned: index 0, like torch.argmax
    seed = 12345 + vocab_size
    tokens = sample(logits, temperatures, seed)
    expected, gap = reference(logits, temperatures, seed)
    assert tokens[0] == 7 and tokens[4] == 0
    greedy = temperatures == 0
    assert torch.equal(tokens[greedy], logits[greedy].argmax(-1))
    # Random rows: the kernel's fast log may flip only a near-tie of the reference.
    differ = (tokens != expected) & (gap > 1e-4)
    assert not differ.any(), (tokens[differ], expected[differ])
    assert (tokens == expected).float().mean() > 0.9


def test_noise_changes_with_the_seed_and_the_row(device: torch.device) -> None:
    from nanovllm.kernels.sampling import sample

    logits = torch.zeros(64, 5000, device=device)
    temperatures = torch.ones(64, device=device)
    first, second = sample(logits, temperatures, 1), sample(logits, temperatures, 2)
    assert len(set(first.tolist())) > 50 and (first != second).sum() > 50


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_match_probabilities(temperature: float, device: torch.device) -> None:
    from nanovllm.kernels.sampling import sample

    rows = 40000
    logits = LOGITS.to(device).expand(rows, -1).contiguous()
    tokens = torch.cat([sample(logits, torch.full((rows,), temperature, device=device), seed) for seed in (3, 4)])
    stat, df = chi2(tokens.cpu(), probs_of(LOGITS / temperature))
    assert stat < chi2_bound(df), stat


def test_frequencies_on_a_large_vocabulary(device: torch.device) -> None:
    """LOGITS spread over a 151936-token vocabulary, every other token impossible: all blocks are read."""
    from nanovllm.kernels.sampling import sample

    rows, vocab_size = 20000, 151936
    ids = torch.linspace(5, vocab_size - 1, 12).long()
    full = torch.full((vocab_size,), float("-inf")).index_put_((ids,), LOGITS)
    tokens = sample(full.to(device, torch.bfloat16).expand(rows, -1).contiguous(), torch.ones(rows, device=device), 99)
    stat, df = chi2(tokens.cpu(), probs_of(full.bfloat16().float()))
    assert stat < chi2_bound(df), stat


def test_sampler_uses_the_kernel_and_honours_banned_tokens(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    from nanovllm.kernels import sampling

    calls = []
    kernel = sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda *args: calls.append(1) or kernel(*args))
    rows = 4000
    logits = LOGITS.to(device).expand(rows, -1).contiguous()
    favourite = int(LOGITS.argmax())
    banned = torch.stack([torch.arange(rows), torch.full((rows,), favourite)]).to(device)
    params = SamplingTensors(torch.full((rows,), 1.0, device=device), banned=banned, any_greedy=False)
    tokens = Sampler()(logits, params).token_ids
    assert calls and not (tokens == favourite).any()
    seeded = SamplingTensors(torch.ones(1, device=device), seed_rows=torch.zeros(1, dtype=torch.long, device=device),
                             seeds=torch.ones(1, dtype=torch.long, device=device), positions=torch.ones(1, dtype=torch.long, device=device))
    calls.clear()
    Sampler()(logits[:1], seeded)
    assert not calls  # seeded rows take the PyTorch path (their noise must not depend on the batch)
