"""Progress of long work: library code marks its stages, and only an installed listener hears them.

    with progress.stage("building the model"):               # live status: 'building the model'
        model = build(...)
    with progress.stage("replaying the batch") as st:        # off a terminal, when it ends:
        record = replay.forward()                            # 'nanscope: replayed the batch (3 images) in 4.2 s'
        st.done = f"replayed the batch ({len(batch)} images)"
    progress.step(2, 5, "training with after")               # 'training with after: step 2/5'
    progress.advance(1200, 5000)                             # 1200 of 5000 samples done (a progress bar)

Without a listener every call does nothing (one context-variable read), so the library stays silent
and `nanscope.watch`, which marks nothing, never shows progress. The CLI installs a listener
(`nanscope.cli._progress`); a user can too, with `listening(listener)`. The listener lives in a
`contextvars.ContextVar`: threads and tasks started elsewhere do not report to it.

A step lasts until the next step, a stage opened beside it, or the end of the stage around it.
`finished()` lists the stages that ended, with their durations (reports show them; the JSON never
does, so it stays byte-identical across runs).
"""

from __future__ import annotations

import contextlib
import functools
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")


class Listener:
    """Receives progress events. Subclass it and override what you need; each default does nothing.

    `started` and `ended` come in nested (last started, first ended) order; depth 0 is outermost."""

    def started(self, doing: str, depth: int) -> None:
        """A stage or step began: `doing` is present tense ('building the model')."""

    def ended(self, doing: str, done: str, seconds: float, depth: int, ok: bool) -> None:
        """It ended after `seconds`; ok is False when an exception left it (then `done` did not happen)."""

    def advanced(self, done: int, total: int | None, unit: str) -> None:
        """`done` of `total` units (None: unknown) of the current stage are done."""


@dataclass
class Stage:
    """What `stage()` yields: set `done` inside the block to say what was done, with numbers."""

    doing: str
    done: str
    start: float = field(default_factory=time.perf_counter)
    step: "Stage | None" = None  # the step open inside this stage


@dataclass(frozen=True)
class Timing:
    """A finished stage or step: what was done, how long it took, how deep it was nested."""

    done: str
    seconds: float
    depth: int


class _Run:
    """The open stages of one listener (a stack) and the finished ones."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.root = Stage("", "")
        self.stack: list[Stage] = []
        self.finished: list[Timing] = []

    def _close_step(self) -> None:
        top = self.stack[-1] if self.stack else self.root
        if top.step is not None:
            step, top.step = top.step, None
            self._end_step(step, True)

    def _end_step(self, step: Stage, ok: bool) -> None:
        """A step has the depth a stage opened beside it would have: the size of the stack."""
        seconds = time.perf_counter() - step.start
        if ok:
            self.finished.append(Timing(step.done, seconds, len(self.stack)))
        self.listener.ended(step.doing, step.done, seconds, len(self.stack), ok)

    def open(self, st: Stage) -> None:
        self._close_step()  # a stage opened beside a step ends it
        self.listener.started(st.doing, len(self.stack))
        self.stack.append(st)

    def close(self, st: Stage, ok: bool) -> None:
        assert self.stack and self.stack[-1] is st, "progress stages must nest"
        if st.step is not None:
            step, st.step = st.step, None
            self._end_step(step, ok)
        self.stack.pop()
        seconds = time.perf_counter() - st.start
        if ok:
            self.finished.append(Timing(st.done, seconds, len(self.stack)))
        self.listener.ended(st.doing, st.done, seconds, len(self.stack), ok)

    def step(self, label: str) -> None:
        self._close_step()
        top = self.stack[-1] if self.stack else self.root
        top.step = Stage(label, label)
        self.listener.started(label, len(self.stack))


_current: ContextVar[_Run | None] = ContextVar("nanscope_progress", default=None)


@contextlib.contextmanager
def stage(doing: str, done: str | None = None) -> Iterator[Stage]:
    """Mark a stage: `doing` while it runs, `done` (default: `doing`; or set `.done`) when it ended."""
    st = Stage(doing, done or doing)
    run = _current.get()
    if run is None:
        yield st
        return
    run.open(st)
    ok = False
    try:
        yield st
        ok = True
    finally:
        run.close(st, ok)


def staged(doing: str, done: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: every call of the function is a stage."""

    def deco(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            with stage(doing, done):
                return fn(*args, **kwargs)

        return wrapper

    return deco


def step(i: int, n: int | None, what: str) -> None:
    """Step `i` (1-based) of `n` of `what`: `what: step i/n`. It ends at the next step or stage."""
    run = _current.get()
    if run is not None:
        run.step(f"{what}: step {i}/{n}" if n else f"{what}: step {i}")


def advance(done: int, total: int | None = None, unit: str = "samples") -> None:
    """`done` (so far, not an increment) of `total` units of the current stage are done.

    Its signature fits a `progress(done, total)` callback: pass `progress.advance` itself."""
    run = _current.get()
    if run is not None:
        run.listener.advanced(int(done), None if total is None else int(total), unit)


def finished() -> list[Timing]:
    """The stages and steps that ended so far under the current listener ([] without one)."""
    run = _current.get()
    return list(run.finished) if run is not None else []


def active() -> bool:
    """Whether a listener is installed (to skip work that only feeds progress)."""
    return _current.get() is not None


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[Listener]:
    """Install `listener` for the current context; on exit end what is still open and restore the previous one."""
    run = _Run(listener)
    token = _current.set(run)
    try:
        yield listener
    finally:
        run._close_step()
        _current.reset(token)
