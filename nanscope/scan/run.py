"""`scan(DATA, ...)`: every sample of a dataset checked for the data bugs that break a GroundingDINO loss.

Library code: it never prints. Progress goes to an optional `progress(done, total)` callback and to
`nanscope.progress` (stages and the sample count: the CLI's bar with samples/s and ETA); each chunk
(raw items and their results, in dataset order) to an optional `on_chunk` callback, which is how
`--write-clean` streams its copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from nanscope import progress
from nanscope.result import Result
from nanscope.scan.aggregate import Aggregate
from nanscope.scan.captions import CaptionRules, label_costs
from nanscope.scan.dataset import Dataset, iter_chunks, open_dataset
from nanscope.scan.engine import ChunkOut, State, run_chunks
from nanscope.scan.sample import OD, Sample


@dataclass
class ScanRun:
    """The result, and the samples asked for with `keep` (their Sample and Prompt, for --batch-out)."""

    result: Result
    dataset: Dataset
    state: State
    kept: list[tuple[Sample, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # --engine ray: (unit, why) of units not scanned
    parts: list[tuple[str, str, int]] = field(default_factory=list)  # --engine ray --write-clean: (unit, file, changes)


DEFAULT_STACK = "groundingdino-py"


def load_tokenizer(*, config: str | os.PathLike[str] | None = None, text_encoder: str | None = None,
                   stack: str | None = None) -> tuple[Any, int]:
    """`(Rust tokenizer, max_text_len)` from the files the stack would read (`nanscope.scan.tokenizer`), without
    importing torch or the model code; the stack's own loader when those files are not there."""
    from nanscope.scan.tokenizer import load

    tok = load(config=config, text_encoder=text_encoder, stack=stack)
    return tok.backend, tok.max_text_len


def environment() -> dict[str, Any]:
    """`nanscope.result.environment("cpu")`'s keys and values, read from the installed packages' metadata (a scan
    imports no torch)."""
    import importlib.metadata as md
    import importlib.util
    import platform
    import re

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cuda, torch_version = None, version("torch")
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin is not None:
        try:
            text = open(os.path.join(os.path.dirname(spec.origin), "version.py"), encoding="utf-8").read()
            m = re.search(r"^cuda(?::[^=]*)?=\s*'([^']*)'", text, re.M)
            cuda = m.group(1) if m else None
            m = re.search(r"^__version__\s*(?::[^=]*)?=\s*'([^']*)'", text, re.M)
            torch_version = m.group(1) if m else torch_version
        except OSError:
            pass
    from nanscope.stacks.groundingdino.provider import environment_fields  # metadata only, no import

    return {"nanscope": version("nanscope"), "torch": torch_version, "torchvision": version("torchvision"),
            **environment_fields(), "transformers": version("transformers"),
            "python": platform.python_version(), "cuda": cuda, "device": "cpu"}


def parse_shard(value: str | tuple[int, int] | None) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    from nanscope.errors import InputError

    if value is None:
        return (0, 1)
    if isinstance(value, tuple):
        i, n = value
    else:
        try:
            a, b = str(value).split("/")
            i, n = int(a), int(b)
        except ValueError:
            raise InputError(f"--shard {value!r} is not I/N; expected e.g. 0/4 (shard 0 of 4)") from None
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"--shard {i}/{n} is out of range; expected 0 <= I < N")
    return (i, n)


@dataclass
class Prepared:
    """A dataset opened and a tokenizer loaded: what every chunk of a scan needs."""

    dataset: Dataset
    state: State
    config: str | None
    text_encoder: str | None
    stack: str | None = None


def prepare_scan(
    data: str | os.PathLike[str],
    *,
    format: str | None = None,
    label_map: str | None = None,
    config: str | os.PathLike[str] | None = None,
    text_encoder: str | None = None,
    tokenizer: Any = None,
    max_text_len: int | None = None,
    rules: CaptionRules | None = None,
    images: str | os.PathLike[str] | None = None,
    keep: Iterable[Any] = (),
    stack: str | None = None,
) -> Prepared:
    from nanscope.errors import InputError

    rules = rules or CaptionRules()
    if images is not None and not os.path.isdir(images):
        raise InputError(f"--images {str(images)!r} is not a folder; expected the folder the image file names are relative to")
    from nanscope.scan import tokenizer as tk

    tokenizer_given = tokenizer
    with progress.stage(f"reading {os.path.basename(str(data))}") as st:  # before the tokenizer: data errors first
        ds = open_dataset(data, format=format, label_map=label_map)
        st.done = f"opened {os.path.basename(str(data))} ({ds.format}, {ds.mode})"
    if tokenizer is None:
        stack = stack or DEFAULT_STACK
        with progress.stage("loading the tokenizer", "loaded the tokenizer"):
            loaded = tk.load(config=config, text_encoder=text_encoder, stack=stack)
        backend, specials, te = loaded.backend, loaded.specials, loaded.name
        max_text_len = max_text_len or loaded.max_text_len
    else:
        backend, specials = tk.unpadded(tokenizer), tk.special_tokens(tokenizer)
        te = str(text_encoder) if text_encoder else getattr(tokenizer, "name_or_path", None)
    costs = label_costs(backend, ds.label_map, rules.trainer) if ds.mode == OD and ds.label_map else None
    state = State(backend, int(max_text_len or 256), rules, ds.format, ds.mode, ds.path, ds.label_map, costs,
                  str(images) if images is not None else None, frozenset(str(k) for k in keep),
                  specials | {".", "?"})
    return Prepared(ds, state, str(config) if config else None, te, stack if tokenizer_given is None else None)


def scan(
    data: str | os.PathLike[str],
    *,
    prepared: Prepared | None = None,
    workers: int | None = 1,
    shard: str | tuple[int, int] | None = None,
    on_chunk: Callable[[list[Any], ChunkOut], None] | None = None,
    engine: str = "local",
    address: str | None = None,
    unit_bytes: int | None = None,
    clean_dir: str | os.PathLike[str] | None = None,
    **options: Any,
) -> ScanRun:
    """Scan `data` (COCO JSON, ODVG JSONL, grounding JSON, GRIT-style webdataset tars or parquet files).
    `options` are `prepare_scan`'s: format, label_map, config, text_encoder (or tokenizer + max_text_len), rules,
    images, keep (sample ids whose prepared samples come back in `ScanRun.kept`), progress (a
    `progress(done, total)` callback after each chunk or unit). `engine="ray"` scans the units of
    `nanscope.scan.units` with Ray actors (`workers` of them, default the cluster's CPUs; `address`: an existing
    cluster; `clean_dir`: per-unit cleaned copies), and lists the units that could not be scanned in
    `ScanRun.failed` and the summary. Never prints; the stages and the count also go to `nanscope.progress`'s
    listener, when one is installed (the CLI's bar)."""
    from nanscope.errors import InputError

    if engine not in ("local", "ray"):
        raise InputError(f"--engine {engine!r} is not known; expected local or ray")
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers} must be at least 1")
    if engine == "ray" and shard is not None:
        raise InputError("--shard splits a scan by hand; --engine ray splits it into units itself: use one of them")
    shard_t = parse_shard(shard)
    on_progress = options.pop("progress", None)
    prep = prepared or prepare_scan(data, **options)
    ds, state = prep.dataset, prep.state
    agg = Aggregate()
    kept: list[tuple[Sample, Any]] = []
    failed: list[tuple[str, str]] = []
    parts: list[tuple[str, str, int]] = []
    i, n = shard_t
    total = None if ds.total is None else (ds.total - i + n - 1) // n
    def report(done: int, total: int | None) -> None:
        progress.advance(done, total, "samples")  # the CLI's bar (samples/s, ETA); nothing without a listener
        if on_progress is not None:
            on_progress(done, total)

    with progress.stage(f"scanning {os.path.basename(ds.path)}") as st:
        if engine == "ray":
            from nanscope.scan.clean import check_cleanable
            from nanscope.scan.ray_engine import run_ray

            if clean_dir is not None:
                check_cleanable(ds)
            from nanscope.scan.units import UNIT_BYTES

            outcome = run_ray(ds, state, workers=workers, address=address, unit_bytes=unit_bytes or UNIT_BYTES,
                              clean_dir=str(clean_dir) if clean_dir is not None else None, progress=report)
            agg, kept, failed, parts = outcome.aggregate, outcome.kept, outcome.failed, outcome.parts
        else:
            for items, out in run_chunks(state, iter_chunks(ds, shard_t), workers=workers or 1, progress=report,
                                         total=total):
                agg.add(out)
                kept.extend(out.kept)
                if on_chunk is not None:
                    on_chunk(items, out)
        st.done = f"scanned {agg.stats.samples} samples"
    summary = {"format": ds.format, "mode": ds.mode, "max_text_len": state.max_text_len,
               "rules": state.rules.to_dict(), "orphan_annotations": ds.orphans}
    if ds.label_map is not None:
        summary["labels"] = len(ds.label_map)
    if failed:
        summary["units_not_scanned"] = [{"unit": u, "why": why} for u, why in failed]
    inputs = {"data": ds.path, "format": ds.format, "label_map": ds.label_map_path, "config": prep.config,
              "text_encoder": prep.text_encoder, "stack": prep.stack, "images": state.images, "shard": f"{i}/{n}"}
    result = agg.result(summary=summary, inputs=inputs, environment=environment())
    return ScanRun(result, ds, state, kept, failed, parts)
