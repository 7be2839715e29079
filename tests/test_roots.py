"""Root, not symptom: the cause a user can act on leads, with the first non-finite operation under it.

Planted on the real demo model; the expected module, image and magnitudes come from what was planted.
"""

from __future__ import annotations

import torch

import nanscope
from nanscope.stacks.groundingdino.demo import demo_batch

MMDET = "fixtures/criteria/supervision.py:set_criterion_mmdet"


def _group_of(result, code):
    return next(g for g in result.groups if code in [f.code for f in g.findings])


def test_an_exploded_weight_leads_and_the_layer_norm_nan_is_its_consequence(demo_files, tmp_path):
    ck = torch.load(demo_files.checkpoint, weights_only=True)
    planted = "transformer.encoder.layers.0.linear1"
    ck["model"][f"{planted}.weight"] = ck["model"][f"{planted}.weight"] * 1e30  # a diverged FFN weight
    torch.save(ck, tmp_path / "exploded.pth")
    torch.save(demo_batch(0, long=False), tmp_path / "batch.pt")
    result = nanscope.inspect(tmp_path / "exploded.pth", tmp_path / "batch.pt", config=demo_files.config,
                              trace=True, criterion=MMDET)
    group = _group_of(result, "NS301")
    assert group.cause.code == "NS311" and group.cause.severity.value == "error"
    root = group.cause.where[0]
    assert root["module"] == planted and root["weight"] == "weight"
    assert root["weight_max_abs"] == float(f"{float(ck['model'][f'{planted}.weight'].abs().max()):.4g}")
    ns301 = next(f for f in group.effects if f.code == "NS301")
    assert not ns301.where[0]["module"].startswith(planted)  # the NaN appears downstream, not in the weight's module
    assert result.findings[0].code == "NS311"  # the report leads with it


def test_a_fully_padded_image_is_named_as_the_cause(demo_files, tmp_path):
    raw = demo_batch(0, long=False)
    b, _, h, w = raw["images"].shape
    masks = torch.zeros(b, h, w, dtype=torch.bool)
    masks[1] = True  # image 1 is all padding
    raw["image_masks"] = masks
    torch.save(raw, tmp_path / "batch.pt")
    result = nanscope.inspect(demo_files.checkpoint, tmp_path / "batch.pt", config=demo_files.config, trace=True,
                              criterion=MMDET)
    padded = [i for i in range(b) if bool(masks[i].all())]
    group = _group_of(result, "NS310")
    assert group.cause.code == "NS310" and [w["image"] for w in group.cause.where] == padded
    assert "NS301" in [f.code for f in group.effects]  # the division in get_reference_points, under its cause
    assert result.exit_code == 1
