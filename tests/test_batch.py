"""The batch schema: validation errors name the field and index."""

from __future__ import annotations

import pytest
import torch

from nanscope.replay.batch import IMAGENET_MEAN, IMAGENET_STD, load_batch, save_batch, validate_batch
from nanscope.errors import BatchError


def good():
    return {
        "images": torch.zeros(2, 3, 64, 64),
        "captions": ["cat . dog .", "a zebra ."],
        "targets": [
            {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]), "phrases": ["cat", "dog"]},
            {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "tokens_positive": [[[2, 7]]]},
        ],
    }


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b["targets"][1].__setitem__("boxes", torch.zeros(3, 5)), "targets[1].boxes has shape [3, 5]; expected [N, 4]"),
        (lambda b: b.__setitem__("images", torch.zeros(2, 32, 32)), "images has shape [2, 32, 32]; expected [B, 3, H, W]"),
        (lambda b: b["captions"].__setitem__(1, "  "), "captions[1] is empty"),
        (lambda b: b["targets"][0].__setitem__("phrases", ["cat"]), "targets[0].phrases has 1 entries for 2 boxes"),
        (lambda b: b["targets"][1].__setitem__("tokens_positive", [[[5, 40]]]), "targets[1].tokens_positive[0][0] is [5, 40], outside its caption of 9 characters"),
        (lambda b: b.pop("captions"), "has no captions"),
        (lambda b: b["captions"].pop(), "captions has 1 entries; expected 2"),
        (lambda b: b["targets"][0].pop("phrases"), "targets[0] has 2 boxes but no 'phrases', 'tokens_positive' or 'positive_map'"),
        (lambda b: b["targets"][0].__setitem__("positive_map", torch.ones(3, 256)), "targets[0].positive_map has shape [3, 256]; expected [2, T]"),
        (lambda b: b["targets"][0].__setitem__("positive_map", -torch.ones(2, 256)), "targets[0].positive_map has negative or non-finite entries"),
        (lambda b: b["targets"][0].__setitem__("positive_map", [[1.0]]), "targets[0].positive_map is a list; expected a tensor [2, T]"),
        (lambda b: b["targets"][1].__setitem__("extra", {"size": [32, object()]}), "targets[1].extra.size[1] is a object"),
    ],
)
def test_validation_names_field_and_index(mutate, message):
    b = good()
    mutate(b)
    with pytest.raises(BatchError) as e:
        validate_batch(b)
    assert message in str(e.value)


def test_uint8_images_are_normalized_like_groundingdino():
    b = good()
    b["images"] = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = validate_batch(b)
    expected = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(out.images[0, :, 0, 0], expected)


def test_round_trip_and_empty_targets(tmp_path):
    b = good()
    b["targets"][1] = {"boxes": torch.zeros(0, 4)}
    p = save_batch(tmp_path / "b.pt", b)
    back = load_batch(p)
    assert back.captions == tuple(b["captions"])
    assert back.targets[1].boxes.shape == (0, 4)
    assert back.targets[0].phrases == ("cat", "dog")


def test_a_trainers_positive_map_and_own_keys_round_trip_and_build_the_targets(tmp_path, demo_replay):
    from nanscope.replay.positive_map import build_text_info

    b = good()
    pm = torch.zeros(2, 256)
    pm[0, 1], pm[1, 3:5] = 1.0, 0.5  # one binary row, one row-normalized over two tokens
    b["targets"][0] = {"boxes": b["targets"][0]["boxes"], "positive_map": pm,
                       "extra": {"labels": torch.tensor([0, 1]), "size": [32, 32], "name": "img0"}}
    back = load_batch(save_batch(tmp_path / "b.pt", b))  # weights_only round trip
    t = back.targets[0]
    assert t.phrases is None and t.spans is None and torch.equal(t.positive_map, pm)
    assert torch.equal(t.extra["labels"], torch.tensor([0, 1])) and t.extra["size"] == [32, 32]
    info = build_text_info(demo_replay.tokenizer, back, max_text_len=256)[0]
    assert torch.equal(info.positive_map, (pm > 0).float())  # binarized, nothing else added
    tokens = demo_replay.tokenizer.convert_ids_to_tokens(demo_replay.tokenizer(b["captions"][0])["input_ids"])
    assert [bt.phrase for bt in info.boxes] == [tokens[1], " ".join(tokens[3:5])]


def test_non_torch_file_is_an_input_error(tmp_path):
    p = tmp_path / "b.pt"
    p.write_bytes(b"not a torch file")
    with pytest.raises(BatchError, match="could not be read"):
        load_batch(p)


def test_image_masks_are_validated_and_reach_the_model(demo_replay):
    import dataclasses

    b = good()
    b["image_masks"] = torch.zeros(2, 64, 63, dtype=torch.bool)
    with pytest.raises(BatchError, match=r"image_masks has shape \[2, 64, 63\]; expected \[2, 64, 64\]"):
        validate_batch(b)
    # A padded right half changes what the model computes: the mask is passed as groundingdino's NestedTensor.
    batch = demo_replay.batch
    masks = torch.zeros(len(batch), *batch.images.shape[2:], dtype=torch.bool)
    masks[:, :, 112:] = True
    replay = dataclasses.replace(demo_replay, batch=dataclasses.replace(batch, image_masks=masks))
    from groundingdino.util.misc import NestedTensor

    assert isinstance(replay.samples(), NestedTensor)
    with_mask = replay.forward().layer_logits[-1]
    without = demo_replay.forward().layer_logits[-1]
    finite = torch.isfinite(without)
    assert not torch.allclose(with_mask[finite], without[finite])
