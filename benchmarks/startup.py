"""Footprint and start-up of nanscope: the core install vs the one that also installs groundingdino-py.

    python benchmarks/startup.py [--runs 7]

Footprint: the dependency closure of pyproject.toml's `dependencies` (the core install), and of the core plus
the `groundingdino` extra (groundingdino-py 0.4.0: what every `pip install nanscope` installed before), resolved
from the metadata of the distributions installed here (requirement markers evaluated, extras followed), with
their installed size (the RECORD's files on disk). Printed with and without torch's own part (torch,
torchvision, triton, nvidia-*), which both share and which dwarfs the rest.

Start-up: the median wall time of fresh processes, in interleaved rounds (`python -c pass` is printed, not subtracted):
`nanscope --help`, `import nanscope`, `from nanscope import inspect` (the first call that needs torch) and
`import torch`, measured side by side, and whether `--help` imported torch at all.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
TORCH_PART = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """Installed distributions the requirements pull in, transitively (name -> distribution)."""
    seen: dict[str, md.Distribution] = {}
    todo = [(Requirement(r), frozenset()) for r in requirements]
    while todo:
        req, _ = todo.pop()
        name = _norm(req.name)
        if name in seen:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            print(f"  (not installed here: {req.name}; left out)", file=sys.stderr)
            continue
        seen[name] = dist
        for spec in dist.requires or ():
            sub = Requirement(spec)
            ok = sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ({""} | set(req.extras)))
            if ok:
                todo.append((sub, frozenset(sub.extras)))
    return seen


def installed_bytes(dist: md.Distribution) -> int:
    total = 0
    for f in dist.files or ():
        try:
            total += Path(dist.locate_file(f)).stat().st_size
        except OSError:
            pass
    return total


def footprint() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = list(project["dependencies"])
    extra = list(project["optional-dependencies"]["groundingdino"])
    rows = {"core install (`pip install nanscope`)": closure(core),
            "before: core + groundingdino-py (`nanscope[groundingdino]`)": closure(core + extra)}
    print("footprint (distributions installed here; sizes of their files on disk)")
    print(f"  {'':62s} {'packages':>8s} {'MB':>9s} | {'w/o torch part':>14s} {'MB':>8s}")
    for label, dists in rows.items():
        rest = {n: d for n, d in dists.items() if not TORCH_PART.match(n)}
        mb = sum(installed_bytes(d) for d in dists.values()) / 1e6
        rest_mb = sum(installed_bytes(d) for d in rest.values()) / 1e6
        print(f"  {label:62s} {len(dists):8d} {mb:9.1f} | {len(rest):14d} {rest_mb:8.1f}")
    only = sorted(set(rows[list(rows)[1]]) - set(rows[list(rows)[0]]))
    print(f"  what groundingdino-py adds: {', '.join(only)}")


def wall(code: list[str]) -> float:
    """Seconds one fresh process takes to run `python CODE...`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t = time.perf_counter()
    subprocess.run([sys.executable, *code], env=env, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t


def startup(runs: int) -> None:
    probe = ("import sys; from nanscope.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'transformers', 'groundingdino', 'matplotlib') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    heavy = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    cases = {
        "python -c pass": ["-c", "pass"],
        "nanscope --help": ["-m", "nanscope", "--help"],
        "import nanscope": ["-c", "import nanscope"],
        "import torch": ["-c", "import torch"],
        "import torch, torchvision.ops": ["-c", "import torch, torchvision.ops"],  # nanscope's criteria need it
        "from nanscope import inspect": ["-c", "from nanscope import inspect"],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):  # interleaved rounds: every case sees the same load
        for name, code in cases.items():
            times[name].append(wall(code))
    got = {name: statistics.median(t) for name, t in times.items()}
    print(f"start-up (median of {runs} interleaved rounds of fresh processes, {sys.executable})")
    for name, seconds in got.items():
        print(f"  {name:30s} {seconds:6.3f} s   {seconds / got['import torch']:5.2f}x import torch")
    print(f"  heavy modules the --help parser imported: {heavy.stdout.strip()}")
    print(f"  targets: --help <= 0.5 s: {got['nanscope --help'] <= 0.5}; import nanscope <= 1.1x import torch: "
          f"{got['import nanscope'] <= 1.1 * got['import torch']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    footprint()
    startup(args.runs)


if __name__ == "__main__":
    main()
