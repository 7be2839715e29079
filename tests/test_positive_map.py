"""Positive maps against groundingdino's own create_positive_map_from_span."""

from __future__ import annotations

import torch
from groundingdino.util.vl_utils import create_positive_map_from_span

from nanscope.replay.batch import validate_batch
from nanscope.replay.positive_map import build_text_info


def _batch(caption, phrases=None, spans=None):
    n = len(phrases or spans)
    t = {"boxes": torch.full((n, 4), 0.25)}
    if phrases is not None:
        t["phrases"] = phrases
    if spans is not None:
        t["tokens_positive"] = spans
    return validate_batch({"images": torch.zeros(1, 3, 8, 8), "captions": [caption], "targets": [t]})


def test_spans_match_groundingdino_binarized(demo_replay):
    tok = demo_replay.model.tokenizer
    caption = "a photo of a zebra next to a red car ."
    spans = [[[13, 18]], [[29, 32], [33, 36]], [[2, 7]]]
    info = build_text_info(tok, _batch(caption, spans=spans))[0]
    ref = create_positive_map_from_span(tok(caption), spans, max_text_len=256)
    assert torch.equal(info.positive_map, (ref > 0).float())


def test_phrase_not_in_caption_gives_empty_row(demo_replay):
    info = build_text_info(demo_replay.model.tokenizer, _batch("cat . dog .", phrases=["cat", "giraffe"]))[0]
    assert info.positive_map[0].sum() == 1 and info.positive_map[1].sum() == 0
    assert info.boxes[1].found is False and info.boxes[1].tokens == ()


def test_truncated_tokens_are_recorded_not_dropped(demo_replay):
    tok = demo_replay.model.tokenizer
    caption = " . ".join(["cat"] * 300) + " . dog ."
    info = build_text_info(tok, _batch(caption, phrases=["dog"]))[0]
    n = len(tok(caption)["input_ids"])
    assert info.num_tokens == n and info.truncated
    assert info.boxes[0].cut == (n - 3,)  # 'dog' is the third token from the end: dog . [SEP]
    assert info.positive_map.sum() == 0
