"""Per-sample data checks: boxes, text (from the positive-map tokens), label map and image files.

Each check returns `Hit`s: one code, the box it concerns (None: the whole sample), how many items it
counts (boxes, or tokens for NS102) and the location details. Severities are the catalogue's.
The text checks read `nanscope.positive_map.BoxTokens`, the same objects `inspect` builds, so a box the
scan calls truncated is the box inspect calls truncated when the sample is replayed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from nanscope.replay.positive_map import BoxTokens
from nanscope.scan.captions import Prompt
from nanscope.scan.sample import OD, Sample

MIN_BOX_PX = 1.0  # MMDetection's loaders drop boxes narrower or lower than 1 pixel
CRASHES = "crashes the trainer's loader"  # a hit of this kind is an error whatever its code's severity


@dataclass
class Hit:
    code: str
    box: int | None
    count: int
    where: dict[str, Any] = field(default_factory=dict)
    score: float = 1.0  # "worst examples" rank samples by the sum of their hits' scores


def _r(x: float) -> float | str:
    return round(x, 2) if math.isfinite(x) else str(x)


def box_hits(sample: Sample) -> list[Hit]:
    """NS201 (non-finite, width or height <= 0), NS206 (outside the image, under 1 px), NS205 (duplicates: the same
    label or phrase and the same coordinates), NS204 (no boxes). Boxes are pixel x1, y1, x2, y2."""
    if not sample.boxes:
        return [Hit("NS204", None, 1, {"why": "no boxes"})]
    out: list[Hit] = []
    seen: dict[tuple[Any, ...], int] = {}
    W, H = sample.width, sample.height
    names = sample.labels if sample.mode == OD else sample.phrases
    for j, box in enumerate(sample.boxes):
        x1, y1, x2, y2 = box
        if not (x2 > x1 and y2 > y1):  # also False for NaN
            value = [_r(v) for v in box]
            if not all(math.isfinite(v) for v in box):
                out.append(Hit("NS201", j, 1, {"kind": "non-finite", "value": value}))
            else:
                out.append(Hit("NS201", j, 1, {"kind": "width or height <= 0", "value": value,
                                               "why": f"x2 - x1 = {x2 - x1:.4g}, y2 - y1 = {y2 - y1:.4g}"}))
            continue
        if not all(math.isfinite(v) for v in box):
            out.append(Hit("NS201", j, 1, {"kind": "non-finite", "value": [_r(v) for v in box]}))
            continue
        if W is not None and H is not None and (min(x2, W) - max(x1, 0.0) <= 0 or min(y2, H) - max(y1, 0.0) <= 0):
            out.append(Hit("NS206", j, 1, {"kind": "outside the image", "value": [_r(v) for v in box],
                                           "why": f"no overlap with the {W:g}x{H:g} image"}))
        elif x2 - x1 < MIN_BOX_PX or y2 - y1 < MIN_BOX_PX:
            out.append(Hit("NS206", j, 1, {"kind": "under 1 px", "value": [_r(v) for v in box],
                                           "why": f"{x2 - x1:.3g} x {y2 - y1:.3g} px"}))
        elif W is not None and H is not None and (x1 < 0 or y1 < 0 or x2 > W or y2 > H):
            out.append(_partly_outside(j, box, W, H))
        key = (names[j], box)
        if key in seen:
            out.append(Hit("NS205", j, 1, {"kind": "same label and box", "value": [_r(v) for v in box],
                                           "duplicate_of": sample.annotations[seen[key]]}))
        else:
            seen[key] = j
    return out


def _partly_outside(j: int, box: tuple[float, ...], W: float, H: float) -> Hit:
    """NS206 for a box that overlaps the image but reaches past its edge: Open-GroundingDino trains on it
    unclipped, MMDetection clips it; `outside` is the share of the box's area past the edge."""
    x1, y1, x2, y2 = box
    area = (x2 - x1) * (y2 - y1)
    inside = (min(x2, W) - max(x1, 0.0)) * (min(y2, H) - max(y1, 0.0))
    past = {k: _r(v) for k, v in (("left", -x1), ("top", -y1), ("right", x2 - W), ("bottom", y2 - H)) if v > 0}
    share = 1.0 - inside / area
    return Hit("NS206", j, 1, {"kind": "partly outside the image", "value": [_r(v) for v in box],
                               "outside": round(share, 4), "past_edge_px": past,
                               "why": f"{100 * share:.1f}% of its area lies outside the {W:g}x{H:g} image "
                                      f"({', '.join(f'{v} px past the {k}' for k, v in past.items())})"},
               score=share)


def _word_char(caption: str, i: int) -> bool:
    return 0 <= i < len(caption) and caption[i].isalnum()


def _cuts_word(caption: str, b: int, e: int) -> bool:
    """The span starts or ends inside a word."""
    return (_word_char(caption, b - 1) and _word_char(caption, b)) or (_word_char(caption, e - 1) and _word_char(caption, e))


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def _context(caption: str, b: int, e: int, pad: int = 12) -> str:
    return ("..." if b > pad else "") + caption[max(0, b - pad):e + pad] + ("..." if e + pad < len(caption) else "")


def text_hits(sample: Sample, prompt: Prompt, groups: Sequence[tuple[BoxTokens, Sequence[int]]], num_tokens: int,
              max_text_len: int, *, words_cut: bool | None = None) -> list[Hit]:
    """NS102, NS103, NS104, NS106 and NS207 from the caption the trainer builds and the boxes' tokens.

    groups: (BoxTokens, the boxes it stands for): boxes with the same phrase (or spans) and the same intended
    place share their tokens and their hits (`engine.box_groups`); boxes the prompt drops are in none.
    `words_cut`: whether the tokens past max_text_len hold more than separators and [SEP] (None: whenever
    the caption is longer); a caption that loses only its final ' .' and [SEP] (MMDetection's token budget
    makes such captions) is not NS104."""
    out: list[Hit] = []
    if prompt.crash is not None:  # counted by box_hits' own NS204 (count 0 here): this adds the severity
        out.append(Hit("NS204", None, 0, {"kind": CRASHES, "why": prompt.crash}, score=1e9))
    inside: dict[str, str | None] = {}  # phrase -> a longer name of this caption holding it (computed once)
    for j, why in sorted(prompt.dropped.items()) if prompt.dropped else ():
        if why.startswith("label missing"):
            out.append(Hit("NS207", j, 1, {"label": sample.labels[j], "why": why}))
    for bt, boxes in groups:
        first = len(out)
        _box_text_hits(out, sample, prompt, boxes[0], bt, max_text_len, inside)
        found = out[first:]
        if len(found) == 1:  # the common hit: one per box, its copies made in one pass
            h = found[0]
            out.extend([Hit(h.code, j, h.count, h.where, h.score) for j in boxes[1:]])
        elif found:  # most groups have no hit: no generator per box
            for j in boxes[1:]:
                out.extend(Hit(h.code, j, h.count, h.where, h.score) for h in found)
    placed = {h.box for h in out if h.code == "NS106"} if prompt.same_name else set()
    for j, others in sorted(prompt.same_name.items()):
        if j not in placed and j not in prompt.dropped:
            out.append(Hit("NS106", j, 1, {"phrase": prompt.phrases[j] if prompt.phrases else "",
                                           "kind": "same name as another label-map id", "label": sample.labels[j],
                                           "same_name_ids": list(others),
                                           "why": "the trainer finds a name's first occurrence in the caption "
                                                  "(caption.find) and maps a name to one class index: every box "
                                                  "of these ids trains on one occurrence's tokens and the other "
                                                  "occurrence is never positive"}))
    if prompt.clipped_from is not None:  # checked before tokenizing: only the first characters were tokenized
        out.append(Hit("NS104", None, 1, {"kind": "too long to tokenize", "characters": prompt.clipped_from,
                                          "max_text_len": max_text_len, "why": f"over {len(prompt.caption)} "
                                          "characters: only those were tokenized"}, score=prompt.clipped_from))
    elif num_tokens > max_text_len and (words_cut is None or words_cut):
        cut = [bt.phrase for bt, _ in groups if bt.cut]
        out.append(Hit("NS104", None, 1, {"kind": "this draw", "tokens": num_tokens, "max_text_len": max_text_len,
                                          "phrases_cut": sorted(set(cut))}, score=num_tokens))
    elif prompt.worst_tokens is not None and prompt.worst_tokens > max_text_len:
        out.append(Hit("NS104", None, 1, {"kind": "possible", "tokens": num_tokens, "worst_tokens": prompt.worst_tokens,
                                          "max_text_len": max_text_len,
                                          "why": "fits in this draw; the longest draw of negatives does not"},
                       score=prompt.worst_tokens))
    overflow = ([j for j, why in prompt.dropped.items() if why.startswith("positive caption overflow")]
                if prompt.dropped else [])
    if overflow:
        out.append(Hit("NS104", None, 1, {"kind": "positives dropped", "boxes_dropped": len(overflow),
                                          "max_text_len": max_text_len,
                                          "why": prompt.dropped[overflow[0]]}, score=max_text_len + len(overflow)))
    return out


def _box_text_hits(out: list[Hit], sample: Sample, prompt: Prompt, j: int, bt: BoxTokens, max_text_len: int,
                   inside: dict[str, str | None]) -> None:
    """NS102, NS103 and NS106 of box j."""
    cap = prompt.caption
    phrase = bt.phrase
    if bt.cut:
        out.append(Hit("NS102", j, len(bt.cut), {"phrase": phrase, "tokens": list(bt.cut), "why": "truncated"},
                       score=len(bt.cut)))
    bad_span = next(((b, e) for b, e in bt.spans if not 0 <= b < e <= len(cap)), None)
    why = None
    if not bt.found:
        why = "phrase not found in the caption"
    elif bad_span is not None:
        why = f"span [{bad_span[0]}, {bad_span[1]}] is outside the caption of {len(cap)} characters"
    elif not bt.tokens:
        why = "span covers no token (whitespace or characters the tokenizer drops)"
    elif not bt.kept:
        why = f"truncated: all {len(bt.tokens)} token(s) fall past max_text_len={max_text_len}"
    if why:
        w: dict[str, Any] = {"phrase": phrase, "why": why}
        if bt.tokens:
            w["tokens"] = list(bt.tokens)
        out.append(Hit("NS103", j, 1, w))
    out.extend(_placement(sample, prompt, j, bt, inside))


def _placement(sample: Sample, prompt: Prompt, j: int, bt: BoxTokens, inside: dict[str, str | None]) -> list[Hit]:
    """NS106: the trainer's text for box j is not where the box's phrase really is."""
    cap = prompt.caption
    if prompt.phrases is not None:  # caption.find: compare with where the phrase was put / its span says
        intended = prompt.intended[j] if j < len(prompt.intended) else None
        if intended is None or not bt.spans:
            return []
        if bt.spans[0] != intended:
            b, e = bt.spans[0]
            kind = "inside another word" if _cuts_word(cap, b, e) else "another occurrence"
            return [Hit("NS106", j, 1, {"phrase": bt.phrase, "kind": kind, "found_at": f"{b}-{e}",
                                        "intended": f"{intended[0]}-{intended[1]}", "found_in": _context(cap, b, e)})]
        if prompt.reordered:  # the trainer reorders the names every epoch: is the phrase inside another one?
            if bt.phrase not in inside:
                # another name holding the phrase puts it twice in the caption: most phrases skip the scan
                inside[bt.phrase] = (None if cap.count(bt.phrase) < 2 else
                                     next((n for n in prompt.names if n != bt.phrase and bt.phrase in n), None))
            other = inside[bt.phrase]
            if other is not None:
                k = other.find(bt.phrase)
                kind = "inside another word" if _cuts_word(other, k, k + len(bt.phrase)) else "another occurrence"
                return [Hit("NS106", j, 1, {"phrase": bt.phrase, "kind": f"{kind}, in other orders", "inside": other,
                                            "why": f"caption.find finds it inside {other!r} when that comes first"})]
        return []
    text = " ".join(cap[b:e] for b, e in bt.spans)
    phrase = sample.phrases[j] if j < len(sample.phrases) else ""
    if phrase and _norm(text) != _norm(phrase) and all(0 <= b < e <= len(cap) for b, e in bt.spans):
        return [Hit("NS106", j, 1, {"phrase": phrase, "kind": "span text differs from the phrase", "span_text": text,
                                    "spans": [list(s) for s in bt.spans]})]
    cut = [(b, e) for b, e in bt.spans if 0 <= b < e <= len(cap) and _cuts_word(cap, b, e)]
    if cut:
        b, e = cut[0]
        return [Hit("NS106", j, 1, {"phrase": phrase or text, "kind": "span cuts a word", "span_text": cap[b:e],
                                    "found_in": _context(cap, b, e), "spans": [list(s) for s in bt.spans]})]
    return []


def image_hits(sample: Sample, images: str | os.PathLike[str]) -> tuple[list[Hit], tuple[int, int] | None]:
    """NS208 (missing / unreadable file) and NS209 (size differs from the annotation); returns the real size."""
    from PIL import Image, UnidentifiedImageError

    path = Path(images) / sample.file
    if not path.is_file():
        return [Hit("NS208", None, 1, {"kind": "missing", "path": str(path)})], None
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return [Hit("NS208", None, 1, {"kind": "unreadable", "path": str(path), "why": str(exc)[:120]})], None
    return size_hits(sample, w, h), (w, h)


def size_hits(sample: Sample, w: int, h: int) -> list[Hit]:
    """NS209 when the image's real size (w, h) differs from the annotated one."""
    if sample.width is None or sample.height is None or (w, h) == (sample.width, sample.height):
        return []
    kind = "width and height swapped (EXIF rotation?)" if (w, h) == (sample.height, sample.width) else "size mismatch"
    return [Hit("NS209", None, 1, {"kind": kind, "file_size": f"{w}x{h}",
                                   "annotation_size": f"{sample.width:g}x{sample.height:g}"})]


def member_hits(sample: Sample) -> list[Hit]:
    """NS208 / NS209 from what a webdataset reader found of the sample's image member (`Sample.image`)."""
    if sample.image is None:
        return []
    if isinstance(sample.image, str):
        kind = "missing" if sample.image.startswith("no image") else "unreadable"
        return [Hit("NS208", None, 1, {"kind": kind, "path": sample.file, "why": sample.image})]
    return size_hits(sample, *sample.image)


def unicode_hits(sample: Sample) -> list[Hit]:
    """NS210: text fields holding a lone surrogate (`Sample.bad_text`), one hit per sample."""
    if not sample.bad_text:
        return []
    fld, at, esc = sample.bad_text[0]
    return [Hit("NS210", None, 1, {"kind": "lone surrogate", "field": fld, "character": at, "value": esc,
                                   "fields": [f for f, _, _ in sample.bad_text],
                                   "why": "no UTF-8 form: the trainer's tokenizer raises on it (the scan checked "
                                          "the sample with U+FFFD in its place)"}, score=1e9)]
