"""inspect end to end on the real demo GroundingDINO, against independently computed counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nanscope.cli import main
from nanscope.replay.diagnose import inspect, inspect_replay
from nanscope.stacks.groundingdino.demo import demo_batch

CRITERIA = str(Path(__file__).parents[1] / "fixtures" / "criteria" / "simple.py")


def _valid_tokens(tokenizer, captions, max_len=256):
    return [min(len(tokenizer(c)["input_ids"]), max_len) for c in captions]


def test_ns101_counts_equal_independent_counts(demo_replay):
    result = inspect_replay(demo_replay)
    f = next(f for f in result.findings if f.code == "NS101")
    valid = _valid_tokens(demo_replay.model.tokenizer, demo_replay.batch.captions)
    layers = result.summary["decoder_layers"] + (1 if result.summary["encoder_proposals"] else 0)
    q = result.summary["queries"]
    expected = layers * q * sum(256 - v for v in valid)
    assert f.count == expected
    per_layer = f.data["per_layer"]
    for i, v in enumerate(valid):
        assert per_layer["dec0"][i]["inf_cells"] == q * (256 - v)
        assert per_layer["dec0"][i]["invalid_columns"] == 256 - v
    # Without a criterion NS101 only warns and says how to check.
    assert f.severity.value == "warning" and "--criterion" in f.message


def test_planted_phrase_past_256_gives_ns102_and_ns104_with_token_indices(demo_replay):
    tok = demo_replay.model.tokenizer
    caption = demo_replay.batch.captions[2]
    phrases = demo_replay.batch.targets[2].phrases
    enc = tok(caption, return_offsets_mapping=True)
    expected = {}
    for j, ph in enumerate(phrases):
        beg = caption.find(ph)
        end = beg + len(ph)
        toks = [k for k, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a >= beg and b <= end]
        if any(t >= 256 for t in toks):
            expected[j] = toks
    assert expected, "the demo batch must plant phrases past 256 tokens"
    result = inspect_replay(demo_replay)
    ns102 = next(f for f in result.findings if f.code == "NS102")
    got = {w["box"]: w["tokens"] for w in ns102.where if w["image"] == 2}
    assert got == expected
    assert ns102.count == sum(len(v) for v in expected.values())
    ns104 = next(f for f in result.findings if f.code == "NS104")
    assert ns104.where[0]["image"] == 2 and ns104.where[0]["tokens"] == len(enc["input_ids"])
    assert sorted(ns104.where[0]["phrases_cut"]) == sorted(phrases[j] for j in expected)
    assert result.findings[0].code == "NS104"  # the cause ranks first: the caption, then what it explains
    assert result.exit_code == 1


@pytest.fixture(scope="module")
def healthy_batch(tmp_path_factory):
    p = tmp_path_factory.mktemp("healthy") / "batch.pt"
    torch.save(demo_batch(seed=3, long=False), p)
    return p


def test_healthy_batch_with_masked_criterion_is_clean(demo_files, healthy_batch, capsys):
    code = main(["inspect", str(demo_files.checkpoint), str(healthy_batch), "--config", str(demo_files.config),
                 "--criterion", f"{CRITERIA}:masked"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "CLEAN" in out


def test_unmasked_criterion_makes_ns001_and_ns101_errors(demo_files, healthy_batch):
    result = inspect(demo_files.checkpoint, healthy_batch, config=demo_files.config,
                     criterion=f"{CRITERIA}:unmasked")
    codes = {f.code: f for f in result.findings}
    assert codes["NS001"].severity.value == "error"
    assert codes["NS001"].where[0]["term"] == "loss_ce"
    assert codes["NS101"].severity.value == "error"
    assert result.loss_terms["loss_ce"] != result.loss_terms["loss_ce"]  # NaN
    assert result.exit_code == 1


def test_user_criterion_that_raises_names_its_frame(demo_files, healthy_batch, capsys):
    code = main(["inspect", str(demo_files.checkpoint), str(healthy_batch), "--config", str(demo_files.config),
                 "--criterion", f"{CRITERIA}:Raises"])
    err = capsys.readouterr().err
    assert code == 2
    assert "boom in user criterion" in err and "simple.py:" in err and "Traceback" not in err
