"""One cause, once: which finding explains which, so a report leads with each cause and its fix.

One over-long caption gives four findings that all ask for the same fix: NS104 (the caption), NS102
(positives cut), NS103 (rows left empty) and NS203 (0/0 matching costs). `RULES` says, in this one
place for every analyzer, which code explains which, matched by location: with
`Rule("NS102", "NS103", same=("image", "box"))` an NS102 at image 2 box 1 explains an NS103 at image 2
box 1, not one at image 0. `group(findings)` links every finding to the finding that explains all of
its locations, follows the links to a root and returns one `Group` per root: the cause, then the
findings it explains. A finding no rule explains stands as its own cause; so does every code no rule
names, including codes added later, until a rule here names it.

A cause that explains an error is reported as an error (it is what makes the run broken), so the
verdict and the exit code stay what they were: exit 1 iff an error exists.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable, Sequence

from nanscope.findings import Finding, Severity, Where, sort_findings, worst_severity

# Location keys compared whenever both locations carry them: a rank's cause never explains another
# rank's symptom in a merged report, nor one step's another step's.
SCOPE = ("rank", "step")

When = Callable[[Finding, Where, Finding, Where], bool]  # (cause, its location, effect, its location)


@dataclass(frozen=True)
class Rule:
    """A finding with code `cause` explains one with code `effect` at each effect location that a
    cause location matches: equal on every key in `same` (both must have it) and on `SCOPE`, and
    `when(cause, cause location, effect, effect location)` holds. `same=()`: anywhere in the batch.
    When several findings could explain one, the one explaining most of its locations wins, then the
    rule naming more keys (location before a blanket rule), then the one ranked first."""

    cause: str
    effect: str
    same: tuple[str, ...]
    why: str  # how the cause produces the effect, for people reading the rules
    when: When | None = None


def _truncated(c: Finding, wc: Where, e: Finding, we: Where) -> bool:
    return we.get("why") == "truncated"


def _empty_row(c: Finding, wc: Where, e: Finding, we: Where) -> bool:
    return str(we.get("why", "")).startswith("empty positive row")


def _box_term(c: Finding, wc: Where, e: Finding, we: Where) -> bool:
    term = str(we.get("term", ""))
    return "bbox" in term or "giou" in term


def _padding_term(c: Finding, wc: Where, e: Finding, we: Where) -> bool:
    return we.get("term") in (c.data.get("terms") or ())


def _from_padding(c: Finding, wc: Where, e: Finding, we: Where) -> bool:
    """The trace's origin is made from the -inf that ContrastiveEmbed writes at padded text positions."""
    origins = e.data.get("origins") or []
    k = e.where.index(we) if we in e.where else -1
    origin = origins[k] if 0 <= k < len(origins) and isinstance(origins[k], dict) else {}
    return "ContrastiveEmbed" in str(origin.get("inf_from") or "")


def _from_finite_inputs(c: Finding, wc: Where, e: Finding, we: Where) -> bool:
    """No parameter or batch tensor entered the origin non-finite, and no -inf written on purpose (padding) made it."""
    origins = e.data.get("origins") or []
    k = e.where.index(we) if we in e.where else -1
    origin = origins[k] if 0 <= k < len(origins) and isinstance(origins[k], dict) else {}
    return not origin.get("source") and "ContrastiveEmbed" not in str(origin.get("inf_from") or "")


def _in_module(c: Finding, wc: Where, e: Finding, we: Where) -> bool:
    outer, inner = wc.get("module"), we.get("module")
    return isinstance(outer, str) and isinstance(inner, str) and (inner == outer or inner.startswith(outer + "."))


def _in_model(c: Finding, wc: Where, e: Finding, we: Where) -> bool:
    """An origin in the loss code (outside any module, or in a criterion module) comes after the boxes."""
    module = str(wc.get("module", ""))
    return module != "(loss code)" and not module.startswith("<outside>")


_SPREAD = ("NaN/inf spreads to every image of the batch: groundingdino's BiMultiHeadAttention subtracts the "
           "batch-wide max of its attention weights (a NaN pixel in image 1 makes image 0's boxes NaN)")

RULES: tuple[Rule, ...] = (
    # text and positive maps
    Rule("NS104", "NS102", ("image",), "the tokens past max_text_len are cut: their positives reach no logit",
         _truncated),
    Rule("NS102", "NS103", ("image", "box"), "a box whose positive tokens are all cut or masked has an empty row"),
    Rule("NS103", "NS203", ("image", "box"), "a row-normalizing matcher divides an empty row by its sum, 0 by 0",
         _empty_row),
    Rule("NS101", "NS001", (), "the term turns finite when only the padded positions are made finite",
         _padding_term),
    Rule("NS101", "NS301", (), "the loss's first NaN is made from the -inf written at padded positions",
         _from_padding),
    # boxes and matching
    Rule("NS201", "NS203", ("image", "box"), "an invalid target box makes its L1 and GIoU costs non-finite"),
    Rule("NS201", "NS001", (), "an invalid target box makes the box loss terms non-finite", _box_term),
    Rule("NS202", "NS203", ("image", "layer"), "a non-finite predicted box makes its costs non-finite"),
    Rule("NS202", "NS001", (), "non-finite predicted boxes make the box loss terms non-finite", _box_term),
    # non-finite inputs and weights: every activation downstream
    *(Rule("NS304", code, (), _SPREAD) for code in ("NS202", "NS203", "NS001", "NS302")),
    Rule("NS304", "NS301", (), "the first non-finite operation is where the pixels enter the model"),
    Rule("NS305", "NS301", (), "the first non-finite operation is in the module holding the weight", _in_module),
    *(Rule("NS310", code, (), "an image that is all padding has valid ratio 0, and the reference points divide by it")
      for code in ("NS301", "NS202", "NS203", "NS001", "NS302")),
    Rule("NS311", "NS301", (), "a finite value past sqrt(float max) overflows in the next square or product: the "
         "first non-finite operation is downstream of the exploded module", _from_finite_inputs),
    Rule("NS311", "NS303", (), "everything downstream of an exploded activation is far beyond the fp16 range"),
    *(Rule("NS305", code, (), "every forward through a non-finite weight is non-finite")
      for code in ("NS202", "NS203", "NS001", "NS302")),
    # the origin trace: the first non-finite operation explains what comes after it
    Rule("NS301", "NS202", (), "the boxes are computed after the first non-finite operation", _in_model),
    Rule("NS301", "NS203", (), "the costs are computed after the first non-finite operation", _in_model),
    Rule("NS301", "NS001", (), "the loss is computed after the first non-finite operation"),
    Rule("NS301", "NS302", (), "the backward of a non-finite forward is non-finite"),
)


@dataclass(frozen=True)
class Group:
    """A cause and the findings it explains (directly or through each other), in report order."""

    cause: Finding
    effects: tuple[Finding, ...] = ()

    @property
    def findings(self) -> tuple[Finding, ...]:
        return (self.cause, *self.effects)

    @property
    def severity(self) -> Severity:
        return self.cause.severity


@lru_cache(maxsize=1)
def _rules_by_effect() -> dict[str, tuple[Rule, ...]]:
    out: dict[str, list[Rule]] = {}
    for r in RULES:
        out.setdefault(r.effect, []).append(r)
    return {k: tuple(v) for k, v in out.items()}


def _matches(rule: Rule, cause: Finding, wc: Where, effect: Finding, we: Where) -> bool:
    if any(k in wc and k in we and wc[k] != we[k] for k in SCOPE):
        return False
    if any(k not in wc or k not in we or wc[k] != we[k] for k in rule.same):
        return False
    return rule.when is None or bool(rule.when(cause, wc, effect, we))


def _explained_by(cause: Finding, effect: Finding, rules: Iterable[Rule]) -> tuple[set[int], int]:
    """(indices of `effect.where` that `cause` explains, the most keys a rule that explained one names)."""
    got: set[int] = set()
    keys = -1
    for r in rules:
        if r.cause != cause.code or r.effect != effect.code:
            continue
        hit = {k for k, we in enumerate(effect.where or ({},))
               if any(_matches(r, cause, wc, effect, we) for wc in cause.where or ({},))}
        if hit:
            got |= hit
            keys = max(keys, len(r.same))
    return got, keys


def explained(cause: Finding, effect: Finding, rules: Iterable[Rule] = RULES) -> set[int]:
    """Indices of `effect.where` that `cause` explains (a finding without locations counts as one)."""
    return _explained_by(cause, effect, rules)[0]


Scope = dict[str, frozenset[Any]]


def _scope(f: Finding) -> Scope:
    """The SCOPE values (rank, step) of a finding whose every location carries them."""
    out = {}
    for k in SCOPE:
        if f.where and all(k in w for w in f.where):
            out[k] = frozenset(str(w[k]) for w in f.where)
    return out


def _apart(a: Scope, b: Scope) -> bool:
    """No location of one can match one of the other (a merged report: other ranks are skipped fast)."""
    return any(k in b and not (v & b[k]) for k, v in a.items())


def _explainer(fs: Sequence[Finding], j: int, scopes: Sequence[Scope]) -> int | None:
    """The finding that explains fs[j]: together the candidates must explain every location of it; the
    one explaining the most is its cause, then the one whose rule names more location keys, then the
    one ranked first."""
    rules = _rules_by_effect().get(fs[j].code, ())
    if not rules:
        return None
    codes = {r.cause for r in rules}
    best: tuple[int, int, int] | None = None  # (locations, keys, -position)
    covered: set[int] = set()
    for i, c in enumerate(fs):
        if i == j or c.code not in codes or _apart(scopes[i], scopes[j]):
            continue
        got, keys = _explained_by(c, fs[j], rules)
        covered |= got
        if got and (best is None or (len(got), keys, -i) > best):
            best = (len(got), keys, -i)
    return -best[2] if best is not None and len(covered) == max(len(fs[j].where), 1) else None


def _root(parent: Sequence[int | None], j: int) -> int:
    seen: list[int] = []
    while parent[j] is not None and j not in seen:  # RULES have no cycle (a test checks); guard anyway
        seen.append(j)
        j = parent[j]  # type: ignore[assignment]
    return j


def _raised(cause: Finding, effects: Sequence[Finding]) -> Finding:
    """The cause at the worst severity it explains: a warning that explains an error is an error."""
    worst = worst_severity(effects)
    if worst is None or worst.rank <= cause.severity.rank:
        return cause
    codes = list(dict.fromkeys(e.code for e in effects if e.severity is worst))
    article = "an" if worst.value[0] in "aeiou" else "a"
    return cause.with_severity(worst, f"Reported as {article} {worst.value}: it causes {', '.join(codes)}.")


def _order(f: Finding) -> tuple[Any, ...]:
    return (-f.severity.rank, f.order, -f.count, f.code)


def group(findings: Iterable[Finding]) -> list[Group]:
    """Findings grouped by cause: causes ordered errors first, then catalogue order (causes before
    symptoms), then larger counts; each cause's effects in that order too. Idempotent."""
    fs = sort_findings(findings)
    scopes = [_scope(f) for f in fs]
    parent = [_explainer(fs, j, scopes) for j in range(len(fs))]
    roots = [_root(parent, j) for j in range(len(fs))]
    groups = []
    for r in dict.fromkeys(roots):
        effects = [fs[j] for j in range(len(fs)) if roots[j] == r and j != r]
        groups.append(Group(_raised(fs[r], effects), tuple(effects)))
    return sorted(groups, key=lambda g: _order(g.cause))


def split_notes(groups: Sequence[Group]) -> tuple[list[Group], list[Group]]:
    """(causes, notes): a group whose cause is only `info` (after `_raised`, so nothing under it is worse)
    is a note about the run, never a cause with a fix to apply."""
    causes = [g for g in groups if g.severity is not Severity.INFO]
    return causes, [g for g in groups if g.severity is Severity.INFO]


def finding_ids(findings: Sequence[Finding]) -> list[str]:
    """Ids unique within one result: the code, or `CODE-n` (n-th in report order) when it repeats."""
    total = Counter(f.code for f in findings)
    seen: Counter[str] = Counter()
    out = []
    for f in findings:
        seen[f.code] += 1
        out.append(f.code if total[f.code] == 1 else f"{f.code}-{seen[f.code]}")
    return out


def linked_dicts(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """`Finding.to_dict()` of every finding in report order, with its `id` and its `cause` (the id of
    the cause it is listed under; None for a cause)."""
    ids = iter(finding_ids([f for g in groups for f in g.findings]))
    out = []
    for g in groups:
        cause_id = None
        for f in g.findings:
            d = f.to_dict()
            d["id"] = next(ids)
            d["cause"] = cause_id
            cause_id = cause_id or d["id"]
            out.append(d)
    return out


def explains_text(g: Group, limit: int = 6) -> str:
    """`NS102 x6, NS103 x2, NS203 x2`: what a cause explains, by code and count."""
    parts = [f"{f.code} x{f.count}" for f in g.effects[:limit]]
    if len(g.effects) > limit:
        parts.append(f"+{len(g.effects) - limit} more")
    return ", ".join(parts)

