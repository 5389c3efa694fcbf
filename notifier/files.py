"""Atomic file replacement (a reader sees the old file or the new one, never a torn one),
and bounded reads of files that must be regular (a FIFO must not hang a reader)."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from pathlib import Path

log = logging.getLogger("notifier.files")


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data`.

    The temp file sits in the same directory (so the rename cannot cross file systems)
    and is named after the process and thread (so concurrent writers never share one).
    It is fsynced before the rename: otherwise a crash just after the rename can leave
    an empty file under the real name on some file systems. On any failure the temp
    file is removed and the error re-raised; the old file is untouched.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def remove_stale_temps(path: Path) -> int:
    """Remove temp files `write_atomic` left for `path` when its process was killed
    mid-write (their process no longer exists). Returns how many were removed."""
    removed = 0
    for temp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            pid = int(temp.name[len(path.name) + 2:].split(".")[0])
            if pid != os.getpid() and not _alive(pid):
                temp.unlink()
                removed += 1
        except (ValueError, OSError):
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_regular(path: Path, limit: int) -> bytes:
    """At most `limit` + 1 bytes of `path` (enough to tell that it is too big), refusing
    anything but a regular file, so that a FIFO or a device cannot hang or flood us."""
    fd = open_regular(path)
    try:
        return read_upto(fd, limit)
    finally:
        os.close(fd)


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path` if it is a regular file (opened non-blocking, so
    even a FIFO returns at once); OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
        raise OSError(code, "is a directory" if code == errno.EISDIR else "not a regular file")
    return fd


def read_upto(fd: int, limit: int) -> bytes:
    """Read from `fd` until end of file or `limit` + 1 bytes, whichever comes first."""
    chunks, size = [], 0
    while size <= limit:
        chunk = os.read(fd, limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class WriteState:
    """Whether a file the relay rewrites every interval was written the last time, and
    why not: `state` ("ok" or "failed") and `reason`, as the metrics report them. Used as
    ``with state: write...``: an OSError is caught and logged at ERROR when the file
    starts failing, at INFO when it is written again, never at every interval."""

    def __init__(self, what: str, path: Path | None):
        self.what, self.path = what, path
        self.state: str = "ok"
        self.reason: str | None = None

    def __enter__(self) -> "WriteState":
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        if exc is None:
            if self.state == "failed":
                log.info("%s %s written again", self.what, self.path)
            self.state, self.reason = "ok", None
            return False
        if not isinstance(exc, OSError):
            return False
        reason = (exc.strerror or str(exc))[:200]
        if self.state == "ok":
            log.error("cannot write the %s %s: %s; tried again every interval", self.what,
                      self.path, reason)
        self.state, self.reason = "failed", reason
        return True
