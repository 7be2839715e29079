"""Progress (nanscope.progress, nanscope.cli._progress): silent library, a live status on a terminal that
disappears, one line per stage off it, --quiet, and the report unchanged by all of it.

The expected stage order is written out here from the pipeline's documented steps (read the batch and
the checkpoint, build the model, load the weights, replay, analyze, write), not read from the code.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyte
import pytest
import torch
from torch import nn

from nanscope import progress
from nanscope.cli import main
from nanscope.result import Result

LINE = re.compile(r"^nanscope: (.+) in (\d+\.\d s|\d+ min \d\d s)$")
INSPECT_STAGES = ["read the batch", "read the checkpoint", "built the model", "loaded the weights",
                  "replayed the batch (3 images)", "ran the analyzers", "wrote the JSON result"]
LIVE_STAGES = ["reading the batch", "reading the checkpoint", "building the model", "loading the weights",
               "replaying the batch", "running the analyzers", "writing the JSON result"]
ROOT = Path(__file__).resolve().parents[1]


class Record(progress.Listener):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def started(self, doing: str, depth: int) -> None:
        self.events.append(("start", doing, depth))

    def ended(self, doing: str, done: str, seconds: float, depth: int, ok: bool) -> None:
        assert seconds >= 0
        self.events.append(("end", done, depth, ok))

    def advanced(self, done: int, total: int | None, unit: str) -> None:
        self.events.append(("count", done, total, unit))


# -- the library API -------------------------------------------------------------------------------

def test_without_a_listener_nothing_happens():
    with progress.stage("building the model") as st:
        st.done = "built the model"
        progress.step(1, 2, "training")
        progress.advance(3, 10)
    assert progress.finished() == [] and not progress.active()
    assert Result(kind="inspect").timings == []


def test_stages_nest_steps_end_at_the_next_event_and_failures_are_not_done():
    rec = Record()
    with progress.listening(rec):
        with progress.stage("replaying", "replayed") as st:
            progress.advance(5, 10, "samples")
            st.done = "replayed (2 images)"
        with progress.stage("checking"):
            progress.step(1, 2, "training")
            progress.step(2, 2, "training")
        progress.step(1, 3, "scanning")
        with pytest.raises(ValueError):
            with progress.stage("writing"):
                raise ValueError("disk full")
        progress.step(2, 3, "scanning")
        done = [t.done for t in progress.finished()]
    assert rec.events == [
        ("start", "replaying", 0), ("count", 5, 10, "samples"), ("end", "replayed (2 images)", 0, True),
        ("start", "checking", 0), ("start", "training: step 1/2", 1), ("end", "training: step 1/2", 1, True),
        ("start", "training: step 2/2", 1), ("end", "training: step 2/2", 1, True), ("end", "checking", 0, True),
        ("start", "scanning: step 1/3", 0), ("end", "scanning: step 1/3", 0, True),  # a stage beside it ends it
        ("start", "writing", 0), ("end", "writing", 0, False),
        ("start", "scanning: step 2/3", 0), ("end", "scanning: step 2/3", 0, True)]  # ended when listening ends
    assert done == ["replayed (2 images)", "training: step 1/2", "training: step 2/2", "checking",
                    "scanning: step 1/3"]
    assert progress.finished() == [] and not progress.active()  # the previous (no) listener is back


def test_a_result_keeps_the_durations_but_the_json_does_not():
    with progress.listening(progress.Listener()):
        with progress.stage("building the model", "built the model"):
            pass
        r = Result(kind="inspect")
    assert [t.done for t in r.timings] == ["built the model"]
    assert r.to_json() == Result(kind="inspect").to_json()


def test_nanscope_watch_never_reports_progress(tmp_path):
    import nanscope

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    rec = Record()
    with progress.listening(rec):
        with nanscope.watch(model, tmp_path, on_nonfinite="stop") as w:
            y = model(torch.randn(4, 8))
            assert w.check(0, {"loss": y.pow(2).mean()})
            assert not w.check(1, {"loss": y.pow(2).mean() * float("nan")})
    assert w.report.failed and (tmp_path / "step00000001-rank0" / "manifest.json").is_file()
    assert rec.events == []


# -- the CLI ---------------------------------------------------------------------------------------

def _inspect_args(demo_files, json_path: Path, *extra: str) -> list[str]:
    return ["inspect", str(demo_files.checkpoint), str(demo_files.batch), "--config", str(demo_files.config),
            "--criterion", "nanscope.criterion:NaiveCriterion", "--json", str(json_path), *extra]


@pytest.fixture(scope="module")
def quiet_run(demo_files, tmp_path_factory):
    """`inspect --quiet`: stdout, stderr and the JSON bytes, the reference every other run must match."""
    out = tmp_path_factory.mktemp("quiet") / "r.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "nanscope", *_inspect_args(demo_files, out, "--quiet")],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 1, r.stderr
    return r.stdout, r.stderr, out.read_bytes()


def test_quiet_prints_no_progress(quiet_run):
    _, err, _ = quiet_run
    assert err == ""


def test_off_a_terminal_one_line_per_stage_in_order(demo_files, quiet_run, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(_inspect_args(demo_files, out)) == 1
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert all(LINE.match(ln) for ln in lines), lines
    assert [LINE.match(ln).group(1) for ln in lines] == INSPECT_STAGES
    assert cap.out == quiet_run[0]  # the report on stdout is exactly the --quiet one
    assert out.read_bytes() == quiet_run[2]  # and so is the JSON


def _screen(raw: bytes, width: int = 100) -> list[str]:
    """What a terminal shows after `raw`: pyte emulates the cursor moves and erases rich sends."""
    screen = pyte.Screen(width, 40)
    stream = pyte.ByteStream(screen)
    stream.feed(raw)
    return [ln.rstrip() for ln in screen.display]


def test_on_a_terminal_a_live_status_that_is_gone_at_the_end(demo_files, quiet_run, tmp_path):
    out = tmp_path / "r.json"
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="100", LINES="40", TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "nanscope", *_inspect_args(demo_files, out)],
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    raw = b""
    while True:  # read the terminal until the process closes it
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            raw += chunk
        elif proc.poll() is not None:
            break
    stdout = proc.stdout.read().decode()
    assert proc.wait(timeout=60) == 1
    os.close(master)
    text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", raw).decode("utf-8", "replace")
    for name in LIVE_STAGES:  # each stage was on the status line while it ran
        assert name in text, (name, text[-2000:])
    assert "nanscope: " not in text  # no plain lines on a terminal
    assert all(ln == "" for ln in _screen(raw)), _screen(raw)  # erased: nothing is left on the terminal
    assert stdout == quiet_run[0]
    assert out.read_bytes() == quiet_run[2]


def test_no_color_on_a_terminal_gives_plain_lines(monkeypatch):
    from nanscope.cli._progress import wants_live

    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert wants_live(Tty())
    monkeypatch.setenv("TERM", "dumb")
    assert not wants_live(Tty())
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("NO_COLOR", "1")
    assert not wants_live(Tty())


def test_verify_fix_reports_each_check_and_training_step(demo_files, capsys):
    steps = 2
    code = main(["verify-fix", str(demo_files.checkpoint), str(demo_files.batch), "--config",
                 str(demo_files.config), "--steps", str(steps)])
    cap = capsys.readouterr()
    assert code == 0, cap.out
    names = [LINE.match(ln).group(1) for ln in cap.err.splitlines()]
    checks = [n for n in names if n.startswith("check ")]
    # each check once (check 10 reads the replayed outputs and runs before the training steps of check 8)
    assert sorted(int(n.split()[1]) for n in checks) == list(range(1, 11))
    # after trains for every step; before is already NaN at step 0 on the demo, so it is not trained
    trained = [n for n in names if n.startswith("training with ")]
    assert trained == [f"training with after (check 8): step {i}/{steps}" for i in range(1, steps + 1)]
    check8 = next(n for n in checks if n.startswith("check 8 "))
    assert names.index(trained[-1]) < names.index(check8)  # the steps come before check 8's verdict
    assert names[:5] == ["read the batch", "read the checkpoint", "built the model", "loaded the weights",
                         "replayed the batch (3 images)"]


def test_rich_report_ends_with_the_time_per_stage_then_the_verdict_plain_does_not():
    from io import StringIO

    from rich.console import Console

    from nanscope.report.html import render_html
    from nanscope.report.terminal import render

    r = Result(kind="inspect", timings=[progress.Timing("built the model", 4.25, 0),
                                        progress.Timing("training: step 1/2", 0.5, 1),
                                        progress.Timing("replayed the batch (3 images)", 1.5, 0)])
    buf = StringIO()
    render(r, Console(file=buf, force_terminal=True, width=80, color_system=None))
    words = buf.getvalue().split()  # rich wraps at 80 columns
    tail = ("time: 5.8 s in 2 stage(s); slowest: built the model 4.2 s, replayed the batch (3 images) 1.5 s "
            "nanscope inspect: CLEAN - no findings")  # the verdict is repeated last (a tall report scrolls)
    assert words[-len(tail.split()):] == tail.split()  # the outermost stages: the step is not one
    buf = StringIO()
    render(r, Console(file=buf, width=80))
    assert "time:" not in buf.getvalue()
    html = render_html(r)
    assert 'id="timings"' in html and "built the model</td>" in html and ">4.25<" in html


def test_counts_show_done_total_rate_and_eta(monkeypatch):
    """What `nanscope scan` gets from `progress.advance`: a bar with samples/s and ETA on a terminal,
    an occasional line off it (every COUNT_EVERY seconds; 0 here)."""
    import io

    from rich.console import Console

    from nanscope.cli import _progress

    monkeypatch.setattr(_progress, "COUNT_EVERY", 0.0)
    err = io.StringIO()
    with progress.listening(_progress.PlainLines(err)):
        with progress.stage("scanning the dataset", "scanned the dataset"):
            for done in (0, 2, 4):
                progress.advance(done, 8)
    lines = err.getvalue().splitlines()
    assert re.fullmatch(r"nanscope: scanning the dataset: 2/8 samples \(\d[\d,]* samples/s, .+ left\)", lines[0])
    assert lines[1].startswith("nanscope: scanning the dataset: 4/8 samples (")
    assert LINE.match(lines[2]).group(1) == "scanned the dataset" and len(lines) == 3

    status = _progress.LiveStatus(io.StringIO())
    status.started("scanning the dataset", 0)
    status.advanced(0, 8, "samples")
    status.advanced(2, 8, "samples")
    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None).print(status._renderable())
    shown = buf.getvalue()
    status.pause()
    assert "scanning the dataset" in shown and "2/8 samples" in shown and "samples/s" in shown and "ETA" in shown


@pytest.mark.parametrize("width", [100, 80, 60])
def test_the_live_count_line_keeps_its_eta_within_the_terminal_width(monkeypatch, width):
    """A long file name and a big count: the status is one line no wider than the terminal, and the
    numbers (done/total, the whole ETA, the rate where it fits) are on it; the stage name gives way first."""
    import io

    from rich.console import Console

    from nanscope.cli import _progress

    clock = [1000.0]
    monkeypatch.setattr(_progress.time, "perf_counter", lambda: clock[0])
    status = _progress.LiveStatus(io.StringIO())
    status.console = Console(file=io.StringIO(), width=width)
    status.started("reading coyo_0_snappy.parquet", 0)
    status.started("scanning grit-20m/coyo_0_snappy-annotations-with-noun-chunks.parquet", 1)
    status.advanced(0, 20_000_000, "samples")
    clock[0] += 40.0
    status.advanced(123_456, 20_000_000, "samples")
    rate = 123_456 / 40.0
    eta = (20_000_000 - 123_456) / rate
    expected_eta = f"ETA {int(eta // 60)} min {eta % 60:02.0f} s"
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(status._renderable())
    lines = buf.getvalue().rstrip("\n").split("\n")
    status.pause()
    assert len(lines) == 1 and len(lines[0]) <= width, lines
    assert "123456/20000000 samples" in lines[0] and expected_eta in lines[0], lines
    if width >= 80:  # at 60 columns the rate gives way before the ETA
        assert f"{rate:,.0f} samples/s" in lines[0] and "scanning" in lines[0], lines
