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


def make_runner(max_num_seqs: int = 8, max_tokens: int = 64, width: int = 4, vocab_size: int | None = None) -> GraphRunner:
    return GraphRunner(torch.nn.Identity(), TorchBackend(), max_num_seqs, max_tokens, width, 1024, 8, torch.float32, torch.device("cpu"),
                       vocab_size=vocab_size)


def test_shape_choice():
    runner = make_runner(max_num_seqs=8, max_tokens=64)
    assert runner.shape_for(3, 3, True) == GraphShape(4, 4, True)
    assert runner.shape_for(9, 9, True) is None  # more sequences than max_num_seqs
    assert runner.shape_for(17, 5, False) == GraphShape(32, 8, False)
    assert runner.shape_for(16, 2, False) == GraphShape(16, 8, False)
    assert runner.shape_for(65, 2, False) is None  # beyond the largest token graph: eager
    assert token_sizes(10**6)[-1] == 10**6 and make_runner(max_tokens=10**6).token_sizes[-1] == MAX_GRAPH_TOKENS


def test_load_pads_a_step_to_its_graph_shape():
    runner = make_runner(max_num_seqs=8, max_tokens=64, vocab_size=32)
    runner.slot_mapping.fill_(7)
    runner.logits_indices.fill_(63)
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
    # The graph's logits rows: the step's, then row 0 for every padding sequence (a stale row could lie past
    # a smaller graph's tokens).
    assert runner.logits_indices.tolist() == [2, 3] + [0] * 6
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


class _ForwardAsGraph:
    """Stands in for a captured graph on CPU: replaying runs the very pass a capture records (`_forward`
    on the runner's static buffers), so the runner's loading, padding and output slicing are what is tested."""

    def __init__(self, runner: GraphRunner, shape: GraphShape) -> None:
        self.runner, self.shape = runner, shape

    def replay(self) -> None:
        self.runner._forward(self.shape)

    def reset(self) -> None:
        pass


def test_graph_path_gives_eager_tokens_and_logprobs(tiny_model):
    """Steps through the graph runner (static buffers, padded shapes, logits computed in the pass for one row
    per sequence, prompt-logprob rows added eagerly) sample what eager steps sample, and score the prompts
    the same."""
    settings = dict(max_num_batched_tokens=64, max_model_len=256, max_num_seqs=8, scheduling_policy="chunked")
    prompts = random_prompts(6, 5, 90, 500, seed=9)
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=2 if i % 3 == 0 else None, logprobs=1)
              for i in range(len(prompts))]
    eager = make_llm(tiny_model, **settings)
    expected = eager.generate(prompts, params, use_tqdm=False)
    eager.exit()
    llm = make_llm(tiny_model, **settings)
    mr = llm.model_runner
    runner = GraphRunner(mr.model, mr.backend, 8, 64, mr.max_blocks_per_seq, 256, llm.config.hf_config.hidden_size,
                         torch.float32, torch.device("cpu"), vocab_size=mr.vocab_size)
    shapes = [GraphShape(t, runner._seqs_for(t), False) for t in runner.token_sizes]
    shapes += [GraphShape(bs, bs, True) for bs in runner.decode_sizes]
    runner.graphs = {shape: _ForwardAsGraph(runner, shape) for shape in shapes}
    mr.graph_runner = runner
    replayed = []
    replay = runner.replay
    runner.replay = lambda shape, *args: (replayed.append(shape), replay(shape, *args))[1]
    got = llm.generate(prompts, params, use_tqdm=False)
    llm.exit()
    assert {s.is_decode for s in replayed} == {True, False}
    assert any(s.num_seqs > 1 and not s.is_decode for s in replayed)
    for a, b in zip(got, expected):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [list(e) for e in a.outputs[0].logprobs] == [list(e) for e in b.outputs[0].logprobs]
        assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
        if a.prompt_logprobs is not None:
            for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
                assert x.keys() == y.keys()
                assert all(abs(x[k].logprob - y[k].logprob) < 1e-4 for k in x)
