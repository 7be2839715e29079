"""The chunk's box filter and size histogram against the per-box Python they replace (`checks.box_hits`,
`engine._size_bin`), on random boxes with planted bad ones."""

from __future__ import annotations

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
        out.append(Sample(i, i, f"{i}.jpg", i + 1, W, W and 480.0, OD, boxes, list(range(len(boxes))), labels))
    return out


def test_the_filter_never_hides_a_box_hit():
    samples = _samples()
    boxes, owner, counts = chunk_boxes.box_array(samples)
    need = chunk_boxes.needs_box_checks(samples, boxes, owner, counts)
    with_hits = [bool(checks.box_hits(s)) for s in samples]
    assert all(n for n, h in zip(need, with_hits) if h)
    assert sum(need) < len(samples)  # and it does skip the clean ones


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


def test_the_clean_text_shortcut_changes_no_result(monkeypatch, tmp_path):
    """The planted fixtures and a synthetic O365-like file, with `engine._text_is_clean` on and off."""
    import importlib.util
    import json
    from pathlib import Path

    from nanscope.report.json_io import result_files
    from nanscope.scan import CaptionRules, engine, scan

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
    for data, lm in cases:
        for trainer in ("open-groundingdino", "mmdet"):
            kw = dict(text_encoder=str(te), rules=CaptionRules.preset(trainer), label_map=str(lm) if lm else None)
            monkeypatch.setattr(engine, "FAST_TEXT", True)
            fast = result_files(scan(data, **kw).result)[0]
            monkeypatch.setattr(engine, "FAST_TEXT", False)
            assert result_files(scan(data, **kw).result)[0] == fast, (data.name, trainer)
