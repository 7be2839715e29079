"""Phrases and character spans -> token positive maps, with what truncation cut.

Follows groundingdino's `create_positive_map_from_span` (char_to_token with the beg+1, beg+2, end-2,
end-3 fallbacks) but keeps the map binary and records, per box, the token positions that fall past
`max_text_len` (the model truncates its input there; groundingdino silently drops them). A target
with neither phrases nor spans uses the trainer's own positive map (binarized, > 0), its phrase being
the text of its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

if TYPE_CHECKING:  # torch loads on first use: `nanscope scan` workers need no torch
    import torch

    from nanscope.replay.batch import Batch

MAX_TEXT_LEN = 256  # groundingdino pads logits to this many columns and truncates captions to it


class BoxTokens(NamedTuple):
    """The tokens of one target box (positions index the untruncated tokenization). A named tuple: a scan
    builds one per box of a whole dataset, and a tuple is several times cheaper to make than a frozen dataclass."""

    box: int
    phrase: str  # the phrase, or the caption text under the spans
    spans: tuple[tuple[int, int], ...]
    found: bool  # False when the phrase does not occur in the caption
    tokens: tuple[int, ...]  # all token positions of the spans
    max_text_len: int

    @property
    def kept(self) -> tuple[int, ...]:
        if not self.tokens or self.tokens[-1] < self.max_text_len:  # tokens are sorted: nothing is cut
            return self.tokens
        return tuple(t for t in self.tokens if t < self.max_text_len)

    @property
    def cut(self) -> tuple[int, ...]:
        if not self.tokens or self.tokens[-1] < self.max_text_len:
            return ()
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


def encode(tokenizer: Any, captions: Sequence[str]) -> list[Any]:
    """Untruncated, unpadded encodings (with [CLS]/[SEP]) of `captions`, one `tokenizers.Encoding` each.

    One batched call into the fast tokenizer's Rust backend (`encode_batch`, threaded); when the backend
    still carries padding or truncation from an earlier call (groundingdino calls it with
    padding="longest"), the tokenizer's own call resets them first. Slow tokenizers have no
    `char_to_token` for spans and are refused.
    """
    from nanscope.errors import ConfigError

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "encode_batch"):  # a `tokenizers.Tokenizer` itself
        backend = tokenizer
    if backend is not None and backend.padding is None and backend.truncation is None:
        return backend.encode_batch(list(captions))
    encodings = tokenizer(list(captions)).encodings if captions else []
    if encodings is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; positive maps need "
                          "char_to_token (load it with transformers.AutoTokenizer, use_fast=True)")
    return list(encodings)


def box_tokens(
    enc: Any,
    caption: str,
    *,
    phrases: Sequence[str] | None = None,
    spans: Sequence[Sequence[tuple[int, int]]] | None = None,
    max_text_len: int = MAX_TEXT_LEN,
) -> tuple[BoxTokens, ...]:
    """The tokens of each box of one caption: its character `spans` (tokens_positive) when given, else its
    phrase found with `_find_phrase` (first occurrence, as Open-GroundingDino's `caption.find`)."""
    out = []
    n = len(spans) if spans is not None else len(phrases or ())
    seen: dict[Any, tuple[str, tuple[tuple[int, int], ...], bool, tuple[int, ...]]] = {}  # boxes often share a phrase
    for j in range(n):
        key = tuple(spans[j]) if spans is not None else phrases[j]  # type: ignore[index]
        if key not in seen:
            if spans is not None:
                sp = tuple((int(b), int(e)) for b, e in spans[j])
                phrase, found = " ".join(caption[b:e] for b, e in sp), True
            else:
                assert phrases is not None
                phrase = phrases[j]
                sp = _find_phrase(caption, phrase)
                found = bool(sp)
            seen[key] = (phrase, sp, found, span_tokens(enc, sp))
        phrase, sp, found, toks = seen[key]
        out.append(BoxTokens(j, phrase, sp, found, toks, max_text_len))
    return tuple(out)


def positive_map(boxes: Sequence[BoxTokens], max_text_len: int = MAX_TEXT_LEN) -> torch.Tensor:
    """Binary positive map [N, max_text_len]: 1 at each box's tokens that the model keeps."""
    import torch

    pmap = torch.zeros(len(boxes), max_text_len)
    for j, bt in enumerate(boxes):
        if bt.kept:
            pmap[j, list(bt.kept)] = 1.0
    return pmap


def build_text_info(tokenizer: Any, batch: Batch, *, max_text_len: int = MAX_TEXT_LEN) -> list[TextInfo]:
    """Tokenize the captions (untruncated, one batched call) and build each binary positive map [N, max_text_len]."""
    infos = []
    for caption, target, enc in zip(batch.captions, batch.targets, encode(tokenizer, batch.captions)):
        toks = tuple(enc.tokens)
        if target.spans is None and target.phrases is None and target.positive_map is not None:  # the trainer's map
            boxes = tuple(_map_tokens(target.positive_map[j], j, toks, max_text_len)
                          for j in range(int(target.boxes.shape[0])))
        else:
            boxes = box_tokens(enc, caption, phrases=target.phrases if target.spans is None else None,
                               spans=target.spans, max_text_len=max_text_len)
        infos.append(TextInfo(caption, tuple(enc.ids), toks, boxes, positive_map(boxes, max_text_len), max_text_len))
    return infos
