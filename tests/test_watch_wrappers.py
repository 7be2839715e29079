"""nanscope.watch on trainers' own shapes: a wrapper called with `class_names=` (captions built inside),
targets with the trainer's own keys and its own positive map, and the one-time replayability warning."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from nanscope.watch.sentinel import NonFiniteStepError, watch


class ClassNamesWrapper(nn.Module):
    """A trainer's wrapper: called with class names, it builds the caption and calls the detector with captions=."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor, class_names: list[str]) -> dict[str, torch.Tensor]:
        caption = " . ".join(class_names) + " ."
        return self.detector(images, captions=[caption] * images.shape[0])


CLASS_NAMES = ["cat", "red car"]
CAPTION = "cat . red car ."


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from nanscope.stacks.groundingdino.demo import write_demo

    return write_demo(tmp_path_factory.mktemp("demo"), long=False)


def build_wrapped(demo: Any) -> ClassNamesWrapper:
    from nanscope.stacks.groundingdino.stack import build_model

    model, _ = build_model(demo.config, text_encoder=demo.text_encoder, seed=0)
    return ClassNamesWrapper(model)


def token_labels(tokenizer: Any, names: list[str], labels: list[int]) -> torch.Tensor:
    """The trainer's own positive map [N, 256]: each box's class name located in the caption by hand."""
    enc = tokenizer(CAPTION)
    out = torch.zeros(len(labels), 256)
    for j, k in enumerate(labels):
        beg = CAPTION.index(names[k])
        first, last = enc.char_to_token(beg), enc.char_to_token(beg + len(names[k]) - 1)
        out[j, first: last + 1] = 1.0
    return out


def trainer_batch(tokenizer: Any, step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    labels = [1, 0]
    target = {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.2]]),
              "labels": torch.tensor(labels), "size": torch.tensor([224, 224]),
              "token_labels": token_labels(tokenizer, CLASS_NAMES, labels)}
    return {"images": torch.randn(1, 3, 224, 224, generator=g), "class_names": list(CLASS_NAMES), "targets": [target]}


def trainer_loss(out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Uses the trainer's token_labels on the first queries; -inf padding replaced before the loss."""
    logits = out["pred_logits"]
    valid = logits != float("-inf")
    target = torch.zeros_like(logits)
    tl = batch["targets"][0]["token_labels"]
    target[0, : len(tl)] = tl
    safe = torch.where(valid, logits, torch.zeros((), dtype=logits.dtype))
    loss_ce = (sigmoid_focal_loss(safe, target, reduction="none") * valid).sum()
    boxes = batch["targets"][0]["boxes"]
    return {"loss_ce": loss_ce, "loss_bbox": (out["pred_boxes"][0, : len(boxes)] - boxes).abs().sum()}


def test_a_class_names_wrapper_still_yields_a_replayable_dump(demo: Any, tmp_path: Path, capsys) -> None:
    model = build_wrapped(demo)
    tok = model.detector.tokenizer
    k = 1
    with pytest.raises(NonFiniteStepError) as info:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with watch(model, tmp_path / "dumps", config=demo.config) as w:
                for step in range(3):
                    batch = trainer_batch(tok, step)
                    if step == k:
                        batch["images"][0, 0, 10, 10] = float("nan")
                    with torch.no_grad():
                        terms = trainer_loss(model(batch["images"], class_names=batch["class_names"]), batch)
                    w.check(step, terms, batch)
    assert not [x for x in seen if "could not be replayed" in str(x.message)]  # this loop's dumps replay
    dump = info.value.report.dump
    dumped = torch.load(dump / "batch.pt", weights_only=True)
    assert dumped["captions"] == [CAPTION]  # where the detector received it, not in the trainer's batch
    t = dumped["targets"][0]
    given = trainer_batch(tok, k)["targets"][0]
    assert torch.equal(t["positive_map"], given["token_labels"])  # the trainer's own positive map
    assert set(t["extra"]) == {"labels", "size", "token_labels"}  # the trainer's own keys, kept
    assert torch.equal(t["extra"]["labels"], given["labels"]) and torch.equal(t["extra"]["size"], given["size"])
    assert "phrases" not in t and "tokens_positive" not in t

    from nanscope.cli import main
    from nanscope.replay.session import prepare

    capsys.readouterr()
    assert main(["inspect", str(dump)]) == 1  # replays: NS304 names the NaN pixel (exit 1, not 2)
    out = capsys.readouterr().out
    assert "NS304" in out
    replay = prepare(dump / "checkpoint.pth", dump / "batch.pt", config=demo.config, hash_checkpoint=False)
    rt = replay.targets()[0]
    assert torch.equal(rt["positive_map"].cpu(), given["token_labels"])  # the replay uses the trainer's map
    assert torch.equal(rt["size"], given["size"])  # and hands the criterion the trainer's own keys
    assert rt["phrases"] == ["red car", "cat"]  # the text of each box's tokens


def test_a_dump_that_could_not_be_replayed_is_warned_once_at_check(demo: Any, tmp_path: Path) -> None:
    model = build_wrapped(demo)
    tok = model.detector.tokenizer
    with watch(model, tmp_path / "dumps", config=demo.config, on_nonfinite="stop") as w:
        with pytest.warns(RuntimeWarning) as record:
            for step in range(3):
                batch = trainer_batch(tok, step)
                del batch["targets"][0]["token_labels"]  # only labels: no phrases, spans or positive map
                with torch.no_grad():
                    terms = trainer_loss(model(batch["images"], class_names=batch["class_names"]),
                                         trainer_batch(tok, step))
                assert w.check(step, terms, batch)
    msgs = [str(r.message) for r in record if "could not be replayed" in str(r.message)]
    assert len(msgs) == 1  # once, not per step
    assert "targets[0] has 2 boxes but no phrases, tokens_positive, positive_map, token_labels or labels indexing a cap_list" in msgs[0]
    assert "labels, size" in msgs[0] and "no captions" not in msgs[0]  # the detector's call had the captions
