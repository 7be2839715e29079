"""nanscope scan on Open-GroundingDino-shaped ODVG data: boxes partly outside the image (NS206), a VG line
with no regions (crashes OG's loader: an error under its rules, info under mmdet's), and two label-map ids
with the same name (NS106 under caption.find rules).

The trainer's behaviour is written here from Open-GroundingDino's datasets/odvg.py (ODVGDataset.__getitem__, read at
longzw1997/Open-GroundingDino@0ad46ce7) and its criterion's caption.find (REFERENCES.md, @d248268a), not from nanscope.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from nanscope.findings import Severity
from nanscope.scan import CaptionRules, scan

from _scan_fixtures import FIX


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIX / "text_encoder"))


def _scan(tmp_path, tokenizer, lines: list[dict[str, Any]], trainer: str, label_map: dict[str, str] | None = None):
    data = tmp_path / f"{trainer}.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    lm = None
    if label_map is not None:
        lm = tmp_path / "label_map.json"
        lm.write_text(json.dumps(label_map))
    hits: list[tuple[str, Any, int | None, dict[str, Any]]] = []

    def collect(items: list[Any], out: Any) -> None:
        for sh in out.hits:
            hits.extend((h.code, sh.id, h.box, h.where) for h in sh.hits)

    run = scan(data, label_map=str(lm) if lm else None, tokenizer=tokenizer, max_text_len=256,
               rules=CaptionRules.preset(trainer), on_chunk=collect)
    return run, hits


@pytest.mark.parametrize("trainer", ["open-groundingdino", "mmdet"])
def test_a_box_partly_outside_the_image_is_ns206_with_its_share_outside(tmp_path, tokenizer, trainer) -> None:
    W, H = 200, 100
    boxes = [[10, 10, 50, 50], [150, 20, 230, 60], [-20, -10, 30, 40], [300, 10, 320, 30]]
    lines = [{"filename": "a.jpg", "height": H, "width": W, "detection": {"instances": [
        {"bbox": b, "label": 0, "category": "cat"} for b in boxes]}}]
    _, hits = _scan(tmp_path, tokenizer, lines, trainer, {"0": "cat"})
    ns206 = {box: w for code, _, box, w in hits if code == "NS206"}
    assert set(ns206) == {1, 2, 3}  # box 3 lies entirely outside (as before); 1 and 2 partly
    assert ns206[3]["kind"] == "outside the image"
    for j in (1, 2):
        x1, y1, x2, y2 = boxes[j]
        inside = (min(x2, W) - max(x1, 0)) * (min(y2, H) - max(y1, 0))
        assert ns206[j]["kind"] == "partly outside the image"
        assert ns206[j]["outside"] == pytest.approx(1 - inside / ((x2 - x1) * (y2 - y1)), abs=1e-4)
    assert ns206[1]["past_edge_px"] == {"right": 30.0} and ns206[2]["past_edge_px"] == {"left": 20.0, "top": 10.0}


def _og_vg_getitem(regions: list[dict[str, Any]]) -> None:
    """The VG branch of Open-GroundingDino's ODVGDataset.__getitem__, as far as it touches the regions."""
    instances = [obj for obj in regions]
    boxes = [obj["bbox"] for obj in instances]
    caption_list = [obj["phrase"] for obj in instances]
    c = list(zip(boxes, caption_list))
    random.shuffle(c)
    boxes[:], caption_list[:] = zip(*c)


def test_a_vg_line_without_regions_is_an_error_under_open_groundingdino_rules_only(tmp_path, tokenizer) -> None:
    with pytest.raises(ValueError):  # the trainer's own code on this line
        _og_vg_getitem([])
    _og_vg_getitem([{"bbox": [0, 0, 5, 5], "phrase": "a cat"}])  # ... and on a line with a region
    lines = [{"filename": "a.jpg", "height": 100, "width": 100,
              "grounding": {"caption": "a cat", "regions": [{"bbox": [0, 0, 5, 5], "phrase": "a cat",
                                                             "tokens_positive": [[0, 5]]}]}},
             {"filename": "b.jpg", "height": 100, "width": 100, "grounding": {"caption": "", "regions": []}}]
    severities = {}
    for trainer in ("open-groundingdino", "mmdet"):
        run, hits = _scan(tmp_path, tokenizer, lines, trainer)
        assert {(c, s) for c, s, _, _ in hits if c == "NS204"} == {("NS204", 1)}
        f = next(f for f in run.result.findings if f.code == "NS204")
        severities[trainer] = f.severity
        assert f.data["samples"] == [1] and f.count == 1
    assert severities == {"open-groundingdino": Severity.ERROR, "mmdet": Severity.INFO}


def _og_positive_tokens(label_map: dict[str, str], labels: list[int], tokenizer: Any) -> tuple[list[set[int]], set[int]]:
    """Open-GroundingDino, OD line: caption from the label map's names, `caption_dict` (name -> last index),
    the box's class index, then create_positive_map's caption.find of cat_list[class]. Returns each box's
    token positions and the token positions of every occurrence of every name."""
    vg_labels = list(label_map)  # max_labels covers them all; order does not change what follows
    caption_list = [label_map[lb] for lb in vg_labels]
    caption_dict = {item: index for index, item in enumerate(caption_list)}
    caption = " . ".join(caption_list) + " ."
    classes = [caption_dict[label_map[str(lb)]] for lb in labels]
    enc = tokenizer(caption, return_offsets_mapping=True)
    def tokens(b: int, e: int) -> set[int]:
        return {t for t, (s, f) in enumerate(enc["offset_mapping"]) if f > s and s < e and f > b}
    per_box = []
    for c in classes:
        name = caption_list[c]
        b = caption.find(name)
        per_box.append(tokens(b, b + len(name)))
    every, pos = set(), 0
    for name in caption_list:
        b = caption.index(name, pos)
        every |= tokens(b, b + len(name))
        pos = b + len(name)
    return per_box, every


def test_two_label_map_ids_with_one_name_are_ns106_under_caption_find_rules(tmp_path, tokenizer) -> None:
    label_map = {"0": "cat", "1": "dog", "2": "cat"}
    labels = [0, 2, 1]
    per_box, every = _og_positive_tokens(label_map, labels, tokenizer)
    assert per_box[0] == per_box[1]  # ids 0 and 2 train on the same tokens ...
    assert every - set().union(*per_box)  # ... and one occurrence of "cat" is never positive
    lines = [{"filename": "a.jpg", "height": 100, "width": 100, "detection": {"instances": [
        {"bbox": [10 + 20 * j, 10, 25 + 20 * j, 30], "label": lb, "category": label_map[str(lb)]}
        for j, lb in enumerate(labels)]}}]
    _, hits = _scan(tmp_path, tokenizer, lines, "open-groundingdino", label_map)
    assert {box for c, _, box, _ in hits if c == "NS106"} == {0, 1}  # the boxes of ids 0 and 2, not 'dog'
    _, hits = _scan(tmp_path, tokenizer, lines, "mmdet", label_map)  # its own span per id: no NS106
    assert not [h for h in hits if h[0] == "NS106"]
