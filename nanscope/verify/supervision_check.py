"""Check 10 of verify-fix: the fix supervises what it should (it introduces no NS401, NS402 or NS403).

A fix that trades the NaN for a loss over matched queries only, for targets without token labels, or
for a matcher that hides non-finite costs, is not a fix: the loss is finite and trains the wrong thing.
The measurements are `nanscope.replay.supervision`'s, on the replayed outputs (the model is not re-run).

Only what after *introduces* fails the check. after is compared with before on the same batch:
- a finding before has too (the same code; for NS403 the same image and box) is a note: the fix did not
  cause it (Open-GroundingDino's matcher sets NaN costs to 0 before and after a criterion fix);
- an NS403 box whose positive-map row is empty because of the data (NS103: its phrase is cut past
  max_text_len, NS104, or is not in the caption), and which after's matcher gives the same query as
  nanscope's guarded matcher, is the data's bug, named with its cause, not the fix's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

from nanscope import progress
from nanscope.result import Check

SUPERVISION_ERRORS = ("NS401", "NS402", "NS403")  # a fix that introduces one of these is not fixed


def _findings(probe: Any, batch: Any, texts: Sequence[Any]) -> list[Any]:
    from nanscope.analyzers import get
    from nanscope.analyzers.context import AnalysisContext

    ctx = AnalysisContext(batch=batch, texts=list(texts), supervision=probe)
    return [f for code in SUPERVISION_ERRORS for f in get(code).fn(ctx)]


def _probe(crit: Any, name: str, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]],
           texts: Sequence[Any], extras: Mapping[str, Any] | None) -> Any:
    from nanscope.replay.diagnose import probe_criterion

    return probe_criterion(crit, name, dict(outputs), list(targets), list(texts), dict(extras or {}))


def data_cause(texts: Sequence[Any], image: int, box: int) -> str:
    """Why box `box` of image `image` has an empty positive-map row, in findings' words."""
    info = texts[image]
    b = info.boxes[box] if box < len(info.boxes) else None
    if b is not None and b.cut:
        return (f"NS103 empty positive map row, caused by NS104: the caption has {info.num_tokens} tokens and the "
                f"phrase {b.phrase!r} lies past max_text_len={info.max_text_len}")
    if b is not None and not b.found:
        return f"NS103 empty positive map row: the phrase {b.phrase!r} does not occur in the caption"
    return "NS103 empty positive map row"


@progress.staged("check 10 (after supervises what it should)")
def check_supervision(crit: Any, name: str, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]],
                      batch: Any, texts: Sequence[Any], *, finite: bool,
                      extras: Mapping[str, Any] | None = None, before: tuple[Any, str] | None = None) -> Check:
    """PASS when after introduces no NS401/NS402/NS403: its classification terms reach the unmatched queries,
    learn the positives, and its matcher does not match a box with an undefined cost to an arbitrary query
    that before's did not (`before`: (criterion, name), probed only when after has a finding)."""
    title = "after supervises what it should"
    if not finite:
        return Check(10, title, True, "not measured: after is non-finite on this batch (check 2 fails)",
                     {"measured": False})
    probe = _probe(crit, name, outputs, targets, texts, extras)
    coverage = {g.term: round(g.share, 4) for g in probe.gradients}
    found = _findings(probe, batch, texts)
    notes: list[str] = []
    if found:
        before_codes: set[str] = set()
        before_hidden: set[tuple[int, int, str]] = set()
        if before is not None:
            try:
                bprobe = _probe(before[0], before[1], outputs, targets, texts, extras)
                before_codes = {f.code for f in _findings(bprobe, batch, texts)}
                before_hidden = {(h.image, h.box, h.why) for h in bprobe.hidden_matches}
            except Exception as exc:  # before cannot be probed: nothing is known to be shared
                notes.append(f"before could not be probed ({type(exc).__name__}), so nothing is counted as shared")
        kept = []
        for h in probe.hidden_matches:
            if (h.image, h.box, h.why) in before_hidden:
                notes.append(f"NS403 image {h.image} box {h.box} ({h.why}) -> query {h.query}: before's matcher does "
                             "the same, so the fix did not introduce it"
                             + (f"; the row is empty because of the data: {data_cause(texts, h.image, h.box)}"
                                if h.why.startswith("empty") else ""))
            elif h.why.startswith("empty") and h.guarded_query == h.query:
                notes.append(f"NS403 image {h.image} box {h.box} -> query {h.query}, the query nanscope's guarded "
                             f"matcher picks too: not a failure of the fix; the data's bug is "
                             f"{data_cause(texts, h.image, h.box)}")
            else:
                kept.append(h)
        others = [f for f in found if f.code != "NS403"]
        for f in others:
            if f.code in before_codes:
                notes.append(f"{f.code} {f.message} (before has it too: not introduced by the fix)")
        found = [f for f in others if f.code not in before_codes]
        if kept:
            found += [f for f in _findings(replace(probe, gradients=[], hidden_matches=kept), batch, texts)
                      if f.code == "NS403"]
    numbers = {"measured": True, "codes": [f.code for f in found], "coverage": coverage, "notes": notes}
    note = f"; notes: {'; '.join(notes)}" if notes else ""
    if found:
        return Check(10, title, False, "; ".join(f"{f.code} {f.message}" for f in found) + note, numbers)
    terms = ", ".join(f"{k} reaches {100 * v:.0f}% of query rows" for k, v in list(coverage.items())[:3])
    return Check(10, title, True, f"no NS401/NS402/NS403 introduced: {terms or 'no classification term'}{note}",
                 numbers)
