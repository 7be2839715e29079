"""Outputs that never replace an input and are never left half-written.

`guard_outputs(outputs, inputs)` compares every output path with every input file, and every file
inside an input folder, by identity (device and inode), so a hard link, a symlink or a second
spelling of an input is refused as well as the same path; the identities stay registered, and every
temporary file is checked against them again once open (its own device and inode, not its path).

`AtomicFile` is the one writer behind every output (reports, the JSON and its sidecar, scan's
`--write-clean` and its change list, `--batch-out`): a temporary file with a random name in the
output's folder, created with `O_CREAT | O_EXCL | O_NOFOLLOW` (a planted file or symlink is never
opened), renamed into place with `os.replace` when complete. A full disk, a file-size limit, SIGINT
or SIGTERM leave the previous file (or nothing) at the path, never a truncated one, and no
temporary file: while one is open, SIGTERM removes the temporaries and exits 143 (SIGINT: 130).
Outputs are regular files: `-`, `/dev/...`, `/proc/...`, devices, pipes and folders are refused.
`write_pair` commits a JSON and its sidecar as one unit under a lock on their folder, so two runs
writing the same path end with one run's pair, not a mix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import signal
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from nanscope.errors import OutputError

PathLike = str | os.PathLike[str]
MAX_FOLDER_FILES = 20_000  # a folder with more files (`/`, a dataset's images): existing files in it by path instead
TMP_PREFIX = ".nanscope-tmp-"  # temporary files, removed on every exit nanscope can catch
SPECIAL_ROOTS = ("/dev", "/proc", "/sys")  # never a place for an output: devices, links to descriptors
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

_INPUTS: dict[tuple[int, int], str] = {}  # identities of the inputs guard_outputs saw (this process)
_LIVE: set[Path] = set()  # temporary files open now: removed on SIGTERM
_LOCK = threading.Lock()
_OWNER = [0]  # the process that installed the handler (forked children inherit it, not the temporaries)
_PREVIOUS_TERM: object = None  # the SIGTERM handler before the first temporary file was opened


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _walk(folder: Path) -> list[Path] | None:
    """Every file under `folder` (symlinks followed for files, not for folders); None when too many."""
    out: list[Path] = []
    for root, _, files in os.walk(folder, onerror=lambda e: None):
        out.extend(Path(root, f) for f in files)
        if len(out) > MAX_FOLDER_FILES:
            return None
    return out


def input_identities(inputs: Iterable[PathLike | None]) -> tuple[dict[tuple[int, int], str], list[Path]]:
    """(identity -> the input it belongs to, folders too large to list: compared by resolved path)."""
    ids: dict[tuple[int, int], str] = {}
    big: list[Path] = []
    for raw in inputs:
        if not raw:
            continue
        p = Path(raw)
        ident = _identity(p)
        if ident is None:
            continue
        if p.is_dir():
            files = _walk(p)
            if files is None:
                big.append(p.resolve())
                continue
            for f in files:
                fid = _identity(f)
                if fid is not None:
                    ids.setdefault(fid, f"{f} (inside input folder {str(p)!r})")
        else:
            ids.setdefault(ident, str(p))
    return ids, big


def protect_inputs(inputs: Iterable[PathLike | None]) -> None:
    """Register input files: every temporary file opened afterwards in this process is checked against them."""
    ids, _ = input_identities(inputs)
    _INPUTS.update(ids)


def check_target(name: str, path: PathLike) -> None:
    """Raise OutputError unless `path` can be an output: a regular file (or nothing yet) outside /dev,
    /proc and /sys. `-` and `/dev/stdout` are refused: nanscope writes files (a JSON has a sidecar)."""
    s = os.fspath(path)
    if s == "-" or s.startswith("/dev/std") or s.startswith("/dev/fd/"):
        raise OutputError(f"{name} {s!r} names the standard output; nanscope writes its outputs to files (the JSON "
                          "has a sidecar beside it): give a file path, e.g. result.json, and `cat` it")
    for p in {os.path.abspath(s), os.path.realpath(s)}:
        for root in SPECIAL_ROOTS:
            if p == root or p.startswith(root + "/"):
                raise OutputError(f"{name} {s!r} is under {root} (devices and kernel files, here {p!r}); "
                                  "expected a regular file in a folder you can write")
    try:
        st = os.stat(s)
    except (OSError, ValueError):
        return
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{name} {s!r} is a folder; expected a file path")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{name} {s!r} is not a regular file (a device, a pipe or a socket); expected a file path")


def guard_outputs(outputs: Sequence[tuple[str, PathLike | None]], inputs: Iterable[PathLike | None]) -> None:
    """Raise OutputError when an output would replace an input file (same device and inode, a file
    inside an input folder, or a second output), or is not a regular file (`check_target`).
    `outputs`: (option name, path) pairs, sidecars included. The inputs stay registered (`protect_inputs`)."""
    ids, big = input_identities(inputs)
    _INPUTS.update(ids)
    seen: dict[str, str] = {}
    for name, raw in outputs:
        if not raw:
            continue
        check_target(name, raw)
        p = Path(raw)
        ident = _identity(p)
        if ident is not None and ident in ids:
            raise OutputError(f"{name} {str(p)!r} is one of the input files ({ids[ident]!r}, same device and "
                              "inode); nanscope never overwrites its inputs: choose another output path")
        resolved = str(p.resolve())
        for folder in big:
            if ident is not None and resolved.startswith(str(folder).rstrip("/") + "/"):
                raise OutputError(f"{name} {str(p)!r} is a file inside the input folder {str(folder)!r}; "
                                  "nanscope never overwrites its inputs: choose another output path")
        if resolved in seen:
            raise OutputError(f"{name} {str(p)!r} is also the path of {seen[resolved]}; give each output its own path")
        seen[resolved] = name


def _on_term(signum: int, frame: object) -> None:
    """SIGTERM while temporary files are open: remove them, then exit 143 (finally blocks still run).
    A forked child (a scan worker ended by its pool) owns none of them: it dies by SIGTERM as before."""
    if os.getpid() != _OWNER[0]:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    for tmp in list(_LIVE):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    raise SystemExit(128 + signum)


def _track(tmp: Path) -> None:
    global _PREVIOUS_TERM
    with _LOCK:
        if not _LIVE and threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            _OWNER[0] = os.getpid()
            _PREVIOUS_TERM = signal.signal(signal.SIGTERM, _on_term)
        _LIVE.add(tmp)


def _untrack(tmp: Path) -> None:
    global _PREVIOUS_TERM
    with _LOCK:
        _LIVE.discard(tmp)
        if not _LIVE and _PREVIOUS_TERM is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _PREVIOUS_TERM)  # type: ignore[arg-type]
            _PREVIOUS_TERM = None


def _pause_hook(path: Path) -> None:
    """Test-only: with NANSCOPE_TEST_PAUSE_WRITE=SECONDS, sleep after the temporary file is half
    written (so a test can signal the process mid-write). Unset in normal use."""
    delay = os.environ.get("NANSCOPE_TEST_PAUSE_WRITE")
    if delay:
        import sys
        import time

        print(f"nanscope-test: writing {path}", file=sys.stderr, flush=True)
        time.sleep(float(delay))


def output_error(name: str, path: PathLike, exc: OSError) -> OutputError:
    """`exc` (a failed write of `path`) as an OutputError that names the output and, for a full disk, says so."""
    if exc.errno == errno.ENOSPC:
        what = "no space left on device"
    elif exc.errno == errno.EDQUOT:
        what = "no space left: disk quota exceeded"
    elif exc.errno == errno.EFBIG:
        what = f"{exc.strerror or 'File too large'} (the file-size limit, ulimit -f)"
    else:
        what = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        what += "; nothing was written there (the previous file, if any, is unchanged)"
    return OutputError(f"{name} {os.fspath(path)!r} cannot be written: {what}")


class AtomicFile:
    """A binary file that becomes `path` on `commit()` and leaves no trace on `abort()`.

    Use as a context manager (commit on success, abort on any exception) or call the two yourself.
    Write errors (a full disk) abort and raise `OutputError` naming `name` and `path`."""

    def __init__(self, path: PathLike, *, name: str = "output") -> None:
        self.path, self.name = Path(path), name
        check_target(name, self.path)
        folder = self.path.parent if str(self.path.parent) else Path(".")
        self.tmp = folder / f"{TMP_PREFIX}{self.path.name}.{secrets.token_hex(8)}"
        try:
            fd = os.open(self.tmp, _OPEN_FLAGS, 0o666)
        except OSError as exc:
            raise output_error(name, self.path, exc) from None
        _track(self.tmp)
        self.file: IO[bytes] = os.fdopen(fd, "wb")
        st = os.fstat(fd)
        clash = _INPUTS.get((st.st_dev, st.st_ino))
        if clash is not None or not stat.S_ISREG(st.st_mode):
            self.abort()
            found = f"{clash!r}, an input file" if clash else "not a regular file"
            raise OutputError(f"{name} {str(self.path)!r}: its new temporary file turned out to be {found}; "
                              "nothing was written (is something replacing files in that folder?)")

    def write(self, data: bytes | memoryview) -> None:
        try:
            self.file.write(data)
        except OSError as exc:
            self.abort()
            raise output_error(self.name, self.path, exc) from None

    def commit(self) -> Path:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise output_error(self.name, self.path, exc) from None
        _untrack(self.tmp)
        return self.path

    def abort(self) -> None:
        """Close (errors ignored: a full disk fails the close too) and remove the temporary file."""
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
        _untrack(self.tmp)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def write_into(f: AtomicFile, data: bytes) -> None:
    """`data` into `f` (in two halves: the test-only pause hook sits between them)."""
    view, half = memoryview(data), len(data) // 2
    f.write(view[:half])
    _pause_hook(f.path)
    f.write(view[half:])


def write_atomic(path: PathLike, data: bytes | str, *, name: str = "output") -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with AtomicFile(path, name=name) as f:
        write_into(f, raw)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Block SIGINT and SIGTERM for a few system calls; a signal that came meanwhile is delivered after."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` itself (no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _written(f: AtomicFile, data: bytes) -> AtomicFile:
    """`f` with `data` in it, flushed to disk and closed (not yet renamed); removed on any failure (Ctrl-C too)."""
    try:
        write_into(f, data)
        f.file.flush()
        os.fsync(f.file.fileno())
        f.file.close()
    except OSError as exc:
        f.abort()
        raise output_error(f.name, f.path, exc) from None
    except BaseException:
        f.abort()
        raise
    return f


def write_pair(main: PathLike, main_data: bytes, side: PathLike, side_data: bytes | None) -> None:
    """Write `main` and its sidecar as one unit: both temporary files first, then both renames under a
    lock on the folder. `side_data=None` removes a stale sidecar. A reader checks the sidecar's hash,
    recorded in `main`, to refuse a pair torn by a crash between the two renames."""
    m, s = Path(main), Path(side)
    check_target("output", m)
    check_target("the sidecar", s)
    files: list[AtomicFile] = []
    try:
        with folder_lock(m.parent if str(m.parent) else Path(".")):
            if side_data is not None:
                files.append(_written(AtomicFile(s, name="the sidecar"), side_data))
            files.append(_written(AtomicFile(m), main_data))
            with _signals_held():  # SIGINT/SIGTERM wait until both renames are done
                for f in files:
                    try:
                        os.replace(f.tmp, f.path)
                    except OSError as exc:
                        raise output_error(f.name, f.path, exc) from None
                    _untrack(f.tmp)
                files.clear()
            if side_data is None and s.exists():
                s.unlink()
    except OSError as exc:
        raise output_error("output", m, exc) from None
    finally:
        for f in files:
            f.abort()
