"""Forward with nanscope's capture hooks vs a plain forward on the demo model.

Same process, interleaved repetitions, medians. Target: capture/plain <= 1.05.
    python benchmarks/capture_overhead.py [--reps 15] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from nanscope.stacks.capture import capture  # noqa: E402
from nanscope.stacks.demo import demo_batch, write_demo  # noqa: E402
from nanscope.stacks.groundingdino_py import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as d:
        files = write_demo(d)
        model, _ = build_model(files.config, text_encoder=files.text_encoder, seed=0)
    model.to(dev).eval()
    b = demo_batch(0, long=False)
    images, captions = b["images"].to(dev), b["captions"]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def plain() -> None:
        model(images, captions=captions)

    def captured() -> None:
        with capture(model):
            model(images, captions=captions)

    times: dict[str, list[float]] = {"plain": [], "capture": []}
    with torch.no_grad():
        for _ in range(2):  # warm-up
            plain()
            captured()
        for _ in range(args.reps):
            for name, fn in (("plain", plain), ("capture", captured)):
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {dev}, {args.reps} interleaved repetitions, batch {len(captions)} at {images.shape[-1]} px")
    print(f"plain forward    median {med['plain'] * 1e3:8.1f} ms")
    print(f"capture forward  median {med['capture'] * 1e3:8.1f} ms")
    print(f"ratio capture/plain = {med['capture'] / med['plain']:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
