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
from nanscope.result import Result, environment
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


DEFAULT_STACK = "groundingdino-py"


def load_tokenizer(*, config: str | os.PathLike[str] | None = None, text_encoder: str | None = None,
                   stack: str | None = None) -> tuple[Any, int]:
    """`(fast tokenizer, max_text_len)` from the stack's seam (`Stack.load_tokenizer`), without building a model."""
    from nanscope.stacks import get_stack

    return get_stack(stack or DEFAULT_STACK).load_tokenizer(config=config, text_encoder=text_encoder)


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
    tokenizer_given = tokenizer
    with progress.stage(f"reading {os.path.basename(str(data))}") as st:  # before the tokenizer: data errors first
        ds = open_dataset(data, format=format, label_map=label_map)
        st.done = f"opened {os.path.basename(str(data))} ({ds.format}, {ds.mode})"
    if tokenizer is None:
        stack = stack or DEFAULT_STACK
        with progress.stage("loading the tokenizer", "loaded the tokenizer"):
            tokenizer, mtl = load_tokenizer(config=config, text_encoder=text_encoder, stack=stack)
        max_text_len = max_text_len or mtl
    costs = label_costs(tokenizer, ds.label_map, rules.trainer) if ds.mode == OD and ds.label_map else None
    state = State(tokenizer, int(max_text_len or 256), rules, ds.format, ds.mode, ds.path, ds.label_map, costs,
                  str(images) if images is not None else None, frozenset(str(k) for k in keep),
                  frozenset(getattr(tokenizer, "all_special_tokens", [])) | {".", "?"})
    te = str(text_encoder) if text_encoder else getattr(tokenizer, "name_or_path", None)
    return Prepared(ds, state, str(config) if config else None, te, stack if tokenizer_given is None else None)


def scan(
    data: str | os.PathLike[str],
    *,
    prepared: Prepared | None = None,
    workers: int = 1,
    shard: str | tuple[int, int] | None = None,
    on_chunk: Callable[[list[Any], ChunkOut], None] | None = None,
    **options: Any,
) -> ScanRun:
    """Scan `data` (COCO JSON, ODVG JSONL or grounding JSON). `options` are `prepare_scan`'s: format,
    label_map, config, text_encoder (or tokenizer + max_text_len), rules, images, keep (sample ids whose
    prepared samples come back in `ScanRun.kept`), progress (a `progress(done, total)` callback after each
    chunk). Never prints; the stages and the count also go to `nanscope.progress`'s listener, when one is
    installed (the CLI's bar)."""
    from nanscope.errors import InputError

    if workers < 1:
        raise InputError(f"--workers {workers} must be at least 1")
    shard_t = parse_shard(shard)
    on_progress = options.pop("progress", None)
    prep = prepared or prepare_scan(data, **options)
    ds, state = prep.dataset, prep.state
    agg = Aggregate()
    kept: list[tuple[Sample, Any]] = []
    i, n = shard_t
    total = None if ds.total is None else (ds.total - i + n - 1) // n
    def report(done: int, total: int | None) -> None:
        progress.advance(done, total, "samples")  # the CLI's bar (samples/s, ETA); nothing without a listener
        if on_progress is not None:
            on_progress(done, total)

    with progress.stage(f"scanning {os.path.basename(ds.path)}") as st:
        for items, out in run_chunks(state, iter_chunks(ds, shard_t), workers=workers, progress=report, total=total):
            agg.add(out)
            kept.extend(out.kept)
            if on_chunk is not None:
                on_chunk(items, out)
        st.done = f"scanned {agg.stats.samples} samples"
    summary = {"format": ds.format, "mode": ds.mode, "max_text_len": state.max_text_len,
               "rules": state.rules.to_dict(), "orphan_annotations": ds.orphans}
    if ds.label_map is not None:
        summary["labels"] = len(ds.label_map)
    inputs = {"data": ds.path, "format": ds.format, "label_map": ds.label_map_path, "config": prep.config,
              "text_encoder": prep.text_encoder, "stack": prep.stack, "images": state.images, "shard": f"{i}/{n}"}
    result = agg.result(summary=summary, inputs=inputs, environment=environment("cpu"))
    return ScanRun(result, ds, state, kept)
