"""The tiny local text encoder: its tokenizer reads the vocabulary nanscope writes, on transformers 4.x and 5.x.

transformers 5 ignores `BertTokenizerFast(vocab_file=...)` and builds an empty vocabulary (every word [UNK]),
so the expected ids here come from the vocabulary list itself, not from a tokenizer.
"""

from __future__ import annotations

import pytest

from nanscope.stacks.groundingdino.demo import demo_batch, long_caption
from nanscope.stacks.tiny_text import SPECIAL_IDS, build_vocab


@pytest.fixture(scope="module")
def tokenizer(demo_files):
    from transformers import AutoTokenizer  # what groundingdino's get_tokenlizer calls

    return AutoTokenizer.from_pretrained(str(demo_files.text_encoder))


def expected_ids(caption: str) -> list[int]:
    """[CLS] + the vocabulary index of each lower-cased word or '.' + [SEP] (every demo word is in the vocab)."""
    vocab = build_vocab()
    words = caption.lower().replace(".", " . ").split()
    return [SPECIAL_IDS["[CLS]"], *[vocab.index(w) for w in words], SPECIAL_IDS["[SEP]"]]


def test_demo_caption_ids(tokenizer) -> None:
    ids = tokenizer("cat . dog .")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and ids[2] == ids[4] == 1012
    assert ids == expected_ids("cat . dog .")
    assert 100 not in ids  # no [UNK]


def test_every_demo_caption_tokenizes_word_by_word(tokenizer) -> None:
    captions = [*demo_batch(0, long=False)["captions"], long_caption()[0], "A Photo of a ZEBRA ."]
    for caption in captions:
        assert tokenizer(caption)["input_ids"] == expected_ids(caption), caption


def test_groundingdinos_special_tokens(tokenizer) -> None:
    # groundingdino splits sub-sentences at these ids (GroundingDINO.specical_tokens)
    assert tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"]) == [101, 102, 1012, 1029]
    assert tokenizer.is_fast  # char_to_token, which positive maps need
