"""Training data for the framework tests: the tiny HF GroundingDino's examples in order, a NaN planted at a known step."""

from __future__ import annotations

import torch

from nanscope.stacks.transformers.demo import write_hf_model

CAPTION = "cat . dog ."
PLANT = 1  # the optimizer step whose batch (or logits) goes bad


def hf_folder(tmp_path_factory):
    """The tiny HF GroundingDino (`nanscope demo --stack hf`'s model) with 50 queries, which 64 px images fit."""
    return write_hf_model(tmp_path_factory.mktemp("hf") / "model", num_queries=50)


def examples(tok, n: int, nan_pixel_at: int | None = None) -> "InOrder":
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        enc = tok(CAPTION, return_tensors="pt")
        pv = torch.randn(3, 64, 64, generator=g)
        if i == nan_pixel_at:
            pv[2, 7, 9] = float("nan")
        out.append({"pixel_values": pv, "input_ids": enc["input_ids"][0], "attention_mask": enc["attention_mask"][0],
                    "labels": {"class_labels": torch.tensor([0, 1]),
                               "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.25, 0.35]])}})
    return InOrder(out)


class InOrder(torch.utils.data.IterableDataset):
    """The examples in order (the Trainer shuffles a map-style dataset): the planted one is at a known step."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)


def collate(items: list[dict]) -> dict:
    return {"pixel_values": torch.stack([x["pixel_values"] for x in items]),
            "input_ids": torch.stack([x["input_ids"] for x in items]),
            "attention_mask": torch.stack([x["attention_mask"] for x in items]),
            "labels": [x["labels"] for x in items]}


def nan_logits_at(model, step_of, step: int):
    """Plant a NaN in the last decoder layer's class logits at one optimizer step (boxes stay finite)."""
    def hook(_m, _args, out):
        if model.training and step_of() == step:
            c = torch.ones_like(out)
            c[0, 0, 0] = float("nan")
            return out * c  # the NaN reaches the gradients too, as a real one would
    return model.class_embed[-1].register_forward_hook(hook)
