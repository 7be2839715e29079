"""Chunk results -> one `Result` of kind "scan"; shard results -> the same result as one run.

Per code: every affected sample id (in dataset order, `data.samples`, with their positions in
`data.indices`), the items counted (boxes, tokens for NS102, samples for sample-level codes), the kinds
and the worst examples (`where`: the highest-scoring samples, ties to the earlier sample; `data.worst`
keeps their scores so shard merges pick the same ones). Histograms have fixed bins, so shards add up.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Mapping, Sequence

from nanscope.findings import CATALOGUE, Finding, Severity
from nanscope.scan.checks import CRASHES
from nanscope.result import Result
from nanscope.scan.engine import BOX_COUNT_BINS, SIZE_BINS, TOKEN_BIN, TOKEN_BINS, ChunkOut, SampleHits, Stats

WORST = 8  # samples listed per code
HITS_PER_SAMPLE = 3  # locations listed per worst sample
COUNT_TOKENS = {"NS102"}  # codes whose count is tokens; the others count boxes or samples


@dataclass
class CodeAgg:
    samples: list[Any] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    count: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    worst: list[tuple[float, int, list[dict[str, Any]]]] = field(default_factory=list)  # min-heap (score, -index, where)

    def takes(self, score: float, index: int) -> bool:
        """Whether `offer(score, index, ...)` would keep the sample."""
        return len(self.worst) < WORST or (score, -index) > self.worst[0][:2]

    def offer(self, score: float, index: int, where: list[dict[str, Any]]) -> None:
        item = (score, -index, where)
        if len(self.worst) < WORST:
            heapq.heappush(self.worst, item)
        elif item[:2] > self.worst[0][:2]:
            heapq.heapreplace(self.worst, item)

    def ranked(self) -> list[tuple[float, int, list[dict[str, Any]]]]:
        return sorted(self.worst, key=lambda t: (-t[0], -t[1]))


def _where(sh: SampleHits, hit: Any) -> dict[str, Any]:
    w: dict[str, Any] = {"sample": sh.id, "file": sh.file}
    if sh.line is not None:
        w["line"] = sh.line
    if hit.box is not None:
        w["annotation"] = sh.annotations[hit.box]
        w["box"] = hit.box
    w.update(hit.where)
    return w


_CODE, _COUNT, _SCORE, _WHERE = attrgetter("code"), attrgetter("count"), attrgetter("score"), attrgetter("where")


@dataclass
class Aggregate:
    stats: Stats = field(default_factory=Stats)
    codes: dict[str, CodeAgg] = field(default_factory=dict)

    def add(self, out: ChunkOut) -> None:
        self.stats.merge(out.stats)
        codes = self.codes
        for sh in out.hits:
            by_code: dict[str, list[Any]] = {}
            if len(set(map(_CODE, sh.hits))) == 1:  # most samples: hits of one code
                by_code[sh.hits[0].code] = sh.hits
            else:
                for h in sh.hits:
                    by_code.setdefault(h.code, []).append(h)
            for code, hs in by_code.items():
                agg = codes.get(code)
                if agg is None:
                    agg = codes[code] = CodeAgg()
                agg.samples.append(sh.id)
                agg.indices.append(sh.index)
                agg.count += sum(map(_COUNT, hs))
                kinds = agg.kinds
                for w in map(_WHERE, hs):
                    kind = w.get("kind") or w.get("why")
                    if kind:
                        kinds[kind] = kinds.get(kind, 0) + 1
                score = float(sum(map(_SCORE, hs)))
                if agg.takes(score, sh.index):  # the locations are built only for a sample that enters the worst
                    agg.offer(score, sh.index, [_where(sh, h) for h in hs[:HITS_PER_SAMPLE]])

    # ------------------------------------------------------------------ to a Result

    def findings(self) -> list[Finding]:
        out = []
        for code, agg in sorted(self.codes.items()):
            info = CATALOGUE[code]
            n = len(agg.samples)
            pct = 100.0 * n / self.stats.samples if self.stats.samples else 0.0
            unit = "token(s)" if code in COUNT_TOKENS else ("sample(s)" if code in ("NS104", "NS204", "NS208", "NS209", "NS210")
                                                           else "box(es)")
            kinds = ", ".join(f"{v} {k}" for k, v in sorted(agg.kinds.items(), key=lambda kv: (-kv[1], kv[0]))[:4])
            msg = (f"{n} of {self.stats.samples} samples ({pct:.3g}%): {agg.count} {unit}"
                   + (f" ({kinds})" if kinds else "") + f". {info.title[0].upper()}{info.title[1:]}.")
            ranked = agg.ranked()
            where = tuple(w for _, _, ws in ranked for w in ws)
            data = {"samples": list(agg.samples), "indices": list(agg.indices), "samples_affected": n,
                    "percent": round(pct, 4), "kinds": dict(sorted(agg.kinds.items())),
                    "worst": [{"index": -ni, "score": s, "where": ws} for s, ni, ws in ranked]}
            # A sample the trainer's own loader raises on is an error under its rules, whatever the code's severity.
            severity = Severity.ERROR if any(k.startswith(CRASHES) for k in agg.kinds) else info.severity
            out.append(Finding(code, severity, agg.count, msg, where, data=data))
        return out

    def tables(self) -> dict[str, Any]:
        from nanscope.findings import sort_findings

        rows = []
        for f in sort_findings(self.findings()):
            worst = [str(w["where"][0]["sample"]) for w in f.data["worst"][:3] if w["where"]]
            rows.append({"code": f.code, "severity": f.severity.value, "title": f.title,
                         "samples": f.data["samples_affected"], "percent": float(f"{f.data['percent']:.3g}"),
                         "count": f.count,
                         "worst": ", ".join(worst)})
        return {
            "codes": rows,
            "histograms": {
                "tokens": {"bin": TOKEN_BIN, "counts": list(self.stats.token_hist)},
                "boxes_per_image": {"bin": 1, "counts": list(self.stats.box_count_hist)},
                "box_size": {"log2_px": True, "counts": list(self.stats.size_hist)},
            },
        }

    def summary(self) -> dict[str, Any]:
        st = self.stats
        return {
            "samples": st.samples, "boxes": st.boxes, "samples_with_findings": st.flagged,
            "tokens": {"min": st.tokens_min, "max": st.tokens_max, "sum": st.tokens_sum,
                       "mean": round(st.tokens_sum / st.samples, 3) if st.samples else None,
                       "over_max_text_len": st.over},
        }

    def result(self, *, summary: Mapping[str, Any], inputs: Mapping[str, Any], environment: Mapping[str, Any]) -> Result:
        return Result(kind="scan", findings=self.findings(), summary={**dict(summary), **self.summary()},
                      inputs=dict(inputs), environment=dict(environment), tables=self.tables())

    # ------------------------------------------------------------------ from results (shards)

    @classmethod
    def from_result(cls, r: Result) -> "Aggregate":
        s = r.summary
        tok = s.get("tokens") or {}
        h = r.tables.get("histograms") or {}
        st = Stats(samples=int(s.get("samples", 0)), boxes=int(s.get("boxes", 0)),
                   flagged=int(s.get("samples_with_findings", 0)), tokens_sum=int(tok.get("sum", 0)),
                   tokens_min=tok.get("min"), tokens_max=int(tok.get("max", 0)), over=int(tok.get("over_max_text_len", 0)),
                   token_hist=list(h.get("tokens", {}).get("counts", [0] * TOKEN_BINS)),
                   box_count_hist=list(h.get("boxes_per_image", {}).get("counts", [0] * BOX_COUNT_BINS)),
                   size_hist=list(h.get("box_size", {}).get("counts", [0] * SIZE_BINS)))
        agg = cls(stats=st)
        for f in r.findings:
            c = CodeAgg(list(f.data.get("samples", [])), [int(i) for i in f.data.get("indices", [])], int(f.count),
                        dict(f.data.get("kinds", {})))
            for w in f.data.get("worst", []):
                c.offer(float(w["score"]), int(w["index"]), list(w["where"]))
            agg.codes[f.code] = c
        return agg

    def merge(self, other: "Aggregate") -> None:
        self.stats.merge(other.stats)
        for code, o in other.codes.items():
            c = self.codes.setdefault(code, CodeAgg())
            pairs = sorted(zip(c.indices + o.indices, c.samples + o.samples), key=lambda t: t[0])
            c.indices, c.samples = [i for i, _ in pairs], [s for _, s in pairs]
            c.count += o.count
            for k, v in o.kinds.items():
                c.kinds[k] = c.kinds.get(k, 0) + v
            for s, ni, ws in o.worst:
                c.offer(s, -ni, ws)


SHARD_KEYS = ("shard",)  # inputs that differ between shards of one scan


def merge_scan_results(results: Sequence[tuple[str, Result]]) -> Result:
    """Shard results of one scan -> the result a single run over the whole dataset gives."""
    from nanscope.errors import InputError

    keyed = []
    for src, r in results:
        shard = str(r.inputs.get("shard", "0/1"))
        keyed.append((shard, src, r))
    shards = [k for k, _, _ in keyed]
    if len(set(shards)) != len(shards):
        raise InputError(f"shard results repeat a shard ({', '.join(sorted(shards))}); expected each shard once")
    ns = {s.split("/")[1] for s in shards}
    if len(ns) != 1:
        raise InputError(f"results come from scans split in different ways ({', '.join(sorted(shards))}); "
                         "expected shards I/N with one N")
    base = {k: v for k, v in keyed[0][2].inputs.items() if k not in SHARD_KEYS}
    for shard, src, r in keyed[1:]:
        other = {k: v for k, v in r.inputs.items() if k not in SHARD_KEYS}
        if other != base:
            diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            raise InputError(f"{src!r} is a scan of other inputs ({', '.join(diff)} differ); merge shards of one scan")
    agg = Aggregate()
    for _, _, r in keyed:
        agg.merge(Aggregate.from_result(r))
    first = keyed[0][2]
    n = int(ns.pop())
    summary = {k: v for k, v in first.summary.items() if k not in Aggregate().summary()}
    inputs = dict(base)
    if len(keyed) != n:
        inputs["shards_merged"] = sorted(shards)
    else:
        inputs["shards_merged"] = n
    return agg.result(summary=summary, inputs=inputs, environment=first.environment)
