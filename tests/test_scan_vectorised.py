"""The chunk-wide (vectorised) scan code against the per-item Python it replaces: the box filter and size histogram
(`checks.box_hits`, `engine._size_bin`, on random boxes with planted bad ones), the worst-draw bound, the
negative draw, the typed line decoder, and the shortcuts together (whole results with them on and off)."""

from __future__ import annotations

import json
import math
import random

from nanscope.scan import checks, chunk_boxes
from nanscope.scan.engine import _size_bin
from nanscope.scan.sample import OD, Sample


def _samples(seed: int = 0, n: int = 400) -> list[Sample]:
    rng = random.Random(seed)
    odd = [math.nan, math.inf, -math.inf, -5.0, 0.0, 0.4, 1e6, 1e300]
    out = []
    for i in range(n):
        W = rng.choice([640.0, 1024.0, None])
        boxes, labels = [], []
        for _ in range(rng.choice([0, 1, 3, 8])):
            x1, y1 = rng.uniform(-20, 700), rng.uniform(-20, 700)
            b = [x1, y1, x1 + rng.choice([0.5, 2, 30, 300]), y1 + rng.choice([0.5, 2, 30, 300])]
            if rng.random() < 0.1:
                b[rng.randrange(4)] = rng.choice(odd)
            boxes.append(tuple(b))
            labels.append(str(rng.randrange(3)))
        if boxes and rng.random() < 0.1:
            boxes.append(boxes[0])
            labels.append(labels[0])
        if boxes and rng.random() < 0.05:  # the same box with -0.0 for 0.0: equal as tuples
            boxes[-1] = (0.0, 0.0, 5.0, 5.0)
            boxes.append((-0.0, 0.0, 5.0, 5.0))
            labels.append(labels[-1])
        out.append(Sample(i, i, f"{i}.jpg", i + 1, W, W and 480.0, OD, boxes, list(range(len(boxes))), labels))
    return out


def test_the_filter_never_hides_a_box_hit():
    samples = _samples()
    boxes, owner, counts = chunk_boxes.box_array(samples)
    need = chunk_boxes.needs_box_checks(samples, boxes, owner, counts)
    with_hits = [bool(checks.box_hits(s)) for s in samples]
    assert all(n for n, h in zip(need, with_hits) if h)
    dup = [any(h.code == "NS205" for h in checks.box_hits(s)) for s in samples]
    assert sum(dup) >= 20 and all(n for n, d in zip(need, dup) if d)
    assert sum(need) < len(samples)  # and it does skip the clean ones


def test_the_repeated_pairs_are_the_samples_with_a_duplicate():
    """One hashed key per box finds exactly the samples whose (name, box) pairs repeat (as `checks.box_hits` says,
    NS205) among the samples whose boxes are all finite with x2 > x1, y2 > y1 (box_hits checks no others for
    duplicates): a key that left out a coordinate or the sample would flag more, one that kept -0.0 apart from
    0.0 fewer."""
    samples = _samples(2, 600)
    base = (10.0, 20.0, 50.0, 60.0)
    for c in range(4):  # near misses: one coordinate apart, another label, the same pair in the next sample
        other = tuple(v + 1.0 if k == c else v for k, v in enumerate(base))
        samples.append(Sample(len(samples), 0, "", 1, 640.0, 480.0, OD, [base, other], [0, 1], ["1", "1"]))
    samples.append(Sample(len(samples), 0, "", 1, 640.0, 480.0, OD, [base, base], [0, 1], ["1", "2"]))
    samples += [Sample(len(samples) + k, 0, "", 1, 640.0, 480.0, OD, [base], [0], ["1"]) for k in range(2)]
    boxes, owner, _ = chunk_boxes.box_array(samples)
    got = set(chunk_boxes._repeated(samples, boxes, owner).tolist())
    ok = [all(math.isfinite(x1 + y1 + x2 + y2) and x2 > x1 and y2 > y1 for x1, y1, x2, y2 in s.boxes) for s in samples]
    want = {i for i, s in enumerate(samples) if ok[i] and any(h.code == "NS205" for h in checks.box_hits(s))}
    assert len(want) >= 20
    assert {i for i in got if ok[i]} == want


def test_the_size_histogram_equals_the_per_box_bins():
    samples = _samples(1)
    boxes, _, _ = chunk_boxes.box_array(samples)
    want = [0] * chunk_boxes.SIZE_BINS
    for s in samples:
        for x1, y1, x2, y2 in s.boxes:
            try:
                b = _size_bin(x2 - x1, y2 - y1)
            except OverflowError:  # the per-box code fails on an infinite area; the array puts it in the last bin
                b = chunk_boxes.SIZE_BINS - 1
            if b is not None:
                want[b] += 1
    assert chunk_boxes.size_histogram(boxes) == want


def test_the_worst_negatives_bound_equals_the_loop_over_labels():
    from nanscope.scan.captions import LabelCosts, longest_negatives

    rng = random.Random(3)
    for _ in range(300):
        n = rng.randrange(1, 40)
        keys = [str(i) for i in range(n)]
        cost = {k: rng.randrange(1, 6) for k in keys}
        order = tuple(sorted(keys, key=lambda k: (-cost[k], int(k))))
        loop = LabelCosts(cost, order, tuple(keys), 2)  # no prefix: the plain loop
        fast = LabelCosts(cost, order, tuple(keys), 2, tuple(__import__("itertools").accumulate(
            (cost[k] for k in order), initial=0)), {k: i for i, k in enumerate(order)})
        pos = set(rng.sample(keys, rng.randrange(0, n + 1)))
        k = rng.randrange(0, n + 3)
        assert longest_negatives(fast, pos, k) == longest_negatives(loop, pos, k)


def test_the_shortcuts_change_no_result(monkeypatch, tmp_path):
    """The planted fixtures and a synthetic O365-like file with the shortcuts on and off: `box_groups`' hit-free
    groups (`engine.FAST_TEXT`), the chunk-wide prompts (`engine.FAST_PROMPTS`), the typed decoder
    (`odvg.FAST_OD`), the tokenizer on a helper thread (`engine.PIPELINE`). Rules include grounding lines matched with caption.find in the file's caption, whose spans
    need not be where find looks."""
    import importlib.util
    import json
    from pathlib import Path

    from nanscope.report.json_io import result_files
    from nanscope.scan import CaptionRules, engine, odvg, scan

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("scan_speed", root / "benchmarks" / "scan_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    te = bench.tokenizer_folder(tmp_path)
    names = bench.names365()
    (tmp_path / "lm.json").write_text(json.dumps({str(i): n for i, n in enumerate(names)}))
    bench.write_dataset(tmp_path / "o365.jsonl", 600, names)
    fix = root / "fixtures" / "scan"
    cases = [(tmp_path / "o365.jsonl", tmp_path / "lm.json"), (fix / "od.jsonl", fix / "label_map.json"),
             (fix / "vg.jsonl", None)]
    presets = [CaptionRules.preset("open-groundingdino"), CaptionRules.preset("mmdet"),
               CaptionRules.preset("open-groundingdino", vg_caption="file", match="find"),
               CaptionRules.preset("open-groundingdino", match="span", order="label-map", max_labels=8)]
    for data, lm in cases:
        for rules in presets:
            kw = dict(text_encoder=str(te), rules=rules, label_map=str(lm) if lm else None)
            results = []
            for on in (True, False):
                for mod, flag in ((engine, "FAST_TEXT"), (engine, "FAST_PROMPTS"), (odvg, "FAST_OD"),
                                  (engine, "PIPELINE")):
                    monkeypatch.setattr(mod, flag, on)
                results.append(result_files(scan(data, **kw).result)[0])
            assert results[0] == results[1], (data.name, rules)


def test_the_typed_decoder_equals_the_checked_path(monkeypatch):
    """Detection lines, well-formed and not: msgspec's typed decoder gives the Sample the orjson path gives, and a
    line it refuses gets the same DataError (the field named)."""
    from nanscope.errors import DataError
    from nanscope.scan import odvg

    inst = [{"bbox": [1, 2.5, 30, 40], "label": 3, "category": "cat"}, {"bbox": [0.0, 0, 1e3, 2], "label": "7"}]
    lines = [{"filename": "a.jpg", "height": 480, "width": 640, "detection": {"instances": inst}},
             {"filename": "a.jpg", "detection": {"instances": []}},
             {"filename": "a.jpg", "width": 640.5, "detection": {"instances": inst, "extra": 1}, "more": [1]},
             {"filename": "a.jpg", "detection": {"instances": [{"bbox": [1, 2, 3, True], "label": 1}]}},
             {"filename": "a.jpg", "detection": {"instances": [{"bbox": [1, 2, 3, "4"], "label": 1}]}},
             {"filename": "a.jpg", "detection": {"instances": [{"bbox": [1, 2, 3], "label": 1}]}},
             {"filename": "a.jpg", "detection": {"instances": [{"bbox": [1, 2, 3, 4], "label": True}]}},
             {"filename": "a.jpg", "detection": {"instances": [{"bbox": [1, 2, 3, 4], "label": 1.5}]}},
             {"filename": "a.jpg", "detection": {"instances": [{"bbox": [1, 2, 3, 4]}]}},
             {"filename": "a.jpg", "detection": {"instances": [[1, 2, 3, 4]]}},
             {"filename": 5, "detection": {"instances": inst}},
             {"filename": "a.jpg", "width": True, "detection": {"instances": inst}},
             {"filename": "a.jpg", "width": -3, "detection": {"instances": inst}},
             {"filename": "a.jpg", "grounding": {"caption": "a cat", "regions": []}},
             {"filename": "a.jpg", "detection": {"instances": inst}, "height": None}]
    raws = [json.dumps(d).encode() + b"\n" for d in lines]
    raws += [b'{"filename": "a.jpg", "detection": {"instances": [{"bbox": [NaN, 1, 2, 3], "label": 0}]}}\n',
             b'{"filename": "a.jpg", "detection": {"instances": [{"bbox": [1, 2, 3, 4], "label": 1}]}',
             b'{"filename": "a.jpg", "filename": 3, "detection": {"instances": []}}\n', b'[1, 2]\n']

    def parse(raw, fast):
        monkeypatch.setattr(odvg, "FAST_OD", fast)
        try:
            s = odvg.parse_line(raw, 4, 5, "d.jsonl", od=True)
        except DataError as exc:
            return "error", str(exc)
        return "sample", (s.index, s.id, s.file, s.line, s.width, s.height, s.mode, s.boxes, s.annotations, s.labels,
                          [tuple(map(type, b)) for b in s.boxes])

    for raw in raws:
        assert parse(raw, True) == parse(raw, False), raw
    assert parse(raws[0], True)[0] == "sample" and parse(raws[4], True)[0] == "error"


def _draw_reference(samples, rules, label_map, costs):
    """The row-by-row draw the chunk-wide `draw_negatives` replaced (nanscope before the scan-at-scale change)."""
    import numpy as np

    from nanscope.scan.captions import _MASK, priorities

    keys = costs.keys
    n = len(keys)
    pos_of = {k: i for i, k in enumerate(keys)}
    pick, order = priorities(samples, rules, n)  # unchanged: the priorities are not what this test compares
    positives = [list(dict.fromkeys(lb for lb in s.labels if lb in label_map)) for s in samples]
    ks = []
    for r, pos in enumerate(positives):
        pick[r, [pos_of[lb] for lb in pos]] = np.uint64(_MASK)
        k = n - len(pos) if rules.max_labels is None else max(0, min(n - len(pos), rules.max_labels - len(pos)))
        ks.append(k if rules.negatives is None else min(k, rules.negatives))
    kmax = max(ks, default=0)
    if 0 < kmax < n:
        part = np.argpartition(pick, kmax - 1, axis=1)[:, :kmax]
        ranked = np.take_along_axis(part, np.argsort(np.take_along_axis(pick, part, 1), axis=1, kind="stable"), 1)
    else:
        ranked = np.argsort(pick, axis=1, kind="stable")[:, :kmax]
    out = []
    for r, (pos, row) in enumerate(zip(positives, ranked.tolist())):
        chosen = np.array([pos_of[lb] for lb in pos] + row[:ks[r]], dtype=np.int64)
        if rules.order == "shuffle":
            chosen = chosen[np.argsort(order[r, chosen], kind="stable")]
        else:
            chosen.sort()
        out.append([keys[j] for j in chosen.tolist()])
    return out


def test_the_chunk_wide_draw_equals_the_row_by_row_draw():
    from nanscope.scan.captions import CaptionRules, LabelCosts, draw_negatives

    rng = random.Random(0)
    for _ in range(300):
        n = rng.choice([1, 3, 40, 365])
        lm = {str(i): f"n{i}" for i in range(n)}
        costs = LabelCosts({k: 1 for k in lm}, tuple(lm), tuple(lm), 2)
        rules = CaptionRules(max_labels=rng.choice([None, 5, 50]), negatives=rng.choice([None, 0, 3, 85]),
                             order=rng.choice(["shuffle", "label-map"]), seed=rng.randrange(5))
        samples = [Sample(rng.randrange(10 ** 6), 0, "", 1, None, None, OD, [], [],
                          [str(rng.randrange(n + 2)) for _ in range(rng.randrange(0, 8))])
                   for _ in range(rng.randrange(1, 30))]
        assert draw_negatives(samples, rules, lm, costs) == _draw_reference(samples, rules, lm, costs)


def test_the_aggregate_counts_every_hit_once():
    """`Aggregate.add` (one-code samples taken whole) against counts made here from the hits: per code the samples,
    the summed counts, the kinds (`kind`, else `why`) and the worst samples' scores, with one- and many-code samples."""
    from collections import Counter

    from nanscope.scan.aggregate import Aggregate
    from nanscope.scan.engine import ChunkOut, SampleHits

    rng = random.Random(3)
    out = ChunkOut()
    for i in range(300):
        hits = []
        for _ in range(rng.randint(1, 6)):
            code = rng.choice(["NS106"] * 4 + ["NS102", "NS205"])
            where = rng.choice([{"kind": "another occurrence"}, {"why": "truncated"}, {"kind": "", "why": "x"}, {}])
            hits.append(checks.Hit(code, rng.randrange(5), rng.randint(1, 3), where, rng.choice([1.0, 0.5, 2.25])))
        out.hits.append(SampleHits(i, f"id{i}", "f.jsonl", i + 1, list(range(5)), hits))
    agg = Aggregate()
    agg.add(out)
    for code in ("NS106", "NS102", "NS205"):
        mine = [(sh, [h for h in sh.hits if h.code == code]) for sh in out.hits]
        mine = [(sh, hs) for sh, hs in mine if hs]
        a = agg.codes[code]
        assert a.samples == [sh.id for sh, _ in mine]
        assert a.count == sum(h.count for _, hs in mine for h in hs)
        assert a.kinds == dict(Counter(k for _, hs in mine for h in hs if (k := h.where.get("kind") or h.where.get("why"))))
        scores = sorted(((sum(h.score for h in hs), -sh.index) for sh, hs in mine), reverse=True)[:8]
        assert [(s, ni) for s, ni, _ in a.ranked()] == scores
