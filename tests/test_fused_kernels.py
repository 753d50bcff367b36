"""The fused Triton kernels (nanovllm.kernels.fused) against the PyTorch layer code they replace.

Kernel tests compare each kernel with the layer's plain-PyTorch path on the same device; the
model test compares the tiny model's hidden states on CUDA (fused path) with those on CPU
(PyTorch path). The kernel tests take the device from the `device` fixture, so they can also be
called directly with CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from transformers import AutoConfig

from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.attention import Attention, AttentionMetadata, TorchBackend
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import RotaryEmbedding, inv_freq_and_scale
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.loader import load_model

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
MAX_POSITIONS = 4096


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda")


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `torch.empty` hand out NaN-filled floating tensors, so an output element a kernel skips shows."""
    empty = torch.empty

    def nan_empty(*args: object, **kwargs: object) -> torch.Tensor:
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)


def fused_module() -> ModuleType:
    """nanovllm.kernels.fused, imported only once a test runs (it needs Triton)."""
    pytest.importorskip("triton")
    from nanovllm.kernels import fused

    return fused


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|; NaN anywhere in `out` gives NaN, which fails every `<=`."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def random_norm(size: int, dtype: torch.dtype, device: torch.device) -> RMSNorm:
    norm = RMSNorm(size, eps=1e-6).to(device=device, dtype=dtype)
    norm.weight.data = (1 + 0.5 * torch.randn(size, device=device)).to(dtype)
    return norm


def strided_rows(num_rows: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Random [num_rows, width] (std 3) whose rows lie width + 48 elements apart."""
    return (3 * torch.randn(num_rows, width + 48, device=device)).to(dtype)[:, :width]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 7, 300])
@pytest.mark.parametrize("hidden_size", [128, 1000, 1024, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype: torch.dtype, num_rows: int, hidden_size: int, with_residual: bool, device: torch.device) -> None:
    fused = fused_module()
    norm = random_norm(hidden_size, dtype, device)
    x = strided_rows(num_rows, hidden_size, dtype, device)
    x_before = x.clone()
    if not with_residual:
        out = fused.rms_norm(x, norm.weight, norm.eps)
        assert rel_err(out, norm.forward_native(x)) <= TOLERANCE[dtype]
    else:
        residual = (3 * torch.randn(num_rows, hidden_size, device=device)).to(dtype)
        ref_out, ref_sum = norm.forward_native(x, residual.clone())
        out, summed = fused.rms_norm(x, norm.weight, norm.eps, residual)
        assert summed is residual
        assert torch.equal(summed, ref_sum)
        assert rel_err(out, ref_out) <= TOLERANCE[dtype]
    assert out.shape == (num_rows, hidden_size) and out.dtype == dtype
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(16, 8), (4, 2), (5, 1)])
def test_qk_norm_rope(
    dtype: torch.dtype, num_tokens: int, head_dim: int, num_q_heads: int, num_kv_heads: int, device: torch.device
) -> None:
    """q and k are views into one fused qkv tensor; the whole tensor is checked (v must not change)."""
    fused = fused_module()
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = (3 * torch.randn(num_tokens, q_size + 2 * kv_size, device=device)).to(dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(num_tokens, num_q_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim)
    q_norm, k_norm = random_norm(head_dim, dtype, device), random_norm(head_dim, dtype, device)
    rope = RotaryEmbedding(inv_freq_and_scale(head_dim, {"rope_type": "default", "rope_theta": 1e6}, MAX_POSITIONS, MAX_POSITIONS)[0], MAX_POSITIONS).to(device)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), device=device)
    ref_q, ref_k = rope(positions, q_norm.forward_native(q), k_norm.forward_native(k))
    v_before = v.clone()
    fused.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, rope.cos_sin, positions, q_norm.eps)
    assert rel_err(q, ref_q) <= TOLERANCE[dtype]
    assert rel_err(k, ref_k) <= TOLERANCE[dtype]
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(32, 8), (28, 4), (5, 1)])
def test_rope(dtype: torch.dtype, num_tokens: int, num_q_heads: int, num_kv_heads: int, device: torch.device) -> None:
    """The rotary alone (families without q/k norms), in place on views of one qkv tensor, against the PyTorch path."""
    fused, head_dim = fused_module(), 128
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = (3 * torch.randn(num_tokens, q_size + 2 * kv_size, device=device)).to(dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(num_tokens, num_q_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim)
    rope = RotaryEmbedding(inv_freq_and_scale(head_dim, {"rope_type": "default", "rope_theta": 5e5}, MAX_POSITIONS, MAX_POSITIONS)[0], MAX_POSITIONS).to(device)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), device=device)
    ref_q, ref_k = rope(positions, q, k)
    v_before = v.clone()
    fused.rope(q, k, rope.cos_sin, positions)
    assert rel_err(q, ref_q) <= TOLERANCE[dtype]
    assert rel_err(k, ref_k) <= TOLERANCE[dtype]
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("block_size", "num_q_heads", "num_kv_heads", "head_dim"), [(256, 16, 8, 128), (16, 4, 2, 64), (64, 5, 1, 128)])
@pytest.mark.parametrize("with_norm", [True, False])
def test_rope_writes_kv_cache(dtype: torch.dtype, block_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int, with_norm: bool,
                              device: torch.device) -> None:
    """With a KVCacheWrite the kernel rotates q in place and writes the rotated k and v into their cache
    slots (the attention layer's KV store): every other slot, k and v stay as they were."""
    fused = fused_module()
    num_tokens, num_blocks = 45, 6
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = (3 * torch.randn(num_tokens, q_size + 2 * kv_size, device=device)).to(dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k, v = q.view(num_tokens, num_q_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim), v.view(num_tokens, num_kv_heads, head_dim)
    norms = (random_norm(head_dim, dtype, device), random_norm(head_dim, dtype, device)) if with_norm else ()
    rope = RotaryEmbedding(inv_freq_and_scale(head_dim, {"rope_type": "default", "rope_theta": 1e6}, MAX_POSITIONS, MAX_POSITIONS)[0], MAX_POSITIONS).to(device)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), device=device)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens].to(torch.int32)
    slots[torch.randperm(num_tokens)[:7]] = -1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype)

    normed = (norms[0].forward_native(q), norms[1].forward_native(k)) if with_norm else (q, k)
    ref_q, ref_k = rope(positions, *normed)
    expected_k, expected_v = k_cache.clone().view(-1, num_kv_heads, head_dim), v_cache.clone().view(-1, num_kv_heads, head_dim)
    keep = (slots >= 0).to(device)
    expected_k[slots[slots >= 0].long()] = ref_k[keep]
    expected_v[slots[slots >= 0].long()] = v[keep]
    k_before = k.clone()
    cache = fused.KVCacheWrite(v, k_cache, v_cache, slots.to(device))
    if with_norm:
        fused.qk_norm_rope(q, k, norms[0].weight, norms[1].weight, rope.cos_sin, positions, norms[0].eps, cache)
    else:
        fused.rope(q, k, rope.cos_sin, positions, cache)
    assert rel_err(q, ref_q) <= TOLERANCE[dtype]
    assert torch.equal(k, k_before)
    assert torch.equal(v_cache.view(-1, num_kv_heads, head_dim), expected_v)
    written = k_cache.view(-1, num_kv_heads, head_dim)
    untouched = torch.ones(written.shape[0], dtype=torch.bool)
    untouched[slots[slots >= 0].long()] = False
    assert torch.equal(written[untouched.to(device)], expected_k[untouched.to(device)])
    assert rel_err(written[slots[slots >= 0].long()], expected_k[slots[slots >= 0].long()]) <= TOLERANCE[dtype]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 7, 300])
@pytest.mark.parametrize("intermediate_size", [128, 1000, 3072, 4096])
def test_silu_and_mul(dtype: torch.dtype, num_rows: int, intermediate_size: int, device: torch.device) -> None:
    fused = fused_module()
    x = strided_rows(num_rows, 2 * intermediate_size, dtype, device)
    out = fused.silu_and_mul(x)
    assert out.shape == (num_rows, intermediate_size) and out.dtype == dtype
    assert rel_err(out, SiluAndMul().forward_native(x)) <= TOLERANCE[dtype]


def test_cuda_graph_replay(device: torch.device) -> None:
    """The three kernels captured in a CUDA graph give the eager results on new inputs."""
    fused = fused_module()
    dtype, num_tokens, hidden_size, head_dim = torch.bfloat16, 9, 256, 64
    norm, q_norm = random_norm(hidden_size, dtype, device), random_norm(head_dim, dtype, device)
    rope = RotaryEmbedding(inv_freq_and_scale(head_dim, {"rope_type": "default", "rope_theta": 1e6}, MAX_POSITIONS, MAX_POSITIONS)[0], MAX_POSITIONS).to(device)
    x = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)
    residual, qk = torch.empty_like(x), torch.empty_like(x)
    positions = torch.empty(num_tokens, dtype=torch.int64, device=device)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = fused.rms_norm(x, norm.weight, norm.eps, residual)
        q = qk.view(num_tokens, 4, head_dim)
        fused.qk_norm_rope(q[:, :2], q[:, 2:], q_norm.weight, q_norm.weight, rope.cos_sin, positions, q_norm.eps)
        return out, fused.silu_and_mul(qk)

    def fill(seed: int) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        for t in (x, residual, qk):
            t.copy_(torch.randn(t.shape, generator=gen, device=device))
        positions.copy_(torch.randint(0, MAX_POSITIONS, positions.shape, generator=gen, device=device))

    fill(0)
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()
    for seed in (1, 2):
        fill(seed)
        graph.replay()
        replayed = [t.clone() for t in (*graph_out, residual, qk)]
        fill(seed)
        eager = [*step(), residual, qk]
        for a, b in zip(replayed, eager):
            assert torch.equal(a, b)


def attention_metadata(cached: list[int], new: list[int], block_size: int, blocks_per_seq: int, device: torch.device) -> AttentionMetadata:
    """Attention metadata for sequences that own blocks [b * blocks_per_seq, (b + 1) * blocks_per_seq)."""
    seq_lens = [c + n for c, n in zip(cached, new)]
    slots = [b * blocks_per_seq * block_size + p for b, (c, n) in enumerate(zip(cached, new)) for p in range(c, c + n)]
    cu_seqlens_q = torch.tensor([0, *new], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    block_tables = torch.arange(len(new) * blocks_per_seq, dtype=torch.int32).view(len(new), blocks_per_seq)
    return AttentionMetadata(
        is_decode=all(n == 1 for n in new),
        cu_seqlens_q=cu_seqlens_q.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        max_seqlen_q=max(new),
        max_seqlen_k=max(seq_lens),
    )


def hidden_states(model: Qwen3ForCausalLM, device: torch.device, steps: list[tuple[list[int], list[int], torch.Tensor]]) -> list[torch.Tensor]:
    """Run `model` (torch attention backend, fresh paged KV cache) over prefill/decode steps of (cached, new, input_ids)."""
    block_size, blocks_per_seq = 16, 32
    backend = TorchBackend()
    for layer in model.modules():
        if isinstance(layer, Attention):
            shape = (len(steps[0][0]) * blocks_per_seq, block_size, layer.num_kv_heads, layer.head_dim)
            layer.backend = backend
            layer.k_cache = torch.zeros(shape, device=device)
            layer.v_cache = torch.zeros(shape, device=device)
    outputs = []
    with torch.inference_mode():
        for cached, new, input_ids in steps:
            positions = torch.cat([torch.arange(c, c + n) for c, n in zip(cached, new)])
            backend.begin_step(attention_metadata(cached, new, block_size, blocks_per_seq, device))
            try:
                outputs.append(model(input_ids.to(device), positions.to(device)).cpu())
            finally:
                backend.end_step()
    return outputs


def loaded_model(path: str) -> Qwen3ForCausalLM:
    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(path), MAX_POSITIONS)
    load_model(model, path)
    return model


def model_steps() -> list[tuple[list[int], list[int], torch.Tensor]]:
    """A prefill of three prompts, then one decode step: (cached, new, input_ids) per step.

    The prompts are short because fp32 rounding noise grows with length: the tiny model's
    hidden states in fp32 and fp64 differ by ~2e-6 (of the max) at these lengths, ~4e-6 at 300.
    """
    gen = torch.Generator().manual_seed(0)
    prompt_lens = [1, 7, 40]
    return [
        ([0, 0, 0], prompt_lens, torch.randint(3, 2048, (sum(prompt_lens),), generator=gen)),
        (prompt_lens, [1, 1, 1], torch.randint(3, 2048, (3,), generator=gen)),
    ]


def test_tiny_model_fused_matches_torch_fp32(tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 hidden states of a prefill and a decode step: CUDA (fused kernels) vs CPU (PyTorch)."""
    fused = fused_module()
    calls: Counter[str] = Counter()

    def counted(name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in ("rms_norm", "qk_norm_rope", "silu_and_mul"):
        monkeypatch.setattr(fused, name, counted(name, getattr(fused, name)))
    cpu_model, cuda_model = loaded_model(tiny_model), loaded_model(tiny_model).to("cuda")
    steps = model_steps()
    expected = hidden_states(cpu_model, torch.device("cpu"), steps)
    assert not calls
    got = hidden_states(cuda_model, torch.device("cuda"), steps)
    layers = len(cuda_model.model.layers)
    assert calls == {"rms_norm": 2 * (2 * layers + 1), "qk_norm_rope": 2 * layers, "silu_and_mul": 2 * layers}
    for out, ref in zip(got, expected):
        assert rel_err(out, ref) <= 1e-5
