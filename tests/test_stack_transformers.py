"""The transformers stack against a real tiny GroundingDinoForObjectDetection built offline (no mocks).

Expected values come from the real model and library: the model's own outputs and loss_dict, token
counts from the tokenizer's attention mask, transformers' matcher run directly.
"""

from __future__ import annotations

import math

import pytest
import torch

from nanscope.findings import Severity
from nanscope.replay.diagnose import inspect_replay
from nanscope.replay.session import prepare
from nanscope.stacks import get_stack, stack_for_checkpoint, stack_for_model
from nanscope.stacks.transformers.demo import write_hf_model
from nanscope.stacks.transformers.loading import load_tokenizer

CAPTION = "cat . dog ."
BOXES = [torch.tensor([[0.30, 0.40, 0.20, 0.30], [0.70, 0.60, 0.25, 0.35]]), torch.tensor([[0.50, 0.50, 0.40, 0.40]])]
CLASSES = [torch.tensor([0, 1]), torch.tensor([1])]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_hf_model(tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def live(folder):
    import transformers

    return transformers.GroundingDinoForObjectDetection.from_pretrained(folder).eval()


def hf_batch(tok, captions=(CAPTION, CAPTION), classes=CLASSES, boxes=BOXES, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = tok(list(captions), padding="longest", return_tensors="pt")
    labels = [{"class_labels": c.clone(), "boxes": b.clone()} for c, b in zip(classes, boxes)]
    return {"pixel_values": torch.randn(len(captions), 3, 224, 224, generator=g), **enc, "labels": labels}


def save(tmp_path, batch, name="batch.pt"):
    p = tmp_path / name
    torch.save(batch, p)
    return p


def run(folder, batch_path, **kw):
    return inspect_replay(prepare(folder, batch_path, hash_checkpoint=False), **kw)


def codes(result):
    return {f.code: f for f in result.findings}


def test_folder_is_detected_and_loads_clean(folder, live, tok, tmp_path):
    assert stack_for_checkpoint(folder).name == "transformers"
    assert stack_for_model(live).name == "transformers" and get_stack("hf") is get_stack("transformers")
    b = hf_batch(tok)
    b["pixel_mask"] = torch.ones(2, 224, 224, dtype=torch.long)
    b["pixel_mask"][1, :, 160:] = 0  # image 1 was padded on the right
    replay = prepare(folder, save(tmp_path, b), hash_checkpoint=False)
    assert replay.key_fit.clean and not replay.key_fit.benign
    with torch.no_grad():
        expected = live(**{k: v for k, v in b.items() if k != "labels"})
    rec = replay.forward()  # save_pretrained -> inspect: the replayed model is the saved one
    assert torch.equal(rec.layer_logits[-1], expected.logits) and torch.equal(rec.layer_boxes()[-1], expected.pred_boxes)
    assert replay.batch.captions == (tok.decode(tok(CAPTION)["input_ids"], skip_special_tokens=True),) * 2


@pytest.mark.parametrize("mm", [False, True], ids=["GroundingDino", "MMGroundingDino"])
@pytest.mark.parametrize("detach", [True, False])
def test_capture_equals_model_outputs_on_every_layer(tmp_path, mm, detach):
    from nanscope.stacks.transformers.demo import tiny_model, write_tokenizer

    tok = write_tokenizer(tmp_path / "tok")
    model = tiny_model(len(tok), mm=mm)
    b = hf_batch(tok, captions=(CAPTION, "a zebra next to a red car ."), classes=[CLASSES[0], torch.tensor([0])])
    with torch.set_grad_enabled(not detach), get_stack("transformers").capture(model, detach=detach) as cap:
        out = model(**b)
    rec = cap.last
    layers = [*out.auxiliary_outputs, {"logits": out.logits, "pred_boxes": out.pred_boxes}]
    assert rec.num_layers == len(layers) == model.config.decoder_layers
    for lg, bx, ref in zip(rec.layer_logits, rec.layer_boxes(), layers):
        assert torch.equal(lg, ref["logits"]) and torch.equal(bx, ref["pred_boxes"])
    assert torch.equal(rec.enc_logits(), out.encoder_logits) and torch.equal(rec.enc_boxes, out.encoder_pred_boxes)
    assert torch.equal(rec.enc_logits_all, out.enc_outputs_class)
    assert torch.equal(rec.text_token_mask, b["attention_mask"].bool()) and torch.equal(rec.input_ids, b["input_ids"])
    assert rec.layer_logits[-1].requires_grad is (not detach)


@pytest.mark.parametrize("mm", [False, True], ids=["GroundingDino", "MMGroundingDino"])
def test_transformers_criterion_on_captured_outputs_equals_the_models_loss(tmp_path, mm):
    from nanscope.criterion.transformers_loss import TransformersLoss
    from nanscope.stacks.transformers.demo import tiny_model

    model_dir = write_hf_model(tmp_path / "m", mm=mm)
    tok = load_tokenizer(model_dir)
    model = tiny_model(len(tok), mm=mm)
    b = hf_batch(tok)
    replay = prepare(model_dir, save(tmp_path, b), hash_checkpoint=False)
    with get_stack("transformers").capture(model) as cap:
        out = model(**b)
    got = TransformersLoss(model.config)(cap.last.to_outputs(), replay.targets())
    want = {k: v for k, v in out.loss_dict.items() if not k.startswith("cardinality")}
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k].detach()), k


def test_set_criterion_hf_equals_transformers_loss_on_real_outputs(folder, tok, tmp_path):
    from nanscope.criterion.set_criterion import SetCriterion
    from nanscope.criterion.transformers_loss import TransformersLoss

    replay = prepare(folder, save(tmp_path, hf_batch(tok)), hash_checkpoint=False)
    rec = replay.forward(detach=False, grad=True)
    outputs, targets = rec.to_outputs(), replay.targets()
    ref_crit = TransformersLoss(replay.model.config)  # auxiliary_loss=True in the tiny config
    ref, ours = ref_crit(outputs, targets), SetCriterion("hf", aux_loss=True)(outputs, targets)
    assert sorted(ref) == sorted(ours)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)
    leaves = [*rec.layer_logits, rec.enc_logits()]
    g_ref = torch.autograd.grad(ref_crit.total(ref), leaves, retain_graph=True)
    g_ours = torch.autograd.grad(SetCriterion("hf", aux_loss=True).total(ours), leaves)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unmasked_padded_loss_gives_ns101_and_ns001_errors(folder, tok, tmp_path):
    captions = (CAPTION, "a photo of a zebra next to a red car .")
    b = hf_batch(tok, captions=captions, classes=[CLASSES[0], torch.tensor([0])])
    result = run(folder, save(tmp_path, b), criterion="fixtures/criteria/simple.py:unmasked")
    found = codes(result)
    valid = [len(tok(c)["input_ids"]) for c in captions]  # real tokens per caption, from the tokenizer
    queries, width, layers = 900, 256, 3  # dec0, dec1 and the encoder proposals
    assert found["NS101"].severity is Severity.ERROR
    assert found["NS101"].count == layers * queries * sum(width - n for n in valid)
    assert found["NS001"].severity is Severity.ERROR and found["NS001"].count == 1


def test_builtin_loss_is_clean_on_a_healthy_batch(folder, live, tok, tmp_path):
    b = hf_batch(tok)
    result = run(folder, save(tmp_path, b), criterion="transformers")
    assert not [f for f in result.findings if f.severity is not Severity.INFO], result.findings
    with torch.no_grad():
        out = live(**b)
    for k, v in out.loss_dict.items():
        if not k.startswith("cardinality"):
            assert result.loss_terms[k] == pytest.approx(float(v), rel=1e-6), k


def test_caption_past_max_text_len_is_named_and_the_model_raises(folder, live, tok, tmp_path):
    from nanscope.stacks.groundingdino.demo import long_caption

    cap, _ = long_caption()
    b = hf_batch(tok, captions=(CAPTION, cap), classes=[CLASSES[0], torch.tensor([0])])
    with pytest.raises(RuntimeError, match="must match the size of tensor b"), torch.no_grad():
        live(**b)  # what training would do
    f = codes(run(folder, save(tmp_path, b)))["NS110"]
    assert f.severity is Severity.ERROR and f.where[0]["image"] == 1
    assert f.where[0]["tokens"] == len(tok(cap)["input_ids"]) > 256


def test_class_offset_names_the_wrong_rows(folder, tok, tmp_path):
    # image 1's caption has one phrase: transformers takes row 0 + len(label_maps[1]) = 1 of the concatenated
    # maps, which is image 0's second phrase 'dog', instead of row 2 (its own 'zebra ...')
    b = hf_batch(tok, captions=(CAPTION, "zebra next to a red car ."), classes=[CLASSES[0], torch.tensor([0])])
    result = run(folder, save(tmp_path, b), criterion="transformers")
    f = codes(result)["NS111"]
    assert f.severity is Severity.ERROR and f.count == 1
    assert f.where[0]["image"] == 1 and f.where[0]["box"] == 0 and "image 0's phrase 1 'dog'" in f.where[0]["why"]
    # the same captions in the other order need a row past the end: transformers raises IndexError
    b2 = hf_batch(tok, captions=("zebra next to a red car .", CAPTION), classes=[torch.tensor([0]), CLASSES[0]],
                  boxes=[BOXES[1], BOXES[0]])
    res2 = run(folder, save(tmp_path, b2, "b2.pt"), criterion="transformers")
    assert codes(res2)["NS111"].data["index_errors"] == 1 and "IndexError" in res2.summary["criterion_error"]


def test_class_label_out_of_range_is_named_and_the_model_raises(folder, live, tok, tmp_path):
    b = hf_batch(tok, classes=[CLASSES[0], torch.tensor([2])])  # 'cat . dog .' has phrases 0 and 1
    with pytest.raises(IndexError), torch.no_grad():
        live(**b)
    f = codes(run(folder, save(tmp_path, b), criterion="transformers"))["NS112"]
    assert f.where[0] == {"image": 1, "box": 0, "class": 2, "phrases": 2,
                          "why": "past the last phrase: IndexError in the matcher"}


def test_pixel_boxes_are_caught_although_the_loss_takes_them(folder, live, tok, tmp_path):
    pixel = [BOXES[0], torch.tensor([[112.0, 112.0, 60.0, 80.0]])]
    b = hf_batch(tok, boxes=pixel)
    with torch.no_grad():
        assert math.isfinite(float(live(**b).loss))  # transformers accepts them silently
    f = codes(run(folder, save(tmp_path, b)))["NS201"]
    assert f.severity is Severity.ERROR and (f.where[0]["image"], f.where[0]["box"]) == (1, 0)
    assert "without an error" in f.message


def test_ns203_says_what_this_transformers_matcher_does(folder, tok, tmp_path):
    from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher

    label_map = torch.zeros(2, 8)
    label_map[0, 1] = 1  # row 1 empty: 0/0 in the matcher's row normalization
    try:
        GroundingDinoHungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)(
            {"logits": torch.randn(1, 4, 8), "pred_boxes": torch.full((1, 4, 4), 0.3), "label_maps": (label_map,)},
            [{"class_labels": torch.tensor([0, 1]), "boxes": torch.full((2, 4), 0.3)}])
        raises = False
    except ValueError:
        raises = True
    b = {"images": torch.randn(2, 3, 224, 224), "captions": [CAPTION, CAPTION],
         "targets": [{"boxes": BOXES[0], "phrases": ["cat", "moose"]}, {"boxes": BOXES[1], "phrases": ["dog"]}]}
    f = codes(run(folder, save(tmp_path, b)))["NS203"]
    assert ("raises scipy's ValueError" in f.message) is raises
    assert ("does not raise" in f.message) is (not raises)


def test_encoder_terms_are_reported_as_info(folder, tok, tmp_path):
    f = codes(run(folder, save(tmp_path, hf_batch(tok))))["NS113"]
    assert f.severity is Severity.INFO and "bitwise equal" in f.message


def test_state_dict_file_with_config_and_dump_meta(folder, live, tok, tmp_path):
    import json

    st = get_stack("transformers")
    torch.save({"model": st.dump_state_dict(live)}, tmp_path / "weights.pth")
    replay = prepare(tmp_path / "weights.pth", save(tmp_path, hf_batch(tok)), stack="hf",
                     config=folder / "config.json", text_encoder=str(folder), hash_checkpoint=False)
    assert replay.key_fit.clean and type(replay.model).__name__ == "GroundingDinoForObjectDetection"
    for k, v in live.state_dict().items():
        assert torch.equal(replay.model.state_dict()[k], v), k
    meta = st.dump_meta(live)
    assert json.loads(json.dumps(meta)) == meta and meta["hf_config"]["model_type"] == "grounding-dino"
    tok2, max_len = st.load_tokenizer(config=folder)
    assert max_len == 256 and tok2(CAPTION)["input_ids"] == tok(CAPTION)["input_ids"]
