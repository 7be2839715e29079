"""Whole-process cost of `nanscope inspect CKPT BATCH` against the bare minimum the job needs.

The bare minimum is a separate Python process that imports torch and groundingdino, builds the model,
loads the checkpoint and runs one forward without gradients, nothing else. `nanscope inspect` runs as
`python -m nanscope inspect ... --quiet`. Both are timed as whole processes (wall clock and the child's
CPU time and peak resident memory from `os.wait4`), interleaved round by round so that the load of a
shared machine falls on both; the ratios of the medians are printed. First, in one process, a forward with and without the per-module statistics
hooks behind NS303 (interleaved, medians).

    python benchmarks/inspect_overhead.py [--rounds 5] [--stats-rounds 5] [--threads 0] [--full] [--full-rounds 2]
        [--full-size 224] [--against /work/main] [--extra "--trace"]

--full adds the default SwinT-OGC config (random weights, the tiny local BERT; 30-45 s per inspect on
a 2-core CPU at 224 px), run --full-rounds times on a batch of 2 images of --full-size pixels (issue 28
measured 800: ~1 min and ~3 GB peak per process on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BARE = """
import sys, warnings
warnings.filterwarnings("ignore")
import torch
from nanscope.stacks.groundingdino.stack import build_model  # groundingdino's build_model on a config
ckpt, batch, config, te = sys.argv[1:5]
model, _ = build_model(None if config == "-" else config, text_encoder=te)
model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])
b = torch.load(batch, map_location="cpu", weights_only=True)
with torch.no_grad():
    model(b["images"], captions=list(b["captions"]))
"""


THREADS = "0"  # OMP_NUM_THREADS of both processes (--threads); "0": torch's default, as a user runs it


def _env(root: Path = ROOT) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    if THREADS != "0":
        env["OMP_NUM_THREADS"] = THREADS
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def timed(cmd: list[str], root: Path = ROOT) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one whole process, from its own rusage (`os.wait4`); `root`: the
    nanscope checkout it imports."""
    t = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        # cwd=root: `python -m` and `-c` put the working directory first on sys.path, before PYTHONPATH
        proc = subprocess.Popen(cmd, env=_env(root), cwd=root, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        if proc.returncode not in (0, 1):  # 1: inspect found something (the demo batch NaNs on purpose)
            err.seek(0)
            raise SystemExit(f"{shlex.join(cmd)} exited {proc.returncode}:\n{err.read()[-2000:].decode()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux: ru_maxrss in KiB


def compare(label: str, ckpt: Path, batch: Path, config: Path | None, te: Path, rounds: int, extra: list[str],
            against: Path | None = None) -> None:
    """Whole processes, interleaved round by round: the bare minimum, `nanscope inspect` of this checkout
    and, with `against`, the same command importing another checkout (e.g. main, for a before/after)."""
    bare = [sys.executable, "-c", BARE, str(ckpt), str(batch), str(config) if config else "-", str(te)]
    insp = [sys.executable, "-m", "nanscope", "inspect", str(ckpt), str(batch), "--text-encoder", str(te), "--quiet",
            *(["--config", str(config)] if config else []), *extra]
    runs = [("bare", bare, ROOT), ("inspect", insp, ROOT)]
    if against is not None:
        runs.append((f"inspect @{against}", insp, against))
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in runs}
    for _ in range(rounds):
        for name, cmd, root in runs:
            times[name].append(timed(cmd, root))
    wall, cpu, rss = ({k: statistics.median(r[i] for r in v) for k, v in times.items()} for i in range(3))
    print(f"{label}: {rounds} interleaved rounds, medians (all rounds: "
          + "; ".join(f"{k} " + " ".join(f"{w:.1f} s/{m:.0f} MiB" for w, _, m in v) for k, v in times.items()) + ")")
    print(f"  {'bare minimum':<24} wall {wall['bare']:6.2f} s   cpu {cpu['bare']:6.2f} s   "
          f"peak RSS {rss['bare']:7.0f} MiB")
    for name in list(times)[1:]:
        shown = "nanscope " + name
        print(f"  {shown:<24} wall {wall[name]:6.2f} s   cpu {cpu[name]:6.2f} s   "
              f"peak RSS {rss[name]:7.0f} MiB   ratio wall {wall[name] / wall['bare']:.2f}x  "
              f"cpu {cpu[name] / cpu['bare']:.2f}x  peak RSS {rss[name] / rss['bare']:.2f}x")


def write_full_size(folder: Path, text_encoder: Path, size: int) -> tuple[Path, Path]:
    """The default SwinT-OGC config with random weights (seed 0) saved as groundingdino saves it, and a batch
    of 2 images of `size` pixels: (checkpoint, batch) paths in `folder`."""
    import torch

    from nanscope.stacks.groundingdino.demo import demo_batch
    from nanscope.stacks.groundingdino.stack import build_model

    model, _ = build_model(None, text_encoder=text_encoder, seed=0)
    ckpt = folder / "swint_ogc_random.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    del model
    batch = demo_batch(0, long=False, image_size=size)
    batch["images"] = batch["images"][:2]
    bp = folder / "batch2.pt"
    torch.save(batch, bp)
    return ckpt, bp


def stats_pass(label: str, ckpt: Path, batch: Path, config: Path | None, te: Path, rounds: int) -> None:
    """In-process: one forward with and without the per-module statistics hooks (NS303), interleaved."""
    import torch

    from nanscope.replay.module_stats import module_stats
    from nanscope.replay.session import prepare

    replay = prepare(ckpt, batch, config=config, text_encoder=str(te), hash_checkpoint=False)
    times: dict[str, list[float]] = {"forward": [], "forward + module_stats": []}
    calls = 0
    replay.forward()  # warm-up
    for _ in range(rounds):
        for name, runs in times.items():
            t = time.perf_counter()
            with torch.no_grad(), contextlib.ExitStack() as stack:
                stats = stack.enter_context(module_stats(replay.model)) if name != "forward" else None
                replay.forward()
                if stats is not None:
                    calls = sum(s.calls for s in stats.result())
            runs.append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{label}, in process, threads={torch.get_num_threads()}, {rounds} interleaved rounds, medians:")
    print(f"  forward                  {med['forward'] * 1e3:8.1f} ms")
    print(f"  forward + module_stats   {med['forward + module_stats'] * 1e3:8.1f} ms   "
          f"ratio {med['forward + module_stats'] / med['forward']:.2f}x   ({calls} hook calls)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="whole-process rounds on the demo (0: skip)")
    ap.add_argument("--stats-rounds", type=int, default=5,
                    help="in-process rounds of forward vs forward + module_stats (0: skip)")
    ap.add_argument("--full", action="store_true", help="also the full-size SwinT-OGC config (slow on CPU)")
    ap.add_argument("--full-rounds", type=int, default=2)
    ap.add_argument("--full-size", type=int, default=224,
                    help="image size (pixels, square) of the --full batch's 2 images (issue 28: 800)")
    ap.add_argument("--threads", default="0", help="OMP_NUM_THREADS of both processes (default 0: torch's default)")
    ap.add_argument("--against", type=Path, metavar="DIR",
                    help="also run inspect importing another nanscope checkout (e.g. /work/main), interleaved")
    ap.add_argument("--extra", default="", help="more inspect options, e.g. '--trace' or '--amp fp16'")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    sys.path.insert(0, str(ROOT))
    from nanscope.stacks.groundingdino.demo import write_demo

    extra = shlex.split(args.extra)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"OMP_NUM_THREADS={THREADS}")
    with tempfile.TemporaryDirectory() as tmp:
        files = write_demo(Path(tmp) / "demo")
        if args.stats_rounds:
            stats_pass("demo", files.checkpoint, files.batch, files.config, files.text_encoder, args.stats_rounds)
        if args.rounds:
            compare("demo", files.checkpoint, files.batch, files.config, files.text_encoder, args.rounds, extra,
                    args.against)
        if args.full:
            ckpt, bp = write_full_size(Path(tmp), files.text_encoder, args.full_size)
            label = f"SwinT-OGC (full size, tiny BERT), 2 images at {args.full_size} px"
            if args.stats_rounds:
                stats_pass(label, ckpt, bp, None, files.text_encoder, max(1, args.stats_rounds // 2))
            compare(label, ckpt, bp, None, files.text_encoder, args.full_rounds, extra, args.against)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
