"""Criterion presets: the loss and matching settings of the three reference GroundingDINO trainers.

A preset is a frozen dataclass; `PRESETS` is the registry keyed by name. Each default carries the
source it was read from (MMDetection 3.x `GroundingDINOHead` + `BinaryFocalLossCost`,
Open-GroundingDino `cfg_odvg.py` + `matcher.py`, transformers 4.57 `loss_grounding_dino.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nanscope.errors import CriterionError, InputError

MatchCost = Literal["focal_bce", "normalized_row"]
Normalizer = Literal["matched_queries", "num_boxes"]


@dataclass(frozen=True)
class CriterionPreset:
    """How one reference trainer weights, normalizes and matches.

    Class targets are always the binarized positive-map rows of the matched boxes; box terms are
    always L1 on normalized cxcywh and 1 - GIoU, normalized by the number of target boxes (>= 1).
    """

    name: str
    # Classification (sigmoid focal loss over text positions).
    cls_weight: float
    cls_normalizer: Normalizer
    cls_normalizer_across_ranks: bool  # average the normalizer over ranks when torch.distributed is up
    # Matching: "focal_bce" = pos_cost @ gt.T + neg_cost @ (1 - gt).T (MMDetection);
    # "normalized_row" = (pos_cost - neg_cost) @ (row / row.sum()).T (Open-GroundingDino, transformers).
    match_cost: MatchCost
    match_class_weight: float
    match_eps: float  # inside -log(p + eps) and -log(1 - p + eps)
    bbox_weight: float = 5.0  # L1 loss weight: DETR, MMDetection, Open-GroundingDino and transformers all use 5.0
    giou_weight: float = 2.0  # GIoU loss weight: 2.0 in all four
    match_bbox_weight: float = 5.0  # L1 matching cost weight: 5.0 in all four
    match_giou_weight: float = 2.0  # GIoU matching cost weight: 2.0 in all four
    focal_alpha: float = 0.25  # RetinaNet default, used by all three references
    focal_gamma: float = 2.0  # RetinaNet default, used by all three references
    aux_loss: bool = True  # supervise every earlier decoder layer (`aux_outputs`) as `_0`, `_1`, ...
    enc_loss: bool = True  # supervise the encoder proposals (`enc_outputs`) as `_enc`


PRESETS: dict[str, CriterionPreset] = {}


def register_preset(preset: CriterionPreset) -> CriterionPreset:
    """Add `preset` to `PRESETS`; a name that is already registered is an error."""
    if preset.name in PRESETS:
        raise CriterionError(f"criterion preset {preset.name!r} is already registered")
    PRESETS[preset.name] = preset
    return preset


def get_preset(preset: str | CriterionPreset) -> CriterionPreset:
    """Return the registered preset called `preset` (or `preset` itself when it is one)."""
    if isinstance(preset, CriterionPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise InputError(
            f"unknown criterion preset {preset!r}; valid presets: {', '.join(sorted(PRESETS))}"
        ) from None


register_preset(CriterionPreset(
    name="mmdet",
    cls_weight=1.0,  # GroundingDINOHead loss_cls=FocalLoss(loss_weight=1.0)
    cls_normalizer="matched_queries",  # cls_avg_factor = num_total_pos (bg_cls_weight 0), max(., 1)
    cls_normalizer_across_ranks=True,  # sync_cls_avg_factor=True: reduce_mean over GPUs
    match_cost="focal_bce",  # BinaryFocalLossCost on the text_token_mask positions
    match_class_weight=2.0,  # dict(type='BinaryFocalLossCost', weight=2.0)
    match_eps=1e-12,  # FocalLossCost default eps
))

register_preset(CriterionPreset(
    name="open-groundingdino",
    cls_weight=2.0,  # cfg_odvg.py cls_loss_coef = 2.0
    cls_normalizer="matched_queries",  # SetCriterion.loss_labels: num_pos_avg_per_gpu, local, >= 1
    cls_normalizer_across_ranks=False,
    match_cost="normalized_row",  # HungarianMatcher: (pos - neg) @ (label_map / label_map.sum()).T
    match_class_weight=1.0,  # cfg_odvg.py set_cost_class = 1.0
    match_eps=1e-8,
))

register_preset(CriterionPreset(
    name="hf",
    cls_weight=2.0,  # GroundingDinoForObjectDetectionLoss weight_dict["loss_ce"] = 2.0
    cls_normalizer="num_boxes",  # sigmoid_focal_loss(...).sum() / num_boxes
    cls_normalizer_across_ranks=True,  # accelerate reduce(num_boxes) / num_processes
    match_cost="normalized_row",  # GroundingDinoHungarianMatcher, no NaN guard
    match_class_weight=1.0,  # GroundingDinoConfig.class_cost = 1.0
    match_eps=1e-8,
    aux_loss=False,  # GroundingDinoConfig.auxiliary_loss defaults to False
))
