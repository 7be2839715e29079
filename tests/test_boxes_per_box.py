"""NS201 judges each box on its own: one normalized xyxy box among cxcywh boxes is invalid whatever the
others look like (the batch-wide xyxy share alone needed 75% of the boxes to look like xyxy)."""

from __future__ import annotations

import torch
from torchvision.ops import box_convert

from nanscope.analyzers.boxes import EDGE_TOL, target_box_problems


def _valid_cxcywh(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(n, 2, generator=g) * 0.1 + 0.05  # small boxes: w < cx, h < cy unless near the corner
    c = 0.3 + torch.rand(n, 2, generator=g) * 0.4
    return torch.cat([c, wh], -1)


def test_one_xyxy_box_among_cxcywh_boxes_is_flagged_alone() -> None:
    good = _valid_cxcywh(12, 0)
    xyxy = torch.tensor([[0.1, 0.2, 0.6, 0.7]])  # a normalized x1, y1, x2, y2 box
    batch = [good[:6], torch.cat([good[6:], xyxy])]
    # Independently: read as cxcywh, torchvision's conversion puts its extent outside [0, 1].
    ext = box_convert(batch[1], "cxcywh", "xyxy")
    outside = {(1, j) for j in range(len(ext)) if float(ext[j].min()) < -EDGE_TOL or float(ext[j].max()) > 1 + EDGE_TOL}
    outside |= {(0, j) for j, e in enumerate(box_convert(batch[0], "cxcywh", "xyxy"))
                if float(e.min()) < -EDGE_TOL or float(e.max()) > 1 + EDGE_TOL}
    assert outside == {(1, 6)}  # only the xyxy box, and 12 of 13 boxes do not look like xyxy
    problems = target_box_problems(batch)
    assert set(problems) == outside
    assert problems[(1, 6)][0] == "xyxy"


def test_a_cxcywh_box_reaching_past_the_edge_is_invalid_even_when_not_xyxy_shaped() -> None:
    good = _valid_cxcywh(5, 1)
    past = torch.tensor([[0.9, 0.5, 0.4, 0.2]])  # cx + w/2 = 1.1: 0.1 past the right edge; w < cx
    problems = target_box_problems([torch.cat([good, past])])
    assert set(problems) == {(0, 5)} and problems[(0, 5)][0] == "past the image"
