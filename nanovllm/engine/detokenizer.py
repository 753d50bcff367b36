"""Incremental detokenization that never splits a multi-byte character, and stop-string handling."""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast


class IncrementalDetokenizer:
    """Turns a growing list of completion token ids into text deltas.

    Text is emitted only up to the last position where the decoded bytes form complete characters
    (a trailing U+FFFD means a character is still incomplete), so the deltas concatenate to the
    decoding of all tokens. Special tokens are skipped unless `skip_special_tokens=False`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust backend decodes the same text without transformers' Python layer (about
        # 1.2 vs 3.2 us a call on the CPU box); this runs twice per token of every streamed sequence.
        self._backend = tokenizer._tokenizer if isinstance(tokenizer, PreTrainedTokenizerFast) else None
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Append tokens; return the newly complete text (everything left when `final`)."""
        return add_all([self], [token_ids], [final])[0]

    def _extend(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """Append tokens; the two windows to decode: the text already read, and that text plus the new tokens."""
        self.token_ids.extend(token_ids)
        return self.token_ids[self.prefix_offset : self.read_offset], self.token_ids[self.prefix_offset :]

    def _advance(self, prefix_text: str, new_text: str, final: bool) -> str:
        """Take the decodings of the two windows of `_extend`; return the new complete text."""
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta


def add_all(detokenizers: list[IncrementalDetokenizer], token_lists: list[list[int]], finals: list[bool]) -> list[str]:
    """`detokenizers[i].add(token_lists[i], finals[i])` for every i, with the decodes of those sharing a fast
    tokenizer and skip_special_tokens in one batched call to its Rust backend (a streaming engine decodes
    two windows of every stream every step; one call per window costs more than the decoding)."""
    windows = [d._extend(token_ids) for d, token_ids in zip(detokenizers, token_lists)]
    texts: list[tuple[str, str] | None] = [None] * len(detokenizers)
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, d in enumerate(detokenizers):
        if d._backend is None:
            texts[i] = tuple(d.tokenizer.decode(w, skip_special_tokens=d.skip_special_tokens, clean_up_tokenization_spaces=False) for w in windows[i])
        else:
            groups.setdefault((id(d._backend), d.skip_special_tokens), []).append(i)
    for (_, skip), rows in groups.items():
        decoded = detokenizers[rows[0]]._backend.decode_batch([w for i in rows for w in windows[i]], skip_special_tokens=skip)
        for k, i in enumerate(rows):
            texts[i] = decoded[2 * k], decoded[2 * k + 1]
    return [d._advance(*text, final) for d, text, final in zip(detokenizers, texts, finals)]


def find_stop(text: str, stops: tuple[str, ...], include: bool, search_from: int) -> tuple[str, str] | None:
    """(`text` cut before the earliest stop string that ends after `search_from`, or after it with
    `include`; that stop string), or None when there is none."""
    hits = [(i, s) for s in stops if (i := text.find(s, max(0, search_from - len(s) + 1))) != -1]
    if not hits:
        return None
    at, stop = min(hits)
    return text[: at + len(stop) if include else at], stop
