"""How fast is `nanscope scan`, next to the tokenizer alone and to a trainer's per-sample path? Is its memory flat?

    python benchmarks/scan_speed.py [--samples 20000] [--memory 10000,100000] [--workers 1,2] [--per-sample 2000]

Generates a synthetic Objects365-like ODVG dataset (365 category names of 1-3 words, boxes per image drawn
around O365's mean of ~15, up to 100; Open-GroundingDino's max_labels=50, so captions hold 5-50 names
after negatives) and prints, side by side in one run:

- scan: `nanscope.scan.scan` over the file, end to end (JSON parsing, captions, batched tokenization,
  positive maps, every check), in-process (the fast tokenizer's own threads) and with --workers;
- tokenizer alone: the same captions (built beforehand, not timed) through the fast tokenizer's batched
  `encode_batch` in chunks of 256: the limit the scan works against;
- per-sample: what a trainer's dataset class does per item (Open-GroundingDino's ODVGDataset +
  create_positive_map): json line -> caption with random negatives -> `tokenizer(caption)` -> one
  positive-map row per label found with `caption.find` -> a [labels, 256] tensor;
- memory: peak RSS of a scan subprocess at each --memory size (flat means the same peak).

The tokenizer is nanscope's tiny local WordPiece (no download). Times are wall-clock medians of
--repeat runs on whatever machine runs this; the numbers go to benchmarks/RESULTS.md with the machine.
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


def tokenizer_folder(d: Path) -> Path:
    from transformers import BertTokenizerFast

    from nanscope.stacks.tiny_text import build_vocab

    (d / "te").mkdir(exist_ok=True)
    (d / "te" / "vocab.txt").write_text("\n".join(build_vocab()) + "\n")
    BertTokenizerFast(vocab_file=str(d / "te" / "vocab.txt"), do_lower_case=True).save_pretrained(str(d / "te"))
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


def time_scan(data: Path, lm: Path, te: Path, workers: int) -> Clock:
    from nanscope.scan import scan

    with Clock() as c:
        scan(data, label_map=str(lm), text_encoder=str(te), workers=workers)
    return c


def captions_of(data: Path, lm: Path, te: Path) -> list[str]:
    """The scan's own captions (its seeded draw), built once and not timed."""
    from nanscope.scan.run import prepare_scan
    from nanscope.scan.dataset import iter_chunks
    from nanscope.scan.engine import parse, prepare

    prep = prepare_scan(data, label_map=str(lm), text_encoder=str(te))
    return [prepare(prep.state, parse(prep.state, i, ln, raw)).caption
            for chunk in iter_chunks(prep.dataset, (0, 1)) for i, ln, raw in chunk]


def time_tokenizer(captions: list[str], te: Path) -> Clock:
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(str(te)).backend_tokenizer
    with Clock() as c:
        for k in range(0, len(captions), 256):
            backend.encode_batch(captions[k:k + 256])
    return c


def time_per_sample(data: Path, lm: Path, te: Path, n: int) -> tuple[Clock, int]:
    """One item at a time, as Open-GroundingDino's ODVGDataset.__getitem__ + create_positive_map do."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(te))
    label_map = json.loads(lm.read_text())
    keys = list(label_map)
    rng = random.Random(0)
    lines = []
    with open(data, "rb") as f:
        for _ in range(n):
            lines.append(f.readline())
    with Clock() as c:
        _per_sample(lines, tok, label_map, keys, rng)
    return c, len(lines)


def _per_sample(lines: list[bytes], tok: object, label_map: dict[str, str], keys: list[str], rng: random.Random) -> None:
    import torch

    for raw in lines:
        meta = json.loads(raw)
        inst = meta["detection"]["instances"]
        pos = list({str(o["label"]) for o in inst})
        neg = [k for k in keys if k not in set(pos)]
        labels = pos + rng.sample(neg, max(0, min(len(neg), 50 - len(pos))))
        rng.shuffle(labels)
        names = [label_map[k] for k in labels]
        caption = " . ".join(names) + " ."
        enc = tok(caption, return_tensors="pt")
        pmap = torch.zeros(len(names), 256)
        for j, name in enumerate(names):
            b = caption.find(name)
            s, e = enc.char_to_token(b), enc.char_to_token(b + len(name) - 1)
            if s is not None and e is not None:
                pmap[j, s:min(e + 1, 256)] = 1
        torch.as_tensor([o["bbox"] for o in inst], dtype=torch.float32)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--memory", default="10000,100000", help="dataset sizes for the peak-memory comparison")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--per-sample", type=int, default=2000, help="items timed on the per-sample path")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        names = names365()
        lm = d / "label_map.json"
        lm.write_text(json.dumps({str(i): n for i, n in enumerate(names)}))
        te = tokenizer_folder(d)
        data = d / "o365.jsonl"
        write_dataset(data, args.samples, names)
        mb = data.stat().st_size / 2 ** 20
        print(f"synthetic O365-like ODVG: {args.samples} samples, {mb:.1f} MiB, 365 names, max_labels 50; "
              f"{os.cpu_count()} CPUs")
        caps = captions_of(data, lm, te)
        n = len(caps)

        def best(runs: list[Clock]) -> Clock:
            return min(runs, key=lambda c: c.wall)

        tok = best([time_tokenizer(caps, te) for _ in range(args.repeat)])
        words = sum(len(c.split()) for c in caps) / n
        print(f"{'':44s}{'samples/s':>10s} {'CPU ms/1k':>10s}   ratio to the tokenizer (wall, CPU)")
        print(f"  tokenizer alone (encode_batch, 256/call) {n / tok.wall:10.0f} {1e3 * tok.cpu / n * 1e3:10.1f}   "
              f"({words:.0f} words/caption)")
        rates = {}
        for w in [int(x) for x in args.workers.split(",")]:
            c = best([time_scan(data, lm, te, w) for _ in range(args.repeat)])
            rates[w] = n / c.wall
            print(f"  scan --workers {w}                         {n / c.wall:10.0f} {1e3 * c.cpu / n * 1e3:10.1f}   "
                  f"{tok.wall / c.wall:.2f}x, {tok.cpu / c.cpu:.2f}x")
        ps, k = time_per_sample(data, lm, te, min(args.per_sample, n))
        top = max(rates.values())
        print(f"  per-sample path (dataset __getitem__)    {k / ps.wall:10.0f} {1e3 * ps.cpu / k * 1e3:10.1f}   "
              f"scan is {top / (k / ps.wall):.1f}x faster (wall), {(ps.cpu / k) / (tok.cpu / n):.1f}x the tokenizer's CPU")
        print(f"  1M samples at the best scan rate: {1e6 / top / 60:.1f} min")
        for size in [int(x) for x in args.memory.split(",") if x.strip()]:
            f = d / f"mem{size}.jsonl"
            write_dataset(f, size, names, seed=1)
            n_done, mib, secs = peak_rss(f, lm, te)
            print(f"  peak RSS, {n_done:>8} samples: {mib:7.1f} MiB  ({f.stat().st_size / 2 ** 20:.0f} MiB file, "
                  f"{n_done / secs:.0f} samples/s incl. start-up)")
            f.unlink()


if __name__ == "__main__":
    main()
