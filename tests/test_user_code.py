"""User criteria with no glue: the names public trainers read, factories, extra parameters, messages.

The criteria in `fixtures/criteria/trainers.py` follow public trainers' shapes (Open-GroundingDino's 4-argument
criterion and 3-argument matcher, a DETR-style criterion on `labels`/`token_labels`, ...) and never
import nanscope. They run on the real demo model through `load_criterion` / `call_criterion` alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanscope.criterion.set_criterion import SetCriterion
from nanscope.errors import CriterionError
from nanscope.replay.criterion_inputs import image_extras
from nanscope.user_code import call_criterion, call_matcher, collect_user_stdout, load_criterion
from nanscope.verify.checks import floats

HERE = Path(__file__).parent
CRITERIA = HERE.parent / "fixtures" / "criteria" / "trainers.py"


def spec(attr: str) -> str:
    return f"{CRITERIA}:{attr}"


def line_of(text: str) -> int:
    """1-based line of `text` in the criteria file, found by reading it (not by nanscope)."""
    return next(i for i, line in enumerate(CRITERIA.read_text().splitlines(), 1) if text in line)


@pytest.fixture(scope="module")
def short(demo_files, tmp_path_factory) -> SimpleNamespace:
    """The demo model on the two short captions (padded, nothing truncated), one captured forward."""
    from nanscope.replay.batch import save_batch
    from nanscope.replay.session import prepare
    from nanscope.stacks.groundingdino.demo import demo_batch

    raw = demo_batch(0, long=False)
    path = save_batch(tmp_path_factory.mktemp("user_code") / "short.pt", raw)
    replay = prepare(demo_files.checkpoint, path, config=demo_files.config, hash_checkpoint=False)
    return SimpleNamespace(replay=replay, raw=raw, outputs=replay.forward().to_outputs(),
                           targets=replay.targets(), extras=replay.criterion_extras())


def test_targets_carry_labels_token_labels_caption_phrases_and_spans(demo_replay) -> None:
    from nanscope.replay.batch import load_batch

    raw = torch.load(demo_replay.inputs["batch"], weights_only=True)  # the batch file, read independently
    targets, extras = demo_replay.targets(), demo_replay.criterion_extras()
    for i, (t, given) in enumerate(zip(targets, raw["targets"])):
        assert t["caption"] == raw["captions"][i] and t["phrases"] == given["phrases"]
        assert t["token_labels"] is t["positive_map"] and torch.equal(t["class_labels"], t["labels"])
        assert t["labels"].dtype == torch.int64 and len(t["labels"]) == len(given["boxes"])
        names = extras["cat_list"][i]
        assert [names[k] for k in t["labels"].tolist()] == given["phrases"]  # labels index the image's categories
        assert len(set(names)) == len(names)
        assert torch.equal(extras["label_map"][i][t["labels"]], t["positive_map"])  # label_map[labels] = the map
        for phrase, spans in zip(given["phrases"], t["tokens_positive"]):
            cap = raw["captions"][i]
            assert spans == [[cap.find(phrase), cap.find(phrase) + len(phrase)]]
    assert extras["caption"] == extras["captions"] == list(raw["captions"])
    assert load_batch(demo_replay.inputs["batch"]).num_boxes == sum(len(t["labels"]) for t in targets)


def test_outputs_carry_text_mask_token_and_interm_outputs(demo_replay) -> None:
    out = demo_replay.forward().to_outputs()
    tok = demo_replay.tokenizer
    captions = list(demo_replay.batch.captions)
    T = out["pred_logits"].shape[-1]
    lengths = [min(len(tok(c)["input_ids"]), T) for c in captions]  # independent tokenization, cut at 256
    expected = torch.zeros(len(captions), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        expected[i, :n] = True
    assert out["text_mask"].shape == (len(captions), T) and torch.equal(out["text_mask"], expected)
    assert torch.equal(out["text_mask"], ~torch.isneginf(out["pred_logits"]).all(1))  # where the model wrote -inf
    token = out["token"]
    assert out["tokenized"] is token and token["input_ids"].shape[1] == max(lengths)
    for i, c in enumerate(captions):  # token[i] is the caption's own encoding (untruncated char_to_token)
        enc = tok(c)
        assert [token[i].char_to_token(k) for k in range(len(c))] == [enc.char_to_token(k) for k in range(len(c))]
    assert out["interm_outputs"]["pred_logits"] is out["enc_outputs"]["pred_logits"]
    assert out["dn_meta"] is None


def test_open_gdino_style_criterion_runs_as_is_and_equals_the_reference(short) -> None:
    crit, _ = load_criterion(spec("build_open_gdino"))  # forward(outputs, targets, cat_list, caption)
    terms = floats(call_criterion(crit, short.outputs, short.targets, extras=short.extras))
    ref = floats(SetCriterion("open-groundingdino", impl="masked_select")(short.outputs, short.targets))
    assert set(ref) == {k.replace("_interm", "_enc") for k in terms if not k.startswith("loss_xy")}
    for k, v in terms.items():
        if not k.startswith("loss_xy"):
            assert v == pytest.approx(ref[k.replace("_interm", "_enc")], rel=1e-5), k
    assert "one_hot" not in short.outputs and "one_hot" not in short.outputs["interm_outputs"]  # it wrote a copy


def test_three_argument_matcher_gets_the_images_label_map(short) -> None:
    matcher, _ = load_criterion(spec("ThreeArgMatcher"))  # a class with defaults: built with no arguments
    for i, t in enumerate(short.targets):
        one = {k: short.outputs[k][i:i + 1] for k in ("pred_logits", "pred_boxes")}
        pairs = call_matcher(matcher, one, [t], extras=image_extras(short.extras, i))
        direct = matcher(one, [t], short.extras["label_map"][i])  # called by hand with its third argument
        assert [(q.tolist(), b.tolist()) for q, b in pairs] == [(q.tolist(), b.tolist()) for q, b in direct]
        assert sorted(pairs[0][1].tolist()) == list(range(len(t["boxes"])))


def test_a_matcher_returning_indices_and_maps_gives_its_indices(short) -> None:
    def matcher(outputs, targets):  # returns (indices, the positive maps it built), as some trainers do
        n = len(targets[0]["boxes"])
        return [(torch.arange(n), torch.arange(n))], torch.cat([t["token_labels"] for t in targets])

    pairs = call_matcher(matcher, short.outputs, short.targets[:1])
    assert len(pairs) == 1 and pairs[0][0].tolist() == [0, 1]


def test_a_factory_with_required_parameters_is_not_taken_for_the_criterion(short) -> None:
    with pytest.raises(CriterionError) as info:
        load_criterion(spec("build_token_criterion"))
    msg = str(info.value)
    assert "num_classes" in msg and "build_token_criterion(num_classes=..." in msg
    assert f"{CRITERIA}:{line_of('def build_token_criterion')}" in msg

    crit, _ = load_criterion(spec("build_token_criterion(num_classes=2, eos_coef=0.1)"))
    assert crit.num_classes == 2 and crit.eos_coef == 0.1
    with collect_user_stdout() as out:
        terms = floats(call_criterion(crit, short.outputs, short.targets, extras=short.extras))
    assert set(terms) == {"loss_ce", "loss_bbox", "loss_giou", "class_error"}  # it read labels and token_labels
    assert out.text.startswith("TokenCriterion: loss_ce=")  # its print went to the collector, not stdout
    # Its loss_ce is the reference's focal sum over another normalizer: num_pos + 0.1 * num_neg.
    B, Q, _ = short.outputs["pred_logits"].shape
    num_pos = sum(len(t["boxes"]) for t in short.raw["targets"])
    ref = floats(SetCriterion("hf", impl="masked_select")(short.outputs, short.targets))
    assert terms["loss_ce"] == pytest.approx(ref["loss_ce"] * num_pos / (num_pos + 0.1 * (B * Q - num_pos)), rel=1e-5)


def test_wrong_or_non_literal_arguments_are_refused_without_running_them(tmp_path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(CriterionError, match="'open' .*is not a callable that MODULE defines"):
        load_criterion(spec(f"build_token_criterion(num_classes=open({str(marker)!r}, 'w'))"))
    assert not marker.exists()
    with pytest.raises(CriterionError, match="it takes no colour"):
        load_criterion(spec("build_token_criterion(2, colour=1)"))
    with pytest.raises(CriterionError, match="takes no colour") as info:
        load_criterion(spec("build_token_criterion(num_classes=2, colour=1)"))
    assert "num_classes, eos_coef" in str(info.value)


def test_a_class_whose_constructor_needs_arguments_points_at_its_definition() -> None:
    with pytest.raises(CriterionError) as info:
        load_criterion(spec("NeedsArgs"))
    msg = str(info.value)
    assert f"{CRITERIA}:{line_of('class NeedsArgs')}" in msg
    assert "num_classes, matcher" in msg and "NeedsArgs(num_classes=..., matcher=...)" in msg
    assert "user_code.py" not in msg


def test_a_keyerror_in_the_users_code_lists_what_nanscope_provides(short) -> None:
    crit, _ = load_criterion(spec("reads_size"))
    with pytest.raises(CriterionError) as info:
        call_criterion(crit, short.outputs, short.targets, extras=short.extras)
    msg = str(info.value)
    size_line = line_of('h, w = targets[0]["size"]')
    assert "KeyError 'size'" in msg and f"{CRITERIA}:{size_line}" in msg
    listed = re.search(r"targets carry (.*?); its outputs carry (.*?); parameters it fills by name: (.*?) \(", msg)
    assert listed is not None
    assert set(listed.group(1).split(", ")) == set(short.targets[0])
    assert set(listed.group(2).split(", ")) == set(short.outputs)
    assert set(listed.group(3).split(", ")) == set(short.extras)


def test_a_criterion_needing_an_unknown_parameter_says_which() -> None:
    def crit(outputs, targets, class_weights):
        return {}

    with pytest.raises(CriterionError, match="needs class_weights, which nanscope cannot fill"):
        call_criterion(crit, {}, [], extras={"caption": []})
