"""Open-GroundingDino's criterion shape with its positive maps built at a fixed 256 columns.

Open-GroundingDino's `SetCriterion.forward` calls `create_positive_map(tokenized, tokens_positive,
cat_list, caption)` (models/GroundingDINO/utils.py, Open-GroundingDino @d248268a per REFERENCES.md), whose map is
`torch.zeros((len(tokens_positive), 256))` whatever the logits' width, and then fills `one_hot`
[B, Q, 256] from it: logits cut to fewer columns meet a 256-wide target. Written here from that
behaviour on top of fixtures/criteria/trainers.py (no nanscope import).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "nanscope_test_trainers", Path(__file__).parents[2] / "fixtures" / "criteria" / "trainers.py")
trainers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trainers)

MAX_TEXT_LEN = 256  # create_positive_map's width in Open-GroundingDino


class FixedWidthCriterion(trainers.OGDStyleCriterion):
    def forward(self, outputs, targets, cat_list, caption):
        token = outputs["token"]
        maps = [trainers.rebuild_positive_map(token[j], cat_list[j], caption[j], MAX_TEXT_LEN)
                for j in range(len(cat_list))]
        num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        losses = {}
        layers = [("", outputs)] + [(f"_{i}", a) for i, a in enumerate(outputs.get("aux_outputs") or [])]
        for suffix, layer in layers:
            one_hot, indices = self._one_hot(layer, targets, maps)
            for k, v in self._terms(layer, targets, indices, one_hot, outputs["text_mask"], num_boxes).items():
                losses[k + suffix] = v
        return losses


def build(masked=True):
    return FixedWidthCriterion(trainers.ThreeArgMatcher(), trainers._ogd_weights(), trainers.ALPHA, trainers.GAMMA,
                               ["labels", "boxes"], masked=masked)
