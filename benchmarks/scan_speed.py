"""How fast is `nanscope scan` next to its floor, how much does it cost to start, is its memory flat, and how do
--workers and --engine ray compare?

    python benchmarks/scan_speed.py [--sizes 10000,100000] [--memory 10000,100000,1000000] [--scale 100000]
                                    [--workers 2] [--startup 5] [--repeat 2] [--grit 20000]

Generates a synthetic Objects365-like ODVG dataset (365 category names of 1-3 words, boxes per image drawn
around O365's mean of ~15, up to 100; Open-GroundingDino's max_labels=50, so captions hold 5-50 names
after negatives) and prints, side by side in one run:

- floor vs scan, per size in --sizes: the floor is parsing the same lines with orjson plus the same fast
  tokenizer's batched `encode_batch` (256 per call, single-threaded) on the scan's own captions (built
  beforehand, untimed); the scan is `nanscope.scan.scan` over the file, in this process
  (TOKENIZERS_PARALLELISM=false), end to end: as it runs by default (the tokenizer on a helper thread) and
  in one thread (`engine.PIPELINE = False`). Ratio = floor time / scan time (1.0: the scan costs nothing
  beyond parsing and tokenizing); wall and CPU seconds, interleaved, best of --repeat;
- start-up: whole processes on a 10-line file, medians of --startup runs: bare Python, Python + import
  `tokenizers` + load the tokenizer, and `nanscope scan` (the CLI) - the split says what the scan adds;
- memory: peak RSS of a scan subprocess at each --memory size (flat means the same peak);
- scale, at --scale samples: scan in one process, `--workers N`, and `--engine ray` with N actors on this
  machine (Ray's start-up included, as a user pays it);
- GRIT, with --grit N: CPU per sample of a scan of a GRIT-like parquet file (short alt-text captions, spans)
  next to the tokenizer alone on its captions, for the GRIT-20M estimate.

The tokenizer is nanscope's tiny local WordPiece (no download). The numbers go to benchmarks/RESULTS.md with
the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

W, H = 1024, 768


def names365(seed: int = 0) -> list[str]:
    from nanscope.stacks.tiny_text import WORDS

    rng = random.Random(seed)
    words = sorted(set(WORDS))
    out: list[str] = []
    while len(out) < 365:
        n = rng.choice([1, 1, 2, 2, 3])
        name = " ".join(rng.sample(words, n))
        if name not in out:
            out.append(name)
    return out


def write_dataset(path: Path, n: int, names: list[str], seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            n_box = min(100, max(1, int(rng.expovariate(1 / 15))))
            n_cat = max(1, min(n_box, int(rng.expovariate(1 / 5)) + 1))
            cats = rng.sample(range(len(names)), n_cat)
            inst = []
            for _ in range(n_box):
                x, y = rng.uniform(0, W - 20), rng.uniform(0, H - 20)
                w, h = rng.uniform(4, min(400, W - x)), rng.uniform(4, min(300, H - y))
                c = rng.choice(cats)
                inst.append({"bbox": [round(x, 2), round(y, 2), round(x + w, 2), round(y + h, 2)], "label": c,
                             "category": names[c]})
            f.write(json.dumps({"filename": f"{i:08d}.jpg", "height": H, "width": W,
                                "detection": {"instances": inst}}) + "\n")


def write_grit(path: Path, n: int, seed: int = 0) -> None:
    """A GRIT-like parquet file: alt-text captions of 8-20 words (~12-25 tokens), 1-3 noun chunks and one
    referring expression per caption as character spans with normalized boxes (Kosmos-2's columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanscope.stacks.tiny_text import WORDS

    rng = random.Random(seed)
    words = sorted(set(WORDS))
    rows = []
    for i in range(n):
        cap_words = [rng.choice(words) for _ in range(rng.randint(8, 20))]
        caption = " ".join(cap_words)
        starts = [0]
        for w in cap_words[:-1]:
            starts.append(starts[-1] + len(w) + 1)
        spans = []
        for _ in range(rng.randint(1, 3)):
            a = rng.randrange(len(cap_words))
            b = min(len(cap_words), a + rng.randint(1, 3))
            x, y = rng.uniform(0, 0.7), rng.uniform(0, 0.7)
            spans.append([starts[a], starts[b - 1] + len(cap_words[b - 1]), x, y, x + rng.uniform(0.05, 0.3),
                          y + rng.uniform(0.05, 0.3), rng.random()])
        rows.append({"key": f"{i:09d}", "caption": caption, "width": W, "height": H, "noun_chunks": spans,
                     "ref_exps": [[0, len(caption), 0.1, 0.1, 0.9, 0.9, 0.5]]})
    pq.write_table(pa.Table.from_pylist(rows), str(path))


def grit_speed(d: Path, te: Path, n: int) -> tuple[Clock, Clock]:
    """The scan of a GRIT-like parquet file in this process, and the tokenizer alone on its captions (256 per
    call): GRIT's captions are short, so the per-sample Python weighs more than on the O365-like file."""
    import pyarrow.parquet as pq

    from nanscope.scan.tokenizer import load

    path = d / "grit.parquet"
    write_grit(path, n)
    caps = pq.read_table(str(path), columns=["caption"]).column("caption").to_pylist()
    tok = load(text_encoder=str(te)).backend
    with Clock() as t:
        for k in range(0, len(caps), 256):
            tok.encode_batch(caps[k:k + 256])
    from nanscope.scan import scan

    with Clock() as s:
        scan(path, text_encoder=str(te))
    path.unlink()
    return t, s


def tokenizer_folder(d: Path) -> Path:
    from transformers import BertTokenizerFast

    from nanscope.stacks.tiny_text import build_vocab

    (d / "te").mkdir(exist_ok=True)
    (d / "te" / "vocab.txt").write_text("\n".join(build_vocab()) + "\n")
    BertTokenizerFast.from_pretrained(str(d / "te"), do_lower_case=True).save_pretrained(str(d / "te"))
    return d / "te"


class Clock:
    """Wall-clock and CPU seconds (this process's threads plus finished child processes)."""

    def __enter__(self) -> "Clock":
        self.w, self.c = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w, self._cpu() - self.c

    @staticmethod
    def _cpu() -> float:
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + ch.ru_utime + ch.ru_stime


def time_scan(data: Path, lm: Path, te: Path, workers: int = 1, **kw: object) -> Clock:
    from nanscope.scan import scan

    with Clock() as c:
        scan(data, label_map=str(lm), text_encoder=str(te), workers=workers, **kw)
    return c


def time_floor(data: Path, lm: Path, te: Path) -> Clock:
    """orjson on every line + one batched encode per 256 of the scan's captions; the captions are built between the
    timed parts (they are the scan's own work, not the floor's)."""
    import orjson

    from nanscope.scan.dataset import iter_chunks
    from nanscope.scan.engine import read_chunk
    from nanscope.scan.run import prepare_scan

    prep = prepare_scan(data, label_map=str(lm), text_encoder=str(te))
    tok = prep.state.tokenizer
    total = Clock()
    total.wall = total.cpu = 0.0
    for chunk in iter_chunks(prep.dataset, (0, 1)):
        caps = [p.caption for p in read_chunk(prep.state, chunk)[1]]
        with Clock() as c:
            for _, _, raw in chunk:
                orjson.loads(raw)
            tok.encode_batch(caps)
        total.wall += c.wall
        total.cpu += c.cpu
    return total


PEAK = """
import resource, sys
sys.path.insert(0, {root!r})
from nanscope.scan import scan
run = scan({data!r}, label_map={lm!r}, text_encoder={te!r}, workers=1)
print(run.result.summary["samples"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(data: Path, lm: Path, te: Path) -> tuple[int, float, float]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK.format(root=str(ROOT), data=str(data), lm=str(lm), te=str(te))],
                         check=True, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "true"})
    n, kb = out.stdout.split()
    return int(n), int(kb) / 1024, time.perf_counter() - t


def startup(d: Path, te: Path, runs: int) -> tuple[float, float, float, float]:
    """Medians (s) of: bare python, python + tokenizers + load, `nanscope scan` of 10 lines; and the scan's peak MiB."""
    import statistics

    ten = d / "ten.jsonl"
    line = {"filename": "a.jpg", "height": 10, "width": 10,
            "grounding": {"caption": "a cat", "regions": [{"bbox": [1, 1, 5, 5], "phrase": "a cat",
                                                            "tokens_positive": [[0, 5]]}]}}
    ten.write_text("".join(json.dumps(line) + "\n" for _ in range(10)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: compiled modules cached
    cmds = {"python": [sys.executable, "-c", "pass"],
            "tokenizer": [sys.executable, "-c", f"import tokenizers; tokenizers.Tokenizer.from_file({str(te / 'tokenizer.json')!r})"],
            "scan": [sys.executable, "-m", "nanscope", "scan", str(ten), "--text-encoder", str(te), "--quiet"]}
    times: dict[str, list[float]] = {k: [] for k in cmds}
    peak = 0.0
    for _ in range(runs + 1):  # the first round warms the caches and is dropped
        for k, cmd in cmds.items():
            t = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            times[k].append(time.perf_counter() - t)
            if k == "scan":
                peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    return med["python"], med["tokenizer"], med["scan"], peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000", help="dataset sizes for scan vs floor")
    ap.add_argument("--memory", default="10000,100000", help="dataset sizes for the peak-memory comparison")
    ap.add_argument("--scale", type=int, default=100000, help="samples for one process vs --workers vs ray (0: skip)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--startup", type=int, default=5, help="start-up runs (0: skip)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--grit", type=int, default=0, help="samples of a GRIT-like parquet file to scan (0: skip)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        names = names365()
        lm = d / "label_map.json"
        lm.write_text(json.dumps({str(i): n for i, n in enumerate(names)}))
        te = tokenizer_folder(d)
        print(f"synthetic O365-like ODVG, 365 names, max_labels 50; {os.cpu_count()} CPUs, load average "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        if args.startup:
            py, tok, sc, peak = startup(d, te, args.startup)
            print(f"start-up (medians of {args.startup}): python {py:.2f} s, + tokenizers and load {tok:.2f} s, "
                  f"`nanscope scan` of 10 lines {sc:.2f} s: {sc - tok:.2f} s over the tokenizer load, "
                  f"peak {peak:.0f} MiB")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # single-threaded, both sides
        for size in [int(x) for x in args.sizes.split(",") if x.strip()]:
            data = d / f"o365_{size}.jsonl"
            write_dataset(data, size, names)
            from nanscope.scan import engine

            fl, sc, one = [], [], []
            for _ in range(args.repeat):
                fl.append(time_floor(data, lm, te))
                sc.append(time_scan(data, lm, te))
                engine.PIPELINE = False
                one.append(time_scan(data, lm, te))
                engine.PIPELINE = True
            f = min(fl, key=lambda c: c.wall)
            fc = min(c.cpu for c in fl)
            for name, runs in (("scan", sc), ("scan, one thread", one)):
                s = min(runs, key=lambda c: c.wall)
                scpu = min(c.cpu for c in runs)
                print(f"  {size:>8} samples: floor {f.wall:7.2f} s wall {fc:7.2f} s CPU; {name} {s.wall:7.2f} s wall "
                      f"{scpu:7.2f} s CPU; at {f.wall / s.wall:.2f}x the floor's speed (wall), {fc / scpu:.2f}x (CPU); "
                      f"{size / s.wall:.0f} samples/s")
            data.unlink()
        for size in [int(x) for x in args.memory.split(",") if x.strip()]:
            f = d / f"mem{size}.jsonl"
            write_dataset(f, size, names, seed=1)
            n_done, mib, secs = peak_rss(f, lm, te)
            print(f"  peak RSS, {n_done:>8} samples: {mib:7.1f} MiB  ({f.stat().st_size / 2 ** 20:.0f} MiB file, "
                  f"{secs:.1f} s, {n_done / secs:.0f} samples/s incl. start-up)")
            f.unlink()
        if args.grit:
            t, sc = grit_speed(d, te, args.grit)
            print(f"  GRIT-like parquet, {args.grit} samples: tokenizer alone {t.cpu:.2f} s CPU, scan {sc.wall:.2f} s "
                  f"wall {sc.cpu:.2f} s CPU: {1e3 * sc.cpu / args.grit:.3f} ms CPU per sample "
                  f"({1e3 * t.cpu / args.grit:.3f} ms of it the tokenizer's)")
        if args.scale:
            data = d / "scale.jsonl"
            write_dataset(data, args.scale, names, seed=2)
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            one = time_scan(data, lm, te)
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            w = time_scan(data, lm, te, workers=args.workers)
            r = time_scan(data, lm, te, workers=args.workers, engine="ray", unit_bytes=8 << 20)
            print(f"  {args.scale} samples: one process {one.wall:.1f} s, --workers {args.workers} {w.wall:.1f} s, "
                  f"--engine ray with {args.workers} actors {r.wall:.1f} s (Ray start-up included): ray / workers "
                  f"{r.wall / w.wall:.2f}x; {args.scale / min(one.wall, w.wall, r.wall):.0f} samples/s at best")


if __name__ == "__main__":
    main()
