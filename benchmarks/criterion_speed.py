"""Criterion speed at full GroundingDINO size: forward + backward of the weighted total loss.

Shapes: B=4 images, Q=900 queries, 256 text columns (captions of 18-40 tokens), 6 decoder layers
(last + 5 aux) + encoder proposals, ~10 boxes per image. All variants run in the same process,
interleaved, and the medians are compared:

1. nanscope `SetCriterion("hf", aux_loss=True)` vs transformers' `GroundingDinoForObjectDetectionLoss`
   (auxiliary_loss and two_stage on, same caption for every image so both compute the same loss);
2. the sync-free classification term vs the `masked_select` reference;
3. the fixed (masked) criterion vs the naive one over all 256 columns (which returns NaN);
4. the same without `text_token_mask`: validity read from the -inf logits, all 256 columns used.

On CUDA (`--device cuda`) it also counts host synchronizations with `torch.cuda.set_sync_debug_mode`:
the sync-free classification term must have none, the whole criterion one per batch (the cost copy
for scipy).

Usage: python benchmarks/criterion_speed.py [--reps 15] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace
from typing import Any, Callable

import torch

B, Q, T, LAYERS, BOXES = 4, 900, 256, 6, 10


def make_inputs(seed: int = 0, same_caption: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Logits of all layers (leaf tensors), boxes, masks and targets in nanscope's and transformers' forms."""
    g = torch.Generator().manual_seed(seed)
    lengths = [30] * B if same_caption else [18, 25, 33, 40]
    length = max(lengths)
    text_mask = torch.zeros(B, length, dtype=torch.bool)
    for i, n in enumerate(lengths):
        text_mask[i, :n] = True
    full = torch.nn.functional.pad(text_mask, (0, T - length))
    n_classes = 8
    label_map = torch.zeros(n_classes, T)
    for c in range(n_classes):  # phrase c covers tokens 1 + 3c .. 2 + 3c
        label_map[c, 1 + 3 * c: 3 + 3 * c] = 1
    layers = []
    for _ in range(LAYERS + 1):  # decoder layers, then the encoder proposals
        logits = torch.randn(B, Q, T, generator=g).masked_fill(~full[:, None, :], float("-inf"))
        boxes = torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25
        layers.append((logits.to(device).requires_grad_(), boxes.to(device).requires_grad_()))
    labels, targets = [], []
    for i in range(B):
        n = BOXES + (i % 3) - 1
        cls = torch.randint(0, n_classes, (n,), generator=g)
        boxes = torch.rand(n, 4, generator=g) * 0.4 + 0.3
        labels.append({"class_labels": cls.to(device), "boxes": boxes.to(device)})
        targets.append({"boxes": boxes.to(device), "positive_map": label_map[cls].to(device)})
    text_mask, full, label_map = text_mask.to(device), full.to(device), label_map.to(device)
    return {"layers": layers, "text_mask": text_mask, "full_mask": full, "label_maps": (label_map,) * B,
            "labels": labels, "targets": targets}


def nanscope_outputs(inp: dict[str, Any]) -> dict[str, Any]:
    (logits, boxes), aux, enc = inp["layers"][LAYERS - 1], inp["layers"][: LAYERS - 1], inp["layers"][LAYERS]
    return {"pred_logits": logits, "pred_boxes": boxes, "text_token_mask": inp["text_mask"],
            "aux_outputs": [{"pred_logits": lo, "pred_boxes": bo} for lo, bo in aux],
            "enc_outputs": {"pred_logits": enc[0], "pred_boxes": enc[1]}}


def hf_step(inp: dict[str, Any]) -> torch.Tensor:
    from transformers.loss.loss_grounding_dino import GroundingDinoForObjectDetectionLoss

    config = SimpleNamespace(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0, focal_alpha=0.25, auxiliary_loss=True,
                             two_stage=True, decoder_layers=LAYERS, bbox_loss_coefficient=5.0,
                             giou_loss_coefficient=2.0)
    dec = inp["layers"][:LAYERS]
    loss, _, _ = GroundingDinoForObjectDetectionLoss(
        logits=dec[-1][0], labels=inp["labels"], device=dec[-1][0].device, pred_boxes=dec[-1][1], config=config,
        label_maps=inp["label_maps"], text_mask=inp["full_mask"][:, None, :].expand(B, Q, T),
        outputs_class=[lo for lo, _ in dec], outputs_coord=[bo for _, bo in dec],
        encoder_logits=inp["layers"][LAYERS][0], encoder_pred_boxes=inp["layers"][LAYERS][1])
    return loss


def timed(fn: Callable[[], torch.Tensor], inp: dict[str, Any]) -> float:
    for lo, bo in inp["layers"]:
        lo.grad = bo.grad = None
    sync = torch.cuda.synchronize if inp["layers"][0][0].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    fn().backward()
    sync()
    return time.perf_counter() - start


def count_syncs(fn: Callable[[], Any]) -> int:
    """Host synchronizations `fn` triggers on CUDA (torch.cuda.set_sync_debug_mode warnings)."""
    import warnings

    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("called a synchronizing" in str(w.message) for w in caught)  # not the "prototype" notice


def report_syncs(inp: dict[str, Any], out: dict[str, Any]) -> None:
    from nanscope.criterion.set_criterion import SetCriterion
    from nanscope.criterion.focal import focal_sum_masked_select, focal_sum_syncfree

    logits = inp["layers"][0][0]
    valid = inp["full_mask"][:, None, :]
    target = torch.zeros_like(logits)
    print("host syncs on CUDA (forward + backward):")
    for name, fn in (("focal_sum_syncfree", focal_sum_syncfree), ("focal_sum_masked_select", focal_sum_masked_select)):
        print(f"  {name:<34} {count_syncs(lambda: fn(logits, target, valid).backward())}")
    for impl in ("syncfree", "masked_select"):
        crit = SetCriterion("mmdet", impl=impl)
        n = count_syncs(lambda: crit.total(crit(out, inp["targets"])).backward())
        print(f"  SetCriterion impl={impl:<16} {n}  ({LAYERS + 1} supervised layers)")


def compare(name: str, a: tuple[str, Callable[[], torch.Tensor]], b: tuple[str, Callable[[], torch.Tensor]],
            inp: dict[str, Any], reps: int, target: float) -> None:
    times: dict[str, list[float]] = {a[0]: [], b[0]: []}
    for fn in (a[1], b[1]):  # warm-up
        timed(fn, inp)
    for _ in range(reps):
        for label, fn in (a, b):
            times[label].append(timed(fn, inp))
    ma, mb = statistics.median(times[a[0]]), statistics.median(times[b[0]])
    ratio = ma / mb
    verdict = "ok" if ratio <= target else "over target"
    print(f"{name}\n  {a[0]:<34} median {ma * 1e3:8.1f} ms\n  {b[0]:<34} median {mb * 1e3:8.1f} ms\n"
          f"  ratio {ratio:.2f}x (target <= {target:.1f}x: {verdict})")


def main() -> None:
    from nanscope.criterion.set_criterion import NaiveCriterion, SetCriterion

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    inp = make_inputs(device=args.device)
    out = nanscope_outputs(inp)
    hf_crit = SetCriterion("hf", aux_loss=True)
    syncfree = SetCriterion("mmdet")
    masked_select = SetCriterion("mmdet", impl="masked_select")
    naive = NaiveCriterion("mmdet")

    ours, theirs = hf_crit.total(hf_crit(out, inp["targets"])), hf_step(inp)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {args.device} ({where}); B={B} Q={Q} T={T} "
          f"{LAYERS} decoder layers + encoder, {sum(len(t['boxes']) for t in inp['targets'])} boxes")
    print(f"total loss: nanscope hf {ours.item():.6f}, transformers {theirs.item():.6f}")
    if args.device.startswith("cuda"):
        report_syncs(inp, out)
    compare("1. nanscope (hf preset) vs transformers", ("nanscope SetCriterion('hf')", lambda: hf_crit.total(
        hf_crit(out, inp["targets"]))), ("transformers GroundingDino loss", lambda: hf_step(inp)), inp, args.reps, 1.0)
    compare("2. sync-free vs masked_select (mmdet)", ("syncfree", lambda: syncfree.total(syncfree(
        out, inp["targets"]))), ("masked_select", lambda: masked_select.total(masked_select(out, inp["targets"]))),
        inp, args.reps, 1.1)
    compare("3. fixed vs naive (mmdet)", ("fixed SetCriterion", lambda: syncfree.total(syncfree(
        out, inp["targets"]))), ("naive (NaN)", lambda: naive.total(naive(out, inp["targets"]))), inp, args.reps, 1.1)
    no_mask = {k: v for k, v in out.items() if k != "text_token_mask"}
    compare("4. fixed, validity from logits vs naive (mmdet)", ("fixed SetCriterion, no text mask", lambda: syncfree.total(
        syncfree(no_mask, inp["targets"]))), ("naive (NaN)", lambda: naive.total(naive(no_mask, inp["targets"]))),
        inp, args.reps, 1.1)


if __name__ == "__main__":
    main()
