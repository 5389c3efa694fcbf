"""Reading and rewriting files that another program writes too, without losing its update.

The Lisp side rewrites ``system_metrics.sexp`` on its own schedule (a temp file, then a
rename) and takes no lock, so the merge cannot keep it out. What the merge guarantees is
that it never puts back contents older than the Lisp side's newest write: `rewrite` reads
the file, builds the new text, writes it to a temp file (fsynced) and swaps it in with
Linux's atomic exchange (``renameat2(RENAME_EXCHANGE)``). The exchange hands back the file
that was replaced; if that is not the file that was read, the Lisp side wrote in
between, so its file is swapped back and the merge starts over from it. Where the
exchange is not available, a check just before ``os.replace`` stands in (see
`_replace_unless_changed` for the window that leaves).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import stat
from pathlib import Path
from typing import Callable, NamedTuple

from notifier.files import open_regular as _open_regular, read_upto as _read

log = logging.getLogger(__name__)

TRIES = 5
"""Reads of the file before `rewrite` gives up: the Lisp side writes every few seconds,
so a second try nearly always succeeds; five rule out a fluke without spinning."""

SWAPS = 100
"""Swaps back in a row before `rewrite` gives up: each one means another write landed in
the microseconds between two of our system calls, which a writer every few seconds never
does. (Giving up then leaves in place a file the Lisp side wrote, one write old.)"""

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# The exchange is missing (ENOSYS) or the file system does not support it (EINVAL).
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


class ReadError(Exception):
    """The existing file could not be read; nothing was written."""


class Busy(Exception):
    """The file changed under every try; nothing was written."""


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2, looked up on first use; None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(first: Path, second: Path) -> None:
    """Swap two existing paths in one atomic step (Linux 3.15+, most local file systems)."""
    function = _renameat2()
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(second))


def rewrite(path: Path, build: Callable[[bytes | None], str], *, limit: int,
            swap: Callable[[Path, Path], None] | None = exchange) -> int:
    """Replace `path` with ``build(its bytes, or None when it does not exist)``, keeping its
    mode and owner, without ever replacing a newer write by someone else; returns the try
    that succeeded. Raises `ReadError`, `Busy`, OSError from writing, and whatever `build`
    raises. `swap` is the atomic exchange (None: use the fallback check)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    for attempt in range(1, TRIES + 1):
        with contextlib.ExitStack() as held:
            current = _read_current(path, limit, held)
            text = build(None if current is None else current.data)
            held.callback(_remove, temp)
            ours = _write_temp(temp, text, None if current is None else current.status)
            held.callback(os.close, ours)
            if current is None:
                done = _create(temp, path)
            else:
                done = _install(temp, path, current, ours, swap, held)
            if done:
                _fsync_directory(path.parent)
                return attempt
        if attempt < TRIES:
            log.info("%s changed while being merged (the Lisp side rewrote it): starting "
                     "over from its new contents (try %d of %d)", path, attempt + 1, TRIES)
    raise Busy(f"{path} changed under each of {TRIES} tries")


class _Current(NamedTuple):
    """The file as read: its bytes and its status (mode, owner, identity)."""

    data: bytes
    status: os.stat_result


def _read_current(path: Path, limit: int, held: contextlib.ExitStack) -> _Current | None:
    """Read the file (None if there is none), keeping it open in `held` until the try ends:
    while open, its inode number cannot be reused by a new file, so comparing inode
    numbers cannot be fooled."""
    try:
        fd = _open_regular(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ReadError(exc.strerror or str(exc)) from exc
    held.callback(os.close, fd)
    try:
        return _Current(_read(fd, limit), os.fstat(fd))
    except OSError as exc:
        raise ReadError(exc.strerror or str(exc)) from exc


def _identity(status: os.stat_result) -> tuple[int, int, int, int]:
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _write_temp(temp: Path, text: str, like: os.stat_result | None) -> int:
    """Write and fsync the new contents (so a crash after the rename cannot leave an empty
    file) with the mode and owner of the file it replaces (`like`); returns the open
    descriptor, which keeps its inode from being reused."""
    _remove(temp)  # left by a killed run that had our pid
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        if like is not None:
            os.fchmod(fd, stat.S_IMODE(like.st_mode))
            # Only root may give a file away; a root cron job must, or a mode 0600 file
            # would become unreadable to the Lisp side. Anyone else keeps their own.
            with contextlib.suppress(PermissionError):
                os.fchown(fd, like.st_uid, like.st_gid)
        with open(fd, "wb", closefd=False) as out:
            out.write(text.encode("utf-8"))
            out.flush()
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create(temp: Path, path: Path) -> bool:
    """Put the temp file at `path` unless someone created `path` meanwhile."""
    try:
        os.link(temp, path)
    except FileExistsError:
        return False
    return True


def _install(temp: Path, path: Path, current: _Current, ours: int,
             swap: Callable[[Path, Path], None] | None, held: contextlib.ExitStack) -> bool:
    """Swap the temp file in; False (with `path` holding the newest file) if `path` is no
    longer the file that was read."""
    if swap is not None:
        try:
            swap(temp, path)
        except FileNotFoundError:  # removed since we read it
            return False
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            log.debug("atomic exchange unavailable here (%s): checking before replacing", exc)
        else:
            return _settle(temp, path, _identity(current.status), ours, swap, held)
    return _replace_unless_changed(temp, path, current)


def _settle(temp: Path, path: Path, identity: tuple, ours: int,
            swap: Callable[[Path, Path], None], held: contextlib.ExitStack) -> bool:
    """After the exchange, `temp` holds what `path` held. True if that is the file we read.
    Otherwise the Lisp side wrote after our read: swap its file back. What comes back then
    should be ours; if it is not, it wrote yet again meanwhile, so swap that newer file
    back, and so on. Every file involved is held open, so no inode number is reused."""
    came_back = _hold(temp, held)
    if _identity(os.fstat(came_back)) == identity:
        return True
    put = ours
    for _ in range(SWAPS):
        newer = came_back
        swap(temp, path)
        came_back = _hold(temp, held)
        if _same_file(came_back, put):
            return False
        put = newer
    raise Busy(f"{path} was rewritten during each of {SWAPS} swaps back")


def _replace_unless_changed(temp: Path, path: Path, current: _Current) -> bool:
    """The fallback without an atomic exchange: compare, then rename.

    A write by the Lisp side between the comparison and ``os.replace`` (a few microseconds)
    would still be lost. That is acceptable here: the Lisp side writes every few seconds,
    and each of its writes is a complete snapshot of its own state, so a lost one is
    replaced by its next write; the file stays valid throughout. Where the exchange is
    available (Linux), there is no such window."""
    try:
        fd = _open_regular(path)
    except FileNotFoundError:
        return False
    try:
        if (_identity(os.fstat(fd)) != _identity(current.status)
                or _read(fd, len(current.data)) != current.data):
            return False
        os.replace(temp, path)
    finally:
        os.close(fd)
    return True


def _hold(path: Path, held: contextlib.ExitStack) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    held.callback(os.close, fd)
    return fd


def _same_file(first: int, second: int) -> bool:
    a, b = os.fstat(first), os.fstat(second)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable, not only the file's contents."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
