"""One-pass sampling for rows without filters: temperature, Gumbel-max noise and argmax fused.

For a row with temperature T > 0 the token is ``argmax(logits / T - log E)`` with E ~ Exp(1),
which draws from ``softmax(logits / T)`` (the exponential race of ``nanovllm.layers.sampler``
in the log domain: no softmax pass is needed). A row with T = 0 takes the exact argmax of its
logits, the first index on ties, like ``torch.argmax``. The noise is the counter-based hash of
``nanovllm.layers.sampler.seeded_exponentials`` keyed by (step seed, row, token id): one step's
rows are independent, a new step seed gives new noise, and how the vocabulary is split among
programs does not change it.

The kernel computes that argmax as ``argmax(logits - T ln2 log2(-log2 u))`` (E = -ln u): the score
above times T > 0, plus the row constant T ln(ln2). That needs no division, and T = 0 leaves the
logits exactly, as the noise term is finite (u is strictly inside (0, 1)). ``-log2 u`` must keep its
relative precision for u near 1, the draws that win: within 2**-7 of 1 it is the series of
``-log2(1 - w)`` in ``w = 1 - u`` (exact in fp32), elsewhere the hardware's log2 of u; both logs take
the hardware's approximation (as CUDA's __log2f: absolute error 2**-22 on [0.5, 2], 2 ulp elsewhere).
E is then within a relative 1.4e-5 of the exact draw (checked over all 2**23 values of u), which moves
a score by less than 2e-5: only near-ties can differ from the PyTorch reference. (The accurate log2 of
u, ~20 instructions an element, was most of the kernel's arithmetic.)

The work is hashing and logs, not bytes, so one program per row would leave most of the GPU idle
at decode batch sizes. Each row's vocabulary is split into chunks whose count depends only on the
batch size, the vocabulary size and the SM count (so the launch is CUDA-graph capturable): a first
kernel writes each chunk's best (score, index), a second picks per row the highest score at the
lowest index. The logits are read once.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from nanovllm.kernels.attention_common import sm_count

# Chosen on an H200 (vocab 151936, bf16, 20 launches in a CUDA graph) among 9 settings for the earlier
# per-element math (a division and two accurate logs): the best or tied at every batch; against one program
# per row: 4.8 / 8.5 / 33.5 / 121.0 / 236.8 us at B = 1 / 8 / 64 / 256 / 512 (was 75.6 / 75.9 / 76.2 / 133.2 /
# 256.8 us). Not re-tuned for today's math (hardware logs and the series), which measured 3.3 / 5.1 / 18.0 /
# 34.8 / 65.8 / 133.5 us at B = 1 / 8 / 64 / 128 / 256 / 512 with them (the accurate log2 of u: 3.6 / 6.0 /
# 23.4 / 46.2 / 86.1 / 172.9 us, same device call).
_BLOCK = 1024
_NUM_WARPS = 4
_PROGRAMS_PER_SM = 16
_ONE_LESS_HALF_STEP = tl.constexpr(1.0 - 2.0**-24)
_TOKEN_MULTIPLIER = tl.constexpr(0x85EBCA6B)


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (the same hash as `nanovllm.layers.sampler.mix32`)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _uniform(bits):
    """u = ((bits >> 9) + 0.5) / 2**23 as in `seeded_exponentials`, exactly: the float in [1, 2) with those 23
    mantissa bits, less 1 - 2**-24."""
    return ((bits >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - _ONE_LESS_HALF_STEP


@triton.jit
def _noise_log2(bits, FAST_LOG2: tl.constexpr):
    """log2(-log2 u) of u = `_uniform(bits)`. With FAST_LOG2 -log2 u comes from the series -log2(1 - w) = (w +
    w^2/2 + w^3/3 + ...) / ln2 in w = 1 - u where w < 2**-7 (truncation error below 2**-23 relative), else from
    the hardware's log2 of u (absolute error 2**-22 on a value above 0.011), and the outer log2 is the
    hardware's; without it both are the accurate log2."""
    if FAST_LOG2:
        w = ((0x7FFFFF - (bits >> 9)).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23: 1 - u, exact
        series = w * (1.4426950408889634 + w * (0.7213475204444817 + w * 0.48089834696298783))
        return libdevice.fast_log2f(tl.where(w < 0.0078125, series, -libdevice.fast_log2f(1.0 - w)))
    return tl.log2(-tl.log2(_uniform(bits)))


@triton.jit(do_not_specialize=["seed", "chunk_size", "num_chunks"])
def _chunk_best_kernel(logits_ptr, temperatures_ptr, best_score_ptr, best_index_ptr, seed, logits_stride, vocab_size,
                       chunk_size, num_chunks, BLOCK: tl.constexpr, FAST_LOG2: tl.constexpr):
    """Grid: (B, num_chunks). logits: [B, vocab_size] rows with stride logits_stride; temperatures fp32 [B];
    best_score fp32 and best_index int32 [B, num_chunks]. Program (row, c) reads tokens
    [c * chunk_size, min((c + 1) * chunk_size, vocab_size)); chunk_size is a multiple of BLOCK.
    FAST_LOG2: the logs are the hardware's (compiled kernels only; the interpreter has no libdevice).

    Each lane keeps its best (score, index) over the blocks (strict `>`, so its earliest index
    wins a tie); the lanes are then reduced to the highest score at the lowest index. A chunk
    with no score above -inf (all -inf or NaN) reports (-inf, 0).
    """
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    noise_scale = tl.load(temperatures_ptr + row) * 0.6931471805599453
    key = _mix32(_mix32(seed.to(tl.uint32)))
    key = _mix32(key + row.to(tl.uint32) * 0x9E3779B9)
    base = logits_ptr + row.to(tl.int64) * logits_stride
    chunk_start = chunk * chunk_size
    chunk_end = tl.minimum(chunk_start + chunk_size, vocab_size)
    best_score = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK], tl.int32)
    # The token hash's multiply, token * 0x85EBCA6B mod 2**32, advanced by a block's worth per block: an add.
    lanes = tl.arange(0, BLOCK)
    token_mix = (chunk_start + lanes).to(tl.uint32) * _TOKEN_MULTIPLIER
    # A while loop: Triton 3.6's interpreter cannot take a scalar tensor as a `range` bound under NumPy 2.4.
    start = chunk_start
    while start < chunk_end:
        offs = start + lanes
        logits = tl.load(base + offs, mask=offs < chunk_end, other=float("-inf")).to(tl.float32)
        score = logits - noise_scale * _noise_log2(_mix32(key ^ token_mix), FAST_LOG2)
        better = score > best_score
        best_score = tl.where(better, score, best_score)
        best_index = tl.where(better, offs, best_index)
        start += BLOCK
        token_mix += (BLOCK * _TOKEN_MULTIPLIER) % 2**32
    top = tl.max(best_score, axis=0)
    index = tl.min(tl.where(best_score == top, best_index, vocab_size), axis=0)
    tl.store(best_score_ptr + row * num_chunks + chunk, top)
    tl.store(best_index_ptr + row * num_chunks + chunk, index)


@triton.jit(do_not_specialize=["num_chunks"])
def _pick_kernel(best_score_ptr, best_index_ptr, out_ptr, num_chunks, CHUNKS: tl.constexpr):
    """Grid: (B,). best_score fp32 and best_index int32 [B, num_chunks] -> out int64 [B]: per row the
    highest chunk score at the lowest index (CHUNKS: a power of two >= any num_chunks of the vocabulary)."""
    row = tl.program_id(0)
    offs = tl.arange(0, CHUNKS)
    mask = offs < num_chunks
    scores = tl.load(best_score_ptr + row * num_chunks + offs, mask=mask, other=float("-inf"))
    indices = tl.load(best_index_ptr + row * num_chunks + offs, mask=mask, other=0)
    top = tl.max(scores, axis=0)
    index = tl.min(tl.where(scores == top, indices, 2**31 - 1), axis=0)
    tl.store(out_ptr + row, index.to(tl.int64))


def _chunk_size(num_rows: int, vocab_size: int, device: torch.device) -> int:
    """Tokens per program: whole blocks, as few as give about _PROGRAMS_PER_SM programs per SM over the
    batch (at most one block per program). Depends on static facts only."""
    blocks = max(1, triton.cdiv(vocab_size, _BLOCK))
    chunks = min(blocks, triton.cdiv(_PROGRAMS_PER_SM * sm_count(device), num_rows))
    return triton.cdiv(blocks, chunks) * _BLOCK


def _sample_chunked(logits: torch.Tensor, temperatures: torch.Tensor, seed: int, chunk_size: int) -> torch.Tensor:
    """`sample` with each row split into chunks of chunk_size tokens (a multiple of _BLOCK); the tokens do
    not depend on chunk_size. One compiled variant of each kernel serves every batch size of a vocabulary
    (the chunk counts are not specialised on, the merge's width depends on the vocabulary only), so the
    start-up warm-up compiles all a run uses. (Before, the merge compiled a variant per power of two of the
    chunk count, at first use: mid-run, inside a user's generate.)"""
    num_rows, vocab_size = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows:
        num_chunks = max(1, triton.cdiv(vocab_size, chunk_size))
        best_score = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
        best_index = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
        _chunk_best_kernel[(num_rows, num_chunks)](logits, temperatures, best_score, best_index, seed, logits.stride(0),
                                                   vocab_size, chunk_size, num_chunks, BLOCK=_BLOCK, FAST_LOG2=logits.is_cuda,
                                                   num_warps=_NUM_WARPS)
        max_chunks = triton.cdiv(vocab_size, _BLOCK)
        _pick_kernel[(num_rows,)](best_score, best_index, out, num_chunks, CHUNKS=triton.next_power_of_2(max_chunks), num_warps=1)
    return out


def sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> torch.Tensor:
    """logits [B, V] (fp16/bf16/fp32, unit stride along V); temperatures fp32 [B] (0 = greedy);
    seed in [0, 2**31) picks the noise. Returns int64 token ids [B]. No host synchronisation."""
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed={seed} must be in [0, 2**31)")
    if logits.stride(1) != 1:
        raise ValueError(f"logits need unit stride along the vocabulary, got strides {logits.stride()}")
    num_rows, vocab_size = logits.shape
    return _sample_chunked(logits, temperatures, seed, _chunk_size(max(num_rows, 1), vocab_size, logits.device))
