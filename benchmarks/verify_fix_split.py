"""Where `nanscope verify-fix` spends its time on the demo, and what flushing denormals does to check 8.

One process, run once (the phases are seconds long):

    python benchmarks/verify_fix_split.py [--steps 5] [--threads 0]

Prints: build+load (`prepare`), the whole `verify_replay` (ten checks, training steps flushed as
verify-fix runs them), then check 8's training steps alone with and without denormal flushing, per
step, and the floor the issue names: build + replay + 2 backward passes + N steps at their
undenormalised (flushed) speed. Target: verify-fix <= 1.2x that floor (issue 28).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from nanscope.criterion.set_criterion import NaiveCriterion, SetCriterion  # noqa: E402
from nanscope.replay.session import prepare  # noqa: E402
from nanscope.stacks.groundingdino.demo import write_demo  # noqa: E402
from nanscope.verify.pipeline import run_criterion, train_steps, verify_replay  # noqa: E402


def _timed(fn):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        files = write_demo(tmp)
        replay, t_prepare = _timed(lambda: prepare(files.checkpoint, files.batch, config=files.config,
                                                   hash_checkpoint=False))
        result, t_verify = _timed(lambda: verify_replay(replay, steps=args.steps))
    preset = replay.stack.default_preset
    targets, extras = replay.targets(), replay.criterion_extras()
    record, t_replay = _timed(lambda: replay.forward(detach=False, grad=True))
    outputs = record.to_outputs()
    runs = [_timed(lambda c=c: run_criterion(replay.model, c, "x", outputs, targets, extras))
            for c in (NaiveCriterion(preset), SetCriterion(preset))]
    del record, outputs
    after = SetCriterion(preset)
    steps_flushed, t_flushed = _timed(lambda: train_steps(replay, after, "after", args.steps, extras=extras))
    steps_plain, t_plain = _timed(lambda: train_steps(replay, after, "after", args.steps, extras=extras,
                                                      flush=False))
    floor = t_prepare + t_replay + sum(t for _, t in runs) + t_flushed
    passed = sum(c.passed for c in result.checks)
    print(f"verify-fix on the demo ({args.steps} steps, {torch.get_num_threads()} threads, {passed}/10 checks pass)")
    print(f"  build + load (prepare)          {t_prepare:8.2f} s")
    print(f"  verify_replay (ten checks)      {t_verify:8.2f} s")
    print(f"    replay forward with grad      {t_replay:8.2f} s")
    print(f"    backward before / after       {runs[0][1]:8.2f} / {runs[1][1]:.2f} s")
    print(f"    check 8 steps, flushed        {t_flushed:8.2f} s ({t_flushed / args.steps:.2f} s/step)")
    print(f"    check 8 steps, not flushed    {t_plain:8.2f} s ({t_plain / args.steps:.2f} s/step)")
    print(f"    everything else               {t_verify - t_replay - runs[0][1] - runs[1][1] - t_flushed:8.2f} s")
    print(f"  losses flushed  {[round(x, 6) for x in steps_flushed[0]]}")
    print(f"  losses plain    {[round(x, 6) for x in steps_plain[0]]}")
    total = t_prepare + t_verify
    print(f"  verify-fix {total:.2f} s vs floor {floor:.2f} s (build + replay + 2 backward + {args.steps} flushed "
          f"steps): {total / floor:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
