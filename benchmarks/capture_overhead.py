"""Forward with nanscope's capture hooks vs a plain forward, on each stack's demo model.

groundingdino-py: the demo model; transformers: the tiny GroundingDinoForObjectDetection of
`nanscope demo --stack hf`. Same process, interleaved repetitions, medians. Target: capture/plain <= 1.05.
    python benchmarks/capture_overhead.py [--reps 15] [--device cpu|cuda] [--stack groundingdino-py|transformers|all]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from nanscope.stacks.capture import capture  # noqa: E402
from nanscope.stacks.groundingdino.demo import demo_batch, write_demo  # noqa: E402
from nanscope.stacks.groundingdino.stack import build_model  # noqa: E402


def groundingdino_py(dev: torch.device) -> tuple[Callable[[], Any], torch.nn.Module, str]:
    with tempfile.TemporaryDirectory() as d:
        files = write_demo(d)
        model, _ = build_model(files.config, text_encoder=files.text_encoder, seed=0)
    model.to(dev).eval()
    b = demo_batch(0, long=False)
    images, captions = b["images"].to(dev), b["captions"]
    return (lambda: model(images, captions=captions)), model, f"batch {len(captions)} at {images.shape[-1]} px"


def transformers_hf(dev: torch.device) -> tuple[Callable[[], Any], torch.nn.Module, str]:
    from nanscope.stacks.transformers.demo import tiny_model, write_tokenizer

    with tempfile.TemporaryDirectory() as d:
        tok = write_tokenizer(d)
    model = tiny_model(len(tok)).to(dev)
    b = demo_batch(0, long=False)
    enc = tok(b["captions"], padding="longest", return_tensors="pt").to(dev)
    pixels = b["images"].to(dev)
    return (lambda: model(pixel_values=pixels, **enc)), model, f"batch {len(b['captions'])} at {pixels.shape[-1]} px"


STACKS = {"groundingdino-py": groundingdino_py, "transformers": transformers_hf}


def measure(name: str, dev: torch.device, reps: int) -> None:
    forward, model, what = STACKS[name](dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def captured() -> None:
        with capture(model):
            forward()

    times: dict[str, list[float]] = {"plain": [], "capture": []}
    with torch.no_grad():
        for _ in range(2):  # warm-up
            forward()
            captured()
        for _ in range(reps):
            for key, fn in (("plain", forward), ("capture", captured)):
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[key].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}: device {dev}, {reps} interleaved repetitions, {what}")
    print(f"  plain forward    median {med['plain'] * 1e3:8.1f} ms")
    print(f"  capture forward  median {med['capture'] * 1e3:8.1f} ms")
    print(f"  ratio capture/plain = {med['capture'] / med['plain']:.3f}  (target <= 1.05)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stack", default="all", choices=[*STACKS, "all"])
    args = ap.parse_args()
    for name in (STACKS if args.stack == "all" else [args.stack]):
        measure(name, torch.device(args.device), args.reps)


if __name__ == "__main__":
    main()
