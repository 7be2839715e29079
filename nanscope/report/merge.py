"""Several results, one summary: per-rank result JSONs or watch dumps -> one `Result` naming the origin rank.

`load_report(paths)` is what `nanscope report` renders: one result JSON is returned as it is (with
its sidecar artifacts); several are merged (`merge_results`); watch dumps (folders holding
`manifest.json`, the manifests themselves, or a dump_dir of `step*-rank*/` folders) are merged with
`nanscope.watch.ranks.merge_rank_dumps` into a `kind="watch"` result (`watch_result`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nanscope.errors import InputError
from nanscope.findings import Finding, Severity
from nanscope.result import Check, Result

PathLike = str | os.PathLike[str]


def _rank_of(result: Result, default: int) -> int:
    for source in (result.inputs, result.summary, result.environment):
        r = source.get("rank")
        if isinstance(r, int) and not isinstance(r, bool):
            return r
    return default


def merge_results(results: Sequence[tuple[str, Result]]) -> Result:
    """Merge per-rank results of one kind. Each finding's locations get the rank they came from (the
    result's inputs/summary "rank", else its position in `results`); the origin ranks are those with
    an error finding or a failed check. Artifacts come from the first origin rank."""
    if not results:
        raise InputError("no results given; expected at least one result JSON")
    kinds = sorted({r.kind for _, r in results})
    if len(kinds) > 1:
        raise InputError(f"cannot merge results of different kinds ({', '.join(kinds)}); pass results of one kind")
    if kinds == ["scan"]:  # shards of one dataset scan: one result, as if scanned in one run
        from nanscope.scan.aggregate import merge_scan_results

        return merge_scan_results(results)
    ranked = [(_rank_of(r, i), src, r) for i, (src, r) in enumerate(results)]
    seen: dict[int, str] = {}
    for rank, src, _ in ranked:
        if rank in seen:
            raise InputError(f"{src!r} and {seen[rank]!r} are both rank {rank}; expected one result per rank")
        seen[rank] = src
    ranked.sort(key=lambda t: t[0])
    findings: list[Finding] = []
    checks: list[Check] = []
    terms: list[dict[str, Any]] = []
    loss_terms: dict[str, Any] = {}
    ranks: dict[str, dict[str, Any]] = {}
    for rank, src, r in ranked:
        for f in r.findings:
            where = tuple({"rank": rank, **dict(w)} for w in f.where) or ({"rank": rank},)
            findings.append(Finding(f.code, f.severity, f.count, f"rank {rank}: {f.message}", where, f.hint,
                                    dict(f.data)))
        for c in r.checks:
            checks.append(Check(len(checks) + 1, f"rank {rank}: {c.name}", c.passed, c.detail,
                                {**dict(c.numbers), "rank": rank}))
        for row in r.tables.get("terms") or []:
            if isinstance(row, Mapping):
                terms.append({**dict(row), "rank": rank})
        for k, v in r.loss_terms.items():
            loss_terms[f"{k}@rank{rank}"] = v
        ranks[str(rank)] = {"source": src, "verdict": r.verdict, "errors": len(r.errors),
                            "failed_checks": len(r.failed_checks), "exit_code": r.exit_code}
    origin = [int(k) for k, v in ranks.items() if v["exit_code"]]
    for k in ranks:
        ranks[k]["origin"] = int(k) in origin
    first = next((r for rank, _, r in ranked if rank in origin), ranked[0][2])
    tables: dict[str, Any] = {"terms": terms} if terms else {}
    return Result(
        kind=kinds[0], findings=findings, checks=checks,
        summary={"merged_from": len(ranked), "origin_ranks": origin, "ranks": ranks},
        inputs={"sources": [src for _, src, _ in ranked]}, environment=dict(first.environment),
        loss_terms=loss_terms, tables=tables, artifacts=dict(first.artifacts),
    )


def _merge_dumps(paths: Sequence[PathLike]) -> dict[str, Any]:
    try:
        from nanscope.watch.ranks import merge_rank_dumps
    except ImportError:  # older layouts kept it in nanscope.watch
        from nanscope.watch.sentinel import merge_rank_dumps  # type: ignore[attr-defined,no-redef]
    return merge_rank_dumps([Path(p) for p in paths])


_REASON_CODE = {"scale_collapse": "NS307"}


def watch_result(merged: Mapping[str, Any]) -> Result:
    """A `merge_rank_dumps` summary as a result: one finding per origin rank, the ranks in `summary`."""
    step = merged.get("step")
    reason = merged.get("reason")
    ranks: Mapping[str, Any] = merged.get("ranks") or {}
    findings = []
    for r in merged.get("origin_ranks") or []:
        info = ranks.get(str(r), {})
        bad = list(info.get("nonfinite_terms") or [])
        code = _REASON_CODE.get(str(reason), "NS001")
        if reason == "nonfinite_grad" and not bad:
            bad = ["grad_norm"]
        replay = f"; replay it with `nanscope inspect {info['dump']}`" if info.get("dump") else ""
        what = ", ".join(bad) if bad else str(reason)
        findings.append(Finding(
            code, Severity.ERROR, count=max(len(bad), 1),
            message=f"rank {r} went bad first at step {step} ({reason}): {what}{replay}.",
            where=tuple({"rank": r, "step": step, "term": t} for t in bad) or ({"rank": r, "step": step},),
            data={"dump": info.get("dump"), "loss_terms": dict(info.get("loss_terms") or {})}))
    origin_terms: dict[str, Any] = {}
    for r in merged.get("origin_ranks") or []:
        origin_terms.update({f"{k}@rank{r}": v for k, v in (ranks.get(str(r), {}).get("loss_terms") or {}).items()})
    env: dict[str, Any] = {}
    replay = merged.get("replay")
    if replay and Path(replay, "manifest.json").is_file():
        m = json.loads(Path(replay, "manifest.json").read_text(encoding="utf-8"))
        env = {k: m.get(k) for k in ("torch", "device", "device_name") if m.get(k) is not None}
    summary = {k: v for k, v in merged.items() if k != "ranks"}
    summary["ranks"] = {k: {kk: vv for kk, vv in dict(v).items() if kk != "loss_terms"} for k, v in ranks.items()}
    return Result(kind="watch", findings=findings, summary=summary,
                  inputs={"dumps": sorted(str(v.get("dump")) for v in ranks.values())},
                  environment=env, loss_terms=origin_terms)


def _is_manifest(path: Path) -> bool:
    if path.is_dir():
        return (path / "manifest.json").is_file() or any(path.glob("*/manifest.json"))
    if path.name != "manifest.json":
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == "nanscope-watch-dump"
    except (OSError, ValueError, AttributeError):
        return False


def load_report(paths: Sequence[PathLike]) -> Result:
    """The result `nanscope report` renders for `paths` (see the module docstring)."""
    from nanscope.report.json_io import read_result

    if not paths:
        raise InputError("no input given; expected RESULT.json files or watch dump folders")
    ps = [Path(p) for p in paths]
    seen: dict[tuple[int, int], Path] = {}
    for p in ps:
        try:
            st = p.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            raise InputError(f"{str(p)!r} and {str(seen[(st.st_dev, st.st_ino)])!r} are the same file; give each "
                             "rank's result once")
        seen[(st.st_dev, st.st_ino)] = p
    dumps = [p for p in ps if _is_manifest(p)]
    if dumps and len(dumps) != len(ps):
        others = ", ".join(repr(str(p)) for p in ps if p not in dumps)
        raise InputError(f"watch dumps and result JSONs cannot be mixed ({others} are not dumps); "
                         "report them separately")
    if dumps:
        return watch_result(_merge_dumps(dumps))
    for p in ps:
        if p.is_dir():
            raise InputError(f"{str(p)!r} is a folder without manifest.json; expected a result JSON or a watch dump")
    results = [(str(p), read_result(p)) for p in ps]
    if len(results) == 1:
        return results[0][1]
    return merge_results(results)
