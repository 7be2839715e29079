"""NS401-NS404: finite losses that supervise the wrong thing, planted one per criterion on the real demo model.

Expected values come from the batch and the tokenizer, never from nanscope's probes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nanscope.criterion.presets import PRESETS
from nanscope.replay.diagnose import inspect_replay
from nanscope.replay.session import prepare
from nanscope.stacks.groundingdino.demo import demo_batch

CRITERIA = Path(__file__).parents[1] / "fixtures" / "criteria" / "supervision.py"
CODES = ("NS401", "NS402", "NS403", "NS404")


def _codes(result):
    return {f.code: f for f in result.findings if f.code in CODES}


@pytest.fixture(scope="module")
def healthy_replay(fixture_files):
    d = fixture_files.demo
    return prepare(d.checkpoint, fixture_files.healthy, config=d.config, hash_checkpoint=False)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_nanscopes_own_criterion_raises_no_supervision_alarm(healthy_replay, demo_replay, preset):
    factory = f"{CRITERIA}:set_criterion_{preset.replace('-', '_')}"  # a factory, as a user's file has
    for replay in (healthy_replay, demo_replay):
        result = inspect_replay(replay, criterion=factory)
        assert not _codes(result), [f.message for f in _codes(result).values()]


def test_open_groundingdinos_interm_spelling_raises_no_alarm_either(healthy_replay, demo_replay):
    """Open-GroundingDino names its encoder terms `_interm`; NS404's reference ratios must find them."""
    for replay in (healthy_replay, demo_replay):
        result = inspect_replay(replay, criterion=f"{CRITERIA}:OpenGroundingDinoSpelling")
        assert {"loss_ce_interm", "loss_bbox_interm"} <= set(result.loss_terms)
        assert not _codes(result), [f.message for f in _codes(result).values()]


def test_matched_only_loss_never_trains_negatives(healthy_replay):
    result = inspect_replay(healthy_replay, criterion=f"{CRITERIA}:MatchedOnly")
    f = _codes(result)["NS401"]
    q = healthy_replay.model.num_queries
    boxes = [len(t.boxes) for t in healthy_replay.batch.targets]
    expected_rows = sum(min(q, n) for n in boxes)  # one row per matched query
    w = f.where[0]
    assert w["term"] == "loss_ce" and w["rows"] == q * len(boxes) and w["rows_reached"] == expected_rows
    assert w["per_image"] == [min(q, n) for n in boxes]
    assert f"{expected_rows} of {q * len(boxes)} query rows" in f.message
    assert set(_codes(result)) == {"NS401"}  # the positives are trained: no NS402


def test_targets_without_token_labels_ignore_the_positives(healthy_replay):
    result = inspect_replay(healthy_replay, criterion=f"{CRITERIA}:NoTokenLabels")
    f = _codes(result)["NS402"]
    assert f.where[0]["term"] == "loss_ce" and f.where[0]["unchanged_without_positives"] is True
    assert set(_codes(result)) == {"NS402"}


def _cut_boxes(replay):
    """(image, box) whose phrase starts past max_text_len tokens: from the caption and the tokenizer only."""
    tok = replay.model.tokenizer
    out = []
    for i, (cap, t) in enumerate(zip(replay.batch.captions, replay.batch.targets)):
        enc = tok(cap)
        for j, ph in enumerate(t.phrases or ()):
            if enc.char_to_token(cap.find(ph)) >= replay.max_text_len:
                out.append((i, j))
    return out


def test_matcher_that_turns_nan_into_zero_is_named_with_the_guarded_pairs(demo_replay):
    cut = _cut_boxes(demo_replay)
    assert cut  # the demo's long caption cuts phrases
    result = inspect_replay(demo_replay, criterion=f"{CRITERIA}:HidesNonFinite")
    f = _codes(result)["NS403"]
    named = {(w["image"], w["box"]) for w in f.where}
    assert named and named <= set(cut)
    assert all(w["query"] != w.get("guarded_query") for w in f.where)


def test_an_unnormalized_sum_drowns_the_box_terms_and_the_normalizer_is_named(demo_files, tmp_path):
    raw = demo_batch(seed=3, long=False)
    g = torch.Generator().manual_seed(0)
    for t in raw["targets"]:  # 60 boxes per image, all 'cat': the reference divides by 120, a plain sum does not
        n = 60
        t["boxes"] = torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.2 + 0.1], 1)
        t["phrases"] = ["cat"] * n
    raw["captions"] = ["cat . dog ."] * len(raw["captions"])
    batch = tmp_path / "many.pt"
    torch.save(raw, batch)
    replay = prepare(demo_files.checkpoint, batch, config=demo_files.config, hash_checkpoint=False)
    result = inspect_replay(replay, criterion=f"{CRITERIA}:UnnormalizedSum")
    f = _codes(result)["NS404"]
    assert f.where[0]["term"] == "loss_ce" and f.where[0]["normalizer"] == "1 (a plain sum)"
    assert f.where[0]["ratio"] >= 100


def test_a_text_mask_built_without_truncation_is_named_not_reported_as_a_crash(demo_replay):
    tok = demo_replay.model.tokenizer
    lengths = [len(tok(c)["input_ids"]) for c in demo_replay.batch.captions]  # untruncated, from the tokenizer
    long = [i for i, n in enumerate(lengths) if n > demo_replay.max_text_len]
    result = inspect_replay(demo_replay, criterion=f"{CRITERIA}:UntruncatedMask")
    f = next(f for f in result.findings if f.code == "NS406")
    assert [w["image"] for w in f.where] == long and f.where[0]["tokens"] == max(lengths)
    assert str(max(lengths)) in f.message and result.exit_code == 1


def test_a_positive_map_made_by_splitting_the_token_range_disagrees_with_the_tokenizer(demo_files, tmp_path):
    raw = demo_batch(seed=3, long=False)
    tok_map = []
    for cap, t in zip(raw["captions"], raw["targets"]):
        n = len(t["boxes"])
        pm = torch.zeros(n, 256)
        enc_len = len(cap.split())  # words, not tokens
        for j in range(n):  # equal splits of the caption's word range: the bug trainers write
            lo = 1 + j * enc_len // n
            pm[j, lo: lo + 1] = 1.0
        t["positive_map"] = pm
        tok_map.append(pm)
    batch = tmp_path / "split.pt"
    torch.save(raw, batch)
    replay = prepare(demo_files.checkpoint, batch, config=demo_files.config, hash_checkpoint=False)
    tok = replay.model.tokenizer
    expected = 0
    for cap, t, pm in zip(raw["captions"], raw["targets"], tok_map):
        enc = tok(cap)
        for j, ph in enumerate(t["phrases"]):
            b = cap.find(ph)
            ours = sorted({enc.char_to_token(c) for c in range(b, b + len(ph)) if enc.char_to_token(c) is not None})
            expected += ours != pm[j].nonzero().flatten().tolist()
    result = inspect_replay(replay)
    f = next(f for f in result.findings if f.code == "NS405")
    assert f.count == expected > 0
    w = f.where[0]
    assert w["user_tokens"] == tok_map[w["image"]][w["box"]].nonzero().flatten().tolist()


def test_verify_fix_is_not_fixed_when_the_fix_stops_training_negatives(healthy_replay):
    from nanscope.verify.pipeline import verify_replay

    result = verify_replay(healthy_replay, after=f"{CRITERIA}:MatchedOnly", preset="mmdet", steps=2)
    check = next(c for c in result.checks if c.id == 10)
    assert not check.passed and "NS401" in check.detail and result.verdict == "not fixed"
