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

    def _decode(self, token_ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False)

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Append tokens; return the newly complete text (everything left when `final`)."""
        self.token_ids.extend(token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta


def find_stop(text: str, stops: tuple[str, ...], include: bool, search_from: int) -> tuple[str, str] | None:
    """(`text` cut before the earliest stop string that ends after `search_from`, or after it with
    `include`; that stop string), or None when there is none."""
    hits = [(i, s) for s in stops if (i := text.find(s, max(0, search_from - len(s) + 1))) != -1]
    if not hits:
        return None
    at, stop = min(hits)
    return text[: at + len(stop) if include else at], stop
