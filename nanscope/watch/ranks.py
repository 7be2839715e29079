"""Ranks under torch.distributed: agree on the first bad step, and merge per-rank dumps into one summary.

Each rank knows only its own local loss. At agreement points every rank sends one small vector
`[first bad step, kind]` through a single `all_gather`; all ranks then take the same decision, so
they stop at the same step and nobody waits in a collective that will never come.
The origin ranks are those whose local failure came first, losses ranking above gradients (a NaN
gradient is shared by every rank after the all-reduce, a NaN local loss is not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from nanscope.errors import InputError

NONE = -1  # "no bad step seen" in the agreement vector
# index = priority, lower first. "exception": the watched block raised after the model ran and before
# check() (a matcher refusing NaN costs); only written at exit, never agreed on, so it ranks last.
KINDS = ("nonfinite_loss", "nonfinite_grad", "scale_collapse", "exception")


@dataclass(frozen=True)
class RankContext:
    rank: int
    world_size: int
    group: Any  # a torch.distributed ProcessGroup, or None for the default group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_context(group: Any = None) -> RankContext:
    """Rank and world size of `group` (the default group), or rank 0 of 1 outside torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return RankContext(0, 1, None)
    return RankContext(dist.get_rank(group), dist.get_world_size(group), group)


@dataclass(frozen=True)
class Agreement:
    """What every rank saw: `per_rank[r] = (first bad step or None, kind or None)`."""

    per_rank: tuple[tuple[int | None, str | None], ...]

    @property
    def step(self) -> int | None:
        steps = [s for s, _ in self.per_rank if s is not None]
        return min(steps) if steps else None

    @property
    def origin_ranks(self) -> tuple[int, ...]:
        step = self.step
        if step is None:
            return ()
        first = [(r, k) for r, (s, k) in enumerate(self.per_rank) if s == step]
        best = min(KINDS.index(k) for _, k in first if k is not None)
        return tuple(r for r, k in first if k is not None and KINDS.index(k) == best)

    @property
    def kind(self) -> str | None:
        origin = self.origin_ranks
        return self.per_rank[origin[0]][1] if origin else None


def _encode(step: int | None, kind: str | None) -> list[int]:
    return [NONE if step is None else int(step), NONE if kind is None else KINDS.index(kind)]


def backend_device(ctx: RankContext) -> torch.device:
    """Where the group's collectives take their tensors: the current CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend(ctx.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(ctx: RankContext, step: int | None, kind: str | None) -> Agreement:
    """One `all_gather` of `[step, kind]` (on the backend's device); local only when not distributed."""
    if not ctx.distributed:
        return Agreement(((step, kind),))
    import torch.distributed as dist

    mine = torch.tensor(_encode(step, kind), dtype=torch.int64, device=backend_device(ctx))
    out = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(out, mine, group=ctx.group)
    vals = torch.stack(out).tolist()  # the one host read, at a point the loop chose
    return Agreement(tuple((None if s == NONE else int(s), None if k == NONE else KINDS[k]) for s, k in vals))


# ---------------------------------------------------------------- merging dumps

MAX_WORLD_SIZE = 65_536  # a manifest claiming more ranks is refused: the merge holds one row per rank


def _int_field(m: dict[str, Any], key: str, where: str, *, minimum: int = 0, optional: bool = False) -> None:
    v = m.get(key)
    if v is None and optional:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise InputError(f"{where} field {key!r} is {v!r}; expected an integer >= {minimum}")


def validate_manifest(m: Any, where: str) -> dict[str, Any]:
    """Check the fields nanscope reads from a watch dump's manifest.json; raise InputError naming the
    file and the field. `where`: the manifest's path, for messages."""
    if not isinstance(m, dict):
        raise InputError(f"{where} holds a JSON {type(m).__name__}; expected an object (a nanscope.watch manifest)")
    _int_field(m, "step", where)
    _int_field(m, "rank", where)
    _int_field(m, "world_size", where, minimum=1, optional=True)
    _int_field(m, "local_first_bad_step", where, optional=True)
    world = m.get("world_size") or 1
    if world > MAX_WORLD_SIZE:
        raise InputError(f"{where} field 'world_size' is {world}; nanscope merges at most {MAX_WORLD_SIZE} ranks")
    if m["rank"] >= max(world, 1) and "world_size" in m:
        raise InputError(f"{where} field 'rank' is {m['rank']}, not below its world_size {world}; expected "
                         "0 <= rank < world_size")
    if m["rank"] >= MAX_WORLD_SIZE:
        raise InputError(f"{where} field 'rank' is {m['rank']}; nanscope merges at most {MAX_WORLD_SIZE} ranks")
    kind = m.get("local_kind")
    if kind is not None and kind not in KINDS:
        raise InputError(f"{where} field 'local_kind' is {kind!r}; expected one of {', '.join(KINDS)} or null")
    for key, typ, name in (("amp", dict, "an object"), ("files", dict, "an object"), ("loss_terms", dict, "an object"),
                           ("stack", dict, "an object"), ("nonfinite_terms", list, "a list"),
                           ("origin_ranks", list, "a list"), ("config", str, "a string"),
                           ("text_encoder", str, "a string"), ("reason", str, "a string")):
        if m.get(key) is not None and not isinstance(m[key], typ):
            raise InputError(f"{where} field {key!r} is a JSON {type(m[key]).__name__}; expected {name}")
    origin = m.get("origin_ranks") or []
    if not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < max(world, m["rank"] + 1) for r in origin):
        raise InputError(f"{where} field 'origin_ranks' is {str(origin)[:80]}; expected ranks below world_size {world}")
    amp = m.get("amp") or {}
    if amp.get("autocast") is not None and not isinstance(amp["autocast"], dict):
        raise InputError(f"{where} field 'amp.autocast' is a JSON {type(amp['autocast']).__name__}; expected an object")
    _int_field(amp, "overflow_skips", f"{where} field 'amp':", optional=True)
    return m


def _ranges(ranks: Sequence[int], limit: int = 8) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (the first `limit` runs, then a count)."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    text = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs[:limit])
    return text + (f" and {len(runs) - limit} more run(s)" if len(runs) > limit else "")


def _manifest_paths(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            out.append(p)
        elif (p / "manifest.json").is_file():
            out.append(p / "manifest.json")
        elif p.is_dir():
            found = sorted(p.glob("*/manifest.json"))
            if not found:
                raise InputError(f"{str(p)!r} holds no watch dumps; expected DUMP/manifest.json or DIR/*/manifest.json")
            out.extend(found)
        else:
            raise InputError(f"{str(p)!r} does not exist; expected a watch dump folder or its manifest.json")
    return out


def merge_rank_dumps(paths: Sequence[str | Path] | str | Path) -> dict[str, Any]:
    """Merge per-rank watch dumps into one summary that names the origin rank(s).

    `paths`: dump folders, their manifest.json files, or a dump_dir holding `step*-rank*/` folders.
    Returns a JSON-able dict: step, reason, origin_ranks, world_size, replay (the origin's dump folder),
    ranks (per-rank step, reason, non-finite terms, loss terms, dump folder, origin flag), overflow_skips,
    and problems (manifests that disagree, missing ranks, dumps of other steps).
    """
    from nanscope.watch.snapshot import read_manifest

    if isinstance(paths, (str, Path)):
        paths = [paths]
    manifests = [validate_manifest(read_manifest(p.parent), repr(str(p))) for p in _manifest_paths(paths)]
    if not manifests:
        raise InputError("no watch dumps given; expected at least one dump folder")
    step = min(int(m["step"]) for m in manifests)
    problems: list[str] = []
    later = sorted({int(m["step"]) for m in manifests if int(m["step"]) != step})
    if later:
        problems.append(f"dumps of later steps {later} were left out; the first bad step is {step}")
    event = sorted((m for m in manifests if int(m["step"]) == step), key=lambda m: int(m["rank"]))
    by_rank: dict[int, dict[str, Any]] = {}
    for m in event:
        r = int(m["rank"])
        if r in by_rank:
            problems.append(f"rank {r} has two dumps of step {step}: {by_rank[r]['dump']} and {m['_path']}")
            continue
        by_rank[r] = {
            "dump": m["_path"], "origin": bool(m.get("origin")), "reason": m.get("reason"),
            "local_first_bad_step": m.get("local_first_bad_step"), "local_kind": m.get("local_kind"),
            "nonfinite_terms": list(m.get("nonfinite_terms", [])), "loss_terms": m.get("loss_terms", {}),
            "overflow_skips": int(m.get("amp", {}).get("overflow_skips", 0) or 0),
            "has_checkpoint": bool(m.get("files", {}).get("checkpoint")),
        }
    world = max([int(m.get("world_size", 1)) for m in event] + [max(by_rank) + 1])
    # Recompute the origin from what each rank saw itself; cross-check with what the ranks wrote.
    seen = tuple((by_rank[r]["local_first_bad_step"], by_rank[r]["local_kind"]) if r in by_rank else (None, None)
                 for r in range(world))
    origin = Agreement(seen).origin_ranks
    declared = sorted({int(r) for m in event for r in m.get("origin_ranks", [])})
    if not origin:
        origin = tuple(declared)
    elif declared and tuple(declared) != origin:
        problems.append(f"manifests name origin ranks {declared}, the local steps give {list(origin)}")
    missing = [r for r in range(world) if r not in by_rank]
    if missing:
        problems.append(f"no dump from rank(s) {_ranges(missing)} of {world}")
    replay = next((by_rank[r]["dump"] for r in origin if r in by_rank and by_rank[r]["has_checkpoint"]), None)
    reason = next((by_rank[r]["reason"] for r in origin if r in by_rank), event[0].get("reason"))
    return {
        "step": step,
        "reason": reason,
        "origin_ranks": list(origin),
        "world_size": world,
        "replay": replay,
        "ranks": {str(r): by_rank[r] for r in sorted(by_rank)},
        "overflow_skips": {str(r): by_rank[r]["overflow_skips"] for r in sorted(by_rank)},
        "problems": problems,
    }
