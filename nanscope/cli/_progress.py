"""The CLI's progress listener (`nanscope.progress`): a live status on a terminal, one line per stage off it.

On a terminal (stderr is a TTY, NO_COLOR unset, TERM not dumb): a rich live status on stderr - a
spinner, the current stage, its elapsed time and the command's; for a count (`progress.advance`, as
`nanscope scan` reports samples) a bar with done/total, samples/s and the ETA. It is transient: erased
when the command ends and whenever the report is printed (a render hook on the report's console
pauses it; the next progress event draws it again), so the report reads as it does without it.

Off a terminal (CI logs, pipes) each stage and step that ends writes one line on stderr,
`nanscope: replayed the batch (3 images) in 4.2 s`, and a count writes `nanscope: scanning: 1200/5000
samples` at most every COUNT_EVERY seconds. `--quiet` turns all of it off. stdout is never written.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Iterator, TextIO

from rich.console import RenderHook

from nanscope import progress

COUNT_EVERY = 30.0  # seconds between count lines off a terminal: a long scan shows in a CI log, sparsely
REFRESH_PER_SECOND = 8  # the live status redraws this often (a spinner needs a few frames a second)


def wants_live(stream: TextIO) -> bool:
    """A live status only on a real terminal that allows it (NO_COLOR, TERM=dumb: plain lines)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:02.0f} s"


class _Stages(progress.Listener):
    """What both listeners track: the open stages (innermost last) and the current count."""

    def __init__(self) -> None:
        self.open: list[tuple[str, float]] = []  # (doing, start)
        self.count: tuple[int, int | None, str, float] | None = None  # (done, total, unit, first seen)
        self.t0 = self.last = time.perf_counter()  # the command's start; the last stage start or end
        self.idle = "starting"  # what the status says between stages

    def started(self, doing: str, depth: int) -> None:
        del self.open[depth:]
        self.last = time.perf_counter()
        self.open.append((doing, self.last))
        self.count = None

    def ended(self, doing: str, done: str, seconds: float, depth: int, ok: bool) -> None:
        del self.open[depth:]
        self.last = time.perf_counter()
        self.idle = "working"
        self.count = None

    def advanced(self, done: int, total: int | None, unit: str) -> None:
        first = self.count[3] if self.count is not None else time.perf_counter()
        self.count = (done, total, unit, first)

    def current(self, opened: list[tuple[str, float]] | None = None) -> str:
        return " > ".join(d for d, _ in (self.open if opened is None else opened)) or self.idle

    def rate_eta(self, count: tuple[int, int | None, str, float] | None) -> tuple[float | None, float | None]:
        """Units per second since the count began, and the seconds left at that rate."""
        if count is None:
            return None, None
        done, total, _, first = count
        elapsed = time.perf_counter() - first
        rate = done / elapsed if elapsed > 0 and done else None
        eta = (total - done) / rate if rate and total is not None else None
        return rate, eta


class PlainLines(_Stages):
    """Off a terminal: `nanscope: <done> in <seconds>` per finished stage, on stderr (looked up at each
    write, so a replaced sys.stderr - pytest's capture - gets them)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream
        self.last_count = 0.0

    def _write(self, line: str) -> None:
        out = self.stream or sys.stderr
        out.write(line + "\n")
        out.flush()

    def ended(self, doing: str, done: str, seconds: float, depth: int, ok: bool) -> None:
        super().ended(doing, done, seconds, depth, ok)
        if ok:
            self._write(f"nanscope: {done} in {_seconds(seconds)}")

    def advanced(self, done: int, total: int | None, unit: str) -> None:
        super().advanced(done, total, unit)
        now = time.perf_counter()
        if now - self.last_count < COUNT_EVERY:
            return
        if self.last_count:
            rate, eta = self.rate_eta(self.count)
            extra = (f" ({rate:,.0f} {unit}/s" + (f", {_seconds(eta)} left" if eta is not None else "") + ")"
                     if rate else "")
            self._write(f"nanscope: {self.current()}: {done}{f'/{total}' if total is not None else ''} {unit}{extra}")
        self.last_count = now


class LiveStatus(_Stages):
    """On a terminal: a transient rich live status on `stream` (stderr)."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.spinner import Spinner

        super().__init__()
        self.console = Console(file=stream, highlight=False)
        self.spinner = Spinner("dots", style="cyan")
        self.live: Any = None

    def show(self) -> None:
        """Draw the status now (starting it again after a pause)."""
        if self.live is None:
            from rich.live import Live

            self.live = Live(get_renderable=self._renderable, console=self.console, transient=True,
                             refresh_per_second=REFRESH_PER_SECOND, redirect_stdout=False, redirect_stderr=False)
            self.live.start()
        self.live.refresh()

    def _renderable(self) -> Any:
        return _FitToWidth(self._line)

    def _line(self, width: int) -> Any:
        """The status as one grid row no wider than `width` (see `fit_status`)."""
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        now = time.perf_counter()
        opened, count = list(self.open), self.count  # the refresh thread reads while the main thread writes
        stage_s = now - (opened[-1][1] if opened else self.last)
        elapsed = f"{_seconds(stage_s)} (total {_seconds(now - self.t0)})"
        stats: list[str] = []
        if count is not None:
            done, total, unit, _ = count
            rate, eta = self.rate_eta(count)
            stats.append(f"{done}{f'/{total}' if total is not None else ''} {unit}")
            stats.append(f"ETA {_seconds(eta)}" if eta is not None else "")
            stats.insert(1, f"{rate:,.0f} {unit}/s" if rate else "")
        name, bar, stats_text, shown_elapsed = fit_status(width, self.current(opened), [x for x in stats if x],
                                                          elapsed)
        grid = Table.grid(padding=(0, 1))
        cells: list[Any] = [self.spinner, Text(name, style="bold")]
        if count is not None and bar:
            cells.append(ProgressBar(total=count[1], completed=count[0], width=bar, pulse=count[1] is None))
        if stats_text:
            cells.append(Text(stats_text))
        if shown_elapsed:
            cells.append(Text(shown_elapsed, style="dim"))
        for _ in cells:
            grid.add_column(no_wrap=True)
        grid.add_row(*cells)
        return grid

    def started(self, doing: str, depth: int) -> None:
        super().started(doing, depth)
        self.show()

    def ended(self, doing: str, done: str, seconds: float, depth: int, ok: bool) -> None:
        super().ended(doing, done, seconds, depth, ok)
        if self.live is not None:
            self.live.refresh()

    def advanced(self, done: int, total: int | None, unit: str) -> None:
        super().advanced(done, total, unit)
        self.show()

    def pause(self) -> None:
        """Erase the status (the report is about to be printed); the next event draws it again."""
        if self.live is not None:
            live, self.live = self.live, None
            live.stop()


BAR_WIDTH, MIN_BAR, MIN_NAME = 24, 8, 12  # the count's bar, the narrowest bar worth drawing, the stage name's floor
SEP = " · "


class _FitToWidth:
    """A renderable made for the width it is drawn at (the terminal's, read at each refresh)."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def __rich_console__(self, console: Any, options: Any) -> Any:
        yield self.make(options.max_width)


def fit_status(width: int, name: str, stats: list[str], elapsed: str) -> tuple[str, int, str, str]:
    """(stage name, bar width or 0, stats text, elapsed text or "") that fit one line of `width` columns
    beside the spinner. `stats` = [done/total, rate, ETA] (rate and ETA when known): done/total and the
    ETA are always whole. What gives way, in order: the stage name down to MIN_NAME (outer stages first,
    then the end of the innermost, with an ellipsis), the elapsed time, the bar down to MIN_BAR then away, the rate, then the rest of the name."""
    def used(name: str, bar: int, text: str, el: str) -> int:  # spinner + a 1-column gap between cells
        return 1 + sum(len(c) + 1 for c in (name, " " * bar, text, el) if c)

    def short(n: int) -> str:  # the innermost stage first: outer stages give way, then its end
        parts = name.split(" > ")
        while len(parts) > 1 and len(" > ".join(parts)) > n:
            parts.pop(0)
        inner = " > ".join(parts)
        return inner if len(inner) <= n else (inner[: n - 1] + "\u2026" if n > 1 else "")

    room = width - 1  # a line that fills the last column wraps on some terminals
    text = SEP.join(stats)
    bar = BAR_WIDTH if stats else 0
    for el in (elapsed, ""):
        free = room - used("", bar, text, el) - 1
        if free >= min(MIN_NAME, len(name)):
            return short(free), bar, text, el
    bar = max(room - used("", 0, text, "") - 1 - MIN_NAME - 1, 0)
    bar = min(bar, BAR_WIDTH) if bar >= MIN_BAR else 0
    if len(stats) == 3 and used("", bar, text, "") > room:
        text = SEP.join((stats[0], stats[2]))  # the rate gives way before the ETA
    return short(room - used("", bar, text, "") - 1), bar, text, ""


class _PauseOnPrint(RenderHook):
    """A rich render hook for the report's console: pause the live status before anything is printed."""

    def __init__(self, status: LiveStatus) -> None:
        self.status = status

    def process_renderables(self, renderables: list[Any]) -> list[Any]:
        self.status.pause()
        return renderables


@contextlib.contextmanager
def reporting(console: Any, *, quiet: bool = False, stream: TextIO | None = None) -> Iterator[None]:
    """Show progress on `stream` (default: stderr) while the command runs; nothing with `quiet`."""
    if quiet:
        yield
        return
    stream = stream or sys.stderr
    if not wants_live(stream):
        with progress.listening(PlainLines(None if stream is sys.stderr else stream)):
            yield
        return
    status = LiveStatus(stream)
    console.push_render_hook(_PauseOnPrint(status))
    status.show()  # at once: importing torch and the model code takes seconds before the first stage
    try:
        with progress.listening(status):
            yield
    finally:
        console.pop_render_hook()
        status.pause()
