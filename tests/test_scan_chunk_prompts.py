"""`chunk_prompts.od_prompts` (Open-GroundingDino's detection prompts for a whole chunk) against the per-sample
`captions.od_prompt` with `captions.draw_negatives` it replaces: every field of every Prompt equal, on random
label maps (names that repeat, names inside other names), random rules and labels missing from the map."""

from __future__ import annotations

import dataclasses
import random

from nanscope.scan import chunk_prompts
from nanscope.scan.captions import CaptionRules, label_costs, prompts
from nanscope.scan.sample import OD, Sample


class _Words:
    """A stand-in tokenizer backend for `label_costs`: one token per word, [CLS] and [SEP] around."""

    class _Enc:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

    def encode_batch(self, texts, add_special_tokens=True):
        return [self.encode(t, add_special_tokens) for t in texts]

    def encode(self, text, add_special_tokens=True):
        return self._Enc([0] * (len(text.split()) + (2 if add_special_tokens else 0)))


def _case(rng: random.Random):
    words = ["cat", "dog", "big", "red", "car", "carriage", "a.b", "hot dog"]
    n = rng.choice([1, 2, 5, 40, 120])
    lm = {str(i): " ".join(rng.sample(words, rng.randint(1, 3))) for i in range(n)}
    if n > 3 and rng.random() < 0.5:
        lm["1"] = lm["0"]  # two ids with one name
    rules = CaptionRules(max_labels=rng.choice([None, 5, 50]), negatives=rng.choice([None, 0, 3, 85]),
                         order=rng.choice(["shuffle", "label-map"]), seed=rng.randrange(5),
                         match=rng.choice(["find", "find", "span"]))
    samples = []
    for _ in range(rng.randrange(1, 40)):
        labels = [str(rng.randrange(n + (3 if rng.random() < 0.2 else 0))) for _ in range(rng.randrange(0, 12))]
        samples.append(Sample(rng.randrange(10 ** 6), 0, "", 1, None, None, OD, [(0.0, 0.0, 1.0, 1.0)] * len(labels),
                              list(range(len(labels))), labels))
    return lm, rules, samples


def test_chunk_prompts_equal_the_per_sample_prompts():
    rng = random.Random(0)
    for _ in range(300):
        lm, rules, samples = _case(rng)
        costs = label_costs(_Words(), lm, rules.trainer)
        assert chunk_prompts.supported(rules, costs)
        fast = chunk_prompts.od_prompts(samples, rules, lm, costs)
        slow = prompts(samples, rules, lm, costs, 256)
        assert [_fields(p) for p in fast] == [_fields(p) for p in slow]


def _fields(p) -> dict:
    d = dataclasses.asdict(p)
    d.pop("found_once")  # od_prompts' hint alone (tested below against caption.find)
    return d


def test_found_once_is_what_caption_find_says():
    """`Prompt.found_once` is set only where caption.find finds every box's phrase where it was put and nowhere
    else, and holds each distinct phrase's first and last character; on captions of plain names (no '.', no edge
    space) it is set wherever that holds (names inside names, repeated names and a.b among the random maps)."""
    rng = random.Random(2)
    seen = {True: 0, False: 0}
    edge = {"0": "cat", "1": "dog", "2": "cat . dog", "3": "dog .", "4": " cat", "5": "cat "}  # found across separators
    cases = [_case(rng) for _ in range(300)]
    for k in range(40):
        rules = CaptionRules(max_labels=None, negatives=None, order=["shuffle", "label-map"][k % 2], seed=k, match="find")
        cases.append((edge, rules, [Sample(k * 100 + i, 0, "", 1, None, None, OD, [(0.0, 0.0, 1.0, 1.0)], [0], [str(i)])
                                    for i in range(6)]))
    for lm, rules, samples in cases:
        costs = label_costs(_Words(), lm, rules.trainer)
        for p in chunk_prompts.od_prompts(samples, rules, lm, costs):
            if p.phrases is None or p.dropped:
                assert p.found_once is None
                continue
            once = all(p.caption.find(ph) == b and p.caption.find(ph, b + 1) < 0
                       for ph, (b, e) in zip(p.phrases, p.intended))
            if p.found_once is not None:
                assert once
                assert set(p.found_once) == {c for b, e in p.intended for c in (b, e - 1)}
            elif all("." not in ph and ph.strip() == ph for ph in p.phrases):
                assert not once
            seen[p.found_once is not None] += 1
    assert min(seen.values()) >= 50


def test_the_draw_does_not_depend_on_the_chunking():
    rng = random.Random(1)
    lm, rules, samples = _case(rng)
    while len(samples) < 10:
        lm, rules, samples = _case(rng)
    costs = label_costs(_Words(), lm, rules.trainer)
    whole = chunk_prompts.od_prompts(samples, rules, lm, costs)
    parts = chunk_prompts.od_prompts(samples[:3], rules, lm, costs) + chunk_prompts.od_prompts(samples[3:], rules, lm, costs)
    assert [p.caption for p in whole] == [p.caption for p in parts]
