"""The criterion spec: nested calls of MODULE's own names with literal arguments, nothing else evaluated;
a factory's `args` filled from the checkpoint's saved argparse.Namespace (Open-GroundingDino's checkpoints).

The module below builds its criterion as Open-GroundingDino's `build_groundingdino(args)` does
(models/GroundingDINO/groundingdino.py, as REFERENCES.md pins it @d248268a: `matcher = build_matcher(args)`,
`SetCriterion(matcher=matcher, weight_dict=weight_dict, focal_alpha=args.focal_alpha, focal_gamma=...,
losses=losses)`; models/GroundingDINO/matcher.py: `HungarianMatcher(cost_class=args.set_cost_class,
cost_bbox=args.set_cost_bbox, cost_giou=args.set_cost_giou, focal_alpha=args.focal_alpha)`): the
objects record what they were given, so the test compares with values it wrote itself.
"""

from __future__ import annotations

import argparse
import textwrap

import pytest
import torch

from nanscope.errors import CriterionError, InputError, SpecError
from nanscope.user_code import load_criterion

MODULE = textwrap.dedent('''
    import os

    CALLS = []

    class HungarianMatcher:
        def __init__(self, cost_class=1, cost_bbox=1, cost_giou=1, focal_alpha=0.25):
            self.costs = (cost_class, cost_bbox, cost_giou, focal_alpha)

        def __call__(self, outputs, targets, label_map):
            return []

    class SetCriterion:
        def __init__(self, matcher, weight_dict, focal_alpha, focal_gamma, losses):
            self.matcher, self.weight_dict = matcher, weight_dict
            self.focal = (focal_alpha, focal_gamma)
            self.losses = losses

        def __call__(self, outputs, targets, cat_list, caption):
            return {"loss_ce": outputs["pred_logits"].sum()}

    def build_matcher(args):
        return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                                cost_giou=args.set_cost_giou, focal_alpha=args.focal_alpha)

    def build_criterion(args):
        weight_dict = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef}
        return SetCriterion(build_matcher(args), weight_dict, args.focal_alpha, args.focal_gamma,
                            ["labels", "boxes"])

    def scaled(x, factor=1.0):
        return x * factor

    def side_effect(path):
        CALLS.append(path)
        return 0.0
''')


@pytest.fixture
def module(tmp_path):
    path = tmp_path / "og_main.py"
    path.write_text(MODULE)
    return path


def test_nested_calls_of_module_names_build_the_criterion(module) -> None:
    crit, _ = load_criterion(
        f"{module}:SetCriterion(matcher=HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0), "
        "weight_dict={'loss_ce': 2.0, 'loss_bbox': 5.0, 'loss_giou': 2.0}, focal_alpha=0.25, focal_gamma=2.0, "
        "losses=['labels', 'boxes'])")
    assert crit.matcher.costs == (2.0, 5.0, 2.0, 0.25)
    assert crit.weight_dict == {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert crit.focal == (0.25, 2.0) and crit.losses == ["labels", "boxes"]


def test_positional_arguments_signed_numbers_tuples_sets_and_nesting_inside_literals(module) -> None:
    crit, _ = load_criterion(f"{module}:SetCriterion(HungarianMatcher(-1, +2.5), "
                             "{'w': scaled(3, factor=-2)}, 0.25, (1, None), {True})")
    assert crit.matcher.costs == (-1, 2.5, 1, 0.25)
    assert crit.weight_dict == {"w": -6} and crit.focal == (0.25, (1, None)) and crit.losses == {True}


@pytest.mark.parametrize("value, node, column_of", [
    ("os.getcwd()", "os.getcwd", "os.getcwd"),             # attribute access
    ("open('x', 'w')", "open", "open"),                    # a name MODULE does not define (a builtin)
    ("(lambda: 1)()", "lambda: 1", "lambda"),              # a lambda
    ("[i for i in range(3)]", "[i for i in range(3)]", "[i for"),  # a comprehension
    ("{'a': 1}['a']", "{'a': 1}['a']", "{'a': 1}["),       # a subscript
    ("f'{1}'", "f'{1}'", "f'"),                            # an f-string
    ("CALLS", "CALLS", "CALLS"),                           # a bare name is not a literal
    ("scaled(os.sep)", "os.sep", "os.sep"),                # nested: the inner argument is refused
])
def test_anything_else_is_refused_naming_the_node_and_its_column(module, value, node, column_of) -> None:
    text = f"{module}:SetCriterion(matcher={value}, weight_dict={{}}, focal_alpha=0.25, focal_gamma=2.0, losses=[])"
    with pytest.raises(SpecError) as info:
        load_criterion(text)
    assert isinstance(info.value, InputError) and isinstance(info.value, CriterionError)
    msg = str(info.value)
    assert repr(node) in msg, msg
    assert f"at column {text.index(column_of) + 1})" in msg, msg


def test_nothing_runs_before_every_node_is_accepted(module) -> None:
    """side_effect is MODULE's own and allowed, but a later argument is refused: it must not have been called."""
    with pytest.raises(SpecError, match="'not_defined'"):
        load_criterion(f"{module}:scaled(side_effect('a'), factor=not_defined())")
    import sys

    mods = [m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(module)]
    assert len(mods) == 1 and mods[0].CALLS == []  # imported, and side_effect never called
    with pytest.raises(CriterionError, match="gave a float, which is not callable"):
        load_criterion(f"{module}:scaled(side_effect('a'), factor=2)")
    again = [m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(module)]
    assert again[0].CALLS == ["a"]  # (each load imports the file afresh; this one ran side_effect once)


def _og_args() -> argparse.Namespace:
    # The fields build_groundingdino reads for its criterion (Open-GroundingDino config/cfg_odvg.py values).
    return argparse.Namespace(set_cost_class=1.0, set_cost_bbox=5.0, set_cost_giou=2.0, focal_alpha=0.25,
                              focal_gamma=2.0, cls_loss_coef=2.0, bbox_loss_coef=5.0, lr=1e-4)


def test_a_factory_taking_args_gets_the_checkpoint_namespace(module, tmp_path) -> None:
    from nanscope.stacks.formats.saved_args import saved_args

    ckpt = tmp_path / "checkpoint0001.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": {}, "epoch": 1, "args": _og_args()}, ckpt)
    provider = lambda: saved_args(ckpt)  # noqa: E731
    crit, _ = load_criterion(f"{module}:build_criterion", saved_args=provider)
    assert crit.matcher.costs == (1.0, 5.0, 2.0, 0.25)
    assert crit.weight_dict == {"loss_ce": 2.0, "loss_bbox": 5.0} and crit.focal == (0.25, 2.0)
    # Nested: build_matcher(args) inside the spec gets it too; a given args= is never replaced.
    crit, _ = load_criterion(f"{module}:SetCriterion(build_matcher(), {{}}, 0.1, 2.0, [])", saved_args=provider)
    assert crit.matcher.costs == (1.0, 5.0, 2.0, 0.25)

    bare = tmp_path / "weights.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, bare)
    with pytest.raises(CriterionError, match="it also needs args.*saved argparse.Namespace"):
        load_criterion(f"{module}:build_criterion", saved_args=lambda: saved_args(bare))
