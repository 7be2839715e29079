"""`--write-clean OUT`: a copy of the annotations without the data bugs the scan found. The input is never
touched; OUT is written to a temporary file and renamed when complete; every change is listed.

What changes, per code (box = one annotation / instance / region box):
- NS201, NS205 (the repeated box), NS206, NS207, NS106, NS103: the box is dropped.
- NS102, NS104 on detection samples (COCO, ODVG OD): the sample is split into several samples (same image)
  whose positives, with the longest negatives the trainer may add, fit max_text_len; with
  Open-GroundingDino's rebuilt VG captions the unique phrases are split the same way. Note that a
  category of one part may then be drawn as a negative of the other part, as with any split prompt.
- NS102, NS104 on a grounding caption kept from the file: the caption is cut after the last whole word
  that fits and the boxes whose spans fall past the cut are dropped.
- NS208, NS209, NS210: the sample is dropped. NS204 (no boxes) is left as it is, except where the trainer's own loader
  raises on it (Open-GroundingDino: a VG line without regions): then the sample is dropped, as is an ODVG VG
  sample whose every box is dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanscope.safe_io import AtomicFile, write_atomic, write_into
from nanscope.scan import odvg
from nanscope.scan.captions import SEPARATOR, empty_vg_crashes
from nanscope.scan.checks import CRASHES
from nanscope.scan.dataset import Dataset
from nanscope.scan.engine import ChunkOut, SampleHits, State, parse
from nanscope.scan.sample import OD, Sample
from nanscope.scan.tokenizer import backend_of

DROP_BOX = ("NS201", "NS205", "NS206", "NS207", "NS106", "NS103")
DROP_SAMPLE = ("NS208", "NS209", "NS210")
TOO_LONG = ("NS102", "NS104")


@dataclass
class Plan:
    """What happens to one sample: dropped entirely, boxes dropped, split into groups of boxes, a caption cut."""

    drop_sample: str | None = None  # the code
    drop_boxes: dict[int, str] = field(default_factory=dict)  # box -> code
    groups: list[list[int]] | None = None  # boxes per part (a split)
    cut_caption: int | None = None  # characters kept


def _tokens_of(state: State, texts: list[str]) -> list[int]:
    backend = backend_of(state.tokenizer)
    return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)] if texts else []


def _split(costs: dict[str, int], keys: list[str], state: State, *, worst_extra) -> list[list[str]] | None:
    """First-fit groups of `keys` (longest first) whose worst caption fits; None when one key alone does not."""
    limit = state.max_text_len
    groups: list[list[str]] = []
    for k in sorted(keys, key=lambda k: (-costs[k], keys.index(k))):
        for g in groups:
            if worst_extra(g + [k]) <= limit:
                g.append(k)
                break
        else:
            if worst_extra([k]) > limit:
                return None
            groups.append([k])
    return groups


def plan_sample(state: State, smp: Sample, sh: SampleHits) -> Plan:
    plan = Plan()
    codes = {h.code for h in sh.hits}
    for h in sh.hits:
        if h.code in DROP_SAMPLE or h.where.get("kind") == CRASHES:
            plan.drop_sample = plan.drop_sample or h.code
        elif h.code in DROP_BOX and h.box is not None and not str(h.where.get("why", "")).startswith("truncated"):
            plan.drop_boxes.setdefault(h.box, h.code)  # truncated boxes are kept: the split or the cut handles them
    if (smp.mode != OD and smp.boxes and len(plan.drop_boxes) == len(smp.boxes) and state.format == "odvg"
            and empty_vg_crashes(state.rules)):
        plan.drop_sample = plan.drop_sample or next(iter(plan.drop_boxes.values()))  # no region left: OG raises
    if plan.drop_sample or not codes & set(TOO_LONG):
        return plan
    specials = state.costs.specials if state.costs else 2
    if smp.mode == OD and state.costs is not None and state.label_map is not None:
        costs, lm, rules = state.costs.cost, state.label_map, state.rules
        positives = list(dict.fromkeys(smp.labels[j] for j in range(len(smp.boxes))
                                       if j not in plan.drop_boxes and smp.labels[j] in lm))

        def worst(group: list[str]) -> int:
            """The longest caption the trainer can build for a sample with these positives."""
            if rules.trainer == "mmdet":
                return sum(costs[k] for k in group)  # check_for_positive_overflow; negatives take what is left
            n = specials + sum(costs[k] for k in group)
            room = len(lm) - len(group) if rules.max_labels is None else max(0, rules.max_labels - len(group))
            if rules.negatives is not None:
                room = min(room, rules.negatives)
            taken = 0
            for k in state.costs.by_cost:
                if taken >= room:
                    break
                if k not in group:
                    n += costs[k]
                    taken += 1
            return n

        groups = _split(costs, positives, state, worst_extra=worst)
        if groups is not None and len(groups) > 1:
            plan.groups = [[j for j in range(len(smp.boxes)) if j not in plan.drop_boxes and smp.labels[j] in g]
                           for g in groups]
        return plan
    if state.rules.vg_caption == "rebuild" and state.format == "odvg":
        uniq = list(dict.fromkeys(smp.phrases[j] for j in range(len(smp.boxes)) if j not in plan.drop_boxes))
        cost = dict(zip(uniq, _tokens_of(state, [p + SEPARATOR.rstrip() for p in uniq])))
        groups = _split(cost, uniq, state, worst_extra=lambda g: specials + sum(cost[p] for p in g))
        if groups is not None and len(groups) > 1:
            plan.groups = [[j for j in range(len(smp.boxes)) if j not in plan.drop_boxes and smp.phrases[j] in g]
                           for g in groups]
        return plan
    cap = smp.caption or ""
    enc = backend_of(state.tokenizer).encode(cap)
    last = state.max_text_len - 2  # the last kept token before [SEP]
    end = enc.offsets[last][1] if last < len(enc.offsets) else len(cap)
    cut = cap.rfind(" ", 0, end + 1) if end < len(cap) and cap[end:end + 1].isalnum() else end
    plan.cut_caption = max(cut, 0)
    for j, sp in enumerate(smp.spans):
        if sp and any(e > plan.cut_caption for _, e in sp):
            plan.drop_boxes.setdefault(j, "NS102")
    return plan


@dataclass
class Change:
    sample: Any
    line: int | None
    action: str
    code: str
    annotation: Any = None

    def to_dict(self) -> dict[str, Any]:
        d = {"sample": self.sample, "action": self.action, "code": self.code}
        if self.line is not None:
            d["line"] = self.line
        if self.annotation is not None:
            d["annotation"] = self.annotation
        return d


def _changes(smp: Sample, plan: Plan) -> list[Change]:
    if plan.drop_sample:
        return [Change(smp.id, smp.line, "dropped the sample", plan.drop_sample)]
    out = [Change(smp.id, smp.line, "dropped the box", code, smp.annotations[j]) for j, code in sorted(plan.drop_boxes.items())]
    if plan.groups:
        sizes = "+".join(str(len(g)) for g in plan.groups)
        out.append(Change(smp.id, smp.line, f"split into {len(plan.groups)} samples ({sizes} boxes) so each caption fits",
                          "NS104"))
    if plan.cut_caption is not None:
        out.append(Change(smp.id, smp.line, f"cut the caption to its first {plan.cut_caption} characters", "NS104"))
    return out


def _odvg_lines(raw: bytes, smp: Sample, plan: Plan) -> list[str]:
    """The line(s) of the copy for one changed ODVG line."""
    d = json.loads(raw)
    keep_groups = plan.groups or [[j for j in range(len(smp.boxes)) if j not in plan.drop_boxes]]
    out = []
    for group in keep_groups:
        e = json.loads(raw) if len(keep_groups) > 1 else d
        keep = set(group)
        if smp.mode == OD:
            insts = e["detection"]["instances"]
            e["detection"]["instances"] = [inst for k, inst in enumerate(insts) if k in keep]
        else:
            regions = e["grounding"]["regions"]
            boxes_of: dict[int, list[int]] = {}
            for j, a in enumerate(smp.annotations):
                if j in keep:
                    k, _, m = str(a).partition(".")
                    boxes_of.setdefault(int(k), []).append(int(m) if m else -1)
            new = []
            for k, r in enumerate(regions):
                if k not in boxes_of:
                    continue
                if boxes_of[k] != [-1]:
                    r = {**r, "bbox": [b for m, b in enumerate(r["bbox"]) if m in boxes_of[k]]}
                new.append(r)
            e["grounding"]["regions"] = new
            if plan.cut_caption is not None:
                e["grounding"]["caption"] = e["grounding"]["caption"][:plan.cut_caption]
        out.append(odvg.dump_line(e))
    return out


def check_cleanable(ds: Dataset) -> None:
    """--write-clean rewrites ODVG lines and JSON documents; shards of other formats are refused up front."""
    from nanscope.errors import InputError

    if ds.format not in ("odvg", "coco", "grounding"):
        raise InputError(f"--write-clean writes ODVG JSONL and COCO-style JSON; {ds.path!r} is {ds.format}: scan it "
                         "without --write-clean")


class CleanWriter:
    """Streams the copy (ODVG: line by line; JSON documents: written at the end)."""

    def __init__(self, ds: Dataset, state: State, out: str | os.PathLike[str]) -> None:
        self.ds, self.state, self.out = ds, state, Path(out)
        self.changes: list[Change] = []
        self.drop_annotations: set[int] = set()  # JSON: positions in `annotations`
        self.drop_images: set[int] = set()
        self.new_images: list[tuple[int, list[list[int]]]] = []  # JSON: (image position, annotation positions per part)
        self.cut_captions: dict[int, int] = {}
        # ODVG streams into the temporary file (random name, O_EXCL | O_NOFOLLOW); JSON is written at the end
        self.f = AtomicFile(self.out, name="--write-clean") if ds.format == "odvg" else None
        self._line = 0

    def on_chunk(self, items: list[tuple[int, int | None, Any]], out: ChunkOut) -> None:
        hits = {sh.index: sh for sh in out.hits}
        for index, line, payload in items:
            sh = hits.get(index)
            smp = parse(self.state, index, line, payload) if sh is not None else None
            plan = plan_sample(self.state, smp, sh) if smp is not None and sh is not None else Plan()
            if smp is not None:
                self.changes.extend(_changes(smp, plan))
            if self.f is not None:
                self._write_odvg(payload, smp, plan)
            elif smp is not None:
                self._plan_json(index, payload, smp, plan)

    def _write_odvg(self, raw: bytes, smp: Sample | None, plan: Plan) -> None:
        assert self.f is not None
        if smp is None or not (plan.drop_boxes or plan.groups or plan.cut_caption is not None or plan.drop_sample):
            self.f.write(raw if raw.endswith(b"\n") else raw + b"\n")  # untouched: byte for byte (CRLF stays)
        elif not plan.drop_sample:
            end = b"\r\n" if raw.endswith(b"\r\n") else b"\n"
            self.f.write(b"".join(line.encode("utf-8", "backslashreplace").rstrip(b"\n") + end
                                  for line in _odvg_lines(raw, smp, plan)))

    def _plan_json(self, index: int, item: dict[str, Any], smp: Sample, plan: Plan) -> None:
        positions = [k for k, _ in item["annotations"]]
        if plan.drop_sample:
            self.drop_images.add(index)
            self.drop_annotations.update(positions)
            return
        self.drop_annotations.update(positions[j] for j in plan.drop_boxes)
        if plan.groups:
            self.new_images.append((index, [[positions[j] for j in g] for g in plan.groups]))
        if plan.cut_caption is not None:
            self.cut_captions[index] = plan.cut_caption

    def finish(self) -> list[Change]:
        """Write the change list, then commit the copy and the list (each complete or absent: `safe_io.AtomicFile`)."""
        text = json.dumps({"source": self.ds.path, "changes": [c.to_dict() for c in self.changes]},
                          indent=1, sort_keys=True) + "\n"
        if self.f is None:
            self.f = AtomicFile(self.out, name="--write-clean")
            self.f.write(self._json_text().encode("utf-8"))
        changes = AtomicFile(self.out.with_name(self.out.name + ".changes.json"), name="--write-clean's change list")
        try:
            write_into(changes, text.encode("utf-8"))
            self.f.commit()
        except BaseException:  # a full disk, Ctrl-C: neither file is left, nor a temporary one
            changes.abort()
            self.f.abort()
            raise
        changes.commit()
        return self.changes

    def abort(self) -> None:
        if self.f is not None:
            self.f.abort()

    def _json_text(self) -> str:
        doc = self.ds.document
        images = [dict(img) for img in doc["images"]]
        anns = [dict(a) for a in doc["annotations"]]
        for index, n in self.cut_captions.items():
            images[index]["caption"] = images[index]["caption"][:n]
        ids = [img["id"] for img in images]
        next_id = max((i for i in ids if isinstance(i, int)), default=0) + 1
        extra = []
        for index, parts in self.new_images:
            for part in parts[1:]:
                img = dict(images[index])
                img["id"] = next_id if isinstance(img["id"], int) else f"{img['id']}_part{len(extra) + 2}"
                next_id += 1
                extra.append(img)
                for k in part:
                    anns[k]["image_id"] = img["id"]
        out = dict(doc)
        out["images"] = [img for k, img in enumerate(images) if k not in self.drop_images] + extra
        out["annotations"] = [a for k, a in enumerate(anns) if k not in self.drop_annotations]
        return json.dumps(out, ensure_ascii=False) + "\n"


MANIFEST = "manifest.json"


def write_manifest(folder: str | os.PathLike[str], run: Any) -> Path:
    """--engine ray --write-clean: the parts in dataset order (concatenated, they are the cleaned copy) and the
    units not written (complete or absent, through the one atomic writer)."""
    path = Path(folder) / MANIFEST
    doc = {"source": run.dataset.path, "format": run.dataset.format,
           "parts": [{"unit": u, "file": f, "changes": c, "changes_file": f + ".changes.json"} for u, f, c in run.parts],
           "not_written": [{"unit": u, "why": why} for u, why in run.failed]}
    write_atomic(path, json.dumps(doc, indent=1) + "\n", name="--write-clean's manifest")
    return path
