"""`nanscope scan --engine ray`: the units of `nanscope.scan.units` scanned by Ray actors, on this machine
(`ray.init()`, the default) or on a cluster (`address`), one code path from a laptop to many nodes.

Each actor receives the prepared `State` once (the Rust tokenizer, the caption rules, the label map) and
scans one unit at a time with the same chunk code as a single process (`engine.process_chunk`), returning
the unit's `Aggregate`; the driver merges them (the merge is order-independent: samples sort by their
dataset index, the worst examples by score and index), so the result is the single-process result. A unit
that fails (a truncated shard: its `DataError`; a worker that dies: Ray's actor error) is listed with the
reason in `failed`; the actor is replaced and the other units go on. Ray Data's own readers are not used:
they do not keep line numbers, and the units already read JSONL, tar and parquet without conversion.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nanscope.scan.aggregate import Aggregate
from nanscope.scan.dataset import CHUNK, Dataset
from nanscope.scan.engine import State, process_chunk, quiet_gc
from nanscope.scan.units import UNIT_BYTES, Unit, iter_unit, plan


@dataclass
class UnitResult:
    unit: Unit
    aggregate: Aggregate
    kept: list[Any] = field(default_factory=list)
    changes: int | None = None  # --write-clean: changes written to this unit's part


@dataclass
class RayOutcome:
    aggregate: Aggregate
    kept: list[Any]
    failed: list[tuple[str, str]]  # (unit label, why)
    parts: list[tuple[str, str, int]]  # --write-clean: (unit label, part file, changes)


def scan_unit(ds: Dataset, state: State, unit: Unit, clean_dir: str | None = None) -> UnitResult:
    """One unit, in chunks of `CHUNK` samples (what an actor runs; also callable in-process)."""
    agg, kept = Aggregate(), []
    writer = None
    if clean_dir is not None:
        from nanscope.scan.clean import CleanWriter

        writer = CleanWriter(ds, state, os.path.join(clean_dir, part_name(ds, unit)))
    try:
        with quiet_gc():
            chunk: list[Any] = []
            for item in iter_unit(ds, unit):
                chunk.append(item)
                if len(chunk) >= CHUNK:
                    _one(state, chunk, agg, kept, writer)
                    chunk = []
            if chunk:
                _one(state, chunk, agg, kept, writer)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    changes = len(writer.finish()) if writer is not None else None
    return UnitResult(unit, agg, kept, changes)


def _one(state: State, chunk: list[Any], agg: Aggregate, kept: list[Any], writer: Any) -> None:
    out = process_chunk(state, chunk)
    agg.add(out)
    kept.extend(out.kept)
    if writer is not None:
        writer.on_chunk(chunk, out)


def part_name(ds: Dataset, unit: Unit) -> str:
    suffix = Path(ds.path).suffix or ".jsonl"
    return f"part-{unit.number:05d}{suffix}"


class _Scanner:
    """A Ray actor: the dataset description and the State arrive once; units arrive one at a time."""

    def __init__(self, ds: Dataset, state: State) -> None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the actors are the parallelism
        self.ds, self.state = ds, state

    def scan(self, unit: Unit, clean_dir: str | None) -> UnitResult:
        return scan_unit(self.ds, self.state, unit, clean_dir)

    def pid(self) -> int:
        return os.getpid()


def run_ray(ds: Dataset, state: State, *, workers: int | None = None, address: str | None = None,
            unit_bytes: int = UNIT_BYTES, clean_dir: str | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> RayOutcome:
    """Scan every unit with `workers` actors (default: the cluster's CPUs)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from nanscope.errors import InputError, NanscopeError

    started = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(f"--address {address!r}: no Ray cluster could be joined ({exc})") from None
        started = True
    try:
        n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        units = plan(ds, unit_bytes=unit_bytes)
        actor_cls = ray.remote(num_cpus=1, max_restarts=0)(_Scanner)
        ds_ref, state_ref = ray.put(ds), ray.put(state)  # once, through the object store
        actors = [actor_cls.remote(ds_ref, state_ref) for _ in range(min(n, max(len(units), 1)))]
        queue = list(reversed(units))
        inflight: dict[Any, tuple[Unit, Any]] = {}
        results: dict[int, UnitResult] = {}
        failed: list[tuple[Unit, str]] = []
        done = 0
        total = sum(u.samples for u in units)

        def submit(actor: Any) -> None:
            if queue:
                u = queue.pop()
                inflight[actor.scan.remote(u, clean_dir)] = (u, actor)

        for a in actors:
            submit(a)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            unit, actor = inflight.pop(ready[0])
            try:
                res: UnitResult = ray.get(ready[0])
                results[unit.number] = res
                done += res.aggregate.stats.samples
            except RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                why = str(cause) if isinstance(cause, NanscopeError) else f"{type(cause or exc).__name__}: {cause or exc}"
                failed.append((unit, why.splitlines()[0] if why else type(exc).__name__))
            except RayActorError as exc:
                failed.append((unit, f"the worker scanning it died ({type(exc).__name__})"))
                ray.kill(actor, no_restart=True)
                actor = actor_cls.remote(ds_ref, state_ref)
            if progress is not None:
                progress(done, total)
            submit(actor)
    finally:
        if started:
            ray.shutdown()
    agg, kept = Aggregate(), []
    for k in sorted(results):
        agg.merge(results[k].aggregate)
        kept.extend(results[k].kept)
    parts = [(results[k].unit.label, part_name(ds, results[k].unit), results[k].changes or 0)
             for k in sorted(results)] if clean_dir is not None else []
    return RayOutcome(agg, kept, [(u.label, why) for u, why in sorted(failed, key=lambda t: t[0].number)], parts)

