"""Phrases and character spans -> token positive maps, with what truncation cut.

Follows groundingdino's `create_positive_map_from_span` (char_to_token with the beg+1, beg+2, end-2,
end-3 fallbacks) but keeps the map binary and records, per box, the token positions that fall past
`max_text_len` (the model truncates its input there; groundingdino silently drops them). A target
with neither phrases nor spans uses the trainer's own positive map (binarized, > 0), its phrase being
the text of its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from nanscope.replay.batch import Batch

MAX_TEXT_LEN = 256  # groundingdino pads logits to this many columns and truncates captions to it


@dataclass(frozen=True)
class BoxTokens:
    """The tokens of one target box (positions index the untruncated tokenization)."""

    box: int
    phrase: str  # the phrase, or the caption text under the spans
    spans: tuple[tuple[int, int], ...]
    found: bool  # False when the phrase does not occur in the caption
    tokens: tuple[int, ...]  # all token positions of the spans
    max_text_len: int

    @property
    def kept(self) -> tuple[int, ...]:
        return tuple(t for t in self.tokens if t < self.max_text_len)

    @property
    def cut(self) -> tuple[int, ...]:
        return tuple(t for t in self.tokens if t >= self.max_text_len)


@dataclass(frozen=True)
class TextInfo:
    """One image's caption as the model sees it."""

    caption: str
    input_ids: tuple[int, ...]  # untruncated, with [CLS] and [SEP]
    tokens: tuple[str, ...]  # decoded token strings, same length
    boxes: tuple[BoxTokens, ...]
    positive_map: torch.Tensor  # [N, max_text_len] float 0/1
    max_text_len: int

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def truncated(self) -> bool:
        return self.num_tokens > self.max_text_len

    def token_text(self, pos: int) -> str:
        return self.tokens[pos] if 0 <= pos < len(self.tokens) else "[PAD]"


def _find_phrase(caption: str, phrase: str) -> tuple[tuple[int, int], ...]:
    """First occurrence (as Open-GroundingDino's `caption.find`), then case-insensitive."""
    beg = caption.find(phrase)
    if beg < 0:
        beg = caption.lower().find(phrase.lower())
    if beg < 0 or not phrase:
        return ()
    return ((beg, beg + len(phrase)),)


def _char_to_token(enc: Any, c: int) -> int | None:
    try:
        return enc.char_to_token(c)
    except Exception:  # out of range characters
        return None


def span_tokens(enc: Any, spans: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Token positions covered by character spans, with groundingdino's fallbacks."""
    out: list[int] = []
    for beg, end in spans:
        b = _char_to_token(enc, beg)
        if b is None:
            b = _char_to_token(enc, beg + 1)
            if b is None:
                b = _char_to_token(enc, beg + 2)
        e = _char_to_token(enc, end - 1)
        if e is None:
            e = _char_to_token(enc, end - 2)
            if e is None:
                e = _char_to_token(enc, end - 3)
        if b is None or e is None:
            continue
        out.extend(range(b, e + 1))
    return tuple(sorted(set(out)))


def _map_tokens(row: torch.Tensor, box: int, tokens: Sequence[str], max_text_len: int) -> BoxTokens:
    """One box of a trainer's own positive map (row [T], > 0 is positive): its tokens, and their text as phrase."""
    positions = tuple(int(p) for p in (row > 0).nonzero().flatten().tolist())
    phrase = " ".join(tokens[p] for p in positions if p < len(tokens)).replace(" ##", "")
    return BoxTokens(box, phrase, (), True, positions, max_text_len)


def build_text_info(tokenizer: Any, batch: Batch, *, max_text_len: int = MAX_TEXT_LEN) -> list[TextInfo]:
    """Tokenize each caption (untruncated) and build its binary positive map [N, max_text_len]."""
    infos = []
    for caption, target in zip(batch.captions, batch.targets):
        enc = tokenizer(caption)
        ids = tuple(int(i) for i in enc["input_ids"])
        toks = tuple(tokenizer.convert_ids_to_tokens(list(ids)))
        n = int(target.boxes.shape[0])
        boxes = []
        pmap = torch.zeros(n, max_text_len)
        for j in range(n):
            if target.spans is None and target.phrases is None and target.positive_map is not None:
                bt = _map_tokens(target.positive_map[j], j, toks, max_text_len)
                pmap[j, list(bt.kept)] = 1.0
                boxes.append(bt)
                continue
            if target.spans is not None:
                spans = target.spans[j]
                phrase = " ".join(caption[b:e] for b, e in spans)
                found = True
            else:
                assert target.phrases is not None
                phrase = target.phrases[j]
                spans = _find_phrase(caption, phrase)
                found = bool(spans)
            tokens = span_tokens(enc, spans)
            bt = BoxTokens(j, phrase, tuple(spans), found, tokens, max_text_len)
            if bt.kept:
                pmap[j, list(bt.kept)] = 1.0
            boxes.append(bt)
        infos.append(TextInfo(caption, ids, toks, tuple(boxes), pmap, max_text_len))
    return infos
