"""The engine on CUDA: fp32 greedy equals HF, CUDA graphs equal eager, Triton equals the torch backend."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_invariants, random_prompts

from nanovllm import LLM, SamplingParams

pytestmark = pytest.mark.cuda

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def cuda_llm(path: str, **kwargs: object) -> LLM:
    settings = dict(device="cuda", dtype="float32", kvcache_block_size=16, max_model_len=1024, max_num_batched_tokens=2048,
                    num_kvcache_blocks=512, max_num_seqs=64)
    settings.update(kwargs)
    return LLM(path, **settings)


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert_invariants(llm)
    return outputs


@pytest.fixture(scope="module")
def prompts(vocab_ids: int) -> list[list[int]]:
    return random_prompts(20, 1, 300, vocab_ids, seed=11)


def test_triton_fp32_matches_hf(tiny_model, hf, prompts):
    llm = cuda_llm(tiny_model, attention_backend="triton")
    assert llm.runtime.attention_backend == "triton" and llm.runtime.cuda_graphs
    for prompt, tokens in zip(prompts, greedy_tokens(llm, prompts)):
        assert tokens == hf.greedy(prompt, 32, ignore_eos=True)
    llm.exit()


def replayed_shapes(llm: LLM) -> list:
    """Record the graph shape of every replay from now on."""
    runner = llm.model_runner.graph_runner
    shapes, replay = [], runner.replay

    def recording(shape, *args):
        shapes.append(shape)
        return replay(shape, *args)

    runner.replay = recording
    return shapes


@pytest.mark.parametrize("policy", ["chunked", "prefill_first"])
def test_cuda_graphs_equal_eager_and_prefix_hits(tiny_model, prompts, policy):
    """Every step kind replays a graph (decode, prefill, mixed) and gives eager's tokens."""
    shared = [prompts[0][:1] * 40 + p for p in prompts[:8]]
    graphed = cuda_llm(tiny_model, attention_backend="triton", scheduling_policy=policy, max_num_batched_tokens=1024)
    shapes = replayed_shapes(graphed)
    first = greedy_tokens(graphed, prompts + shared)
    again = greedy_tokens(graphed, shared)
    assert graphed.scheduler.block_manager.num_hit_tokens > 0
    assert any(s.is_decode for s in shapes) and any(not s.is_decode for s in shapes)
    graphed.exit()
    eager = cuda_llm(tiny_model, attention_backend="triton", enforce_eager=True, scheduling_policy=policy, max_num_batched_tokens=1024)
    assert not eager.runtime.cuda_graphs
    assert greedy_tokens(eager, prompts + shared) == first
    assert first[len(prompts):] == again
    eager.exit()


def compiled_triton_variants() -> int:
    """Kernel variants Triton has compiled (or loaded) in this process, over every kernel of nanovllm.kernels."""
    import importlib
    import pkgutil

    import triton

    from nanovllm import kernels

    total = 0
    for info in pkgutil.iter_modules(kernels.__path__):
        for obj in vars(importlib.import_module(f"nanovllm.kernels.{info.name}")).values():
            if isinstance(obj, triton.runtime.jit.JITFunction):
                total += sum(len(caches[0]) for caches in obj.device_caches.values())
    return total


def test_no_kernel_compiles_after_start_up(tiny_model, vocab_ids):
    """Start-up compiles every kernel variant a run uses, so no user's generate stalls on a compile: a varied
    run (prompts of 1-300 tokens, 1 to 48 sequences a step, sampled and greedy rows, chunked prefills, then a
    lone request) adds none. (A sampler variant per power of two of its chunk count once compiled mid-run.)"""
    llm = cuda_llm(tiny_model, dtype="bfloat16", attention_backend="triton")
    before = compiled_triton_variants()
    prompts = random_prompts(48, 1, 300, vocab_ids, seed=5)
    params = [SamplingParams(temperature=0.6 if i % 2 else 0.0, max_tokens=1 + (7 * i) % 40, ignore_eos=True) for i in range(48)]
    llm.generate(prompts, params, use_tqdm=False)
    llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    assert before > 0 and compiled_triton_variants() == before
    llm.exit()


def test_auto_backend_on_fp32_is_triton(tiny_model):
    """flash-attn runs fp16/bf16 only: "auto" must not pick it for an fp32 model, installed or not."""
    llm = cuda_llm(tiny_model, enforce_eager=True)
    assert llm.runtime.attention_backend == "triton"
    llm.exit()


@pytest.fixture(scope="module")
def model_hd128(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny checkpoint with head_dim 128 (the size the device's flash-attn wheel is built for)."""
    from nanovllm import testing

    testing.PRESETS["tiny-hd128"] = {**testing.PRESETS["tiny"], "head_dim": 128}
    try:
        return str(testing.make_checkpoint(tmp_path_factory.mktemp("hd128"), "tiny-hd128", dtype="bfloat16"))
    finally:
        del testing.PRESETS["tiny-hd128"]


def step_logits(llm: LLM, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return llm.model_runner.execute(inputs).float()


def backend_step_logits(path: str, backend: str, dtype: str, graphs: bool = False) -> list[torch.Tensor]:
    """Logits of a prefill (4 prompts of 300 tokens), of a mixed step over it (sequences 0 and 1 decode one
    token, 2 and 3 prefill 40 more over their 300 cached tokens), then of a decode step of all four,
    eagerly or replaying graphs."""
    import dataclasses

    import numpy as np

    from nanovllm.engine.inputs import prefill_inputs

    llm = cuda_llm(path, attention_backend=backend, enforce_eager=not graphs, dtype=dtype, kvcache_block_size=256, num_kvcache_blocks=64)
    prefill = prefill_inputs(4, 300, 256)
    prefill.input_ids = np.random.default_rng(0).integers(3, 1900, prefill.input_ids.shape)
    counts = np.array([1, 1, 40, 40])
    mixed = prefill_inputs(4, 340, 256)
    keep = np.concatenate([np.arange(i * 340 + 300, i * 340 + 300 + n) for i, n in enumerate(counts)])
    mixed.input_ids = np.random.default_rng(1).integers(3, 1900, len(keep))
    mixed.positions, mixed.slot_mapping = mixed.positions[keep], mixed.slot_mapping[keep]
    mixed.cu_seqlens_q = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    mixed.seq_lens = (300 + counts).astype(np.int32)
    mixed.logits_indices = (mixed.cu_seqlens_q[1:] - 1).astype(np.int64)
    lens = mixed.seq_lens + 1
    decode = dataclasses.replace(
        mixed, input_ids=np.random.default_rng(2).integers(3, 1900, 4), positions=(lens - 1).astype(np.int64),
        slot_mapping=(np.arange(4) * 512 + lens - 1).astype(np.int32), cu_seqlens_q=np.arange(5, dtype=np.int32),
        seq_lens=lens.astype(np.int32), logits_indices=np.arange(4, dtype=np.int64), max_seqlen_k=int(lens.max()), is_decode=True,
    )
    logits = [step_logits(llm, prefill), step_logits(llm, mixed), step_logits(llm, decode)]
    llm.exit()
    return logits


@pytest.mark.parametrize("backend,graphs", [("triton", False), ("triton", True), ("flash_attn", False), ("flash_attn", True)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_backend_logits_match_torch_reference(model_hd128, backend, graphs, dtype):
    """Half precision: each GPU backend's logits, eager and replayed from graphs, within rounding of
    the torch backend's (greedy tokens of random weights flip on near-ties, so logits are compared)."""
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    reference = backend_step_logits(model_hd128, "torch", dtype)
    for got, ref in zip(backend_step_logits(model_hd128, backend, dtype, graphs), reference):
        assert (got - ref).abs().max() <= 0.03 * ref.abs().max()


def test_flash_attn_backend_runs_graphed(model_hd128):
    """The flash_attn backend under CUDA graphs (decode and token graphs) completes every request."""
    pytest.importorskip("flash_attn")
    llm = cuda_llm(model_hd128, attention_backend="flash_attn", dtype="bfloat16", kvcache_block_size=256, num_kvcache_blocks=64)
    assert llm.runtime.cuda_graphs
    shapes = replayed_shapes(llm)
    outputs = llm.generate(random_prompts(8, 1, 300, 1900, seed=3), GREEDY, use_tqdm=False)
    assert all(len(o["token_ids"]) == 32 for o in outputs) and any(not s.is_decode for s in shapes)
    llm.exit()


def test_preemption_on_gpu(tiny_model, hf, prompts):
    llm = cuda_llm(tiny_model, attention_backend="triton", num_kvcache_blocks=70)
    outputs = greedy_tokens(llm, prompts)
    assert llm.scheduler.num_preemptions > 0
    for prompt, tokens in zip(prompts, outputs):
        assert tokens == hf.greedy(prompt, 32, ignore_eos=True)
    llm.exit()


def test_kv_cache_sized_from_gpu_memory(tiny_model):
    llm = LLM(tiny_model, device="cuda", max_model_len=1024, gpu_memory_utilization=0.3, enforce_eager=True)
    free, total = torch.cuda.mem_get_info()
    kv_bytes = llm.model_runner.kv_cache.nbytes
    assert 0.2 * total < kv_bytes < 0.3 * total
    llm.exit()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_tensor_parallel_two_gpus_matches_tp1(tiny_model, hf, prompts, enforce_eager):
    """NCCL TP=2 (overlap on, so rank 0 broadcasts sampled tokens) equals HF; nothing left after exit."""
    import multiprocessing
    import os

    llm = cuda_llm(tiny_model, attention_backend="triton", tensor_parallel_size=2, enforce_eager=enforce_eager)
    assert llm.runtime.overlap and llm.runtime.cuda_graphs != enforce_eager
    for prompt, tokens in zip(prompts, greedy_tokens(llm, prompts)):
        assert tokens == hf.greedy(prompt, 32, ignore_eos=True)
    llm.exit()
    assert not multiprocessing.active_children()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"nanovllm-{os.getpid()}-")]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_graphed_decode_agrees_with_eager_teacher_forced(tiny_model, vocab_ids, dtype):
    """Half precision, graphs against eager on the same tokens: the log-probability the graphed run gave each
    token it generated equals the eager engine's prompt logprob of that token (teacher forcing), within
    rounding. Separates a defect of the graphed path from rounding, which greedy continuations cannot."""
    from nanovllm import SamplingParams

    prompts = random_prompts(8, 20, 200, vocab_ids, seed=9)
    graphed = cuda_llm(tiny_model, dtype=dtype)
    assert graphed.runtime.cuda_graphs
    outputs = graphed.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0), use_tqdm=False)
    graphed.exit()
    eager = cuda_llm(tiny_model, dtype=dtype, enforce_eager=True)
    forced = eager.generate([p + o.outputs[0].token_ids for p, o in zip(prompts, outputs)],
                            SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    eager.exit()
    diffs = []
    for prompt, output, check in zip(prompts, outputs, forced):
        completion = output.outputs[0]
        for i, token in enumerate(completion.token_ids):
            diffs.append(abs(completion.logprobs[i][token].logprob - check.prompt_logprobs[len(prompt) + i][token].logprob))
    assert max(diffs) <= 0.2, f"largest |graphed - eager| logprob {max(diffs):.3f}, mean {sum(diffs) / len(diffs):.4f}"


@pytest.fixture(scope="module")
def recited_0p6b(tmp_path_factory) -> tuple[str, list[int]]:
    """A Qwen3-0.6B-shaped checkpoint (bf16) trained on CUDA until it recites the checkpoint maker's text
    (one 1350-token sequence), and that text's token ids.

    Why trained: random real-size weights are chaotic in bf16. Measured on an H200 with the `qwen3-0.6b`
    preset: HF's own bf16 forward differs from HF fp32 by 2.4-4.0 nats of log-probability per token on
    the same tokens (ours by 3.8-3.9), so no greedy comparison there can tell a defect from rounding. A
    model that has memorised a text has peaked, stable logits: bf16 rounding rarely flips its argmax,
    while a defect (positions, KV blocks, prefix hits, graphs) breaks the recitation."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from nanovllm.testing import TRAINING_TEXT, make_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("recited"), "qwen3-0.6b")
    ids = AutoTokenizer.from_pretrained(path)(TRAINING_TEXT).input_ids
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config.from_pretrained(path)).cuda().float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    batch = torch.tensor([ids], device="cuda")
    for step in range(400):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 9 and loss.item() < 0.01:
            break
    assert loss.item() < 0.05, f"training stopped at loss {loss.item():.3f} after {step + 1} steps"
    model.to(torch.bfloat16).save_pretrained(path)
    del model, optimizer
    torch.cuda.empty_cache()
    return str(path), ids


def test_bf16_production_path_equals_hf_on_a_trained_checkpoint(recited_0p6b):
    """As users run it (bf16, CUDA graphs, overlap, the default policy, prefix hits) on the Qwen3-0.6B shape:
    greedy tokens equal HF fp32's on at least 15 of 16 prompts x 32 tokens (prompts: the recited text
    cut at 16 lengths from 280 to 1300 tokens, so all share their first KV block)."""
    from transformers import Qwen3ForCausalLM

    path, ids = recited_0p6b
    prompts = [ids[:length] for length in range(280, 1301, 68)]
    llm = LLM(path, max_model_len=2048, gpu_memory_utilization=0.3)
    assert llm.runtime.dtype == torch.bfloat16 and llm.runtime.cuda_graphs and llm.runtime.overlap
    assert llm.config.scheduling_policy == "chunked"
    # The first prompt alone, so that the others find the shared prefix in the cache.
    got = [o["token_ids"] for batch in (prompts[:1], prompts[1:]) for o in llm.generate(batch, GREEDY, use_tqdm=False)]
    assert llm.scheduler.block_manager.num_hit_tokens > 0
    llm.exit()
    hf = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    with torch.inference_mode():
        want = [hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(p):].tolist()
                for p in prompts]
    equal = sum(g == w for g, w in zip(got, want))
    recited = sum(w == ids[len(p) : len(p) + 32] for p, w in zip(prompts, want))
    assert equal >= 15, f"{equal} of 16 continuations equal HF fp32's (HF fp32 recites the text on {recited})"
