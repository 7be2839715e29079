"""fixtures/build.py's batches carry exactly the cause each is named for, on the demo model."""

from __future__ import annotations

import math

import torch

from nanscope.replay.diagnose import inspect

MASKED = "nanscope.criterion:SetCriterion"


def _inspect(fixture_files, batch):
    d = fixture_files.demo
    return inspect(d.checkpoint, batch, config=d.config, criterion=MASKED)


def test_healthy_batch_is_clean_with_the_masked_criterion(fixture_files):
    result = _inspect(fixture_files, fixture_files.healthy)
    assert result.exit_code == 0 and not [f for f in result.findings if f.severity.value == "error"]
    assert all(math.isfinite(v) for v in result.loss_terms.values())


def test_nan_image_batch_names_the_pixel(fixture_files):
    raw = torch.load(fixture_files.nan_image, weights_only=True)
    nan_pixels = torch.isnan(raw["images"]).nonzero().tolist()  # computed from the file, not from nanscope
    assert nan_pixels == [[1, 0, 17, 42]]
    result = _inspect(fixture_files, fixture_files.nan_image)
    ns304 = next(f for f in result.findings if f.code == "NS304")
    assert ns304.count == 1 and ns304.where[0]["image"] == 1


def test_no_boxes_batch_reports_the_empty_image(fixture_files):
    raw = torch.load(fixture_files.no_boxes, weights_only=True)
    empty = [i for i, t in enumerate(raw["targets"]) if len(t["boxes"]) == 0]
    result = _inspect(fixture_files, fixture_files.no_boxes)
    ns204 = next(f for f in result.findings if f.code == "NS204")
    assert [w["image"] for w in ns204.where] == empty == [0]
    assert all(math.isfinite(v) for v in result.loss_terms.values())  # normalizers clamp at 1
