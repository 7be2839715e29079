"""Cost of `nanscope.trace.trace_nonfinite` against a plain forward + loss + backward on the demo model.

Same process, interleaved rounds, medians. Also times `torch.autograd.detect_anomaly` and the op-level trace of
the whole step (`two_phase=False`) for comparison; on CUDA it counts the host syncs of each case
(`torch.cuda.set_sync_debug_mode("warn")`). Three steps: a healthy one (the intentional -inf only), a NaN that
starts in the loss code (focal loss on the -inf logits) and a NaN that starts in one module's backward
(`transformer.decoder.layers.0.linear1` wrapped with a module whose forward adds an exact 0 and whose backward
is sqrt'(0) = inf, then 0 * inf = NaN). It checks that the two-phase answer equals the op-level one.

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


class BadBackward(torch.nn.Module):
    """Off: the identity. On: x + sqrt(sum((x - x.detach())^2)), the same values; its backward is NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (x - x.detach()).pow(2).sum().sqrt() if self.on else x


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
    layer = model.transformer.decoder.layers[0]
    bad = BadBackward()
    layer.linear1 = torch.nn.Sequential(layer.linear1, bad)
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

    def backward_nan(f: Callable[[], object]) -> Callable[[], object]:
        def on() -> object:
            bad.on = True
            try:
                return f()
            finally:
                bad.on = False
        return on

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
        "anomaly_nan": lambda: anomaly(loss(False)),
        "plain_bw": backward_nan(lambda: plain(loss(True))),
        "trace_bw": backward_nan(lambda: trace_nonfinite(model, loss(True))),
        "op_level_bw": backward_nan(lambda: trace_nonfinite(model, loss(True), two_phase=False)),
        "anomaly_bw": backward_nan(lambda: anomaly(loss(True))),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for f in cases.values():  # warm-up
        f()
    cpu_times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, f in cases.items():
            sync()
            t, c = time.perf_counter(), time.process_time()
            f()
            sync()
            times[name].append(time.perf_counter() - t)
            cpu_times[name].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
    r = trace_nonfinite(model, loss(True))
    print(f"demo GroundingDINO, batch of {len(captions)}, {args.device}, threads={torch.get_num_threads()}, "
          f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"healthy batch: {r.module_calls} module calls, {r.ops_seen} ops replayed op by op in {list(r.replayed)}; "
          f"full trace: {r.full_trace_reason or 'not needed'}")
    for label, key in (("NaN batch", "nan"), ("NaN in the backward", "bw")):
        quick, full = cases[f"trace_{key}"](), cases[f"op_level_{key}"]()
        same = [_key(o) for o in quick.origins] == [_key(o) for o in full.origins]
        print(f"{label}: full trace: {quick.full_trace_reason or 'not needed'}; {quick.ops_seen} ops op by op "
              f"(op-level: {full.ops_seen}), replayed {list(quick.replayed)}, backward replayed "
              f"{list(getattr(quick, 'replayed_backward', ()))}; same origins as the op-level trace: {same}")
        for o in quick.origins:
            print(f"    {o.phase} {o.kind} {o.op} in {o.module} ({o.grad_fn or ''}) at {o.frame}")
    syncs = {k: count_syncs(f) for k, f in cases.items()} if dev.type == "cuda" else {}

    def row(label: str, key: str, base: str) -> None:
        extra = f"   {syncs[key]} host syncs" if syncs else ""
        ratio = (f"   ratio {med[key] / med[base]:.2f}x wall, {cpu[key] / cpu[base]:.2f}x CPU" if key != base
                 else f"   ({cpu[key] * 1e3:.1f} ms CPU)")
        print(f"{label:38s}{med[key] * 1e3:8.1f} ms{ratio}{extra}")

    for prefix, suffix in (("", ""), ("NaN batch: ", "_nan"), ("NaN in the backward: ", "_bw")):
        row(f"{prefix}plain forward+loss+backward", f"plain{suffix}", f"plain{suffix}")
        row(f"{prefix}trace_nonfinite (two phases)", f"trace{suffix}", f"plain{suffix}")
        row(f"{prefix}op-level trace of the step", f"op_level{suffix}", f"plain{suffix}")
        row(f"{prefix}detect_anomaly(check_nan)", f"anomaly{suffix}", f"plain{suffix}")


def _key(o: object) -> tuple[object, ...]:
    return tuple(getattr(o, f) for f in ("phase", "op", "module", "kind", "nan_count", "inf_count", "shape",
                                         "first_indices", "source", "grad_fn", "frame"))


if __name__ == "__main__":
    main()
