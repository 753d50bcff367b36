"""MoE: the router matches HF's; the Triton grouped GEMM (CUDA) equals the PyTorch reference; CUDA graph capture works."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from serving import REPO

from nanovllm.layers.fused_moe import fused_moe_reference, select_experts

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def moe_inputs(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    logits = torch.randn(num_tokens, num_experts, generator=gen) * 2
    weights, ids = select_experts(logits, top_k, renormalize=True)
    return [t.to(device) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights.to(dtype))] + [ids.to(device)]


def test_router_matches_hf():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    for norm in (False, True):
        config = Qwen3MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm)
        router = Qwen3MoeTopKRouter(config)
        torch.nn.init.normal_(router.weight)
        x = torch.randn(10, 32)
        _, expected_weights, expected_ids = router(x)
        weights, ids = select_experts(torch.nn.functional.linear(x, router.weight), 3, norm)
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(weights, expected_weights)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens, num_experts, top_k, hidden, inter", [
    (1, 8, 2, 128, 64), (7, 8, 2, 128, 96), (33, 16, 4, 256, 64), (256, 128, 8, 512, 192), (300, 4, 1, 64, 32),
])
def test_kernel_matches_reference(dtype, num_tokens, num_experts, top_k, hidden, inter):
    from nanovllm.kernels.moe import fused_moe

    args = moe_inputs(num_tokens, num_experts, top_k, hidden, inter, dtype, "cuda")
    expected = fused_moe_reference(*args)
    out = fused_moe(*args)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.cuda
def test_kernel_is_graph_capturable():
    from nanovllm.kernels.moe import fused_moe

    x, w13, w2, weights, ids = moe_inputs(64, 16, 4, 256, 128, torch.bfloat16, "cuda")
    fused_moe(x, w13, w2, weights, ids)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    new = moe_inputs(64, 16, 4, 256, 128, torch.bfloat16, "cuda", seed=1)
    for static, value in zip((x, w13, w2, weights, ids), new):
        static.copy_(value)
    graph.replay()
    torch.testing.assert_close(out, fused_moe_reference(*new), rtol=2e-2, atol=2e-2 * out.abs().max().item())


def test_bandwidth_benchmark_checks_the_interpreted_kernel_on_cpu(tmp_path):
    """benchmarks/moe_bandwidth.py in its smoke mode: the Triton kernel (TRITON_INTERPRET=1) against the
    reference, with the figures of every batch; and its check refuses an output left NaN."""
    from benchmarks.moe_bandwidth import SMOKE, check

    out = tmp_path / "moe.jsonl"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "benchmarks.moe_bandwidth", "--device", "cpu", "--smoke", "--batches", "1,8", "--layers", "1", "--json", str(out)]
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    rows = json.loads(out.read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 8]
    assert rows[0]["experts_touched"] == SMOKE.top_k and 0 < rows[0]["MB"] < rows[1]["MB"]
    assert all(row["kernel_us"] > 0 and row["max_abs_err"] < 1e-4 for row in rows)
    expected = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="differs from the reference"):
        check(torch.full_like(expected, float("nan")), expected, SMOKE, "poisoned")
