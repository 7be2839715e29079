"""Where `nanscope inspect`'s peak memory goes: the resident-memory high-water mark of each of its stages.

Linux only. One process per case (this script starts them): the bare build + load + forward of
`inspect_overhead.py`, and `nanscope.replay.diagnose.inspect` with a progress listener that reads
`/proc/self/status` (VmHWM, VmRSS, RssAnon, RssFile) when each stage starts and ends and then resets
the high-water mark (`echo 5 > /proc/self/clear_refs`), so each line is the peak inside that stage.
`tracemalloc` does not see torch's allocator; this does.

    python benchmarks/inspect_phases.py [--size 224] [--ignore NS303,NS311] [--against /work/main]

Full-size SwinT-OGC (random weights, the tiny local BERT), a batch of 2 images of --size pixels.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys, warnings
warnings.filterwarnings("ignore")
case, ckpt, batch, te, ignore = sys.argv[1:6]

def mark(what):
    m = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            m[k] = int(v.split()[0]) // 1024
    print(f"  {what:40s} peak {m['VmHWM']:6d}  now {m['VmRSS']:6d}  (anon {m['RssAnon']:6d}, file {m['RssFile']:5d}) MiB",
          file=sys.__stderr__, flush=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

mark("interpreter")
import torch
import nanscope
print(f"  (nanscope imported from {nanscope.__file__})", file=sys.__stderr__)
mark("import torch")
if case == "bare":
    from nanscope.stacks.groundingdino.stack import build_model
    model, _ = build_model(None, text_encoder=te); mark("build (imports groundingdino, transformers)")
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]; mark("torch.load")
    model.load_state_dict(sd); del sd; mark("load_state_dict, state dict freed")
    b = torch.load(batch, map_location="cpu", weights_only=True)
    with torch.no_grad():
        model(b["images"], captions=list(b["captions"]))
    mark("forward")
else:
    from nanscope import progress
    from nanscope.replay.diagnose import inspect
    mark("import nanscope.replay.diagnose")

    class Marks(progress.Listener):
        def started(self, doing, depth): mark("before " + doing)
        def ended(self, doing, done, seconds, depth, ok): mark(doing)

    with progress.listening(Marks()):
        result = inspect(ckpt, batch, text_encoder=te, ignore=[c for c in ignore.split(",") if c] or None)
    mark("after inspect returned")
    print("  findings: " + " ".join(sorted(f.code for f in result.findings)), file=sys.__stderr__)
"""


def run(case: str, root: Path, ckpt: Path, batch: Path, te: Path, ignore: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    print(f"{case} ({root}):", flush=True)
    subprocess.run([sys.executable, "-c", CHILD, case, str(ckpt), str(batch), str(te), ignore], env=env,
                   cwd=root, stdout=subprocess.DEVNULL, check=False)  # cwd: `-c` puts it first on sys.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="image size of the batch's 2 images (issue 28: 800)")
    ap.add_argument("--ignore", default="", help="finding codes inspect skips, e.g. NS303,NS311 (no statistics hooks)")
    ap.add_argument("--against", type=Path, metavar="DIR", help="also inspect importing another nanscope checkout")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from inspect_overhead import write_full_size  # this folder: the same checkpoint and batch

    from nanscope.stacks.tiny_text import write_tiny_text_encoder

    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        te = write_tiny_text_encoder(Path(tmp) / "text_encoder", seed=0)
        ckpt, bp = write_full_size(Path(tmp), te, args.size)
        run("bare", ROOT, ckpt, bp, te, "")
        run("inspect", ROOT, ckpt, bp, te, args.ignore)
        if args.against is not None:
            run("inspect", args.against, ckpt, bp, te, args.ignore)


if __name__ == "__main__":
    main()
