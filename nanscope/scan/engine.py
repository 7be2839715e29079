"""The scan loop: the chunks of `nanscope.scan.dataset`, captioned, tokenized in one batched call each,
every sample checked, and the per-chunk results handed back in dataset order.

Chunks run in this process (`workers=1`, the tokenizer encoding the next chunk on a helper thread) or in
`workers` spawned processes, at most two chunks per worker in flight, so memory stays flat however large
the dataset.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

from nanscope.replay.positive_map import BoxTokens, box_tokens, encode
from nanscope.scan import checks, chunk_boxes, chunk_prompts, coco, grit, odvg
from nanscope.scan.captions import CaptionRules, LabelCosts, Prompt, prompts as make_prompts
from nanscope.scan.sample import OD, Sample

SMALL_CHUNK = 64  # chunks under this many samples take the per-box Python path (when numpy is not loaded yet)
TOKEN_BIN = 8  # caption-length histogram: bins of 8 tokens up to 1024, then one overflow bin
TOKEN_BINS = 1024 // TOKEN_BIN + 1
BOX_COUNT_BINS = 102  # boxes per image 0..100, then one bin for more
SIZE_BINS = chunk_boxes.SIZE_BINS


@dataclass
class State:
    """Everything a worker needs, pickled once per worker."""

    tokenizer: Any
    max_text_len: int
    rules: CaptionRules
    format: str
    mode: str
    source: str
    label_map: Mapping[str, str] | None
    costs: LabelCosts | None
    images: str | None
    keep: frozenset[str] = frozenset()
    separators: frozenset[str] = frozenset()  # special tokens and '.': losing only these to truncation is harmless


@dataclass
class SampleHits:
    index: int
    id: Any
    file: str
    line: int | None
    annotations: list[Any]
    hits: list[checks.Hit]


@dataclass
class Stats:
    """Counts that add up over chunks and shards (fixed histogram bins)."""

    samples: int = 0
    boxes: int = 0
    flagged: int = 0  # samples with at least one hit
    tokens_sum: int = 0
    tokens_min: int | None = None
    tokens_max: int = 0
    over: int = 0  # captions that lose more than separators and [SEP] to max_text_len
    token_hist: list[int] = field(default_factory=lambda: [0] * TOKEN_BINS)
    box_count_hist: list[int] = field(default_factory=lambda: [0] * BOX_COUNT_BINS)
    size_hist: list[int] = field(default_factory=lambda: [0] * SIZE_BINS)

    def merge(self, o: "Stats") -> None:
        for k in ("samples", "boxes", "flagged", "tokens_sum", "over"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        if o.tokens_min is not None:
            self.tokens_min = o.tokens_min if self.tokens_min is None else min(self.tokens_min, o.tokens_min)
        self.tokens_max = max(self.tokens_max, o.tokens_max)
        for dst, src in ((self.token_hist, o.token_hist), (self.box_count_hist, o.box_count_hist),
                         (self.size_hist, o.size_hist)):
            for k, v in enumerate(src):
                dst[k] += v

    def add_chunk(self, n_tokens: list[int], over: int, n_boxes: list[int]) -> None:
        """A chunk's samples: tokens per caption, how many lose words to max_text_len, boxes per sample (the size
        histogram is added apart: `chunk_boxes.size_histogram` or `add_sizes`)."""
        if not n_tokens:
            return
        self.samples += len(n_tokens)
        self.boxes += sum(n_boxes)
        self.tokens_sum += sum(n_tokens)
        lo = min(n_tokens)
        self.tokens_min = lo if self.tokens_min is None else min(self.tokens_min, lo)
        self.tokens_max = max(self.tokens_max, max(n_tokens))
        self.over += over
        th, bh = self.token_hist, self.box_count_hist
        for n in n_tokens:
            th[min(n // TOKEN_BIN, TOKEN_BINS - 1)] += 1
        for n in n_boxes:
            bh[min(n, BOX_COUNT_BINS - 1)] += 1

    def add_sizes(self, boxes: list[tuple[float, float, float, float]]) -> None:
        for x1, y1, x2, y2 in boxes:
            b = _size_bin(x2 - x1, y2 - y1)
            if b is not None:
                self.size_hist[b] += 1


@dataclass
class ChunkOut:
    stats: Stats = field(default_factory=Stats)
    hits: list[SampleHits] = field(default_factory=list)
    kept: list[tuple[Sample, Prompt]] = field(default_factory=list)


def _size_bin(w: float, h: float) -> int | None:
    import math

    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        return None
    s = math.sqrt(w * h)
    return 0 if s < 1 else min(SIZE_BINS - 1, 1 + int(math.log2(s)))


def parse(state: State, index: int, line: int | None, payload: Any) -> Sample:
    if state.format == "odvg":
        return odvg.parse_line(payload, index, line or 0, state.source, od=state.mode == OD)
    if state.format in grit.FORMATS:
        return grit.parse_record(payload["record"], index, payload["source"], key=payload["key"],
                                 file=payload["file"], image=payload["image"])
    return coco.parse_item(payload, index, state.source, state.format)


def prepare(state: State, smp: Sample) -> Prompt:
    """One sample's prompt (the same as in a chunk: draws depend on the sample's index only)."""
    return prepare_all(state, [smp])[0]


MAX_CAPTION_FACTOR = 64  # a caption past 64 x max_text_len characters (a token is >= 1 character) is cut before
# tokenizing: the model reads max_text_len tokens, and the Rust tokenizer's memory grows with the whole caption


def prepare_all(state: State, samples: list[Sample]) -> list[Prompt]:
    return [_bounded(p, MAX_CAPTION_FACTOR * state.max_text_len) for p in _prompts(state, samples)]


def _bounded(pr: Prompt, limit: int) -> Prompt:
    if len(pr.caption) <= limit:
        return pr
    pr.clipped_from, pr.caption, pr.found_once = len(pr.caption), pr.caption[:limit], None
    return pr


FAST_PROMPTS = True  # Open-GroundingDino's detection prompts chunk-wide (tests compare with it off)


def _prompts(state: State, samples: list[Sample]) -> list[Prompt]:
    if (FAST_PROMPTS and state.mode == OD and samples and samples[0].mode == OD and state.label_map is not None
            and chunk_prompts.supported(state.rules, state.costs)):
        return chunk_prompts.od_prompts(samples, state.rules, state.label_map, state.costs)  # type: ignore[arg-type]
    return make_prompts(samples, state.rules, state.label_map, state.costs, state.max_text_len,
                        grounding_json=state.format in ("grounding", *grit.FORMATS))


def box_groups(state: State, smp: Sample, pr: Prompt, enc: Any, *, skip_clean: bool = False
               ) -> list[tuple[Any, list[int]]]:
    """(BoxTokens, boxes) per distinct phrase (or spans) and intended place, with nanscope's positive-map code:
    the tokens are computed once per distinct text, not once per box. Boxes the trainer drops are left out.
    `skip_clean` (caption.find prompts whose tokens all fit max_text_len): leave out the groups `_clean_phrase`
    proves hit-free too (`checks.text_hits` finds nothing for them); with `Prompt.found_once` (chunk_prompts proved
    the caption.find part for every phrase) only the tokens of each phrase's first and last character are asked."""
    if skip_clean and pr.found_once is not None and None not in list(map(enc.char_to_token, pr.found_once)):
        return []  # every phrase is found once, where it was put (chunk_prompts), on tokens: _clean_phrase holds
    groups: dict[Any, list[int]] = {}
    span_mode = pr.spans is not None
    if span_mode:
        ph = smp.phrases
        keys: Iterable[Any] = ((sp, it, ph[j] if j < len(ph) else None)
                               for j, (sp, it) in enumerate(zip(pr.spans, pr.intended)))  # type: ignore[arg-type]
    else:
        keys = zip(pr.phrases, pr.intended)  # type: ignore[arg-type]
    dropped = pr.dropped
    clean: set[Any] = set()
    if skip_clean and not span_mode:  # the distinct keys in C, each tested once
        distinct = dict.fromkeys(zip(pr.phrases, pr.intended))  # type: ignore[arg-type]
        clean = {k for k in distinct if _clean_phrase(pr.caption, enc, k[0], k[1])}
        if len(clean) == len(distinct):
            return []
        if not dropped:  # each remaining key's boxes by one comparison pass in C, in first-occurrence order
            pairs = list(zip(pr.phrases, pr.intended))  # type: ignore[arg-type]
            groups = {k: [j for j, p in enumerate(pairs) if p == k] for k in distinct if k not in clean}
            keys = ()
    for j, key in enumerate(keys):
        if (dropped and j in dropped) or key in clean:
            continue
        g = groups.get(key)
        if g is None:
            groups[key] = [j]
        else:
            g.append(j)
    T = state.max_text_len
    out = []
    for key, boxes in groups.items():
        text = key[0]
        bt = (box_tokens(enc, pr.caption, spans=[text], max_text_len=T) if span_mode
              else box_tokens(enc, pr.caption, phrases=[text], max_text_len=T))[0]
        out.append((BoxTokens(boxes[0], *bt[1:]), boxes))  # a namedtuple's _replace costs several times more
    return out


def _clean_phrase(caption: str, enc: Any, phrase: str, intended: tuple[int, int] | None) -> bool:
    """Whether `checks.text_hits` finds nothing for the boxes of `phrase` put at `intended`, when the caption's
    tokens all fit max_text_len: caption.find finds it there and only there (so inside no other name), and its
    first and last characters are on tokens (so its tokens are found and kept)."""
    if intended is None or not phrase:
        return False
    b = intended[0]
    e = b + len(phrase)
    return (b >= 0 and e == intended[1] and caption.find(phrase) == b and caption.find(phrase, b + 1) < 0
            and enc.char_to_token(b) is not None and enc.char_to_token(e - 1) is not None)


def sample_tokens(state: State, smp: Sample, pr: Prompt, enc: Any) -> list[Any]:
    """Each box's BoxTokens (None for boxes the trainer drops): what `inspect` builds for the same sample."""
    out: list[Any] = [None] * len(smp.boxes)
    for bt, boxes in box_groups(state, smp, pr, enc):
        for j in boxes:
            out[j] = bt._replace(box=j)
    return out


def read_chunk(state: State, items: list[tuple[int, int | None, Any]]) -> tuple[list[Sample], list[Prompt]]:
    """Parse and caption one chunk (Python); the tokenizer runs next, in one batched call."""
    samples = [parse(state, index, line, payload) for index, line, payload in items]
    return samples, prepare_all(state, samples)


def process_chunk(state: State, items: list[tuple[int, int | None, Any]]) -> ChunkOut:
    """Parse, caption, tokenize (one batched call) and check one chunk."""
    samples, prompts = read_chunk(state, items)
    return check_chunk(state, samples, prompts, encode(state.tokenizer, [p.caption for p in prompts]))


def check_chunk(state: State, samples: list[Sample], prompts: list[Prompt], encs: list[Any]) -> ChunkOut:
    """Positive-map tokens and every check of one tokenized chunk."""
    out = ChunkOut()
    T = state.max_text_len
    small = len(samples) < SMALL_CHUNK and "numpy" not in sys.modules  # a few samples: no numpy import for them
    if small:
        need_box = [True] * len(samples)
        counts = [len(s.boxes) for s in samples]
    else:
        boxes, owner, counts = chunk_boxes.box_array(samples)
        need_box = chunk_boxes.needs_box_checks(samples, boxes, owner, counts)
        for k, v in enumerate(chunk_boxes.size_histogram(boxes)):
            out.stats.size_hist[k] += v
    n_tokens = list(map(len, encs))  # no Python list of ids
    over = 0
    separators, images, keep, fast = state.separators, state.images, state.keep, FAST_TEXT
    for smp, pr, enc, nb, n_tok in zip(samples, prompts, encs, need_box, n_tokens):
        words_cut = n_tok > T and any(t not in separators for t in enc.tokens[T:])
        over += words_cut
        if fast and n_tok <= T and pr.phrases is not None:
            groups = box_groups(state, smp, pr, enc, skip_clean=True)
            hits = checks.box_hits(smp) if nb else []
            if groups or not _prompt_is_clean(pr, T):
                hits += checks.text_hits(smp, pr, groups, n_tok, T, words_cut=words_cut)
        else:
            groups = box_groups(state, smp, pr, enc)
            hits = (checks.box_hits(smp) if nb else []) + checks.text_hits(smp, pr, groups, n_tok, T,
                                                                              words_cut=words_cut)
        if smp.bad_text:
            hits += checks.unicode_hits(smp)
        if images is not None:
            hits += checks.image_hits(smp, images)[0]
        elif smp.image is not None:
            hits += checks.member_hits(smp)
        if hits:
            out.stats.flagged += 1
            out.hits.append(SampleHits(smp.index, smp.id, smp.file, smp.line, list(smp.annotations), hits))
        if keep and str(smp.id) in keep:
            out.kept.append((smp, pr))
    out.stats.add_chunk(n_tokens, over, counts)
    if small:
        for smp in samples:
            out.stats.add_sizes(smp.boxes)
    return out


FAST_TEXT = True  # the shortcuts of `box_groups(skip_clean=True)` and `_prompt_is_clean` (tests compare with it off)


def _prompt_is_clean(pr: Prompt, max_text_len: int) -> bool:
    """Whether `checks.text_hits` finds nothing but its groups' hits: no loader crash, no box dropped, no two ids
    of one name, no caption clipped before tokenizing, no possible overflow in another draw (the caller checks
    that the tokens fit max_text_len)."""
    return (pr.crash is None and not pr.dropped and not pr.same_name and pr.clipped_from is None
            and (pr.worst_tokens is None or pr.worst_tokens <= max_text_len))


PIPELINE = True  # encode on a helper thread (False: one thread; the benchmark measures both)


def _pipelined(state: State, chunks: Iterable[list[tuple[int, int | None, Any]]]
               ) -> Iterator[tuple[list[Any], ChunkOut]]:
    """In one process: the tokenizer encodes chunk k+1 on a helper thread (its batched call releases the GIL)
    while this thread checks chunk k and reads chunk k+2. Less wall time where a second core is free; on two
    hyper-threads of one core each thread runs slower, so the CPU time grows (benchmarks/RESULTS.md)."""
    if not PIPELINE:
        yield from ((items, process_chunk(state, items)) for items in chunks)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanscope-scan-encode") as ex:
        pending = None
        for items in chunks:
            samples, prompts = read_chunk(state, items)
            fut = ex.submit(encode, state.tokenizer, [p.caption for p in prompts])
            if pending is not None:
                items0, s0, p0, f0 = pending
                yield items0, check_chunk(state, s0, p0, f0.result())
            pending = (items, samples, prompts, fut)
        if pending is not None:
            items0, s0, p0, f0 = pending
            yield items0, check_chunk(state, s0, p0, f0.result())


@contextlib.contextmanager
def quiet_gc(threshold: int = 50_000) -> Iterator[None]:
    """The scan loop with the objects that exist before it frozen (`gc.freeze`) and the first generation's threshold
    raised: the collector no longer walks every live object each few hundred allocations (14% of the loop), yet
    still collects cycles, so memory stays flat. The thresholds and the frozen set are restored on exit."""
    import gc

    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(threshold, old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def _for_workers(state: State) -> State:
    """The state a worker gets: the Rust tokenizer alone (no transformers, no torch to import in the worker)."""
    import dataclasses

    backend = getattr(state.tokenizer, "backend_tokenizer", None)
    if backend is None:
        return state
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()
    return dataclasses.replace(state, tokenizer=copy)


_STATE: State | None = None  # a worker's state, set once by _init


def _init(state: State) -> None:
    global _STATE
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    _STATE = state


def _work(items: list[tuple[int, int | None, Any]]) -> ChunkOut:
    assert _STATE is not None
    with quiet_gc():
        return process_chunk(_STATE, items)


Progress = Callable[[int, "int | None"], None]


def run_chunks(state: State, chunks: Iterable[list[tuple[int, int | None, Any]]], *, workers: int = 1,
               progress: Progress | None = None, total: int | None = None
               ) -> Iterator[tuple[list[tuple[int, int | None, Any]], ChunkOut]]:
    """(chunk, its result) in dataset order; `progress(samples done, total)` after each chunk."""
    done = 0

    def finished(items: list[Any], res: ChunkOut) -> tuple[list[Any], ChunkOut]:
        nonlocal done
        done += res.stats.samples
        if progress:
            progress(done, total)
        return items, res

    if workers <= 1:
        with quiet_gc():
            yield from (finished(items, out) for items, out in _pipelined(state, chunks))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init,
                             initargs=(_for_workers(state),)) as pool:
        pending: deque[tuple[list[Any], Any]] = deque()
        try:
            for items in chunks:
                pending.append((items, pool.submit(_work, items)))
                while len(pending) >= 2 * workers or (pending and pending[0][1].done()):
                    items0, fut = pending.popleft()
                    yield finished(items0, fut.result())
            while pending:
                items0, fut = pending.popleft()
                yield finished(items0, fut.result())
        finally:
            for _, fut in pending:
                fut.cancel()
