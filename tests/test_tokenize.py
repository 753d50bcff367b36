"""tokenize() on token-id prompts: the fast path for plain in-range ints and the per-id checks behind it
give the same results and the same errors, wherever in a long prompt the bad id sits."""
import re

import numpy as np
import pytest

from nanovllm.engine.requests import tokenize

VOCAB = 1000
LONG = [7, 999, 0, 500] * 150  # 600 ids, both ends of the vocabulary included


def test_in_range_ids_come_back_as_a_new_list():
    result = tokenize(None, LONG, VOCAB)
    assert result == LONG and result is not LONG
    assert tokenize(None, tuple(LONG), VOCAB) == LONG


def test_numpy_ids_become_python_ints():
    result = tokenize(None, list(np.array(LONG, dtype=np.int64)), VOCAB)
    assert result == LONG and all(type(token_id) is int for token_id in result)


@pytest.mark.parametrize("bad, error, message", [
    (-1, ValueError, f"token id -1 is outside the vocabulary [0, {VOCAB})"),
    (VOCAB, ValueError, f"token id {VOCAB} is outside the vocabulary [0, {VOCAB})"),
    (10**30, ValueError, f"token id {10**30} is outside the vocabulary [0, {VOCAB})"),
    (True, TypeError, "a token id must be an int, got True (bool)"),
    (3.0, TypeError, "a token id must be an int, got 3.0 (float)"),
    ("7", TypeError, "a token id must be an int, got '7' (str)"),
])
@pytest.mark.parametrize("position", [0, 300, -1])
def test_a_bad_id_anywhere_in_a_long_prompt_is_refused_by_name(bad, error, message, position):
    prompt = list(LONG)
    prompt[position] = bad
    with pytest.raises(error, match=re.escape(message)):
        tokenize(None, prompt, VOCAB)


def test_the_first_bad_id_is_the_one_named():
    with pytest.raises(ValueError, match=re.escape("token id 2000 is outside")):
        tokenize(None, [1, 2000, -5, 3], VOCAB)
