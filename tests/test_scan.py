"""nanscope scan on the planted fixtures: every planted bug found, with its sample and annotation, and nothing else.

Expected findings come from the fixture script's construction (`PLANTED`) and, for the over-long
captions, from the tokenizer's own offsets (not from nanscope's positive-map code).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nanscope.scan import CaptionRules, scan
from nanscope.scan.engine import ChunkOut

from _scan_fixtures import DATA_FILES, FIX, load_maker

FILES = {"od": ("od.jsonl", "label_map.json"), "coco": ("coco.json", None), "vg": ("vg.jsonl", None),
         "grounding": ("grounding.json", None)}
TEXT = ("NS102", "NS103", "NS104")
IMAGES: Path | None = None  # set by the `maker` fixture: the images the script writes (not committed)


@pytest.fixture(scope="module", autouse=True)
def maker(tmp_path_factory):
    global IMAGES
    mod = load_maker()
    out = tmp_path_factory.mktemp("fixtures")
    mod.build(out)  # fills PLANTED / OVERFLOW and writes every file, images included
    IMAGES = out / "images"
    return mod


def test_the_committed_fixtures_are_what_the_script_makes(maker):
    built = IMAGES.parent
    for name in DATA_FILES:
        assert (FIX / name).read_bytes() == (built / name).read_bytes(), name
    assert (FIX / "text_encoder" / "vocab.txt").read_bytes() == (built / "text_encoder" / "vocab.txt").read_bytes()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIX / "text_encoder"))


def run_scan(name: str, tokenizer: Any, rules: CaptionRules, *, images: bool = True, **kw: Any):
    data, lm = FILES[name]
    hits: set[tuple[str, Any, Any]] = set()

    def collect(items: list[Any], out: ChunkOut) -> None:
        for sh in out.hits:
            for h in sh.hits:
                hits.add((h.code, sh.id, sh.annotations[h.box] if h.box is not None else None))

    run = scan(FIX / data, label_map=str(FIX / lm) if lm else None, tokenizer=tokenizer, max_text_len=256,
               rules=rules, images=IMAGES if images else None, on_chunk=collect, **kw)
    return run, hits


def _annotations(name: str, sample: Any) -> list[Any]:
    """The annotation ids of one sample, in box order, read from the fixture file."""
    data = FIX / FILES[name][0]
    if name in ("od", "vg"):
        lines = [json.loads(x) for x in data.read_text().splitlines() if x.strip()]
        d = lines[sample]
        return list(range(len(d["detection"]["instances"]))) if name == "od" else list(range(len(d["grounding"]["regions"])))
    doc = json.loads(data.read_text())
    return [a["id"] for a in doc["annotations"] if a["image_id"] == sample and not a.get("iscrowd")]


def overflow_expectation(name: str, sample: Any, tokenizer: Any, maker: Any) -> set[tuple[str, Any, Any]]:
    """NS102/NS103/NS104 of an over-long caption whose names are in file order, from the tokenizer's offsets:
    a box is cut when one of its name's tokens sits at position >= 256, empty when all do."""
    names = maker.NAMES[:maker.LONG]
    caption = " . ".join(names) + " ."
    enc = tokenizer(caption, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    out = {("NS104", sample, None)}
    pos = 0
    for ann, name in zip(_annotations(name, sample), names):
        b = caption.index(name, pos)
        pos = b + len(name)
        toks = [t for t, (s, e) in enumerate(offsets) if e > s and s < b + len(name) and e > b]
        if any(t >= 256 for t in toks):
            out.add(("NS102", sample, ann))
        if all(t >= 256 for t in toks):
            out.add(("NS103", sample, ann))
    return out


def expected(maker: Any, name: str, trainer: str, tokenizer: Any, *, images: bool = True) -> set[tuple[str, Any, Any]]:
    scopes = {"all", trainer} | ({"images"} if images else set())
    out = {(c, s, a) for c, s, a, scope in maker.PLANTED[name] if scope in scopes}
    for sample in maker.OVERFLOW[name]:
        if trainer == "mmdet" and name in ("od", "coco"):
            out.add(("NS104", sample, None))  # check_for_positive_overflow drops 5 positives: nothing is cut
        else:
            out |= overflow_expectation(name, sample, tokenizer, maker)
    return out


DETERMINISTIC = {"order": "label-map", "negatives": 0}  # captions that do not depend on a draw


@pytest.mark.parametrize("trainer", ["open-groundingdino", "mmdet"])
@pytest.mark.parametrize("name", sorted(FILES))
def test_every_planted_bug_is_found_and_nothing_else(maker, tokenizer, name, trainer):
    run, hits = run_scan(name, tokenizer, CaptionRules.preset(trainer, **DETERMINISTIC))
    assert hits == expected(maker, name, trainer, tokenizer)
    # The result lists, per code, exactly the samples with a hit of that code, in dataset order.
    by_code: dict[str, set[Any]] = {}
    for c, s, _ in hits:
        by_code.setdefault(c, set()).add(s)
    got = {f.code: f.data["samples"] for f in run.result.findings}
    assert {c: set(v) for c, v in got.items()} == by_code
    assert all(len(v) == len(set(v)) for v in got.values())
    assert run.result.exit_code == 1


def test_without_images_the_file_checks_are_skipped(maker, tokenizer):
    _, hits = run_scan("coco", tokenizer, CaptionRules(**DETERMINISTIC), images=False)
    assert hits == expected(maker, "coco", "open-groundingdino", tokenizer, images=False)


def test_default_rules_shuffle_but_the_overflow_is_the_same(maker, tokenizer):
    """Open-GroundingDino's defaults: 50 labels, shuffled. The 90-positive sample takes no negatives and all names
    cost 3 tokens, so whatever the order the last 5 names (10 tokens) fall past 256."""
    run, hits = run_scan("od", tokenizer, CaptionRules())
    planted = {(c, s, a) for c, s, a, scope in maker.PLANTED["od"] if scope in ("all", "open-groundingdino", "images")}
    assert {h for h in hits if h[0] not in TEXT} == planted
    (sample,) = maker.OVERFLOW["od"]
    text = [h for h in hits if h[0] in TEXT]
    assert {h[1] for h in text} == {sample}
    assert sum(1 for h in text if h[0] == "NS103") == 5
    ns102 = next(f for f in run.result.findings if f.code == "NS102")
    assert ns102.count == 10  # tokens
    # The result is summarized: 14 samples, and the caption of every other sample fits.
    assert run.result.summary["samples"] == 14 and run.result.summary["tokens"]["over_max_text_len"] == 1


def test_the_draw_is_reproducible_and_independent_of_workers(tokenizer):
    a, _ = run_scan("od", tokenizer, CaptionRules(seed=3), keep=[str(i) for i in range(14)])
    b, _ = run_scan("od", tokenizer, CaptionRules(seed=3), workers=2, keep=[str(i) for i in range(14)])
    c, _ = run_scan("od", tokenizer, CaptionRules(seed=4), keep=[str(i) for i in range(14)])
    assert a.result.to_json() == b.result.to_json()
    caps = lambda r: [p.caption for _, p in sorted(r.kept, key=lambda t: t[0].index)]
    assert caps(a) == caps(b)
    assert caps(a) != caps(c)
    # Open-GroundingDino's rule: positives plus min(#neg, max_labels - #pos) negatives.
    for smp, pr in a.kept:
        n_pos = len({lb for lb in smp.labels if lb in a.state.label_map})
        assert len(pr.names) == max(n_pos, 50) and len(set(pr.names)) == len(pr.names)


def test_possible_overflow_is_bounded_over_all_draws(tmp_path, tokenizer):
    """A caption that fits in this draw but not in the longest one is NS104 'possible'; the bound is the positives
    plus the (max_labels - #pos) longest negatives, computed here from each name's own tokenization."""
    names = {"0": "cat", "1": "dog", "2": "zebra", "3": "qqqqqqqqqq", "4": "wwwwwwwwwwww", "5": "horse"}
    (tmp_path / "lm.json").write_text(json.dumps(names))
    lines = [{"filename": f"{i}.png", "width": 10, "height": 10,
              "detection": {"instances": [{"bbox": [1, 1, 5, 5], "label": lb}]}} for i, lb in enumerate([0, 1, 2, 5])]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cost = {k: len(tokenizer(v + " .", add_special_tokens=False)["input_ids"]) for k, v in names.items()}
    limit = 20
    hits: dict[Any, dict[str, Any]] = {}

    def collect(items, out):
        for sh in out.hits:
            for h in sh.hits:
                hits[sh.id] = h.where

    run = scan(tmp_path / "d.jsonl", label_map=str(tmp_path / "lm.json"), tokenizer=tokenizer, max_text_len=limit,
               rules=CaptionRules(max_labels=3, seed=0), keep=["0", "1", "2", "3"], on_chunk=collect)
    for smp, pr in run.kept:
        pos = smp.labels[0]
        worst = 2 + cost[pos] + sum(sorted((c for k, c in cost.items() if k != pos), reverse=True)[:2])
        drawn = len(tokenizer(pr.caption)["input_ids"])
        if drawn > limit:
            assert hits[smp.id]["kind"] == "this draw"
        elif worst > limit:
            assert hits[smp.id]["kind"] == "possible" and hits[smp.id]["worst_tokens"] == worst
        else:
            assert smp.id not in hits
    assert hits  # the two long names make some draw too long


def test_positive_maps_equal_the_ones_inspect_builds(tokenizer):
    """The scan's tokens per box (batched encoding) equal inspect's build_text_info on the batch --batch-out writes,
    and groundingdino's own create_positive_map_from_span for span samples."""
    import torch
    from groundingdino.util.vl_utils import create_positive_map_from_span

    from nanscope.replay.batch import validate_batch
    from nanscope.replay.positive_map import build_text_info, encode, positive_map
    from nanscope.scan.batch_out import build_batch
    from nanscope.scan.engine import sample_tokens

    for name, ids, trainer in (("vg", ["1", "2", "9"], "open-groundingdino"), ("grounding", ["1", "4", "6"], "mmdet"),
                               ("od", ["0", "8"], "open-groundingdino")):
        run, _ = run_scan(name, tokenizer, CaptionRules.preset(trainer), keep=ids)
        kept = sorted(run.kept, key=lambda t: t[0].index)
        ids_in_order = [str(s.id) for s, _ in kept]
        batch = validate_batch(build_batch(kept, ids_in_order, IMAGES, image_size=64))
        backwards = build_batch(kept, ids_in_order[::-1], IMAGES, image_size=64)
        assert backwards["captions"] == list(batch.captions)[::-1]  # the batch follows --ids
        infos = build_text_info(tokenizer, batch)
        encs = encode(tokenizer, [p.caption for _, p in kept])
        for (smp, pr), enc, info in zip(kept, encs, infos):
            bts = [bt for bt in sample_tokens(run.state, smp, pr, enc) if bt is not None]
            assert torch.equal(positive_map(bts), info.positive_map)
            assert [bt.tokens for bt in bts] == [bt.tokens for bt in info.boxes]
            assert info.input_ids == tuple(tokenizer(pr.caption)["input_ids"])
            if pr.spans is not None:
                spans = [list(map(list, pr.spans[j])) for j in range(len(smp.boxes)) if j not in pr.dropped]
                ref = create_positive_map_from_span(tokenizer(pr.caption), spans, max_text_len=256)
                assert torch.equal(info.positive_map, (ref > 0).float())


def test_batched_encoding_equals_one_call_per_caption_even_after_padding(tokenizer):
    from nanscope.replay.positive_map import encode

    caps = ["a cat next to a dog", "red cat . blue dog .", "the woman  is sitting ."]
    tokenizer(caps, padding="longest")  # what groundingdino's forward leaves behind in the backend
    for c, enc in zip(caps, encode(tokenizer, caps)):
        one = tokenizer(c)
        assert list(enc.ids) == one["input_ids"]
        assert [enc.char_to_token(k) for k in range(len(c))] == [one.char_to_token(k) for k in range(len(c))]


def test_progress_reports_samples_done(tokenizer):
    """Through the callback and through nanscope.progress's listener (what the CLI's bar reads)."""
    from nanscope import progress

    class Heard(progress.Listener):
        def __init__(self):
            self.counts, self.stages = [], []

        def advanced(self, done, total, unit):
            self.counts.append((done, total, unit))

        def ended(self, doing, done, seconds, depth, ok):
            self.stages.append(done)

    seen = []
    with progress.listening(Heard()) as heard:
        scan(FIX / "vg.jsonl", tokenizer=tokenizer, max_text_len=256, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == 11 and all(t == 11 for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert heard.counts == [(d, t, "samples") for d, t in seen]
    assert heard.stages[-1] == "scanned 11 samples"
