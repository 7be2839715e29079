"""Cost of `nanscope.trace.trace_nonfinite` against a plain forward + loss + backward on the demo model.

Same process, interleaved rounds, medians. Also times `torch.autograd.detect_anomaly` and the op-level trace of
the whole step (`two_phase=False`) for comparison; on CUDA it counts the host syncs of each case
(`torch.cuda.set_sync_debug_mode("warn")`).

    python benchmarks/trace_overhead.py [--rounds 7] [--threads 1] [--device cpu]

`--threads 1` (the default) keeps the numbers steady on a shared CPU; both sides run with the same setting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torchvision  # noqa: E402

from nanscope.stacks.groundingdino.demo import demo_batch, write_demo  # noqa: E402
from nanscope.stacks.groundingdino.stack import build_model  # noqa: E402
from nanscope.trace.tracer import trace_nonfinite  # noqa: E402

from criterion_speed import count_syncs  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_demo(tmp, long=False)
        model, _ = build_model(files.config, text_encoder=files.text_encoder, seed=0)
    model.to(dev)
    batch = demo_batch(0, long=False)
    images, captions = batch["images"].to(dev), batch["captions"]

    def loss(masked: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            out = model(images, captions=captions)
            logits = out["pred_logits"]  # [B, 900, 256], -inf past each caption's tokens
            if masked:
                logits = torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))
            focal = torchvision.ops.sigmoid_focal_loss(logits, torch.zeros_like(logits), reduction="mean")
            return focal + out["pred_boxes"].abs().mean()
        return run

    def plain(run: Callable[[], torch.Tensor]) -> None:
        model.zero_grad(set_to_none=True)
        run().backward()

    def anomaly(run: Callable[[], torch.Tensor]) -> None:
        model.zero_grad(set_to_none=True)
        with torch.autograd.detect_anomaly(check_nan=True):
            try:
                run().backward()
            except RuntimeError:  # raised on the NaN batch: that is its report
                pass

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    cases = {
        "plain": lambda: plain(loss(True)),
        "trace": lambda: trace_nonfinite(model, loss(True)),
        "op_level": lambda: trace_nonfinite(model, loss(True), two_phase=False),
        "anomaly": lambda: anomaly(loss(True)),
        "plain_nan": lambda: plain(loss(False)),
        "trace_nan": lambda: trace_nonfinite(model, loss(False)),
        "op_level_nan": lambda: trace_nonfinite(model, loss(False), two_phase=False),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for f in cases.values():  # warm-up
        f()
    for _ in range(args.rounds):
        for name, f in cases.items():
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    r = trace_nonfinite(model, loss(True))
    rn = trace_nonfinite(model, loss(False))
    print(f"demo GroundingDINO, batch of {len(captions)}, {args.device}, threads={torch.get_num_threads()}, "
          f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    print(f"healthy batch: {r.module_calls} module calls, {r.ops_seen} ops replayed op by op in {list(r.replayed)}; "
          f"full trace: {r.full_trace_reason or 'not needed'}")
    print(f"NaN batch: full trace: {rn.full_trace_reason or 'not needed'}")
    syncs = {k: count_syncs(f) for k, f in cases.items()} if dev.type == "cuda" else {}

    def row(label: str, key: str, base: str) -> None:
        extra = f"   {syncs[key]} host syncs" if syncs else ""
        ratio = f"   ratio {med[key] / med[base]:.2f}x" if key != base else ""
        print(f"{label:32s}{med[key] * 1e3:8.1f} ms{ratio}{extra}")

    row("plain forward+loss+backward", "plain", "plain")
    row("trace_nonfinite (two phases)", "trace", "plain")
    row("op-level trace of the step", "op_level", "plain")
    row("detect_anomaly(check_nan)", "anomaly", "plain")
    row("NaN batch: plain", "plain_nan", "plain_nan")
    row("NaN batch: trace_nonfinite", "trace_nan", "plain_nan")
    row("NaN batch: op-level trace", "op_level_nan", "plain_nan")


if __name__ == "__main__":
    main()
