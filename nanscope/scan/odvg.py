"""ODVG JSONL (Open-GroundingDino's `data_format.md`, MMDetection's `ODVGDataset`), read one line at a time.

OD lines: `{"filename", "height", "width", "detection": {"instances": [{"bbox": [x1, y1, x2, y2] pixels,
"label": id, "category": name}]}}` with a label-map JSON `{"0": "person", ...}`. VG lines: `{...,
"grounding": {"caption", "regions": [{"bbox", "phrase", "tokens_positive": [[b, e], ...]}]}}`; a
region's bbox may also be a list of boxes (MMDetection accepts that). As in both trainers, a dataset
given a label map is OD, one without is VG. Memory stays flat: lines stream from the file, in bounded
chunks, and the sample id is the 0-based index of the line among non-blank lines.
"""

from __future__ import annotations

import json
import os
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Mapping

from nanscope.errors import DataError
from nanscope.scan import sample as S

READ_BLOCK = 1 << 20  # bytes per read when counting lines

try:  # orjson parses a line 3-5x faster than json; it refuses NaN/Infinity, which `json` then reads (NS201)
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - the scan extra installs it
    _fast_loads = None


MAX_LINE = 64 << 20  # bytes of one JSONL line: a longer one is refused before it is held in memory


def iter_lines(path: str | os.PathLike[str], *, max_line: int | None = None, start: int = 0, end: int | None = None,
               first_line: int = 1) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every non-blank line, of the whole file or of the newline-aligned byte
    range [start, end) whose first line is `first_line` (a unit of `nanscope.scan.units`). A line longer than
    `max_line` bytes (default MAX_LINE) is a DataError naming it, raised after reading at most `max_line` bytes of
    it: memory stays bounded on any file."""
    limit = MAX_LINE if max_line is None else max_line
    try:
        with open(path, "rb") as f:
            if start:
                f.seek(start)
            n, pos = first_line - 1, start
            while (end is None or pos < end) and (raw := f.readline(limit + 1)):
                n += 1
                pos += len(raw)
                if len(raw) > limit and not raw.endswith(b"\n"):
                    raise DataError(f"{str(path)!r} line {n} is longer than {limit >> 20} MiB; expected one "
                                    "JSON object per line (a caption that long cannot be a training sample)")
                if raw.strip():
                    yield n, raw
    except OSError as exc:
        raise DataError(f"{str(path)!r} cannot be read: {exc.strerror or exc}") from None


def count_lines(path: str | os.PathLike[str]) -> int:
    """Newlines in the file (plus a last line without one): the progress bar's total, read at disk speed."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def load_label_map(path: str | os.PathLike[str]) -> dict[str, str]:
    """A label map `{"0": "person", ...}` (keys as strings, as both trainers look them up)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"label map {str(p)!r} does not exist; expected a JSON object {{\"0\": \"person\", ...}} "
                        "(Open-GroundingDino's label_map)")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"label map {str(p)!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    except ValueError as exc:
        raise DataError(f"label map {str(p)!r} is not valid JSON: {exc}") from None
    if not isinstance(d, dict) or not d:
        raise DataError(f"label map {str(p)!r} holds {type(d).__name__ if not isinstance(d, dict) else 'an empty object'};"
                        " expected a JSON object mapping label ids to names, e.g. {\"0\": \"person\"}")
    out = {}
    for k, v in d.items():
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"label map {str(p)!r} field {k!r} is {v!r}; expected a non-empty category name")
        out[str(k)] = v
    return out


def _json(raw: bytes, source: str, line: int) -> dict[str, Any]:
    if _fast_loads is not None:
        try:
            d = _fast_loads(raw)
            if type(d) is dict:
                return d
        except ValueError:  # orjson.JSONDecodeError: json below reads NaN or names the error
            pass
    try:
        d = json.loads(raw)
    except ValueError as exc:
        msg = getattr(exc, "msg", str(exc))
        col = getattr(exc, "colno", None)
        raise DataError(f"{source!r} line {line} is not valid JSON ({msg}{f' at column {col}' if col else ''}); "
                        "expected one ODVG object per line") from None
    if not isinstance(d, dict):
        raise DataError(f"{source!r} line {line} holds a JSON {type(d).__name__}; expected an ODVG object "
                        "{filename, height, width, detection | grounding}")
    return d


def parse_line(raw: bytes, index: int, line: int, source: str, *, od: bool) -> S.Sample:
    """One ODVG line -> Sample; `od` when the dataset has a label map."""
    if od and FAST_OD:
        smp = _typed_od(raw, index, line, source)
        if smp is not None:
            return smp
    d = _json(raw, source, line)
    file = S.get(d, "filename", source, line, "filename", str)
    width = S.size(d.get("width"), source, line, "width")
    height = S.size(d.get("height"), source, line, "height")
    smp = S.Sample(index, index, file, line, width, height, S.OD if od else S.VG, [], [])
    if od:
        if "detection" not in d and "grounding" in d:
            raise DataError(f"{source!r} line {line} is a grounding (VG) line, but the dataset has a label map, "
                            "which makes it detection (OD); scan VG files without --label-map")
        det = S.get(d, "detection", source, line, "detection", dict)
        insts = S.get(det, "instances", source, line, "detection.instances", list)
        if _plain_instances(insts, smp):
            return smp
        for k, inst in enumerate(insts):
            if type(inst) is dict:  # the common case, checked cheaply; anything else takes the path that names the field
                b, lb = inst.get("bbox"), inst.get("label")
                if (type(b) is list and len(b) == 4 and all(type(v) is float or type(v) is int for v in b)
                        and (type(lb) is int or type(lb) is str)):
                    x1, y1, x2, y2 = b
                    smp.boxes.append((float(x1), float(y1), float(x2), float(y2)))
                    smp.labels.append(str(lb))
                    smp.annotations.append(k)
                    continue
            fld = f"detection.instances[{k}]"
            if not isinstance(inst, dict):
                raise DataError(f"{S.where_of(source, line, fld)} is {inst!r}; expected an object {{bbox, label}}")
            smp.boxes.append(S.bbox(S.get(inst, "bbox", source, line, f"{fld}.bbox", list), source, line,
                                    f"{fld}.bbox", xywh=False))
            smp.labels.append(str(S.get(inst, "label", source, line, f"{fld}.label", (int, str))))
            smp.annotations.append(k)
        return smp
    if "grounding" not in d and "detection" in d:
        raise DataError(f"{source!r} line {line} is a detection (OD) line; pass its label map with --label-map")
    g = S.get(d, "grounding", source, line, "grounding", dict)
    smp.caption = S.text(g.get("caption", ""), source, line, "grounding.caption", smp.bad_text)
    regions = S.get(g, "regions", source, line, "grounding.regions", list)
    for k, r in enumerate(regions):
        fld = f"grounding.regions[{k}]"
        if not isinstance(r, dict):
            raise DataError(f"{S.where_of(source, line, fld)} is {r!r}; expected an object {{bbox, phrase, tokens_positive}}")
        phrase = S.text(S.get(r, "phrase", source, line, f"{fld}.phrase", str), source, line, f"{fld}.phrase",
                        smp.bad_text)
        tp = r.get("tokens_positive")
        spans = S.spans(tp, source, line, f"{fld}.tokens_positive") if tp is not None else None
        b = S.get(r, "bbox", source, line, f"{fld}.bbox", list)
        many = bool(b) and isinstance(b[0], list)
        for m, one in enumerate(b if many else [b]):
            smp.boxes.append(S.bbox(one, source, line, f"{fld}.bbox" + (f"[{m}]" if many else ""), xywh=False))
            smp.annotations.append(f"{k}.{m}" if many else k)
            smp.phrases.append(phrase)
            smp.spans.append(spans)
    return smp


FAST_OD = True  # detection lines through msgspec's typed decoder when it is installed (tests compare with it off)
_OD_DECODER: Any = None  # built on first use: (decoder, the errors it raises), or False without msgspec


def _typed_od(raw: bytes, index: int, line: int, source: str) -> S.Sample | None:
    """A detection line decoded straight into its fields by msgspec, which checks the types in C as it parses
    (bbox: 4 numbers, label: int or str, filename: str, width/height: number or absent); None for any line it
    refuses (invalid JSON, NaN, a wrong type, a missing field), which then takes the path that names the field."""
    global _OD_DECODER
    if _OD_DECODER is None:
        _OD_DECODER = _od_decoder()
    if _OD_DECODER is False:
        return None
    decoder, errors = _OD_DECODER
    try:
        d = decoder.decode(raw)
    except errors:
        return None
    insts = d.detection.instances
    smp = S.Sample(index, index, d.filename, line, S.size(d.width, source, line, "width"),
                   S.size(d.height, source, line, "height"), S.OD, [i.bbox for i in insts],
                   list(range(len(insts))), [str(i.label) for i in insts])
    return smp


def _od_decoder() -> Any:
    try:
        import msgspec
    except ImportError:  # pragma: no cover - the scan extra installs it
        return False

    from typing import Optional, Tuple, Union

    box = Tuple[float, float, float, float]  # ints are converted, bools and strings refused
    instance = msgspec.defstruct("Instance", [("bbox", box), ("label", Union[int, str])], gc=False)
    detection = msgspec.defstruct("Detection", [("instances", list[instance])], gc=False)  # type: ignore[valid-type]
    line = msgspec.defstruct("Line", [("filename", str), ("detection", detection), ("width", Optional[Union[int, float]], None),
                                      ("height", Optional[Union[int, float]], None)], gc=False)
    return msgspec.json.Decoder(line), (msgspec.ValidationError, msgspec.DecodeError)


_NUMBER = {int, float}
_LABEL = {int, str}


def _plain_instances(insts: list[Any], smp: S.Sample) -> bool:
    """The common case, checked with C-level passes over the whole line: every instance an object with a bbox of
    4 numbers and an int or str label. Fills `smp` and says True; False leaves the per-instance path (which names
    the field that is wrong) to do it."""
    if not insts:
        return False
    if set(map(type, insts)) != {dict}:
        return False
    try:
        bbs = [inst["bbox"] for inst in insts]
        lbs = [inst["label"] for inst in insts]
    except KeyError:
        return False
    if set(map(type, bbs)) != {list} or set(map(len, bbs)) != {4} or not set(map(type, lbs)) <= _LABEL:
        return False
    if not set(map(type, chain.from_iterable(bbs))) <= _NUMBER:
        return False
    smp.boxes = [(float(a), float(b), float(c), float(d)) for a, b, c, d in bbs]
    smp.labels = list(map(str, lbs))
    smp.annotations = list(range(len(insts)))
    return True


def dump_line(d: Mapping[str, Any]) -> str:
    """One JSONL line (compact, key order kept, non-ASCII kept)."""
    return json.dumps(d, ensure_ascii=False, separators=(", ", ": ")) + "\n"
