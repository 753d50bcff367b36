"""Step-shape logic of the CUDA graph runner (ladders, shape choice, padding) and per-step attention
metadata, on CPU: what decides which graph replays a step and what the padded step looks like."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_llm, random_prompts

from nanovllm import SamplingParams
from nanovllm.engine.graph_runner import MAX_GRAPH_TOKENS, GraphRunner, GraphShape, decode_sizes, token_sizes
from nanovllm.engine.inputs import StepInputs
from nanovllm.layers.attention import TorchBackend


@pytest.mark.parametrize("max_num_seqs", [1, 7, 16, 100, 512])
def test_decode_ladder_covers_every_batch(max_num_seqs):
    sizes = decode_sizes(max_num_seqs)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_num_seqs
    for batch in range(1, max_num_seqs + 1):
        size = next(s for s in sizes if s >= batch)
        assert size - batch < 16 and (batch > 8 or size <= 2 * batch)


@pytest.mark.parametrize("max_tokens", [16, 100, 256, 2048, 8192])
def test_token_ladder_pads_at_most_a_fifth(max_tokens):
    sizes = token_sizes(max_tokens)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_tokens
    for num_tokens in range(257, max_tokens + 1, 7):
        size = next(s for s in sizes if s >= num_tokens)
        assert size - num_tokens <= size / 5


def make_runner(max_num_seqs: int = 8, max_tokens: int = 64, width: int = 4) -> GraphRunner:
    return GraphRunner(torch.nn.Identity(), TorchBackend(), max_num_seqs, max_tokens, width, 1024, 8, torch.float32, torch.device("cpu"))


def test_shape_choice():
    runner = make_runner(max_num_seqs=8, max_tokens=64)
    assert runner.shape_for(3, 3, True) == GraphShape(4, 4, True)
    assert runner.shape_for(9, 9, True) is None  # more sequences than max_num_seqs
    assert runner.shape_for(17, 5, False) == GraphShape(32, 8, False)
    assert runner.shape_for(16, 2, False) == GraphShape(16, 8, False)
    assert runner.shape_for(65, 2, False) is None  # beyond the largest token graph: eager
    assert token_sizes(10**6)[-1] == 10**6 and make_runner(max_tokens=10**6).token_sizes[-1] == MAX_GRAPH_TOKENS


def test_load_pads_a_step_to_its_graph_shape():
    runner = make_runner(max_num_seqs=8, max_tokens=64)
    runner.slot_mapping.fill_(7)
    runner.seq_lens.fill_(9)
    # Two sequences: a 3-token prefill chunk over 5 cached tokens and a decode at position 12.
    inputs = StepInputs(
        input_ids=np.array([11, 12, 13, 14]), positions=np.array([5, 6, 7, 12]), slot_mapping=np.array([5, 6, 7, 28], dtype=np.int32),
        cu_seqlens_q=np.array([0, 3, 4], dtype=np.int32), seq_lens=np.array([8, 13], dtype=np.int32),
        block_tables=np.array([[0, -1], [1, 2]], dtype=np.int32), samples=np.array([True, True]), logits_indices=np.array([2, 3]),
        max_seqlen_k=13,
        is_decode=False, pending_rows=np.zeros(0, dtype=np.int64), pending_src=np.zeros(0, dtype=np.int64),
    )
    shape = runner.shape_for(inputs.num_tokens, inputs.num_seqs, inputs.is_decode)
    assert shape == GraphShape(16, 8, False)
    runner.load(shape, inputs, torch.from_numpy(inputs.input_ids), torch.from_numpy(inputs.positions))
    assert runner.input_ids[:4].tolist() == [11, 12, 13, 14] and runner.positions[:4].tolist() == [5, 6, 7, 12]
    assert runner.slot_mapping[:16].tolist() == [5, 6, 7, 28] + [-1] * 12
    assert runner.cu_seqlens_q[:9].tolist() == [0, 3, 4] + [4] * 6
    assert runner.seq_lens[:8].tolist() == [8, 13] + [0] * 6
    assert runner.block_tables[:2, :2].tolist() == [[0, -1], [1, 2]]
    # Beyond the graph's shape nothing is touched.
    assert runner.slot_mapping[16:].tolist() == [7] * (len(runner.slot_mapping) - 16)


def test_attention_metadata_is_built_once_per_step(tiny_model, monkeypatch):
    """One begin_step per forward pass, and every attention layer of that pass reads that same metadata."""
    llm = make_llm(tiny_model, max_num_batched_tokens=64, max_model_len=256, scheduling_policy="chunked")
    backend = llm.model_runner.backend
    steps, seen = [], []
    begin_step, forward = backend.begin_step, backend.forward
    monkeypatch.setattr(backend, "begin_step", lambda metadata: (steps.append(metadata), begin_step(metadata)))
    monkeypatch.setattr(backend, "forward", lambda *args: (seen.append(backend.metadata), forward(*args))[1])
    launch = llm.model_runner.launch
    launches = []
    monkeypatch.setattr(llm.model_runner, "launch", lambda *args: (launches.append(1), launch(*args))[1])
    llm.generate(random_prompts(5, 30, 120, 500, seed=4), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    layers = len(llm.model_runner.attention_layers)
    assert len(steps) == len(launches) > 1
    assert [id(m) for m in seen] == [id(m) for m in steps for _ in range(layers)]
    assert backend.metadata is None
    llm.exit()
