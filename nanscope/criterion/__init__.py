"""The masked criterion: pure tensor math for GroundingDINO's set-prediction loss.

`set_criterion` (SetCriterion, NaiveCriterion), `matcher` (Hungarian matching on valid tokens), `focal`
(sigmoid focal loss, sync-free and masked_select), `presets` (mmdet / open-groundingdino / hf) and
`text_mask` (which text columns are real tokens).
"""

from nanscope.criterion.set_criterion import LossWeights, NaiveCriterion, SetCriterion, presets_markdown

__all__ = ["LossWeights", "NaiveCriterion", "SetCriterion", "presets_markdown"]
