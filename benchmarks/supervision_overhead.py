"""Cost of the supervision probes (NS401-NS404) against one forward + loss + backward on the demo model.

The probe re-runs the criterion on detached leaf copies of the captured logits (one gradient per
classification term, one run with the positive maps zeroed); the model is not run again. Same process,
interleaved rounds, medians:

    python benchmarks/supervision_overhead.py [--rounds 5] [--threads 1]

Target: gradient coverage <= 1.5x a forward + loss + backward (issue 14).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from nanscope.criterion import SetCriterion  # noqa: E402
from nanscope.replay.session import prepare  # noqa: E402
from nanscope.replay.supervision import gradient_coverage, probe_supervision  # noqa: E402
from nanscope.stacks.groundingdino.demo import demo_batch, write_demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        files = write_demo(tmp, long=False)
        torch.save(demo_batch(3, long=False), f"{tmp}/healthy.pt")
        replay = prepare(files.checkpoint, f"{tmp}/healthy.pt", config=files.config, hash_checkpoint=False)
    crit = SetCriterion("mmdet")
    targets = replay.targets()
    outputs = replay.forward(detach=True).to_outputs()

    def step() -> None:  # what one training step of the replayed batch costs
        replay.model.zero_grad(set_to_none=True)
        out = replay.forward(detach=False, grad=True).to_outputs()
        crit.total(crit(out, targets)).backward()

    cases = {
        "forward+loss+backward": step,
        "gradient coverage": lambda: gradient_coverage(crit, outputs, targets, weight_dict=crit.weight_dict),
        "all probes": lambda: probe_supervision(crit, "SetCriterion", outputs, targets, replay.texts,
                                                weight_dict=crit.weight_dict, matcher=crit.matcher),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for f in cases.values():  # warm-up
        f()
    for _ in range(args.rounds):
        for name, f in cases.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["forward+loss+backward"]
    print(f"demo GroundingDINO, batch of {len(replay.batch)}, cpu, threads={torch.get_num_threads()}, {args.rounds} rounds")
    for name, t in med.items():
        print(f"{name:<24} {t * 1e3:9.1f} ms   ratio {t / base:.2f}x")


if __name__ == "__main__":
    main()
