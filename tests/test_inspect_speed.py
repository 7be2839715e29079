"""The shortcuts that keep `inspect` near the bare forward give what the long way gives: NS101's
non-finite focal count against torchvision's focal loss on every cell, NS305's counts against
isnan/isinf on every tensor."""

from __future__ import annotations

import math

import torch
from torchvision.ops import sigmoid_focal_loss

from nanscope.analyzers.numerics import nonfinite_tensors
from nanscope.analyzers.text import padded_counts


def test_nonfinite_focal_count_equals_the_loss_on_every_cell():
    torch.manual_seed(0)
    lg = torch.randn(2, 50, 16)
    lg[:, :, 10:] = -math.inf  # padding columns
    lg[0, 3, 2], lg[1, 4, 1] = math.inf, math.nan
    lg[1, 7, :3] = 1e30  # huge but finite: a finite loss
    maps = [(torch.rand(3, 16) > 0.5).float(), (torch.rand(60, 16) > 0.7).float()]  # more boxes than queries too
    got = padded_counts(lg, maps)
    for i, c in enumerate(got):
        target = torch.zeros_like(lg[i])
        n = min(maps[i].shape[0], lg.shape[1])
        target[:n] = (maps[i][:n] > 0).float()
        loss = sigmoid_focal_loss(lg[i], target, alpha=0.25, gamma=2.0, reduction="none")
        assert c["nonfinite_focal"] == int((~torch.isfinite(loss)).sum())
        assert c["inf_cells"] == int(torch.isneginf(lg[i]).sum())
        assert c["inf_target1"] == int(((target > 0) & torch.isneginf(lg[i])).sum())
        assert c["invalid_columns"] == 6


def test_nonfinite_tensors_equal_isnan_isinf_counts():
    state = {"ok": torch.ones(3, 4), "b": torch.tensor([1.0, math.nan, math.inf, -math.inf]),
             "permuted": torch.tensor([[math.nan, 1.0], [2.0, 3.0]]).t(), "gap": torch.randn(4, 8)[:, ::2],
             "complex": torch.tensor([1 + 1j, complex(math.nan, 0)]), "ints": torch.arange(3),
             "half": torch.tensor([1.0, math.inf]).half(), "empty": torch.empty(0)}
    expected = [(k, int(torch.isnan(t).sum()), int(torch.isinf(t).sum()), t.numel()) for k, t in state.items()
                if (t.is_floating_point() or t.is_complex()) and t.numel() and not torch.isfinite(t).all()]
    assert nonfinite_tensors(state) == expected
    assert [k for k, *_ in expected] == ["b", "permuted", "complex", "half"]
