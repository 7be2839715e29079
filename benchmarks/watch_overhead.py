"""What nanscope.watch costs per training step, next to torch.autograd.detect_anomaly (CPU, demo model).

One process, five copies of the demo GroundingDINO with the same weights, timed interleaved
(round-robin, shuffled order each round) so that load from other processes hits every variant alike:

    plain        forward, masked loss, backward, SGD step
    watched      the same with nanscope.watch: check() every step (CPU default: read at once)
    watched+copy check() with sync_every=50 and keep_weights=True: the device weight copy that
                 covers late reads is refreshed every step (what CUDA runs by default)
    attached     nanscope.watch.attach on the criterion module: its forward hook checks the returned
                 terms (no check() in the loop), the model's pre-hook records the inputs
    anomaly      the same inside torch.autograd.detect_anomaly(check_nan=True)

Prints medians of wall time and of process CPU time (`time.process_time`, all threads), the ratios
to plain, and the median time of check() alone (the direct cost, free of step-to-step noise). On a
shared machine the CPU-time ratios are the ones to read: other processes stretch wall time at
random, not the work this process does. Run: `python benchmarks/watch_overhead.py [--rounds 20]`.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torchvision.ops import sigmoid_focal_loss  # noqa: E402

from nanscope.stacks.groundingdino.demo import demo_batch, write_demo  # noqa: E402
from nanscope.stacks.groundingdino.stack import build_model  # noqa: E402
from nanscope.watch.attachment import attach  # noqa: E402
from nanscope.watch.sentinel import watch  # noqa: E402


class Criterion(torch.nn.Module):
    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return masked_loss(out, batch)


def masked_loss(out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Focal loss on the valid text positions only (padded -inf replaced first), L1 on the first queries."""
    logits = out["pred_logits"]
    valid = logits != float("-inf")
    safe = torch.where(valid, logits, torch.zeros((), dtype=logits.dtype))
    n = max(sum(len(t["boxes"]) for t in batch["targets"]), 1)
    loss_ce = (sigmoid_focal_loss(safe, torch.zeros_like(safe), reduction="none") * valid).sum() / n
    boxes = out["pred_boxes"]
    loss_bbox = sum((boxes[i, : len(t["boxes"])] - t["boxes"]).abs().sum() for i, t in enumerate(batch["targets"])) / n
    return {"loss_ce": loss_ce, "loss_bbox": loss_bbox}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    tmp = Path(tempfile.mkdtemp(prefix="nanscope-bench-"))
    demo = write_demo(tmp / "demo", long=False)
    base, _ = build_model(demo.config, text_encoder=demo.text_encoder, seed=0)
    base.train()
    batch = demo_batch(0, long=False)
    models = {name: copy.deepcopy(base) for name in ("plain", "watched", "watched+copy", "attached", "anomaly")}
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-6) for name, m in models.items()}
    watchers = {
        "watched": watch(models["watched"], tmp / "dumps-a"),
        "watched+copy": watch(models["watched+copy"], tmp / "dumps-b", sync_every=50, keep_weights=True),
    }
    criteria = {name: Criterion() for name in models}
    attached = attach(criteria["attached"], tmp / "dumps-c", model=models["attached"])
    check_times: dict[str, list[float]] = {k: [] for k in watchers}
    steps = {k: 0 for k in models}

    def step(name: str) -> tuple[float, float]:
        model, opt = models[name], opts[name]
        t0, p0 = time.perf_counter(), time.process_time()
        ctx = torch.autograd.detect_anomaly(check_nan=True) if name == "anomaly" else _null()
        with ctx:
            terms = criteria[name](model(batch["images"], captions=batch["captions"]), batch)
            if name in watchers:
                c0 = time.perf_counter()
                watchers[name].check(steps[name], terms, batch)
                check_times[name].append(time.perf_counter() - c0)
            opt.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
        opt.step()
        steps[name] += 1
        return time.perf_counter() - t0, time.process_time() - p0

    for _ in range(args.warmup):
        for name in models:
            step(name)
    for v in check_times.values():
        v.clear()
    times: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    rng = random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            wall, proc = step(name)
            times[name].append(wall)
            cpu[name].append(proc)
    for w in watchers.values():
        w.close()
    attached.detach()

    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"nanscope.watch overhead, demo GroundingDINO train step (batch {len(batch['captions'])}, "
          f"{batch['images'].shape[-1]} px), CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds")
    print(f"{'variant':<14} {'wall median s':>13} {'ratio':>6} {'min s':>6} {'max s':>6}   "
          f"{'CPU median s':>12} {'ratio':>6}")
    for k in models:
        print(f"{k:<14} {med[k]:>13.3f} {med[k] / med['plain']:>6.3f} {min(times[k]):>6.3f} {max(times[k]):>6.3f}   "
              f"{cmed[k]:>12.3f} {cmed[k] / cmed['plain']:>6.3f}")
    for k, v in check_times.items():
        c = statistics.median(v)
        print(f"check() alone, {k:<12}: {c * 1e3:7.3f} ms median = {c / min(times['plain']) * 100:.2f}% "
              "of the fastest plain step")
    print(f"watched / plain = {med['watched'] / med['plain']:.3f} wall, {cmed['watched'] / cmed['plain']:.3f} CPU "
          "(target <= 1.03)")
    print(f"attached / plain = {med['attached'] / med['plain']:.3f} wall, {cmed['attached'] / cmed['plain']:.3f} CPU "
          "(target <= 1.02)")
    print(f"anomaly / plain = {med['anomaly'] / med['plain']:.3f} wall, {cmed['anomaly'] / cmed['plain']:.3f} CPU")


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


if __name__ == "__main__":
    main()
