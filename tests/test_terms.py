"""Term families: the spellings of Open-GroundingDino, MMDetection, transformers and DETR name one term.

The names below are written as each trainer's own code builds them, not from nanscope's output:
- DETR / transformers / nanscope: `k + f'_{i}'` for auxiliary layer i, `k + '_enc'` for the encoder;
- Open-GroundingDino (models/GroundingDINO/groundingdino.py): `k + f'_{i}'` and `k + '_interm'`;
- MMDetection (DINOHead.loss_by_feat): `f'd{i}.loss_cls'`, `'enc_loss_cls'`, `'dn_loss_cls'`, `f'd{i}.dn_loss_cls'`.
"""

from __future__ import annotations

import pytest
import torch

from nanscope.criterion.set_criterion import LossWeights
from nanscope.terms import base_name, canonical, loss_term_names, parse, term_layer

BASES = ("loss_ce", "loss_bbox", "loss_giou")


@pytest.mark.parametrize("base", BASES)
def test_detr_and_open_groundingdino_spellings(base: str) -> None:
    aux = [base + f"_{i}" for i in range(5)]
    assert [term_layer(n, "dec5") for n in aux] == [f"dec{i}" for i in range(5)]
    assert term_layer(base, "dec5") == "dec5" and term_layer(base) == "last"
    assert term_layer(base + "_enc") == term_layer(base + "_interm") == "enc"
    assert canonical(base + "_interm") == canonical(base + "_enc") == base + "_enc"
    assert {base_name(n) for n in [base, base + "_interm", *aux]} == {base}


def test_mmdetection_spelling() -> None:
    names = {"loss_cls": ("loss_cls", "last", False), "d0.loss_cls": ("loss_cls", "dec0", False),
             "d4.loss_iou": ("loss_iou", "dec4", False), "enc_loss_bbox": ("loss_bbox", "enc", False),
             "dn_loss_cls": ("loss_cls", "last", True), "d2.dn_loss_bbox": ("loss_bbox", "dec2", True)}
    for name, (base, layer, dn) in names.items():
        t = parse(name)
        assert (t.base, t.layer, t.dn) == (base, layer, dn), name
    assert canonical("d0.loss_cls") == "loss_cls_0" and canonical("enc_loss_cls") == "loss_cls_enc"
    assert canonical("d2.dn_loss_bbox") == "loss_bbox_dn_2" and parse("loss_bbox_dn_2") == parse("d2.dn_loss_bbox")


@pytest.mark.parametrize("name", ["class_error", "cardinality_error", "loss_xy", "loss"])
def test_names_outside_the_families_are_last_layer_and_unchanged(name: str) -> None:
    assert canonical(name) == name and term_layer(name, "dec1") == "dec1"


def test_loss_weights_resolve_every_layer_to_its_base_weight() -> None:
    w = LossWeights({"loss_ce": 2.0, "loss_bbox": 5.0})
    assert w["loss_ce_interm"] == w["loss_ce_3"] == w["loss_ce_enc"] == 2.0 and w["loss_bbox_0"] == 5.0
    with pytest.raises(KeyError):
        w["loss_giou_0"]


def test_loss_terms_follow_the_weight_dict_else_the_gradient() -> None:
    g = torch.ones((), requires_grad=True)
    terms = {"loss_ce": g * 1, "loss_ce_interm": g * 2, "class_error": torch.tensor(3.0)}
    assert loss_term_names(terms, {"loss_ce": 2.0, "loss_ce_interm": 0.0}) == ["loss_ce"]
    assert loss_term_names(terms, None) == ["loss_ce", "loss_ce_interm"]
