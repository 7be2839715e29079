"""Checkpoint loading: weights_only by default, key-fit reported instead of silently ignored."""

from __future__ import annotations

import collections

import pytest
import torch

from nanscope.stacks.formats.checkpoint import key_fit, load_into, read_state_dict
from nanscope.errors import CheckpointError


class Payload:  # a pickled object: needs code to load
    pass


def test_module_prefix_and_layouts(tmp_path):
    sd = collections.OrderedDict(a=torch.ones(2), b=torch.zeros(3))
    for i, obj in enumerate([{"model": {f"module.{k}": v for k, v in sd.items()}}, dict(sd), {"state_dict": dict(sd)}]):
        p = tmp_path / f"c{i}.pth"
        torch.save(obj, p)
        got = read_state_dict(p)
        assert set(got) == {"a", "b"} and torch.equal(got["a"], sd["a"])


def test_pickled_objects_are_refused_naming_the_flag(tmp_path):
    p = tmp_path / "c.pth"
    torch.save({"model": {"a": torch.ones(1)}, "extra": Payload()}, p)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        read_state_dict(p)
    assert set(read_state_dict(p, trust=True)) == {"a"}


def test_missing_unexpected_and_mismatched_keys_are_counted():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    sd = dict(model.state_dict())
    sd.pop("1.bias")
    sd["0.weight"] = torch.zeros(5, 4)
    sd["extra.w"] = torch.zeros(1)
    fit = key_fit(model, sd)
    assert fit.missing == ("1.bias",)
    assert fit.unexpected == ("extra.w",)
    assert fit.mismatched == (("0.weight", (5, 4), (4, 4)),)
    assert set(fit.matched) == {"0.bias", "1.weight"}


def test_foreign_state_dict_is_an_input_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with pytest.raises(CheckpointError, match="does not look like a checkpoint"):
        load_into(model, {"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)})


def test_ns306_reported_for_a_checkpoint_missing_keys(demo_files, tmp_path):
    from nanscope.replay.diagnose import inspect

    sd = torch.load(demo_files.checkpoint, weights_only=True)["model"]
    dropped = sorted(k for k in sd if k.startswith("transformer.decoder.layers.0.ca_text"))
    for k in dropped:
        del sd[k]
    p = tmp_path / "partial.pth"
    torch.save({"model": sd}, p)
    result = inspect(p, demo_files.batch, config=demo_files.config, select=["NS306"])
    (f,) = result.findings
    assert f.code == "NS306" and f.severity.value == "error"
    assert f.data["missing"] == dropped and f.count == len(dropped)


def test_keys_real_checkpoints_carry_are_not_errors(demo_files, tmp_path):
    """groundingdino_swint_ogc.pth holds BERT's position_ids (persistent in old transformers) and the
    training-only `label_enc.weight`; loading it is clean, as groundingdino's demo shows."""
    from nanscope.replay.diagnose import inspect

    sd = torch.load(demo_files.checkpoint, weights_only=True)["model"]
    sd["bert.embeddings.position_ids"] = torch.arange(512)[None]
    sd["label_enc.weight"] = torch.zeros(2001, 256)
    p = tmp_path / "like_real.pth"
    torch.save({"model": sd}, p)
    result = inspect(p, demo_files.batch, config=demo_files.config, select=["NS306"])
    (f,) = result.findings
    assert f.severity.value == "info" and f.count == 2
    assert sorted(k for k, _ in f.data["benign"]) == ["bert.embeddings.position_ids", "label_enc.weight"]
    assert result.exit_code == 0
