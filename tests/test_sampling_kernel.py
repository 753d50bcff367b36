"""The fused sampling kernel (nanovllm.kernels.sampling) against a PyTorch reference, against itself with
other chunkings of the vocabulary, and against the distribution it must draw from. Tests take the device
from the `device` fixture, so they can also be called directly with CPU tensors under TRITON_INTERPRET=1
(the last test does that for the chunking tests, so they also run without a GPU)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from test_sampling import LOGITS, chi2, chi2_bound, probs_of

from nanovllm.layers.sampler import Sampler, SamplingTensors, seeded_exponentials

cuda = pytest.mark.cuda


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


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab_size", [1000, 4096, 151936])
def test_matches_reference(dtype: torch.dtype, vocab_size: int, device: torch.device) -> None:
    from nanovllm.kernels.sampling import sample

    torch.manual_seed(vocab_size)
    rows = 48
    logits = (torch.randn(rows, vocab_size, device=device) * 4).to(dtype)
    temperatures = torch.tensor([0.0, 0.3, 1.0, 1.7] * (rows // 4), device=device)
    # A greedy tie, also between two blocks' same lane (4096 tokens is two blocks): the first index wins.
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


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_chunking_picks_the_same_tokens(dtype: torch.dtype, device: torch.device) -> None:
    """Chunks of 1, 2, 4 blocks and one chunk per row give the same tokens, greedy and sampled rows mixed, with a
    ragged last chunk and ties across chunk boundaries (the lowest index wins)."""
    from nanovllm.kernels.sampling import _BLOCK, _sample_chunked

    block, rows, seed = _BLOCK, 24, 777
    vocab_size = 5 * block + 123
    torch.manual_seed(1)
    logits = (torch.randn(rows, vocab_size, device=device) * 4).to(dtype)
    temperatures = torch.tensor([0.0, 0.6, 1.0, 0.0, 1.7, 0.6] * (rows // 6), device=device)
    assert temperatures[[0, 3, 9, 12]].eq(0).all() and temperatures[[1, 7]].gt(0).all()
    top = logits.max() + 1
    logits[0, [block - 1, block, 3 * block + 5, vocab_size - 1]] = top  # either side of the first boundary
    logits[3, [4 * block + 17, 2 * block + 1, vocab_size - 1]] = top  # the later chunks, the ragged one among them
    logits[9, vocab_size - 1] = top  # the best token is the last one, in the ragged chunk
    logits[12] = float("-inf")  # nothing allowed: index 0, like torch.argmax
    logits[1, [4 * block, 2 * block - 1]] = float("inf")  # a sampled row's tie: both score +inf
    logits[7, [block + 3, 5 * block + 1]] = float("inf")
    one_chunk = _sample_chunked(logits, temperatures, seed, 6 * block)
    for blocks_per_chunk in (1, 2, 4):
        tokens = _sample_chunked(logits, temperatures, seed, blocks_per_chunk * block)
        assert torch.equal(tokens, one_chunk), (blocks_per_chunk, tokens, one_chunk)
    assert one_chunk[[0, 3, 9, 12, 1, 7]].tolist() == [block - 1, 2 * block + 1, vocab_size - 1, 0, 2 * block - 1, block + 3]
    greedy = temperatures == 0
    assert torch.equal(one_chunk[greedy], logits[greedy].argmax(-1))
    expected, gap = reference(logits, temperatures, seed)
    differ = (one_chunk != expected) & (gap > 1e-4)
    assert not differ.any(), (one_chunk[differ], expected[differ])


@cuda
def test_sample_splits_rows_by_the_batch_and_the_device(device: torch.device) -> None:
    """The public entry point: one block per program for a lone row, longer chunks for more rows, at least 4
    programs per SM at 256 rows (Qwen3's vocabulary); its tokens are those of one chunk per row."""
    from nanovllm.kernels.attention_common import sm_count
    from nanovllm.kernels.sampling import _BLOCK, _chunk_size, _sample_chunked, sample

    sizes = [_chunk_size(rows, 151936, device) for rows in (1, 8, 64, 256, 512, 4096)]
    assert sizes[0] == _BLOCK and sizes == sorted(sizes) and all(size % _BLOCK == 0 for size in sizes)
    assert 256 * -(-151936 // sizes[3]) >= 4 * sm_count(device)
    rows, vocab_size, seed = 6, 3 * _BLOCK + 7, 31
    assert _chunk_size(rows, vocab_size, device) < vocab_size
    torch.manual_seed(2)
    logits = torch.randn(rows, vocab_size, device=device) * 4
    logits[0, [_BLOCK - 5, 2 * _BLOCK + 3]] = logits[0].max() + 1
    temperatures = torch.tensor([0.0, 0.6, 1.0, 0.0, 0.6, 1.0], device=device)
    tokens = sample(logits, temperatures, seed)
    assert tokens[0] == _BLOCK - 5
    assert torch.equal(tokens, _sample_chunked(logits, temperatures, seed, 4 * _BLOCK))


@cuda
def test_one_compiled_variant_serves_every_batch_size(device: torch.device) -> None:
    """After the engine's warm-up call (2 rows), sampling any batch of the same vocabulary compiles nothing:
    a variant compiled at first use would stall a user's generate mid-run."""
    from nanovllm.kernels import sampling

    vocab_size = 151936
    kernels = (sampling._chunk_best_kernel, sampling._pick_kernel)

    def compiled() -> int:
        return sum(len(caches[0]) for kernel in kernels for caches in kernel.device_caches.values())

    logits = torch.randn(512, vocab_size, device=device).to(torch.bfloat16)
    sampling.sample(logits[:2], torch.tensor([0.0, 1.0], device=device), 0)
    before = compiled()
    for rows in (1, 3, 8, 17, 64, 100, 256, 333, 512):
        sampling.sample(logits[:rows], torch.full((rows,), 0.6, device=device), rows)
    torch.cuda.synchronize()
    assert before > 0 and compiled() == before


@cuda
def test_the_top_hash_value_is_no_sure_win(device: torch.device) -> None:
    """Step seed 4503 hashes row 0's token 541 to the top 24-bit value (see test_sampling.py): its noise is the
    largest Gumbel draw, finite, so a token 1e4 below the rest still loses (a uniform rounded to 1.0 made it +inf)."""
    from nanovllm.kernels.sampling import sample

    logits = torch.zeros(1, 1000, device=device)
    logits[0, 541] = -1e4
    assert sample(logits, torch.ones(1, device=device), 4503).item() != 541


def test_the_chunking_tests_pass_in_the_triton_interpreter() -> None:
    """The reference test (small vocabularies), the two chunking tests and the top hash value on CPU tensors through
    Triton's interpreter (fp32 and fp16: it cannot load bf16), so the split, the reduction and the noise are checked
    without a GPU (the interpreter takes the accurate log2 for the hardware's approximate one)."""
    pytest.importorskip("triton")
    tests = pathlib.Path(__file__).parent
    code = ("import torch, test_sampling_kernel as t; cpu = torch.device('cpu')\n"
            "for vocab_size in (1000, 4096): t.test_matches_reference(torch.float32, vocab_size, cpu)\n"
            "for dtype in (torch.float32, torch.float16): t.test_every_chunking_picks_the_same_tokens(dtype, cpu)\n"
            "t.test_sample_splits_rows_by_the_batch_and_the_device(cpu)\n"
            "t.test_the_top_hash_value_is_no_sure_win(cpu)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tests.parent}{os.pathsep}{tests}"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tests.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@cuda
def test_noise_changes_with_the_seed_and_the_row(device: torch.device) -> None:
    from nanovllm.kernels.sampling import sample

    logits = torch.zeros(64, 5000, device=device)
    temperatures = torch.ones(64, device=device)
    first, second = sample(logits, temperatures, 1), sample(logits, temperatures, 2)
    assert len(set(first.tolist())) > 50 and (first != second).sum() > 50


@cuda
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_match_probabilities(temperature: float, device: torch.device) -> None:
    from nanovllm.kernels.sampling import sample

    rows = 40000
    logits = LOGITS.to(device).expand(rows, -1).contiguous()
    tokens = torch.cat([sample(logits, torch.full((rows,), temperature, device=device), seed) for seed in (3, 4)])
    stat, df = chi2(tokens.cpu(), probs_of(LOGITS / temperature))
    assert stat < chi2_bound(df), stat


@cuda
def test_frequencies_on_a_large_vocabulary(device: torch.device) -> None:
    """LOGITS spread over a 151936-token vocabulary, every other token impossible: all blocks are read."""
    from nanovllm.kernels.sampling import sample

    rows, vocab_size = 20000, 151936
    ids = torch.linspace(5, vocab_size - 1, 12).long()
    full = torch.full((vocab_size,), float("-inf")).index_put_((ids,), LOGITS)
    tokens = sample(full.to(device, torch.bfloat16).expand(rows, -1).contiguous(), torch.ones(rows, device=device), 99)
    stat, df = chi2(tokens.cpu(), probs_of(full.bfloat16().float()))
    assert stat < chi2_bound(df), stat


@cuda
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
