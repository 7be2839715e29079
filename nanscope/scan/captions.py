"""The caption and the phrase of each box, built as the user's trainer builds them.

Two trainers' rules, chosen with `CaptionRules.preset(trainer)` and overridable field by field:

| field | open-groundingdino (datasets/odvg.py, cfg_odvg.py) | mmdet (ODVGDataset + RandomSamplingNegPos) |
|---|---|---|
| OD caption | `' . '.join(names) + ' .'` | `''.join(clean_name(name) + '. ')` |
| OD labels | positives, then `min(#neg, max_labels - #pos)` random negatives (max_labels=50), all shuffled | positives kept while their tokens fit `max_text_len` (the rest and their boxes are dropped, `check_for_positive_overflow`), up to 85 random negatives while tokens remain, shuffled |
| VG caption | rebuilt: `' . '.join(set(phrases)) + ' .'` | the file's caption |
| box tokens | `caption.find(phrase)` (first occurrence) | the character spans (`tokens_positive`) |

COCO-style grounding JSON (MDETR, GLIP, MMDetection) always uses the file's caption and spans. (MMDetection
lower-cases a VG caption and appends '. ' when it does not end with '.'; neither moves a span, so the scan
keeps the caption as the file has it.)

A trainer draws negatives and orders at random on every epoch. The scan's draw is reproducible and
independent of workers and shards: Open-GroundingDino's OD draw comes from counter-based hashes of
(seed, sample index, label) (`draw_negatives`), the other draws from `random.Random(f"{seed}:{index}")`. For
Open-GroundingDino's OD captions the scan also computes the bound over all draws (`worst_tokens`: the
positives plus the longest negatives that fit `max_labels`), so a caption that fits in this draw but
can overflow in another is reported too.
"""

from __future__ import annotations

import random
import re
from itertools import accumulate
from operator import add
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from nanscope.scan.sample import OD, Sample

TRAINERS = ("open-groundingdino", "mmdet")
SEPARATOR = " . "  # Open-GroundingDino / GLIP: names joined by ' . ', ending with ' .'


@dataclass(frozen=True)
class CaptionRules:
    trainer: str = "open-groundingdino"
    max_labels: int | None = 50  # OD: names per caption, positives included (Open-GroundingDino cfg_odvg.py)
    negatives: int | None = None  # OD: at most this many negatives (None: fill up to max_labels; mmdet: 85)
    order: str = "shuffle"  # OD: "shuffle" (both trainers) or "label-map" (label-map order, no shuffle)
    seed: int = 0  # the scan's draw of negatives and orders: random.Random(f"{seed}:{index}")
    vg_caption: str = "rebuild"  # VG: "rebuild" from the phrases (Open-GroundingDino) or "file"
    match: str = "find"  # "find": caption.find(phrase); "span": the character spans

    @classmethod
    def preset(cls, trainer: str, **overrides: Any) -> "CaptionRules":
        """The rules of `trainer` ('open-groundingdino' or 'mmdet'); `overrides` that are None are ignored."""
        from nanscope.errors import InputError

        if trainer not in TRAINERS:
            raise InputError(f"trainer {trainer!r} is not known; expected one of {', '.join(TRAINERS)}")
        base = cls() if trainer == "open-groundingdino" else cls(
            trainer="mmdet", max_labels=None, negatives=85, vg_caption="file", match="span")
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {"trainer": self.trainer, "max_labels": self.max_labels, "negatives": self.negatives,
                "order": self.order, "seed": self.seed, "vg_caption": self.vg_caption, "match": self.match}


@dataclass
class Prompt:
    """What the trainer feeds the model for one sample. Per-box lists index `sample.boxes`."""

    caption: str
    phrases: list[str] | None  # match="find": the phrase each box is looked up by
    spans: list[tuple[tuple[int, int], ...]] | None  # match="span": each box's character spans
    intended: list[tuple[int, int] | None]  # where each box's text really is in the caption (None: unknown)
    dropped: dict[int, str] = field(default_factory=dict)  # boxes the trainer leaves out, with the reason
    worst_tokens: int | None = None  # OD, Open-GroundingDino: the longest caption any draw can make
    names: list[str] = field(default_factory=list)  # the caption's names / unique phrases, in order
    reordered: bool = False  # the trainer draws another order every epoch (rebuilt, shuffled captions)
    crash: str | None = None  # why the trainer's own loader raises on this sample (None: it loads)
    same_name: dict[int, tuple[str, ...]] = field(default_factory=dict)  # box -> other label-map ids of its name
    clipped_from: int | None = None  # characters of a caption past MAX_CAPTION_FACTOR x max_text_len, cut before tokenizing
    found_once: list[int] | None = None  # chunk_prompts, match="find": caption.find finds every box's phrase where it
    # was put and nowhere else; the first and last character of each distinct phrase (None: not proven)


# Samples a trainer's loader raises on, by its rules (the scan reports them as errors whatever the code's severity).
OG_EMPTY_VG = ("Open-GroundingDino's ODVGDataset.__getitem__ raises on it: `boxes[:], caption_list[:] = zip(*c)` "
               "unpacks zip(*[]) (ValueError: not enough values to unpack); training stops at this line")


def clean_name(name: str) -> str:
    """MMDetection's `clean_name`: drop '(...)', '_' -> ' ', collapse double spaces, lower-case."""
    name = re.sub(r"\(.*\)", "", name)
    name = re.sub(r"_", " ", name)
    name = re.sub(r"  ", " ", name)
    return name.lower()


def _join(names: Sequence[str], style: str) -> tuple[str, list[tuple[int, int]]]:
    """Caption and each name's (begin, end) in it: `' . '.join(names) + ' .'`, or MMDetection's `name. name. `."""
    sep, caption = (". ", "".join(n + ". " for n in names)) if style == "mmdet" else (SEPARATOR, SEPARATOR.join(names) + " .")
    lens = list(map(len, names))
    step = len(sep)
    starts = list(accumulate([n + step for n in lens[:-1]], initial=0)) if lens else []
    return caption, list(zip(starts, map(add, starts, lens)))


@dataclass(frozen=True)
class LabelCosts:
    """Token cost of each label-map name inside a caption (name + separator, without [CLS]/[SEP]),
    and the labels sorted by cost (longest first) for the worst-case bound."""

    cost: Mapping[str, int]
    by_cost: tuple[str, ...]
    keys: tuple[str, ...]  # the label map's keys in its order
    specials: int  # tokens the tokenizer adds around a caption ([CLS], [SEP])
    prefix: tuple[int, ...] = ()  # prefix[i]: the cost of by_cost[:i] (the worst-case bound without a loop)
    rank: Mapping[str, int] = field(default_factory=dict)  # label -> its position in by_cost
    same_name: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # id -> other ids with its name


def label_costs(tokenizer: Any, label_map: Mapping[str, str], trainer: str) -> LabelCosts:
    """One batched tokenizer call over the label map's names."""
    from nanscope.scan.tokenizer import backend_of

    keys = list(label_map)
    if trainer == "mmdet":
        texts = [clean_name(label_map[k]) + ". " for k in keys]
    else:
        texts = [label_map[k] + " ." for k in keys]
    backend = backend_of(tokenizer)
    encs = backend.encode_batch(texts, add_special_tokens=False) if texts else []
    specials = len(backend.encode("", add_special_tokens=True).ids)
    cost = {k: len(e.ids) for k, e in zip(keys, encs)}
    position = {k: i for i, k in enumerate(keys)}
    order = tuple(sorted(keys, key=lambda k: (-cost[k], position[k])))
    prefix = tuple(accumulate((cost[k] for k in order), initial=0))
    by_name: dict[str, list[str]] = {}
    for k in keys:
        by_name.setdefault(label_map[k], []).append(k)
    same = {k: tuple(o for o in ids if o != k) for ids in by_name.values() if len(ids) > 1 for k in ids}
    return LabelCosts(cost, order, tuple(keys), specials, prefix=prefix, rank={k: i for i, k in enumerate(order)},
                      same_name=same)


def longest_negatives(costs: LabelCosts, positives: set[str], k: int) -> int:
    """Token cost of the k costliest labels that are not positives (the worst draw of k negatives)."""
    if not costs.prefix:
        total = taken = 0
        for lb in costs.by_cost:
            if taken >= k:
                break
            if lb not in positives:
                total += costs.cost[lb]
                taken += 1
        return total
    skipped = 0  # positives among the first k + skipped labels are passed over
    cut = 0
    for r in sorted(costs.rank[lb] for lb in positives):
        if r < k + skipped:
            skipped += 1
            cut += costs.cost[costs.by_cost[r]]
        else:
            break
    end = min(k + skipped, len(costs.by_cost))
    return costs.prefix[end] - cut


def _rng(rules: CaptionRules, index: int) -> random.Random:
    return random.Random(f"{rules.seed}:{index}")


_MASK = (1 << 64) - 1


def _splitmix(x: Any) -> Any:
    """SplitMix64 on a numpy uint64 array (wrapping arithmetic): a counter-based hash, so a sample's draw does
    not depend on which chunk, worker or shard handles it."""
    import numpy as np

    x = x + np.uint64(0x9E3779B97F4A7C15)  # a new array; the steps below work in place on it
    t = x >> np.uint64(30)
    x ^= t
    x *= np.uint64(0xBF58476D1CE4E5B9)
    np.right_shift(x, np.uint64(27), out=t)
    x ^= t
    x *= np.uint64(0x94D049BB133111EB)
    np.right_shift(x, np.uint64(31), out=t)
    x ^= t
    return x


def seed_bits(rules: CaptionRules) -> Any:
    """The draw's seed as the uint64 every priority is XORed with."""
    import numpy as np

    return np.uint64((rules.seed * 0x2545F4914F6CDD1D) & _MASK)


def priorities(samples: Sequence[Sample], rules: CaptionRules, n: int) -> tuple[Any, Any]:
    """`(pick, order)` [B, n] uint64: the draw's two priorities of each sample's n label positions."""
    import numpy as np

    index = np.array([s.index for s in samples], dtype=np.uint64)[:, None]
    base = (index * np.uint64(n) + np.arange(n, dtype=np.uint64)[None, :]) * np.uint64(2)
    seed = seed_bits(rules)
    return _splitmix(base ^ seed), _splitmix((base + np.uint64(1)) ^ seed)


def draw_negatives(samples: Sequence[Sample], rules: CaptionRules, label_map: Mapping[str, str],
                   costs: LabelCosts) -> list[list[str]]:
    """Open-GroundingDino's OD draw for a chunk, vectorized: each sample's positives plus
    `min(#neg, max_labels - #pos)` negatives, in random order. Sample i, label position j get the priorities
    `splitmix64(seed, i, j)`: the negatives are the lowest-priority non-positive labels, the order follows a
    second priority. Uniform subsets and orders, reproducible, and the same whatever the chunking."""
    import numpy as np

    keys = costs.keys
    n = len(keys)
    pos_of = {k: i for i, k in enumerate(keys)}
    pick, order = priorities(samples, rules, n)
    positives = [list(dict.fromkeys(lb for lb in s.labels if lb in label_map)) for s in samples]
    B = len(samples)
    lens = [len(pos) for pos in positives]
    rows = np.repeat(np.arange(B), lens)
    cols = np.array([pos_of[lb] for pos in positives for lb in pos], dtype=np.int64)
    pick[rows, cols] = np.uint64(_MASK)  # positives are never drawn as negatives
    ks = []
    for m in lens:
        k = n - m if rules.max_labels is None else max(0, min(n - m, rules.max_labels - m))
        ks.append(k if rules.negatives is None else min(k, rules.negatives))
    kmax = max(ks, default=0)
    if 0 < kmax < n:  # the kmax lowest priorities of each row (no full sort of the rows)
        ranked = np.argpartition(pick, kmax - 1, axis=1)[:, :kmax]
    else:
        ranked = np.argsort(pick, axis=1, kind="stable")[:, :kmax]
    # the chosen labels of every row at once: positives, then the negatives of rank < k (which kmax lowest
    # priorities a row takes does not depend on their order, only on k)
    if kmax:
        rank = np.argsort(np.take_along_axis(pick, ranked, 1), axis=1, kind="stable")
        ranked = np.take_along_axis(ranked, rank, 1)
    chosen = np.zeros((B, n), dtype=bool)
    chosen[rows, cols] = True
    take = np.arange(kmax)[None, :] < np.array(ks, dtype=np.int64)[:, None]  # [B, kmax]
    chosen[np.nonzero(take)[0], ranked[take]] = True
    width = max((m + k for m, k in zip(lens, ks)), default=0)
    if rules.order == "shuffle":
        key = np.where(chosen, order, np.uint64(_MASK))
    else:
        key = np.where(chosen, np.arange(n, dtype=np.uint64)[None, :], np.uint64(_MASK))
    if 0 < width < n:
        part = np.argpartition(key, width - 1, axis=1)[:, :width]
        best = np.take_along_axis(part, np.argsort(np.take_along_axis(key, part, 1), axis=1, kind="stable"), 1)
    else:
        best = np.argsort(key, axis=1, kind="stable")[:, :width]
    return [[keys[j] for j in row[:m + k]] for row, m, k in zip(best.tolist(), lens, ks)]


def od_prompt(sample: Sample, rules: CaptionRules, label_map: Mapping[str, str], costs: LabelCosts,
              max_text_len: int, *, labels: list[str] | None = None) -> Prompt:
    """A detection sample's caption from its labels, positives and negatives as `rules.trainer` draws them.
    `labels`: this sample's row of `draw_negatives` (drawn here when not given)."""
    dropped = ({} if label_map.keys() >= set(sample.labels) else
               {j: "label missing from the label map" for j, lb in enumerate(sample.labels) if lb not in label_map})
    positives = list(dict.fromkeys(lb for lb in sample.labels if lb in label_map))
    if rules.trainer == "mmdet":
        order = {k: i for i, k in enumerate(label_map)} if rules.order == "label-map" else None
        return _mmdet_od(sample, rules, label_map, costs, max_text_len, _rng(rules, sample.index), positives, dropped,
                         order)
    if labels is None:
        labels = draw_negatives([sample], rules, label_map, costs)[0]
    pos_set = set(positives)
    k = len(labels) - len(positives)
    names = list(map(label_map.__getitem__, labels))
    caption, where = _join(names, "gdino")
    pos_of = dict(zip(labels, where))
    worst = costs.specials + sum(costs.cost[lb] for lb in positives) + longest_negatives(costs, pos_set, k)
    pr = _od_result(sample, rules, label_map, caption, pos_of, dropped, worst, names)
    if costs.same_name and rules.match == "find":  # caption.find: one name, one place, whatever the id
        pr.same_name = {j: costs.same_name[lb] for j, lb in enumerate(sample.labels) if lb in costs.same_name}
    return pr


def _mmdet_od(sample: Sample, rules: CaptionRules, label_map: Mapping[str, str], costs: LabelCosts,
              max_text_len: int, rng: random.Random, positives: list[str], dropped: dict[int, str],
              order: Mapping[str, int] | None) -> Prompt:
    rng.shuffle(positives)
    kept, length = [], 0
    for lb in positives:  # check_for_positive_overflow
        length += costs.cost[lb]
        if length > max_text_len:
            break
        kept.append(lb)
    keep = set(kept)
    for j, lb in enumerate(sample.labels):
        if lb in label_map and lb not in keep:
            dropped[j] = f"positive caption overflow: MMDetection's check_for_positive_overflow drops it " \
                         f"(positives need more than max_tokens={max_text_len} tokens)"
    n_neg = min(rules.negatives if rules.negatives is not None else len(label_map), len(label_map))
    if rules.max_labels is not None:
        n_neg = min(n_neg, max(0, rules.max_labels - len(kept)))
    negs = [lb for lb in rng.sample(list(label_map), n_neg) if lb not in keep]
    budget, screened = max_text_len - length, []  # `length` counts the positive that overflowed, as MMDetection's
    for lb in negs:
        budget -= costs.cost[lb]
        if budget <= 0:
            break
        screened.append(lb)
    labels = screened + kept
    if order is None:
        rng.shuffle(labels)
    else:
        labels.sort(key=order.__getitem__)
    names = [clean_name(label_map[lb]) for lb in labels]
    caption, where = _join(names, "mmdet")
    pos_of = {lb: where[i] for i, lb in enumerate(labels)}
    return _od_result(sample, rules, label_map, caption, pos_of, dropped, None, names)


def _od_result(sample: Sample, rules: CaptionRules, label_map: Mapping[str, str], caption: str,
               pos_of: Mapping[str, tuple[int, int]], dropped: dict[int, str], worst: int | None,
               names: list[str]) -> Prompt:
    intended: list[tuple[int, int] | None] = list(map(pos_of.get, sample.labels))
    if rules.match == "span":
        spans = [((s,) if s is not None else ()) for s in intended]
        return Prompt(caption, None, spans, intended, dropped, worst, names)  # type: ignore[arg-type]
    if not dropped:  # every label is in the caption: its phrase is the text at its place
        text = {lb: caption[b:e] for lb, (b, e) in pos_of.items()}
        phrases = list(map(text.__getitem__, sample.labels))
    else:
        phrases = [caption[s[0]:s[1]] if s is not None else label_map.get(lb, "")
                   for s, lb in zip(intended, sample.labels)]
    return Prompt(caption, phrases, None, intended, dropped, worst, names, reordered=rules.order == "shuffle")


def empty_vg_crashes(rules: CaptionRules) -> bool:
    """Whether the trainer's VG loader raises on a line with no regions (Open-GroundingDino's rebuilt captions)."""
    return rules.trainer == "open-groundingdino" and rules.vg_caption == "rebuild"


def vg_prompt(sample: Sample, rules: CaptionRules, *, force_file: bool = False) -> Prompt:
    """A grounding sample: the file's caption, or (Open-GroundingDino) one rebuilt from its unique phrases."""
    if rules.vg_caption == "rebuild" and not force_file:
        if not sample.boxes and empty_vg_crashes(rules):
            return Prompt(" .", [], None, [], {}, None, [], crash=OG_EMPTY_VG)
        uniq = list(dict.fromkeys(sample.phrases))
        if rules.order == "shuffle":
            _rng(rules, sample.index).shuffle(uniq)
        caption, where = _join(uniq, "gdino")
        pos = dict(zip(uniq, where))
        intended: list[tuple[int, int] | None] = [pos[p] for p in sample.phrases]
        if rules.match == "span" and not force_file:
            return Prompt(caption, None, [(s,) if s else () for s in intended], intended, {}, None, uniq)
        return Prompt(caption, list(sample.phrases), None, intended, {}, None, uniq, reordered=rules.order == "shuffle")
    caption = sample.caption or ""
    intended = [s[0] if s and len(s) == 1 else None for s in sample.spans]
    if rules.match == "span" or force_file:
        return Prompt(caption, None, [s or () for s in sample.spans], intended, {}, None, list(sample.phrases))
    return Prompt(caption, list(sample.phrases), None, intended, {}, None, list(sample.phrases))


def prompts(samples: Sequence[Sample], rules: CaptionRules, label_map: Mapping[str, str] | None,
            costs: LabelCosts | None, max_text_len: int, *, grounding_json: bool = False) -> list[Prompt]:
    """The prompts of a chunk (Open-GroundingDino's OD draws vectorized over it)."""
    if samples and samples[0].mode == OD:
        assert label_map is not None and costs is not None
        if rules.trainer == "mmdet":
            return [od_prompt(s, rules, label_map, costs, max_text_len) for s in samples]
        rows = draw_negatives(samples, rules, label_map, costs)
        return [od_prompt(s, rules, label_map, costs, max_text_len, labels=r) for s, r in zip(samples, rows)]
    return [vg_prompt(s, rules, force_file=grounding_json) for s in samples]
