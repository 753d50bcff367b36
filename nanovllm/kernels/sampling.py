"""One-pass sampling for rows without filters: temperature, Gumbel-max noise and argmax fused.

For a row with temperature T > 0 the token is ``argmax(logits / T - log E)`` with E ~ Exp(1),
which draws from ``softmax(logits / T)`` (the exponential race of ``nanovllm.layers.sampler``
in the log domain: no softmax pass is needed). A row with T = 0 takes the exact argmax of its
logits, the first index on ties, like ``torch.argmax``. The noise is the counter-based hash of
``nanovllm.layers.sampler.seeded_exponentials`` keyed by (step seed, row): one step's rows are
independent, and a new step seed gives new noise. One program per row reads the logits once.
"""

import torch
import triton
import triton.language as tl

_BLOCK = 4096


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (the same hash as `nanovllm.layers.sampler.mix32`)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit(do_not_specialize=["seed"])
def _sample_kernel(logits_ptr, temperatures_ptr, out_ptr, seed, logits_stride, vocab_size, BLOCK: tl.constexpr):
    """Grid: (B,). logits: [B, vocab_size] rows with stride logits_stride; temperatures fp32 [B]; out int64 [B].

    Each lane keeps its best (score, index) over the blocks (strict `>`, so its earliest index
    wins a tie); the lanes are then reduced to the highest score at the lowest index.
    """
    row = tl.program_id(0)
    temperature = tl.load(temperatures_ptr + row)
    greedy = temperature == 0.0
    divisor = tl.where(greedy, 1.0, temperature)
    key = _mix32(_mix32(seed.to(tl.uint32)))
    key = _mix32(key + row.to(tl.uint32) * 0x9E3779B9)
    base = logits_ptr + row.to(tl.int64) * logits_stride
    best_score = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        logits = tl.load(base + offs, mask=offs < vocab_size, other=float("-inf")).to(tl.float32)
        bits = _mix32(key ^ (offs.to(tl.uint32) * 0x85EBCA6B))
        uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        noisy = tl.math.div_rn(logits, divisor) - tl.log(-tl.log(uniform))
        score = tl.where(greedy, logits, noisy)
        better = score > best_score
        best_score = tl.where(better, score, best_score)
        best_index = tl.where(better, offs, best_index)
    top = tl.max(best_score, axis=0)
    index = tl.min(tl.where(best_score == top, best_index, vocab_size), axis=0)
    tl.store(out_ptr + row, index.to(tl.int64))


def sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> torch.Tensor:
    """logits [B, V] (fp16/bf16/fp32, unit stride along V); temperatures fp32 [B] (0 = greedy);
    seed in [0, 2**31) picks the noise. Returns int64 token ids [B]. No host synchronisation."""
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed={seed} must be in [0, 2**31)")
    if logits.stride(1) != 1:
        raise ValueError(f"logits need unit stride along the vocabulary, got strides {logits.stride()}")
    num_rows, vocab_size = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows:
        _sample_kernel[(num_rows,)](logits, temperatures, out, seed, logits.stride(0), vocab_size, BLOCK=_BLOCK, num_warps=8)
    return out
