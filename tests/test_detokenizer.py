"""Batched incremental detokenization: add_all over many streams equals each stream detokenized alone."""
from __future__ import annotations

import random

from transformers import AutoTokenizer

from nanovllm.engine.detokenizer import IncrementalDetokenizer, add_all

TEXTS = ["你好，世界！推理引擎把训练好的语言模型变成服务。", "KV cache: 键值缓存被切分成固定大小的块。", "The scheduler batches requests."]


def test_add_all_equals_one_stream_at_a_time(tiny_model):
    """Streams of multi-byte text with a special token inside, half of them keeping special tokens, advanced
    a few tokens at a time in random subsets: each batched stream's deltas are those it gets alone."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rng = random.Random(0)
    streams, skips = [], []
    for i in range(9):
        ids = tokenizer.encode(TEXTS[i % 3])
        ids.insert(0, tokenizer.all_special_ids[0])  # (inside, it could split a character for good)
        streams.append(ids)
        skips.append(i % 2 == 0)
    assert tokenizer.decode(streams[0], skip_special_tokens=True) != tokenizer.decode(streams[0], skip_special_tokens=False)
    batched = [IncrementalDetokenizer(tokenizer, skip) for skip in skips]
    alone = [IncrementalDetokenizer(tokenizer, skip) for skip in skips]
    deltas = {"batched": [[] for _ in streams], "alone": [[] for _ in streams]}
    positions = [0] * len(streams)
    while any(p < len(ids) for p, ids in zip(positions, streams)):
        rows = [i for i, ids in enumerate(streams) if positions[i] < len(ids) and rng.random() < 0.8]
        news = []
        for i in rows:
            n = rng.choice([1, 1, 2, 3])
            news.append(streams[i][positions[i] : positions[i] + n])
            positions[i] += n
        finals = [positions[i] >= len(streams[i]) for i in rows]
        for i, delta in zip(rows, add_all([batched[i] for i in rows], news, finals)):
            deltas["batched"][i].append(delta)
        for i, new, final in zip(rows, news, finals):
            deltas["alone"][i].append(alone[i].add(new, final))
    for i, ids in enumerate(streams):
        assert deltas["batched"][i] == deltas["alone"][i]
        assert "".join(deltas["batched"][i]) == batched[i].text == tokenizer.decode(ids, skip_special_tokens=skips[i])
        assert not any("\ufffd" in delta for delta in deltas["batched"][i])
