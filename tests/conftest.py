"""Shared fixtures: the tiny checkpoint, HF's greedy oracle, engine factories."""
from __future__ import annotations

import random

import pytest
import torch

from nanovllm import LLM
from nanovllm.testing import make_checkpoint

# One intra-op thread: the CPU box has 2 cores and TP tests run 2 processes; oversubscription makes torch ~100x slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny"))


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The `tiny-trained` checkpoint (about 15 s of training, once per session)."""
    return str(make_checkpoint(tmp_path_factory.mktemp("trained"), "tiny-trained"))


class HFOracle:
    """Greedy continuations from HF transformers' own model class for the checkpoint, in fp32 (memoised)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.eos_token_id = self.model.generation_config.eos_token_id
        self.cache: dict[tuple, list[int]] = {}

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
        key = (tuple(prompt), max_new_tokens, ignore_eos)
        if key not in self.cache:
            ids = torch.tensor([prompt])
            eos = None if ignore_eos else self.eos_token_id
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                                      eos_token_id=eos, pad_token_id=0, min_new_tokens=0)
            self.cache[key] = out[0, len(prompt):].tolist()
        return self.cache[key]


@pytest.fixture(scope="session")
def hf(tiny_model: str) -> HFOracle:
    return HFOracle(tiny_model)


@pytest.fixture(scope="session")
def vocab_ids(tiny_model: str) -> int:
    """Number of ordinary (non-special) token ids of the tiny tokenizer; prompts draw from [3, n)."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tiny_model))


def random_prompts(count: int, low: int, high: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(low, high))] for _ in range(count)]


def make_llm(path: str, **kwargs: object) -> LLM:
    """A CPU engine with small blocks (exercises block boundaries) unless overridden."""
    settings = dict(device="cpu", kvcache_block_size=16, max_model_len=512, max_num_batched_tokens=1024, num_kvcache_blocks=256)
    settings.update(kwargs)
    return LLM(path, **settings)


@pytest.fixture(scope="module")
def llm(tiny_model: str) -> LLM:
    """A CPU engine on the tiny checkpoint with make_llm's settings, one per test module."""
    return make_llm(tiny_model)


def assert_invariants(llm: LLM) -> None:
    llm.scheduler.block_manager.check_invariants(llm.scheduler.live_sequences())
