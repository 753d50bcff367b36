"""Generate from a Qwen3 folder with chat prompts, then stream one answer.

    python example.py                 # builds the tiny random-weight checkpoint in a temp dir
    python example.py --model DIR     # any local Hugging Face Qwen3 folder
"""
from __future__ import annotations

import argparse
import tempfile

from nanovllm import LLM, SamplingParams
from nanovllm.testing import make_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="local Hugging Face Qwen3 folder (default: a tiny random-weight checkpoint)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanovllm-example-") as scratch:
        path = args.model or str(make_checkpoint(scratch, "tiny"))
        llm = LLM(path, enforce_eager=True, max_model_len=4096)
        tokenizer = llm.tokenizer
        questions = ["introduce yourself", "list all prime numbers within 100", "用一句话介绍推理引擎"]
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions
        ]
        outputs = llm.generate(prompts, SamplingParams(temperature=0.6, max_tokens=64, seed=0))
        for prompt, output in zip(prompts, outputs):
            print(f"\nPrompt: {prompt!r}\nCompletion: {output['text']!r} ({output['finish_reason']})")
        print("\nStreaming:", end=" ", flush=True)
        for chunk in llm.stream([prompts[0]], SamplingParams(temperature=0, max_tokens=32)):
            print(chunk.text, end="", flush=True)
        print()
        llm.exit()


if __name__ == "__main__":
    main()
