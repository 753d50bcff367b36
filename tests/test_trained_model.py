"""End to end on a model that learned real text: the engine completes the built-in text's sentences, and
example.py prints them."""
from __future__ import annotations

import pathlib
import subprocess
import sys

from conftest import make_llm

from nanovllm import SamplingParams

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "example.py"
# Prompts from nanovllm.testing.TRAINING_TEXT and how that text goes on (the model ends each line with EOS).
COMPLETIONS = {
    "The KV cache stores the keys and values": " of past tokens; without it, every step would recompute the whole prompt.",
    "The scheduler decides": " which sequences run in the next step.",
    "What is the capital of France?": " Paris is the capital of France.",
}


def test_engine_completes_the_training_sentences(trained_model):
    llm = make_llm(trained_model, scheduling_policy="chunked", max_num_batched_tokens=16)
    outputs = llm.generate(list(COMPLETIONS), SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    assert [out["text"] for out in outputs] == list(COMPLETIONS.values())
    assert [out["finish_reason"] for out in outputs] == ["stop"] * 3
    streamed = "".join(chunk.text for chunk in llm.stream(["The KV cache stores the keys and values"], SamplingParams(temperature=0, max_tokens=40)))
    assert streamed == COMPLETIONS["The KV cache stores the keys and values"]
    llm.exit()


def test_example_prints_the_completions(trained_model):
    result = subprocess.run([sys.executable, str(EXAMPLE), "--model", trained_model], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for completion in COMPLETIONS.values():
        assert repr(completion) in result.stdout
    assert "Once upon a time, there was a small engine that wanted to run a very large model." in result.stdout
