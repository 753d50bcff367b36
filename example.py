"""Complete a few sentences, then stream one completion.

    python example.py                 # trains the tiny `tiny-trained` Qwen3 on the built-in text (~15 s on a CPU)
    python example.py --model DIR     # any local Hugging Face Qwen3 folder
"""
from __future__ import annotations

import argparse
import tempfile

from nanovllm import LLM, SamplingParams
from nanovllm.testing import make_checkpoint

PROMPTS = ["The KV cache stores the keys and values", "The scheduler decides", "What is the capital of France?"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="local Hugging Face Qwen3 folder (default: a tiny model trained for seconds on nanovllm.testing's text)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanovllm-example-") as scratch:
        path = args.model or str(make_checkpoint(scratch, "tiny-trained"))
        llm = LLM(path, enforce_eager=True, max_model_len=4096)
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32))
        for prompt, output in zip(PROMPTS, outputs):
            print(f"\nPrompt: {prompt!r}\nCompletion: {output['text']!r} ({output['finish_reason']})")
        print("\nStreaming: Once upon a time,", end="", flush=True)
        for chunk in llm.stream(["Once upon a time,"], SamplingParams(temperature=0, max_tokens=32)):
            print(chunk.text, end="", flush=True)
        print()
        llm.exit()


if __name__ == "__main__":
    main()
