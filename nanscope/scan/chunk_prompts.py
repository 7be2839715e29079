"""Open-GroundingDino's detection prompts for a whole chunk at once: the same `Prompt`s as `captions.od_prompt`,
with the per-sample Python reduced to one join per caption.

`captions.od_prompt` builds, for each sample, a dict of every drawn name's place in the caption (50 names for
11 boxes on average), slices every name back out of the caption and walks the sorted ranks of the positives for
the worst-draw bound; `captions.draw_negatives` hashes two priorities for every (sample, label) pair and sorts
the chosen labels through an array as wide as the label map. Here the draw hashes the second (order) priority
only for the labels a caption holds, the names' places are one cumulative sum over each row's name lengths,
each box finds its label's place with one sorted search over the chunk, and the worst-draw bound
(`captions.longest_negatives`) is computed for every row at once. What is left per sample is the caption's join
and the lists a `Prompt` holds. `tests/test_scan_vectorised.py` compares every field with `od_prompt`'s.

With match="find" it also proves, for every row at once, which captions hold each box's phrase exactly once,
where it was put (`Prompt.found_once`, from the label map's name-inside-name table, `_holders`): the text checks
then skip those samples after two `char_to_token` calls per phrase (`engine.box_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any, Mapping, Sequence

from nanscope.scan.captions import _MASK, SEPARATOR, CaptionRules, LabelCosts, Prompt, _splitmix, seed_bits
from nanscope.scan.sample import Sample

MISSING = "label missing from the label map"  # the reason `od_prompt` gives a dropped box (same text)


@dataclass(frozen=True)
class _Tables:
    """A label map's names and costs as arrays, indexed by position in `LabelCosts.keys` (built once per scan)."""

    position: "_Positions"  # label -> its position (-1: not in the label map)
    names: list[str]
    phrase: list[str]  # names + [""]: a box's phrase by its label position, "" at -1 (not in the label map)
    length: Any  # [n] int64: characters of each name
    cost: Any  # [n] int64: tokens of each name with its separator
    rank: Any  # [n] int64: position in costs.by_cost (longest first)
    prefix: Any  # [n + 1] int64: costs.prefix
    inside: Any  # None (label maps over ONCE_LABELS) or (plain [n] bool, ptr [n + 1], holders [nnz]): see _holders


ONCE_LABELS = 2048  # label maps up to this size get `Prompt.found_once` (n * n substring tests, once per scan)


class _Positions(dict):  # type: ignore[type-arg]
    """label -> position; -1 for a label the map lacks (looked up in C through `map(positions.__getitem__, ...)`)."""

    def __missing__(self, key: str) -> int:
        return -1


_CACHE: list[tuple[LabelCosts, Mapping[str, str], _Tables]] = []  # the last (costs, label map) seen


def _tables(costs: LabelCosts, label_map: Mapping[str, str]) -> _Tables:
    import numpy as np

    if _CACHE and _CACHE[0][0] is costs and _CACHE[0][1] is label_map:
        return _CACHE[0][2]
    keys = costs.keys
    names = [label_map[k] for k in keys]
    t = _Tables(_Positions((k, i) for i, k in enumerate(keys)), names, [*names, ""],
                np.array([len(x) for x in names], dtype=np.int64), np.array([costs.cost[k] for k in keys], dtype=np.int64),
                np.array([costs.rank[k] for k in keys], dtype=np.int64), np.array(costs.prefix, dtype=np.int64),
                _holders(names) if len(names) <= ONCE_LABELS else None)
    _CACHE[:] = [(costs, label_map, t)]
    return t


def _holders(names: list[str]) -> tuple[Any, Any, Any]:
    """`(plain [n] bool, ptr [n + 1], holders [nnz])`: names[i] is plain when it is not empty, holds no '.' and
    neither starts nor ends with a space; holders[ptr[i]:ptr[i + 1]] are the other positions j whose name holds
    names[i] (equal names included), for a plain names[i] (none for the others: never read).

    In a caption `n1 . n2 . ... nk .` a plain name occurs only inside names: an occurrence holds no '.', so it lies
    in one dot-free run, which is a space, part of one name, a space; it cannot take either space. So caption.find
    finds a plain name where it was put and nowhere else exactly when no other drawn name holds it."""
    from bisect import bisect_right

    import numpy as np

    plain = [bool(x) and "." not in x and x[0] != " " and x[-1] != " " for x in names]
    sep = "\n"
    if any(sep in x for x in names):  # one text of all the names, a character none holds between them
        sep = next(chr(c) for c in range(1, 0x110000) if not any(chr(c) in x for x in names))
    text = sep.join(names)
    starts = [0]
    for x in names[:-1]:
        starts.append(starts[-1] + len(x) + 1)
    ptr, holders = [0], []
    for i, x in enumerate(names):
        if plain[i]:
            found = set()
            k = text.find(x)
            while k >= 0:  # each occurrence lies in one name: x holds no separator
                found.add(bisect_right(starts, k) - 1)
                k = text.find(x, k + 1)
            found.discard(i)
            holders.extend(sorted(found))
        ptr.append(len(holders))
    return np.array(plain, dtype=bool), np.array(ptr, dtype=np.int64), np.array(holders, dtype=np.int64)


def _found_once(t: _Tables, valid: Any, best: Any, prow: Any, plab: Any, B: int) -> Any:
    """[B] bool: every positive of the row is a plain name that no other drawn name of its caption holds."""
    import numpy as np

    plain, ptr, holders = t.inside
    drawn = np.zeros((B, len(t.names)), dtype=bool)  # [B, n]
    drawn[np.nonzero(valid)[0], best[valid]] = True
    ok = np.ones(B, dtype=bool)
    ok[prow[~plain[plab]]] = False
    cnt = ptr[plab + 1] - ptr[plab]  # [P] holders of each positive
    if cnt.sum():
        row = np.repeat(prow, cnt)
        at = np.repeat(ptr[plab] - np.cumsum(cnt) + cnt, cnt) + np.arange(int(cnt.sum()))  # each holder's index
        ok[row[drawn[row, holders[at]]]] = False
    return ok


def supported(rules: CaptionRules, costs: LabelCosts | None) -> bool:
    """Whether `od_prompts` applies: Open-GroundingDino's rules, and costs with the worst-draw prefix sums."""
    return rules.trainer == "open-groundingdino" and costs is not None and bool(costs.prefix) and bool(costs.rank)


def od_prompts(samples: Sequence[Sample], rules: CaptionRules, label_map: Mapping[str, str],
               costs: LabelCosts) -> list[Prompt]:
    """`[captions.od_prompt(s, rules, label_map, costs, T, labels=row) for s, row in zip(samples, draw)]`."""
    import numpy as np

    if not samples:
        return []
    t = _tables(costs, label_map)
    n = len(t.names)
    counts = [len(s.labels) for s in samples]
    label = np.array(list(map(t.position.__getitem__, chain.from_iterable(s.labels for s in samples))),
                     dtype=np.int64)  # [N] each box's label position, -1: not in the map
    owner = np.repeat(np.arange(len(samples), dtype=np.int64), counts)  # [N]
    pos = np.unique((owner * n + label)[label >= 0])  # distinct (sample, label) positives, row-major
    prow, plab = pos // n, pos % n
    best, drawn, ks = draw(samples, rules, n, prow, plab)  # [B, width] label positions
    B, width = best.shape
    valid = np.arange(width)[None, :] < drawn[:, None]  # [B, width]
    step = np.where(valid, t.length[best] + len(SEPARATOR), 0)
    starts = np.cumsum(step, axis=1) - step  # [B, width] each name's first character in its caption
    place = np.zeros((B, n), dtype=np.int64)  # [B, n] where each drawn name starts in its caption
    place[np.nonzero(valid)[0], best[valid]] = starts[valid]
    begin = place[owner, label]  # [N] (a label the map lacks: ignored below)
    end = begin + t.length[label]
    worst = _worst(costs.specials, t, prow, plab, ks)
    once: list[Any] = [None] * B
    if t.inside is not None and rules.match == "find":  # each row's distinct positives' first and last characters
        pb = place[prow, plab]
        chars = np.stack((pb, pb + t.length[plab] - 1), axis=1).ravel().tolist()
        cut = np.searchsorted(prow, np.arange(B + 1)) * 2
        ok = _found_once(t, valid, best, prow, plab, B).tolist()
        once = [chars[x:y] if k else None for x, y, k in zip(cut[:-1].tolist(), cut[1:].tolist(), ok)]
    missing = np.zeros(B, dtype=bool)
    missing[owner[label < 0]] = True  # [B] rows with a label the map lacks
    labels_at = label.tolist()
    names_of = t.names
    drawn_names = list(map(names_of.__getitem__, best[valid].tolist()))  # every caption's names, row after row
    intended_all = list(zip(begin.tolist(), end.tolist()))  # [N] (begin, end) of each box's name
    phrases_all = list(map(t.phrase.__getitem__, labels_at))  # [N] each box's name ("" at -1: not in the map)
    shuffled = rules.order == "shuffle"
    span = rules.match == "span"
    same = costs.same_name if rules.match == "find" else {}
    join = SEPARATOR.join
    out = []
    a = d = 0
    for s, m, w, c, o, miss in zip(samples, drawn.tolist(), worst.tolist(), counts, once, missing.tolist()):
        b, e = a + c, d + m
        names = drawn_names[d:e]
        caption = join(names) + " ."
        intended: list[Any] = intended_all[a:b]
        phrases = phrases_all[a:b]
        dropped = {}
        if miss:
            dropped = {j: MISSING for j, i in enumerate(labels_at[a:b]) if i < 0}
            for j in dropped:
                intended[j] = None
        a, d = b, e
        if span:
            spans = [((x,) if x is not None else ()) for x in intended]
            out.append(Prompt(caption, None, spans, intended, dropped, w, names))
            continue
        pr = Prompt(caption, phrases, None, intended, dropped, w, names, reordered=shuffled,
                    found_once=None if dropped else o)
        if same:
            pr.same_name = {j: same[lb] for j, lb in enumerate(s.labels) if lb in same}
        out.append(pr)
    return out


def draw(samples: Sequence[Sample], rules: CaptionRules, n: int, prow: Any, plab: Any) -> tuple[Any, Any, Any]:
    """`captions.draw_negatives` as arrays: `(rows [B, width] label positions, names per caption [B], negatives
    per caption [B])`; row i's caption is its first `names[i]` positions. prow, plab [P]: the distinct positives'
    samples and label positions, sorted by sample.

    The same draw: the negatives are the lowest `pick` priorities among the non-positive labels; the caption's
    order follows the `order` priority, hashed here only for the labels drawn (splitmix64 is a bijection, so the
    priorities of one row never tie and the order does not depend on how they are sorted)."""
    import numpy as np

    B = len(samples)
    lens = np.bincount(prow, minlength=B)  # [B] positives
    ks = n - lens
    if rules.max_labels is not None:
        ks = np.maximum(0, np.minimum(ks, rules.max_labels - lens))
    if rules.negatives is not None:
        ks = np.minimum(ks, rules.negatives)
    index = np.array([s.index for s in samples], dtype=np.uint64)[:, None] * np.uint64(n)  # [B, 1]
    seed = seed_bits(rules)
    pick = _splitmix(((index + np.arange(n, dtype=np.uint64)[None, :]) * np.uint64(2)) ^ seed)  # [B, n]
    pick[prow, plab] = np.uint64(_MASK)  # positives are never drawn as negatives
    kmax = int(ks.max(initial=0))
    if 0 < kmax < n:  # the kmax lowest priorities of each row, in priority order
        ranked = np.argpartition(pick, kmax - 1, axis=1)[:, :kmax]
    else:
        ranked = np.argsort(pick, axis=1, kind="stable")[:, :kmax]
    if kmax:
        ranked = np.take_along_axis(ranked, np.argsort(np.take_along_axis(pick, ranked, 1), axis=1, kind="stable"), 1)
    drawn = lens + ks
    width = int(drawn.max(initial=0))
    sel = np.full((B, width), -1, dtype=np.int64)  # [B, width] positives, then negatives, then -1
    first = np.searchsorted(prow, np.arange(B))
    sel[prow, np.arange(len(prow)) - first[prow]] = plab
    take = np.arange(kmax)[None, :] < ks[:, None]  # [B, kmax]
    r, c = np.nonzero(take)
    sel[r, lens[r] + c] = ranked[take]
    valid = sel >= 0
    if rules.order == "shuffle":
        key = _splitmix(((index + sel.astype(np.uint64)) * np.uint64(2) + np.uint64(1)) ^ seed)
    else:
        key = sel.astype(np.uint64)
    key[~valid] = np.uint64(_MASK)
    best = np.take_along_axis(sel, np.argsort(key, axis=1, kind="stable"), 1)
    return best, drawn, ks


def _worst(specials: int, t: _Tables, prow: Any, plab: Any, ks: Any) -> Any:
    """[B] int64: `specials + cost(positives) + captions.longest_negatives(costs, positives, k)` of every row.

    longest_negatives walks a row's positives by rank r_0 < r_1 < ... and skips r_i while r_i < k + i; as
    r_i - i never decreases, the skipped ones are exactly those with r_i - i < k."""
    import numpy as np

    B, n = len(ks), len(t.names)
    rank, cost = t.rank[plab], t.cost[plab]
    by_rank = np.lexsort((rank, prow))  # row-major, ranks ascending within a row
    row, rank, cost = prow[by_rank], rank[by_rank], cost[by_rank]
    first = np.searchsorted(row, np.arange(B))  # [B] each row's first positive
    i = np.arange(len(row)) - first[row]  # position of the positive among its row's
    skip = (rank - i) < ks[row]
    skipped = np.bincount(row[skip], minlength=B)
    cut = np.bincount(row[skip], weights=cost[skip], minlength=B).astype(np.int64)
    pos_cost = np.bincount(row, weights=cost, minlength=B).astype(np.int64)
    end = np.minimum(ks + skipped, n)
    return specials + pos_cost + t.prefix[end] - cut
