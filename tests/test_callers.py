"""One engine, many callers, and its life cycle: interleaved streams and generate calls each get exactly
their own tokens, threads are serialized, a folder without a tokenizer is refused (or used with token ids
only), a TP script without the __main__ guard fails fast, and exit() frees the engine for a new one."""
from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest
import torch
from conftest import make_llm, random_prompts
from serving import REPO

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(vocab_ids):
    return random_prompts(4, 5, 40, vocab_ids, seed=50)


def joined(chunks) -> tuple[list[int], str]:
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def test_two_streams_alternated_each_get_their_own_tokens(llm, hf, prompts):
    first, second = llm.stream([prompts[0]], GREEDY), llm.stream([prompts[1]], GREEDY)
    chunks: dict[int, list] = {0: [], 1: []}
    live = {0: first, 1: second}
    while live:
        for key in list(live):
            try:
                chunks[key].append(next(live[key]))
            except StopIteration:
                del live[key]
    for key in (0, 1):
        assert joined(chunks[key])[0] == hf.greedy(prompts[key], 20, ignore_eos=True)
        assert len({c.request_id for c in chunks[key]}) == 1 and chunks[key][-1].finished
    assert chunks[0][0].request_id != chunks[1][0].request_id
    assert llm.is_finished() and not llm.requests


def test_generate_while_a_stream_is_open(llm, hf, prompts):
    stream = llm.stream([prompts[0]], GREEDY)
    head = [next(stream)]
    [out] = llm.generate([prompts[1]], GREEDY, use_tqdm=False)
    assert out["token_ids"] == hf.greedy(prompts[1], 20, ignore_eos=True)
    tokens, text = joined(head + list(stream))
    assert tokens == hf.greedy(prompts[0], 20, ignore_eos=True)
    assert text == llm.tokenizer.decode(tokens, skip_special_tokens=True)
    assert llm.is_finished() and not llm.requests


def test_threads_calling_generate_get_their_own_tokens(llm, hf, vocab_ids):
    batches = [random_prompts(3, 5, 60, vocab_ids, seed=60 + i) for i in range(2)]
    expected = [[hf.greedy(p, 20, ignore_eos=True) for p in batch] for batch in batches]
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = [[o["token_ids"] for o in llm.generate(batches[i], GREEDY, use_tqdm=False)] for _ in range(3)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(2):
        assert results[i] == [expected[i]] * 3
    assert llm.is_finished() and not llm.requests


def test_folder_without_tokenizer(tiny_model, hf, tmp_path, vocab_ids):
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt"))
    with pytest.raises(ValueError, match="no tokenizer.*skip_tokenizer_init=True"):
        make_llm(str(folder))
    llm = make_llm(str(folder), skip_tokenizer_init=True)
    assert llm.eos_token_ids == {hf.eos_token_id} == {2}
    prompt = random_prompts(1, 8, 8, vocab_ids, seed=51)[0]
    [out] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    assert out["token_ids"] == hf.greedy(prompt, 12) and out["text"] == ""
    with pytest.raises(ValueError, match="token-id lists"):
        llm.generate(["hello"], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate([prompt], SamplingParams(stop=["x"]), use_tqdm=False)


def test_exit_frees_the_engine_and_a_new_one_works(tiny_model, hf, prompts):
    first = make_llm(tiny_model)
    kv_cache, model = weakref.ref(first.model_runner.kv_cache), weakref.ref(first.model_runner.model)
    stream = first.stream([prompts[0]], GREEDY)
    next(stream)
    first.exit()
    assert kv_cache() is None and model() is None, "exit() must drop the KV cache and the model while the LLM object lives"
    for call in (lambda: first.generate([prompts[0]], GREEDY), lambda: next(stream), lambda: first.stream([prompts[0]], GREEDY)):
        with pytest.raises(RuntimeError, match="exit"):
            call()
    first.exit()
    second = make_llm(tiny_model)
    assert second.generate([prompts[1]], GREEDY, use_tqdm=False)[0]["token_ids"] == hf.greedy(prompts[1], 20, ignore_eos=True)
    second.exit()


@pytest.mark.cuda
def test_exit_gives_the_gpu_memory_back(tiny_model):
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_reserved()
    for _ in range(2):
        llm = LLM(tiny_model, device="cuda", gpu_memory_utilization=0.5, max_model_len=512)
        assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)[0]["token_ids"]
        llm.exit()
        assert torch.cuda.memory_reserved() - baseline < 256 * 2**20


def test_sampling_params_are_frozen_and_lone_surrogates_are_refused(llm):
    params = SamplingParams(top_p=0.5, logit_bias={3: 1.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.top_p = 0
    with pytest.raises(TypeError):
        params.logit_bias[3] = 50.0
    with pytest.raises(ValueError, match="surrogate"):
        llm.generate(["ok \ud800 then"], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="surrogate"):
        llm.chat([{"role": "user", "content": "\udc00"}], GREEDY, use_tqdm=False)
    assert llm.is_finished() and not llm.requests


def test_tensor_parallel_script_without_main_guard_fails_fast(tiny_model, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        from nanovllm import LLM
        llm = LLM({tiny_model!r}, device="cpu", tensor_parallel_size=2, kvcache_block_size=16,
                  max_model_len=256, max_num_batched_tokens=256, num_kvcache_blocks=32)
        print("started")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert result.returncode != 0 and "started" not in result.stdout
    last_line = result.stderr.strip().splitlines()[-1]
    assert "RuntimeError" in last_line and 'if __name__ == "__main__":' in last_line, result.stderr[-2000:]
    assert elapsed < 40, f"the dead worker was noticed after {elapsed:.0f} s"
    gc.collect()
