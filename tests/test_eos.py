"""EOS ids: every id that generation_config.json lists (plus the tokenizer's) ends generation and is banned below min_tokens."""
from __future__ import annotations

import json
import shutil

import torch
from conftest import HFOracle, make_llm, random_prompts

from nanovllm import SamplingParams
from nanovllm.testing import EOS_TOKEN_ID
from nanovllm.utils.generation_config import eos_token_ids, read_generation_config


def with_eos(tiny_model: str, folder, eos: list[int]) -> str:
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    return str(folder)


def first_new_tokens(tokens: list[int]) -> list[tuple[int, int]]:
    """(index, token) of each token at its first occurrence."""
    seen: set[int] = set()
    return [(i, t) for i, t in enumerate(tokens) if not (t in seen or seen.add(t))]


def test_reader_unions_generation_config_and_tokenizer(tiny_model, tmp_path):
    path = with_eos(tiny_model, tmp_path / "two", [7, 9])
    assert eos_token_ids(read_generation_config(path), EOS_TOKEN_ID) == {7, 9, EOS_TOKEN_ID}
    assert eos_token_ids(read_generation_config(tiny_model), None) == {EOS_TOKEN_ID}
    (tmp_path / "two" / "generation_config.json").unlink()
    assert read_generation_config(path) == {}
    assert eos_token_ids({}, None, 5) == {5}


def test_generation_stops_on_either_listed_eos(tiny_model, tmp_path, vocab_ids):
    prompt = random_prompts(1, 30, 30, vocab_ids, seed=7)[0]
    full = make_llm(tiny_model).generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]["token_ids"]
    assert EOS_TOKEN_ID not in full[:12]
    firsts = [(i, t) for i, t in first_new_tokens(full) if 2 <= i < 12]
    (i, a), (j, b) = firsts[0], firsts[-1]
    unused = next(t for t in range(3, vocab_ids) if t not in full)
    for eos, stop_at in (([a, b], i), ([unused, b], j)):
        path = with_eos(tiny_model, tmp_path / f"eos{stop_at}", eos)
        [out] = make_llm(path).generate([prompt], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
        assert out["token_ids"] == full[: stop_at + 1] and out["finish_reason"] == "stop"
    path = with_eos(tiny_model, tmp_path / "banned", [a, b])
    [out] = make_llm(path).generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, min_tokens=j + 1), use_tqdm=False)
    hf = HFOracle(path).model
    ids = torch.tensor([prompt])
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24, min_new_tokens=j + 1,
                           eos_token_id=[EOS_TOKEN_ID, a, b], pad_token_id=0)[0, len(prompt):].tolist()
    assert out["token_ids"] == expected and len(out["token_ids"]) > j
    assert a not in out["token_ids"][: j + 1] and b not in out["token_ids"][: j + 1]
