"""Cost of `--isolate` (the default): each user criterion / matcher call runs once more, first, in a forked child.

Runs `nanscope verify-fix` (in this process, through `nanscope.cli.main`) on the demo with a user
after-criterion (fixtures/criteria/trainers.py), with `--isolate` and `--no-isolate`, interleaved round by
round so that a shared machine's load falls on both; prints the median wall time of each, their ratio,
and how many user calls forked (counted by wrapping `os.fork`).

    python benchmarks/isolate_overhead.py [--rounds 3] [--steps 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
CRITERION = f"{ROOT / 'fixtures' / 'criteria' / 'trainers.py'}:build_token_criterion(num_classes=2, eos_coef=0.1)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    import torch

    from nanscope.cli import main as cli
    from nanscope.replay.batch import save_batch
    from nanscope.stacks.groundingdino.demo import demo_batch, write_demo

    tmp = Path(tempfile.mkdtemp(prefix="nanscope-isolate-"))
    demo = write_demo(tmp / "demo")
    batch = save_batch(tmp / "short.pt", demo_batch(0, long=False))
    forks = [0]
    real_fork = os.fork

    def counting_fork() -> int:
        forks[0] += 1
        return real_fork()

    os.fork = counting_fork  # type: ignore[assignment]
    times: dict[str, list[float]] = {"--isolate": [], "--no-isolate": []}
    calls: dict[str, int] = {}
    for r in range(a.rounds):
        for flag in (list(times) if r % 2 else list(times)[::-1]):  # alternate which goes first
            forks[0] = 0
            argv = ["verify-fix", str(demo.checkpoint), str(batch), "--config", str(demo.config), "--steps",
                    str(a.steps), "--after", CRITERION, "--quiet", flag]
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                code = cli(argv)
            times[flag].append(time.perf_counter() - t0)
            calls[flag] = forks[0]
            assert code in (0, 1), code
    os.fork = real_fork  # type: ignore[assignment]
    iso, bare = (statistics.median(times[f]) for f in ("--isolate", "--no-isolate"))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {a.rounds} rounds, "
          f"verify-fix --steps {a.steps} on the demo")
    print(f"--no-isolate  median {bare:.2f} s  {times['--no-isolate']}")
    print(f"--isolate     median {iso:.2f} s  {times['--isolate']}  ({calls['--isolate']} user calls forked)")
    print(f"ratio {iso / bare:.3f}x, {iso - bare:+.2f} s")


if __name__ == "__main__":
    main()
