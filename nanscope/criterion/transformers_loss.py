"""transformers' own GroundingDino loss (`loss/loss_grounding_dino.py`) on nanscope's DETR-style outputs.

`TransformersLoss(config)` calls `GroundingDinoForObjectDetectionLoss` exactly as
`GroundingDinoForObjectDetection.forward` does when given `labels`: label maps are the caption's
'.'-separated phrases (`targets[i]["phrase_map"]`, built from the input ids as transformers'
`build_label_maps` does), `class_labels` index them, the text mask is the attention mask padded to
max_text_len, aux layers follow `config.auxiliary_loss` and the encoder terms `config.two_stage`. It
returns transformers' loss terms without the `cardinality_error` metrics (not in its weight dict).
This is what training with transformers computes, including its known behaviour: with different
captions per image, images 1.. take class rows of another caption (see NS111).

`TransformersReference()` is the same loss with `GroundingDinoConfig`'s defaults (preset 'hf') on the
targets' own positive maps (one label-map row per box), run image by image and re-weighted by the
batch's box count: the batch loss without the class-offset bug, so it equals nanscope's
`SetCriterion('hf')` to float rounding on any batch (verify-fix check 4 on the transformers stack).

Failures inside transformers' code become nanscope errors that name the cause: non-finite boxes or
costs (`MatchingError`), class labels that index past the label maps (`TransformersLabelError`).
"""

from __future__ import annotations

import functools
import traceback
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from nanscope.errors import MatchingError, NanscopeError

CONFIG_FIELDS = ("class_cost", "bbox_cost", "giou_cost", "focal_alpha", "auxiliary_loss", "two_stage",
                 "decoder_layers", "bbox_loss_coefficient", "giou_loss_coefficient")
CLS_WEIGHT = 2.0  # GroundingDinoForObjectDetectionLoss hard-codes "loss_ce": 2.0 in its weight dict


class TransformersLabelError(NanscopeError):
    """transformers' loss indexed a label map with a class label past its rows (IndexError)."""


def loss_config(config: Any = None, **overrides: Any) -> SimpleNamespace:
    """The config fields the loss reads; None: `GroundingDinoConfig()` defaults."""
    if config is None:
        from transformers import GroundingDinoConfig

        config = GroundingDinoConfig()
    values = {k: getattr(config, k) for k in CONFIG_FIELDS}
    values.update(overrides)
    return SimpleNamespace(**values)


def text_mask_3d(mask: Tensor, queries: int, width: int) -> Tensor:
    """[B, L] -> [B, Q, width] bool, False past L: transformers' `build_text_mask`."""
    out = torch.zeros(mask.shape[0], queries, width, dtype=torch.bool, device=mask.device)
    n = min(width, mask.shape[1])
    out[:, :, :n] = mask[:, None, :n].bool()
    return out


def _raise_known(exc: Exception) -> None:
    where = traceback.extract_tb(exc.__traceback__)[-1]
    at = f"{where.filename.rsplit('/', 2)[-1]}:{where.lineno}: {(where.line or '').strip()}"
    msg = f"transformers' GroundingDino loss raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]} (at {at})"
    if isinstance(exc, IndexError):
        raise TransformersLabelError(msg) from None
    if isinstance(exc, ValueError):  # the GIoU corner check on non-finite boxes, scipy on non-finite costs
        raise MatchingError(msg) from None
    raise exc


class TransformersLoss:
    """`GroundingDinoForObjectDetectionLoss` as the model runs it, on captured outputs (see module doc)."""

    def __init__(self, config: Any = None, *, source: str = "labels", per_image: bool = False) -> None:
        self.config = config if isinstance(config, SimpleNamespace) else loss_config(config)
        self.source = source  # "labels": class_labels + phrase_map; "positive_map": one row per box
        self.per_image = per_image

    @property
    def weight_dict(self) -> dict[str, float]:
        c = self.config
        base = {"loss_ce": CLS_WEIGHT, "loss_bbox": float(c.bbox_loss_coefficient),
                "loss_giou": float(c.giou_loss_coefficient)}
        out = dict(base)
        if c.two_stage:
            out.update({f"{k}_enc": v for k, v in base.items()})
        if c.auxiliary_loss:
            for i in range(int(c.decoder_layers) - 1):
                out.update({f"{k}_{i}": v for k, v in base.items()})
        return out

    def total(self, terms: Mapping[str, Tensor]) -> Tensor:
        w = self.weight_dict
        return sum(w[k] * v for k, v in terms.items() if k in w)  # type: ignore[return-value]

    def labels(self, targets: Sequence[Mapping[str, Tensor]], width: int) -> tuple[tuple[Tensor, ...], list[dict]]:
        """(label_maps per image [n_i, width] long, labels [{class_labels, boxes}]) in transformers' form."""
        maps, labels = [], []
        for t in targets:
            if self.source == "positive_map":
                lm = (t["positive_map"] > 0).long()
                cls = torch.arange(lm.shape[0], device=lm.device)
            else:
                lm, cls = t["phrase_map"].long(), t["class_labels"].long()
            if lm.shape[1] < width:
                lm = torch.nn.functional.pad(lm, (0, width - lm.shape[1]))
            maps.append(lm[:, :width])
            labels.append({"class_labels": cls, "boxes": t["boxes"]})
        return tuple(maps), labels

    def _call(self, outputs: Mapping[str, Any], label_maps: tuple[Tensor, ...], labels: list[dict]) -> dict[str, Tensor]:
        from transformers.loss.loss_grounding_dino import GroundingDinoForObjectDetectionLoss

        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        aux = list(outputs.get("aux_outputs") or [])
        enc = outputs.get("enc_outputs")
        mask = outputs.get("text_token_mask")
        if mask is None:  # validity from the -inf columns, as nanscope's criterion does
            mask = ~torch.isneginf(logits).all(dim=1)
        cfg = SimpleNamespace(**{**vars(self.config), "two_stage": bool(self.config.two_stage and enc is not None),
                                 "auxiliary_loss": bool(self.config.auxiliary_loss and aux)})
        try:
            _, loss_dict, _ = GroundingDinoForObjectDetectionLoss(
                logits=logits, labels=labels, device=logits.device, pred_boxes=boxes, config=cfg,
                label_maps=label_maps, text_mask=text_mask_3d(mask, logits.shape[1], logits.shape[2]),
                outputs_class=[a["pred_logits"] for a in aux] + [logits],
                outputs_coord=[a["pred_boxes"] for a in aux] + [boxes],
                encoder_logits=enc["pred_logits"] if enc else None, encoder_pred_boxes=enc["pred_boxes"] if enc else None)
        except (IndexError, ValueError) as exc:
            _raise_known(exc)
        return {k: v for k, v in loss_dict.items() if not k.startswith("cardinality_error")}

    def __call__(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        width = int(outputs["pred_logits"].shape[-1])
        label_maps, labels = self.labels(targets, width)
        if not self.per_image:
            return self._call(outputs, label_maps, labels)
        total = max(sum(len(lab["boxes"]) for lab in labels), 1)
        out: dict[str, Tensor] = {}
        for i in range(len(labels)):
            terms = self._call(_image(outputs, i), label_maps[i:i + 1], labels[i:i + 1])
            scale = max(len(labels[i]["boxes"]), 1) / total  # transformers divides by max(boxes, 1)
            for k, v in terms.items():
                out[k] = out[k] + v * scale if k in out else v * scale
        return out

    def matcher(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """transformers' GroundingDinoHungarianMatcher on the last layer: [(query_idx, box_idx)] per image."""
        from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher

        label_maps, labels = self.labels(targets, int(outputs["pred_logits"].shape[-1]))
        m = GroundingDinoHungarianMatcher(class_cost=self.config.class_cost, bbox_cost=self.config.bbox_cost,
                                          giou_cost=self.config.giou_cost)
        try:
            return m({"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"], "label_maps": label_maps},
                     labels)
        except (IndexError, ValueError) as exc:
            _raise_known(exc)
            raise


def _image(outputs: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Image i of DETR-style outputs (batch of one)."""
    def one(d: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v[i:i + 1] for k, v in d.items() if isinstance(v, Tensor)}

    out = one(outputs)
    out["aux_outputs"] = [one(a) for a in outputs.get("aux_outputs") or []]
    if outputs.get("enc_outputs"):
        out["enc_outputs"] = one(outputs["enc_outputs"])
    return out


class TransformersReference(TransformersLoss):
    """transformers' loss with GroundingDinoConfig defaults on the targets' positive maps, image by image."""

    def __init__(self) -> None:
        super().__init__(None, source="positive_map", per_image=True)


@functools.lru_cache(maxsize=1)
def nonfinite_cost_behaviour() -> str:
    """What the installed transformers' GroundingDinoHungarianMatcher does with a NaN cost, measured once:
    'raise' (scipy's ValueError) or 'max-float' (5.x replaces NaN/inf by the largest float and matches)."""
    from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher

    label_map = torch.zeros(2, 4)
    label_map[0, 1] = 1.0  # row 1 is empty: its normalized class cost is 0/0 = NaN for every query
    outputs = {"logits": torch.zeros(1, 3, 4), "pred_boxes": torch.full((1, 3, 4), 0.25), "label_maps": (label_map,)}
    labels = [{"class_labels": torch.tensor([0, 1]), "boxes": torch.full((2, 4), 0.25)}]
    try:
        GroundingDinoHungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)(outputs, labels)
    except ValueError:
        return "raise"
    return "max-float"
