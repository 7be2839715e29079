"""Outputs that never replace an input and are never left half-written.

`guard_outputs(outputs, inputs)` compares every output path with every input file, and every file
inside an input folder, by identity (device and inode), so a hard link, a symlink or a second
spelling of an input is refused as well as the same path. `write_atomic` writes to a temporary file
in the target's folder and renames it into place: a full disk, a file-size limit, SIGINT or SIGTERM
leave the previous file (or nothing) at the path, never a truncated one. `write_pair` commits a
JSON and its sidecar as one unit under a lock on their folder, so two runs writing the same path
end with one run's pair, not a mix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from nanscope.errors import OutputError

PathLike = str | os.PathLike[str]
MAX_FOLDER_FILES = 20_000  # a folder with more files (`/`, a dataset's images): existing files in it by path instead
TMP_PREFIX = ".nanscope-tmp-"  # temporary files, removed on every exit nanscope can catch


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


def guard_outputs(outputs: Sequence[tuple[str, PathLike | None]], inputs: Iterable[PathLike | None]) -> None:
    """Raise OutputError when an output would replace an input file (same device and inode, a file
    inside an input folder, or a second output). `outputs`: (option name, path) pairs, sidecars included."""
    ids, big = input_identities(inputs)
    seen: dict[str, str] = {}
    for name, raw in outputs:
        if not raw:
            continue
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


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While writing, SIGTERM raises SystemExit(143) (instead of killing the process outright) so the
    temporary file is removed. Only in the main thread and only when nobody else handles SIGTERM."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _pause_hook(path: Path) -> None:
    """Test-only: with NANSCOPE_TEST_PAUSE_WRITE=SECONDS, sleep after the temporary file is half
    written (so a test can signal the process mid-write). Unset in normal use."""
    delay = os.environ.get("NANSCOPE_TEST_PAUSE_WRITE")
    if delay:
        import sys
        import time

        print(f"nanscope-test: writing {path}", file=sys.stderr, flush=True)
        time.sleep(float(delay))


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _write_tmp(path: Path, data: bytes) -> Path:
    """`data` into a new temporary file beside `path`, flushed to disk; removed again on any failure."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            view, half = memoryview(data), len(data) // 2
            _write_all(fd, view[:half])
            _pause_hook(path)
            _write_all(fd, view[half:])
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _error(path: Path, exc: OSError) -> OutputError:
    what = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        what += "; nothing was written there (the previous file, if any, is unchanged)"
    return OutputError(f"output {str(path)!r} cannot be written: {what}")


def write_atomic(path: PathLike, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    p = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with _sigterm_raises():
        tmp = None
        try:
            tmp = _write_tmp(p, raw)
            os.replace(tmp, p)
        except OSError as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise _error(p, exc) from None
        except BaseException:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise


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


def write_pair(main: PathLike, main_data: bytes, side: PathLike, side_data: bytes | None) -> None:
    """Write `main` and its sidecar as one unit: both temporary files first, then both renames under a
    lock on the folder. `side_data=None` removes a stale sidecar. A reader checks the sidecar's hash,
    recorded in `main`, to refuse a pair torn by a crash between the two renames."""
    m, s = Path(main), Path(side)
    tmps: list[Path] = []
    with _sigterm_raises():
        try:
            with folder_lock(m.parent if str(m.parent) else Path(".")):
                if side_data is not None:
                    tmps.append(_write_tmp(s, side_data))
                tmps.append(_write_tmp(m, main_data))
                with _signals_held():  # SIGINT/SIGTERM wait until both renames are done
                    if side_data is not None:
                        os.replace(tmps[0], s)
                    os.replace(tmps[-1], m)
                    tmps.clear()
                if side_data is None and s.exists():
                    s.unlink()
        except OSError as exc:
            raise _error(s if s.name in str(exc.filename or "") else m, exc) from None
        finally:
            for t in tmps:
                with contextlib.suppress(OSError):
                    os.unlink(t)
