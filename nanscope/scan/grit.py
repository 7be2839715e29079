"""GRIT-style grounding records (Kosmos-2's GRIT-20M, img2dataset's per-sample JSON): a caption and its
`noun_chunks` / `ref_exps`, each `[begin, end, x1, y1, x2, y2(, score)]` with character offsets into the
caption and box corners normalized to [0, 1] by the image's `width` and `height` (as the GRIT dataset card
describes them). One record -> one grounding `Sample` (the file's caption, each box's span), whether it
comes from a webdataset tar (`wds.py`) or a parquet row (`parquet.py`).
"""

from __future__ import annotations

from typing import Any

from nanscope.errors import DataError
from nanscope.scan import sample as S

SPAN_FIELDS = ("noun_chunks", "ref_exps")
FORMATS = ("webdataset", "parquet")


def _offset(v: Any, source: str, fld: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or float(v) != int(v):
        raise DataError(f"{source!r} field {fld} is {v!r}; expected a whole character offset")
    return int(v)


def parse_record(rec: Any, index: int, source: str, *, key: Any, file: str, image: Any = None) -> S.Sample:
    """`source` names the shard (and the key) in messages; `image`: what the reader found of the image
    ((width, height), an error text, or None when it did not look)."""
    if not isinstance(rec, dict):
        raise DataError(f"{source!r} sample {key!r} holds a JSON {type(rec).__name__}; expected an object "
                        "{caption, width, height, noun_chunks | ref_exps}")
    at = f"{source!r} sample {key!r}"
    cap = rec.get("caption")
    if not isinstance(cap, str):
        raise DataError(f"{at} field caption is {S._short(cap)}; expected the caption string")
    W = S.size(rec.get("width"), at, None, "width")
    H = S.size(rec.get("height"), at, None, "height")
    if W is None or H is None:
        raise DataError(f"{at} field width/height is missing; expected the image size in pixels (GRIT's boxes are "
                        "normalized to it)")
    smp = S.Sample(index, key, file, None, W, H, S.VG, [], [])
    smp.caption = S.text(cap, at, None, "caption", smp.bad_text)
    cap = smp.caption
    smp.image = image
    for name in SPAN_FIELDS:
        items = rec.get(name)
        if items is None:
            continue
        if not isinstance(items, (list, tuple)):
            raise DataError(f"{at} field {name} is {S._short(items)}; expected a list of [begin, end, x1, y1, x2, y2, score]")
        for k, it in enumerate(items):
            fld = f"{name}[{k}]"
            if not isinstance(it, (list, tuple)) or len(it) < 6:
                raise DataError(f"{at} field {fld} is {S._short(it)}; expected [begin, end, x1, y1, x2, y2(, score)]")
            b, e = _offset(it[0], at, f"{fld}[0]"), _offset(it[1], at, f"{fld}[1]")
            x1, y1, x2, y2 = (S.number(v, at, None, f"{fld}[{m + 2}]") for m, v in enumerate(it[2:6]))
            smp.boxes.append((x1 * W, y1 * H, x2 * W, y2 * H))
            smp.annotations.append(fld)
            smp.spans.append(((b, e),))
            smp.phrases.append(cap[b:e] if 0 <= b < e <= len(cap) else "")
    return smp
