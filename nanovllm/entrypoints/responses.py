"""Log-probabilities in OpenAI's two response shapes. Each entry is (sampled token id, {token id:
Logprob} of the top-n tokens and the sampled one), as the engine records them: each Logprob carries
its token's text, decoded once by the engine."""
from __future__ import annotations

from nanovllm.outputs import Logprob

TokenLogprobs = list[tuple[int, dict[int, Logprob]]]


def completion_logprobs(entries: TokenLogprobs, text_offset: int) -> dict:
    """/v1/completions: parallel lists of tokens, their logprobs, the top alternatives and text offsets."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, entry in entries:
        token = entry[token_id].decoded_token
        tokens.append(token)
        token_logprobs.append(entry[token_id].logprob)
        top.append({lp.decoded_token: lp.logprob for lp in entry.values()})
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _token_entry(logprob: Logprob) -> dict:
    return {"token": logprob.decoded_token, "logprob": logprob.logprob, "bytes": list(logprob.decoded_token.encode())}


def chat_logprobs(entries: TokenLogprobs, num_top: int) -> dict:
    """/v1/chat/completions: one item per token with its `num_top` most likely alternatives."""
    content = []
    for token_id, entry in entries:
        best = sorted(entry.values(), key=lambda lp: -lp.logprob)[:num_top]
        item = _token_entry(entry[token_id])
        item["top_logprobs"] = [_token_entry(lp) for lp in best]
        content.append(item)
    return {"content": content}
