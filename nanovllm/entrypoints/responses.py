"""Log-probabilities in OpenAI's two response shapes. Each entry is (sampled token id, {token id:
logprob} of the top-n tokens and the sampled one), as the engine records them."""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

TokenLogprobs = list[tuple[int, dict[int, float]]]


def completion_logprobs(tokenizer: PreTrainedTokenizerBase, entries: TokenLogprobs, text_offset: int) -> dict:
    """/v1/completions: parallel lists of tokens, their logprobs, the top alternatives and text offsets."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, entry in entries:
        token = tokenizer.decode([token_id])
        tokens.append(token)
        token_logprobs.append(entry[token_id])
        top.append({tokenizer.decode([i]): lp for i, lp in entry.items()})
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _token_entry(tokenizer: PreTrainedTokenizerBase, token_id: int, logprob: float) -> dict:
    token = tokenizer.decode([token_id])
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, entries: TokenLogprobs, num_top: int) -> dict:
    """/v1/chat/completions: one item per token with its `num_top` most likely alternatives."""
    content = []
    for token_id, entry in entries:
        best = sorted(entry.items(), key=lambda item: -item[1])[:num_top]
        item = _token_entry(tokenizer, token_id, entry[token_id])
        item["top_logprobs"] = [_token_entry(tokenizer, i, lp) for i, lp in best]
        content.append(item)
    return {"content": content}
