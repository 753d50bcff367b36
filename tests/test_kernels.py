"""Tests of the Triton kernels in nanovllm.kernels against plain PyTorch references.

They need a CUDA device and are skipped without one. With TRITON_INTERPRET=1 set in the
environment (before Python starts) they also run on CPU tensors through Triton's
interpreter, except the CUDA-graph test.
"""

import math
import os

import pytest
import torch

TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-4}


def _device(dtype: torch.dtype = torch.float32) -> torch.device:
    """The device the kernels run on; skips the test where there is none."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a CUDA device")
    if dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly")
    return torch.device("cpu")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def _paged_cache(
    seq_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches with shuffled block ids, and the -1 padded block table.

    Each sequence owns cdiv(seq_len, block_size) blocks. Spare blocks and
    the slots past each sequence's length are NaN, so any read of them shows in the output.
    """
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    max_blocks = max(max(blocks_per_seq), 1)
    num_blocks = sum(blocks_per_seq) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    perm = torch.randperm(num_blocks).tolist()
    block_tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    for b, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        ids = [perm.pop() for _ in range(nb)]
        block_tables[b, :nb] = torch.tensor(ids, dtype=torch.int32)
        flat_k = k_cache[ids].view(-1, num_kv_heads, head_dim)
        flat_v = v_cache[ids].view(-1, num_kv_heads, head_dim)
        flat_k[:n] = torch.randn(n, num_kv_heads, head_dim, device=device).to(dtype)
        flat_v[:n] = torch.randn(n, num_kv_heads, head_dim, device=device).to(dtype)
        k_cache[ids] = flat_k.view(nb, block_size, num_kv_heads, head_dim)
        v_cache[ids] = flat_v.view(nb, block_size, num_kv_heads, head_dim)
    return k_cache, v_cache, block_tables.to(device)


def _strided_q(
    num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """q as a non-contiguous view into a fused qkv projection output."""
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, device=device).to(dtype)
    return qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)


def _reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: list[int],
    seq_lens: list[int],
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """float64 causal attention over the paged cache; rows past cu_seqlens_q[-1] are zero."""
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.zeros(num_tokens, num_q_heads, head_dim, dtype=torch.float64, device=q.device)
    for b, seq_len in enumerate(seq_lens):
        q_lo, q_hi = cu_seqlens_q[b], cu_seqlens_q[b + 1]
        q_len = q_hi - q_lo
        if q_len == 0 or seq_len == 0:
            continue
        blocks = block_tables[b, : math.ceil(seq_len / block_size)].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].double()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].double()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q_lo:q_hi].double(), k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[q_lo:q_hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


VARLEN_CASES = [
    (torch.bfloat16, 256, 128, 2),
    (torch.bfloat16, 16, 64, 4),
    (torch.bfloat16, 64, 128, 1),
    (torch.float16, 16, 128, 1),
    (torch.float16, 64, 64, 2),
    (torch.float16, 256, 128, 4),
    (torch.float32, 16, 64, 2),
    (torch.float32, 64, 128, 4),
    (torch.float32, 256, 64, 1),
]


@pytest.mark.cuda
@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("dtype,block_size,head_dim,group", VARLEN_CASES)
def test_paged_attention_varlen_mixed(dtype: torch.dtype, block_size: int, head_dim: int, group: int, ordered: bool) -> None:
    """Unordered, and with the decode rows' programs started longest sequence first."""
    torch.manual_seed(block_size * head_dim + group)
    num_kv_heads = 2
    num_q_heads = num_kv_heads * group
    # (cached context, new tokens): prefills ending mid-block and on a boundary, prefill
    # chunks over cached prefixes, decodes (one ending on a boundary) and an idle sequence.
    batch = [
        (0, 37),
        (0, block_size),
        (2 * block_size, block_size // 2 + 3),
        (101, 1),
        (block_size - 1, 1),
        (300, 75),
        (50, 0),
        (0, 1),
        (5, 200),
    ]
    _check_varlen(batch, dtype, block_size, head_dim, num_kv_heads, num_q_heads, padding=3, ordered=ordered)


@pytest.mark.cuda
def test_paged_attention_varlen_many_sequences() -> None:
    """More sequences than one vector load of the kernel's sequence lookup covers."""
    torch.manual_seed(300)
    q_lens = torch.randint(0, 5, (300,)).tolist()
    q_lens[-1] = 70
    contexts = torch.randint(0, 40, (300,)).tolist()
    _check_varlen(list(zip(contexts, q_lens)), torch.float16, 16, 64, num_kv_heads=2, num_q_heads=4, padding=0, ordered=True)


def _check_varlen(
    batch: list[tuple[int, int]], dtype: torch.dtype, block_size: int, head_dim: int, num_kv_heads: int, num_q_heads: int, padding: int,
    ordered: bool,
) -> None:
    """Run paged_attention_varlen on `batch` ((cached context, new tokens) per sequence) with `padding`
    extra query rows after the last token, and compare with the reference; padding rows stay untouched.
    `ordered`: the decode rows' programs start longest sequence first."""
    device = _device(dtype)
    from nanovllm.kernels.decode_attention import longest_first
    from nanovllm.kernels.paged_attention import paged_attention_varlen

    seq_lens = [c + n for c, n in batch]
    cu = [0]
    for _, n in batch:
        cu.append(cu[-1] + n)
    k_cache, v_cache, block_tables = _paged_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, device)
    num_tokens = cu[-1] + padding
    q = _strided_q(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, device)
    out = torch.full((num_tokens, num_q_heads, head_dim), float("nan"), dtype=dtype, device=device)
    scale = head_dim**-0.5
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)

    paged_attention_varlen(
        q,
        k_cache,
        v_cache,
        out,
        torch.tensor(cu, dtype=torch.int32, device=device),
        lens,
        block_tables,
        max(n for _, n in batch),
        scale,
        longest_first(lens) if ordered else None,
    )
    ref = _reference(q, k_cache, v_cache, cu, seq_lens, block_tables, scale)
    assert not out[: cu[-1]].isnan().any()
    assert out[cu[-1] :].isnan().all()
    assert _rel_err(out[: cu[-1]], ref[: cu[-1]]) <= TOLERANCE[dtype]


DECODE_CASES = [
    # dtype, block_size, head_dim, num_kv_heads, group, batch, max context
    (torch.bfloat16, 256, 128, 2, 2, 1, 3000),
    (torch.bfloat16, 16, 64, 2, 4, 33, 3000),
    (torch.bfloat16, 256, 128, 8, 2, 160, 700),
    (torch.float16, 64, 128, 2, 1, 33, 3000),
    (torch.float16, 256, 64, 2, 4, 1, 3000),
    (torch.float16, 16, 128, 2, 2, 300, 400),
    (torch.float32, 16, 128, 2, 2, 33, 3000),
    (torch.float32, 64, 64, 2, 1, 1, 3000),
    (torch.float32, 256, 128, 1, 4, 5, 1000),
]


def _decode_lens(batch: int, max_context: int, block_size: int) -> list[int]:
    """Random lengths in [1, max_context], with boundaries, length 1 and (for batch > 2) an empty slot."""
    lens = torch.randint(1, max_context + 1, (batch,)).tolist()
    lens[0] = max_context
    if batch > 2:
        lens[1] = 1
        lens[2] = 0
    for i in range(3, batch, 4):
        lens[i] = block_size * max(1, lens[i] // block_size)
    return lens


@pytest.mark.cuda
@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("dtype,block_size,head_dim,num_kv_heads,group,batch,max_context", DECODE_CASES)
def test_paged_attention_decode(
    dtype: torch.dtype, block_size: int, head_dim: int, num_kv_heads: int, group: int, batch: int, max_context: int, ordered: bool
) -> None:
    """Unordered, and with the programs started longest sequence first (each output row must still be its own sequence's)."""
    device = _device(dtype)
    from nanovllm.kernels.decode_attention import longest_first, paged_attention_decode

    torch.manual_seed(batch * block_size + head_dim + group)
    num_q_heads = num_kv_heads * group
    seq_lens = _decode_lens(batch, max_context, block_size)
    k_cache, v_cache, block_tables = _paged_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, device)
    q = _strided_q(batch, num_q_heads, num_kv_heads, head_dim, dtype, device)
    out = torch.full((batch, num_q_heads, head_dim), float("nan"), dtype=dtype, device=device)
    scale = head_dim**-0.5

    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    order = longest_first(lens) if ordered else None
    paged_attention_decode(q, k_cache, v_cache, out, lens, block_tables, scale, order)
    ref = _reference(q, k_cache, v_cache, list(range(batch + 1)), seq_lens, block_tables, scale)
    assert not out.isnan().any()
    assert _rel_err(out, ref) <= TOLERANCE[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("dtype,block_size,head_dim,num_kv_heads,group,batch,max_context", DECODE_CASES)
def test_paged_attention_decode_rotates_and_stores(
    dtype: torch.dtype, block_size: int, head_dim: int, num_kv_heads: int, group: int, batch: int, max_context: int, with_norm: bool
) -> None:
    """With a DecodeRotary the kernel does the rotary kernel's work: q and k as projected are (normed and) rotated,
    k and v land in the new token's slot, and the attention reads them there. The new tokens' slots start as
    NaN, so reading the slot before the store (or any other stale value) shows in the output."""
    device = _device(dtype)
    from nanovllm.kernels.decode_attention import DecodeRotary, longest_first, paged_attention_decode
    from nanovllm.layers.layernorm import RMSNorm
    from nanovllm.layers.rotary_embedding import RotaryEmbedding, inv_freq_and_scale

    torch.manual_seed(batch * block_size + head_dim + group + with_norm)
    num_q_heads = num_kv_heads * group
    seq_lens = _decode_lens(batch, max_context, block_size)
    k_cache, v_cache, block_tables = _paged_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, device)
    slots = [-1 if n == 0 else block_tables[b, (n - 1) // block_size].item() * block_size + (n - 1) % block_size
             for b, n in enumerate(seq_lens)]
    new_slots = torch.tensor([s for s in slots if s >= 0], device=device)
    k_cache.view(-1, num_kv_heads, head_dim)[new_slots] = float("nan")
    v_cache.view(-1, num_kv_heads, head_dim)[new_slots] = float("nan")
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(batch, q_size + 2 * kv_size, device=device).to(dtype)
    q, k, v = (x.view(batch, -1, head_dim) for x in qkv.split([q_size, kv_size, kv_size], dim=-1))
    positions = torch.tensor([max(n - 1, 0) for n in seq_lens], device=device)
    rope = RotaryEmbedding(inv_freq_and_scale(head_dim, {"rope_type": "default", "rope_theta": 1e6}, 4096, 4096)[0], 4096).to(device)
    norms = [RMSNorm(head_dim, eps=1e-6).to(device=device, dtype=dtype) for _ in range(2)] if with_norm else []
    for norm in norms:
        norm.weight.data = (1 + 0.5 * torch.randn(head_dim, device=device)).to(dtype)
    ref_q, ref_k = rope(positions, norms[0].forward_native(q), norms[1].forward_native(k)) if with_norm else rope(positions, q, k)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    stored = torch.tensor(slots, device=device) >= 0
    expected_k.view(-1, num_kv_heads, head_dim)[new_slots] = ref_k[stored]
    expected_v.view(-1, num_kv_heads, head_dim)[new_slots] = v[stored]
    qkv_before = qkv.clone()
    out = torch.full((batch, num_q_heads, head_dim), float("nan"), dtype=dtype, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    weights = (norms[0].weight, norms[1].weight, norms[0].eps) if with_norm else ()
    rotary = DecodeRotary(k, v, torch.tensor(slots, dtype=torch.int32, device=device), rope.cos_sin, *weights)
    paged_attention_decode(q, k_cache, v_cache, out, lens, block_tables, head_dim**-0.5, longest_first(lens), rotary)

    ref = _reference(ref_q, expected_k, expected_v, list(range(batch + 1)), seq_lens, block_tables, head_dim**-0.5)
    assert not out.isnan().any()
    assert _rel_err(out, ref) <= TOLERANCE[dtype]
    assert torch.equal(qkv, qkv_before)
    assert torch.allclose(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)
    others = torch.ones(k_cache.shape[0] * block_size, dtype=torch.bool, device=device)
    others[new_slots] = False
    flat_k, flat_expected = k_cache.view(-1, num_kv_heads, head_dim), expected_k.view(-1, num_kv_heads, head_dim)
    assert torch.allclose(flat_k[others], flat_expected[others], rtol=0, atol=0, equal_nan=True)
    assert _rel_err(flat_k[new_slots], flat_expected[new_slots]) <= TOLERANCE[dtype]


def test_longest_first_is_a_permutation_by_descending_length() -> None:
    """The decode kernel's program order: every sequence once (ties and empty padding rows included), longest first."""
    pytest.importorskip("triton")
    from nanovllm.kernels.decode_attention import longest_first

    for lens in ([5], [0, 7, 7, 300, 1, 0, 299], list(range(513))):
        order = longest_first(torch.tensor(lens, dtype=torch.int32))
        assert order.dtype == torch.int64 and sorted(order.tolist()) == list(range(len(lens)))
        assert [lens[i] for i in order.tolist()] == sorted(lens, reverse=True)


@pytest.mark.cuda
def test_paged_attention_decode_cuda_graph() -> None:
    device = _device()
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    from nanovllm.kernels.decode_attention import longest_first, paged_attention_decode

    torch.manual_seed(7)
    dtype, block_size, head_dim, num_kv_heads, num_q_heads, batch = torch.bfloat16, 64, 128, 2, 4, 6
    capacity = 2000
    scale = head_dim**-0.5
    seq_lens = _decode_lens(batch, capacity, block_size)
    k_cache, v_cache, block_tables = _paged_cache(
        [capacity] * batch, block_size, num_kv_heads, head_dim, dtype, device
    )
    q = _strided_q(batch, num_q_heads, num_kv_heads, head_dim, dtype, device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    out = torch.full((batch, num_q_heads, head_dim), float("nan"), dtype=dtype, device=device)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_attention_decode(q, k_cache, v_cache, out, lens, block_tables, scale, longest_first(lens))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the order is captured too: each replay sorts the lengths it finds
        paged_attention_decode(q, k_cache, v_cache, out, lens, block_tables, scale, longest_first(lens))

    for _ in range(2):
        seq_lens = _decode_lens(batch, capacity, block_size)
        lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, device=device).to(dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(q, k_cache, v_cache, list(range(batch + 1)), seq_lens, block_tables, scale)
        assert not out.isnan().any()
        assert _rel_err(out, ref) <= TOLERANCE[dtype]
