"""COCO-style JSON documents: detection (`images`, `annotations` with `bbox` [x, y, w, h] and
`category_id`, `categories`) and grounding as MDETR, GLIP and MMDetection use it (each image has a
`caption`, each annotation its `tokens_positive` character spans; an optional `phrase`).

A JSON document is parsed whole, as pycocotools does (memory grows with the file; million-sample
datasets are ODVG JSONL, which streams). Crowd annotations (`iscrowd: 1`) are skipped, as
Open-GroundingDino's and MDETR's COCO loaders skip them; annotations of images that do not exist are
counted in the summary. The sample id is the image id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from nanscope.errors import DataError
from nanscope.scan import sample as S

COCO, GROUNDING = "coco", "grounding"


def load_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        d = json.loads(p.read_bytes())
    except OSError as exc:
        raise DataError(f"{str(p)!r} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        line = getattr(exc, "lineno", None)
        raise DataError(f"{str(p)!r} is not valid JSON ({getattr(exc, 'msg', exc)}"
                        f"{f' at line {line}' if line else ''}); expected a COCO-style JSON document") from None
    if not isinstance(d, dict):
        raise DataError(f"{str(p)!r} holds a JSON {type(d).__name__}; expected a COCO object {{images, annotations, ...}}")
    for key in ("images", "annotations"):
        if not isinstance(d.get(key), list):
            raise DataError(f"{str(p)!r} field {key} is {'missing' if key not in d else type(d[key]).__name__}; "
                            "expected a list (a COCO-style document)")
    return d


def kind_of(doc: dict[str, Any]) -> str:
    """grounding when images carry a caption, else coco (detection)."""
    imgs = doc["images"]
    return GROUNDING if any(isinstance(i, dict) and "caption" in i for i in imgs[:100]) else COCO


def label_map_of(doc: dict[str, Any], source: str) -> dict[str, str]:
    cats = doc.get("categories")
    if not isinstance(cats, list) or not cats:
        raise DataError(f"{source!r} field categories is {'missing' if cats is None else repr(cats)[:40]}; expected a "
                        "list of {id, name} (the label map of a COCO detection file)")
    out = {}
    for k, c in enumerate(cats):
        cid = S.get(c, "id", source, None, f"categories[{k}].id", (int, str))
        out[str(cid)] = S.get(c, "name", source, None, f"categories[{k}].name", str)
    return out


def group(doc: dict[str, Any], source: str) -> tuple[dict[Any, list[int]], int]:
    """image id -> indices of its (non-crowd) annotations, and the count of annotations of unknown images."""
    by_image: dict[Any, list[int]] = {}
    for k, img in enumerate(doc["images"]):
        by_image.setdefault(S.get(img, "id", source, None, f"images[{k}].id", (int, str)), [])
    orphans = 0
    for k, a in enumerate(doc["annotations"]):
        iid = S.get(a, "image_id", source, None, f"annotations[{k}].image_id", (int, str))
        if a.get("iscrowd", 0):
            continue
        if iid in by_image:
            by_image[iid].append(k)
        else:
            orphans += 1
    return by_image, orphans


def iter_items(doc: dict[str, Any], by_image: dict[Any, list[int]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, {"image": ..., "annotations": [(k, ann), ...]}) in the order of `images`."""
    anns = doc["annotations"]
    for index, img in enumerate(doc["images"]):
        yield index, {"image": img, "annotations": [(k, anns[k]) for k in by_image.get(img["id"], [])]}


def parse_item(item: dict[str, Any], index: int, source: str, kind: str) -> S.Sample:
    img = item["image"]
    k0 = index
    file = S.get(img, "file_name", source, None, f"images[{k0}].file_name", str)
    width = S.size(img.get("width"), source, None, f"images[{k0}].width")
    height = S.size(img.get("height"), source, None, f"images[{k0}].height")
    smp = S.Sample(index, img["id"], file, None, width, height, S.OD if kind == COCO else S.VG, [], [])
    if kind == GROUNDING:
        smp.caption = S.text(S.get(img, "caption", source, None, f"images[{k0}].caption", str), source, None,
                             f"images[{k0}].caption", smp.bad_text)
    for k, a in item["annotations"]:
        fld = f"annotations[{k}]"
        smp.boxes.append(S.bbox(S.get(a, "bbox", source, None, f"{fld}.bbox", list), source, None, f"{fld}.bbox",
                                xywh=True))
        smp.annotations.append(a.get("id", k))
        if kind == COCO:
            smp.labels.append(str(S.get(a, "category_id", source, None, f"{fld}.category_id", (int, str))))
            continue
        spans = S.spans(S.get(a, "tokens_positive", source, None, f"{fld}.tokens_positive", list), source, None,
                        f"{fld}.tokens_positive")
        smp.spans.append(spans)
        phrase = a.get("phrase")
        smp.phrases.append(S.text(phrase, source, None, f"{fld}.phrase", smp.bad_text) if phrase is not None else "")
    return smp
