"""The Hugging Face form of a batch: field-and-index validation, and its conversion with the real tokenizer."""

from __future__ import annotations

import pytest
import torch

from nanscope.errors import BatchError
from nanscope.replay.batch_file import read_batch
from nanscope.replay.hf_batch import HfBatch, to_batch, validate_hf_batch
from nanscope.replay.positive_map import build_text_info


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from nanscope.stacks.transformers.demo import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def good(tok):
    enc = tok(["cat . dog .", "a red car . zebra ."], padding="longest", return_tensors="pt")
    return {"pixel_values": torch.zeros(2, 3, 64, 64), **enc, "pixel_mask": torch.ones(2, 64, 64, dtype=torch.long),
            "labels": [{"class_labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)},
                       {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1]])}]}


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b["labels"][1].__setitem__("boxes", torch.zeros(1, 5)), "labels[1].boxes has shape [1, 5]; expected [N, 4]"),
    (lambda b: b["labels"][0].__setitem__("class_labels", torch.tensor([0])),
     "labels[0].class_labels has 1 entries for 2 boxes; expected one per box"),
    (lambda b: b["labels"][0].__setitem__("class_labels", torch.tensor([0.0, 1.0])),
     "labels[0].class_labels has dtype torch.float32; expected integers"),
    (lambda b: b["labels"].pop(), "labels has 1 entries; expected a list of 2 dicts"),
    (lambda b: b["labels"][1].pop("class_labels"), "labels[1] is not a dict with 'class_labels' and 'boxes'"),
    (lambda b: b.pop("labels"), "has pixel_values and input_ids but no labels"),
    (lambda b: b.__setitem__("pixel_values", torch.zeros(2, 64, 64)), "pixel_values has shape [2, 64, 64]"),
    (lambda b: b.__setitem__("attention_mask", b["attention_mask"][:, :3]), "attention_mask has shape [2, 3]"),
    (lambda b: b.__setitem__("pixel_mask", torch.ones(2, 16, 16)), "pixel_mask has shape [2, 16, 16]; expected [2, 64, 64]"),
    (lambda b: b.__setitem__("input_ids", b["input_ids"].float()), "input_ids has shape [2, 8] and dtype torch.float32"),
])
def test_validation_names_field_and_index(tok, mutate, message):
    b = good(tok)
    mutate(b)
    with pytest.raises(BatchError) as e:
        validate_hf_batch(b)
    assert message in str(e.value)


def test_conversion_keeps_ids_and_maps_class_labels_to_their_phrase(tok, tmp_path):
    raw = good(tok)
    torch.save(raw, tmp_path / "b.pt")
    hf = read_batch(tmp_path / "b.pt")
    assert isinstance(hf, HfBatch)
    batch = to_batch(hf, tok)
    for i, caption in enumerate(batch.captions):  # the caption tokenizes back to the collator's ids
        ids = raw["input_ids"][i][raw["attention_mask"][i].bool()].tolist()
        assert tok(caption)["input_ids"] == ids
    texts = build_text_info(tok, batch)
    # class 1 of 'cat . dog .' is 'dog', class 0 'cat'; class 1 of 'a red car . zebra .' is 'zebra'
    assert [[texts[0].token_text(t) for t in b.tokens] for b in texts[0].boxes] == [["dog"], ["cat"]]
    assert [texts[1].token_text(t) for t in texts[1].boxes[0].tokens] == ["zebra"]
    assert batch.targets[0].class_labels == (1, 0) and batch.image_masks is not None
    assert not batch.image_masks.any()  # pixel_mask 1 everywhere: nothing padded


def test_out_of_range_class_label_is_kept_with_an_empty_row(tok):
    raw = good(tok)
    raw["labels"][1]["class_labels"] = torch.tensor([5])
    batch = to_batch(validate_hf_batch(raw), tok)
    texts = build_text_info(tok, batch)
    assert batch.targets[1].class_labels == (5,) and texts[1].positive_map[0].sum() == 0


def test_ids_that_do_not_round_trip_are_refused(tok):
    raw = good(tok)
    raw["input_ids"][0, 1] = 100  # [UNK] where 'cat' was: decoding drops it, so the caption has other ids
    with pytest.raises(BatchError, match=r"input_ids\[0\] decodes to"):
        to_batch(validate_hf_batch(raw), tok)


def test_schema_batch_keeps_class_labels(tmp_path):
    from nanscope.replay.batch import load_batch, save_batch

    raw = {"images": torch.zeros(1, 3, 64, 64), "captions": ["cat . dog ."],
           "targets": [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "phrases": ["dog"], "class_labels": [1]}]}
    back = load_batch(save_batch(tmp_path / "b.pt", raw))
    assert back.targets[0].class_labels == (1,)
    raw["targets"][0]["class_labels"] = [0.5]
    with pytest.raises(BatchError, match=r"targets\[0\].class_labels is \[0.5\]; expected 1 integers"):
        save_batch(tmp_path / "c.pt", raw)
