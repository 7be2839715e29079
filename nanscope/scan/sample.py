"""One dataset sample as every reader hands it to the scan: an image, its boxes and their text.

Readers (`odvg.py`, `coco.py`) turn a line or an image entry into a `Sample`; they validate the
structure (a bbox of 4 numbers, a caption string ...) and raise `DataError` naming the file, the line
and the field. Values that are wrong but well-formed (a zero-width box, a label missing from the
label map) are data bugs the checks report, not input errors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from nanscope.errors import DataError

OD, VG = "od", "vg"  # detection (captions from category names) or grounding (a caption with phrases)


@dataclass
class Sample:
    """A sample in the reader's order. Boxes are absolute pixel x1, y1, x2, y2 (COCO's x, y, w, h converted)."""

    index: int  # position in the dataset (stream order): shards, workers and seeds use it
    id: Any  # what people call it: COCO image id, ODVG line index
    file: str  # image file name, relative to the images folder
    line: int | None  # 1-based line in a JSONL file, None for JSON documents
    width: float | None
    height: float | None
    mode: str  # OD or VG
    boxes: list[tuple[float, float, float, float]]
    annotations: list[Any]  # per box: COCO annotation id, or the instance / region index of an ODVG line
    labels: list[str] = field(default_factory=list)  # OD: label-map key per box (str(label))
    phrases: list[str] = field(default_factory=list)  # VG: phrase per box ("" when the format has none)
    spans: list[tuple[tuple[int, int], ...] | None] = field(default_factory=list)  # VG: tokens_positive per box
    caption: str | None = None  # VG: the caption in the file
    image: Any = None  # webdataset: the image member's (width, height), or why it is missing / unreadable
    bad_text: list[tuple[str, int, str]] = field(default_factory=list)  # (field, character, escape) of each text
    # that is not valid Unicode (a lone surrogate): the text holds U+FFFD in its place, so the sample is still
    # checked, and the scan reports it (NS210)


def where_of(source: str, line: int | None, fld: str) -> str:
    """`data.jsonl line 7 field detection.instances[2].bbox` / `coco.json field annotations[12].bbox`."""
    at = f" line {line}" if line is not None else ""
    return f"{source!r}{at} field {fld}"


def number(value: Any, source: str, line: int | None, fld: str) -> float:
    """A JSON number (NaN/inf allowed: they are data bugs the checks report); anything else is an input error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where_of(source, line, fld)} is {value!r}; expected a number")
    return float(value)


def bbox(value: Any, source: str, line: int | None, fld: str, *, xywh: bool) -> tuple[float, float, float, float]:
    """A 4-number box -> x1, y1, x2, y2. `xywh`: COCO's x, y, width, height."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        n = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
        shape = "[x, y, width, height]" if xywh else "[x1, y1, x2, y2]"
        raise DataError(f"{where_of(source, line, fld)} is {value!r} ({n} values); expected 4 numbers {shape}")
    if all(type(v) is float or type(v) is int for v in value):  # the common case, checked cheaply
        a, b, c, d = (float(v) for v in value)
    else:
        a, b, c, d = (number(v, source, line, f"{fld}[{k}]") for k, v in enumerate(value))
    return (a, b, a + c, b + d) if xywh else (a, b, c, d)


def spans(value: Any, source: str, line: int | None, fld: str) -> tuple[tuple[int, int], ...]:
    """tokens_positive: a list of [begin, end] character spans (a single [b, e] pair is accepted too)."""
    if (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                       for x in value)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where_of(source, line, fld)} is {value!r}; expected a list of [begin, end] character spans")
    out = []
    for k, s in enumerate(value):
        if not (isinstance(s, (list, tuple)) and len(s) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in s)):
            raise DataError(f"{where_of(source, line, f'{fld}[{k}]')} is {s!r}; expected [begin, end] with two integers")
        out.append((int(s[0]), int(s[1])))
    return tuple(out)


def text(value: Any, source: str, line: int | None, fld: str, bad: list[tuple[str, int, str]] | None = None) -> str:
    """A string field. A lone surrogate ("\\ud800" in the JSON: no UTF-8, no tokenizer can read it) is recorded in
    `bad` (field, character, its escape) and replaced by U+FFFD, which keeps every character offset; without
    `bad` it is a DataError naming the field."""
    if not isinstance(value, str):
        raise DataError(f"{where_of(source, line, fld)} is {value!r}; expected a string")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            if bad is None:
                raise DataError(f"{where_of(source, line, fld)} holds a lone surrogate {value[exc.start]!r} at "
                                f"character {exc.start}; expected valid Unicode text (the trainer's tokenizer fails on "
                                "it too)") from None
            bad.append((fld, exc.start, f"\\u{ord(value[exc.start]):04x}"))
            value = _SURROGATE.sub("\ufffd", value)
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def size(value: Any, source: str, line: int | None, fld: str) -> float | None:
    """An image width/height: absent is allowed (None: size checks are skipped)."""
    if value is None:
        return None
    if (type(value) is int or type(value) is float) and 0 < value < math.inf:  # the common case, checked cheaply
        return float(value)
    v = number(value, source, line, fld)
    if not math.isfinite(v) or v <= 0:
        raise DataError(f"{where_of(source, line, fld)} is {value!r}; expected a positive image size in pixels")
    return v


def get(obj: Any, key: str, source: str, line: int | None, fld: str, kind: type | tuple[type, ...]) -> Any:
    """obj[key], which must exist and be of `kind`."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where_of(source, line, fld)} is missing; expected {_kind_name(kind)}")
    v = obj[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise DataError(f"{where_of(source, line, fld)} is {_short(v)}; expected {_kind_name(kind)}")
    return v


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _short(v: Any, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."
