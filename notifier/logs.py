"""Logging: one greppable line per event, tokens scrubbed, rotation-safe files, and a
handler that can never stop the relay.

Only entry points call `configure`; every module logs through its own named logger.

A log call must never raise, block or kill the thread that makes it: every thread of the
relay logs, so a log directory removed or a full log disk would otherwise stop delivery.
`LogHandler` writes each line with one unbuffered append; when the file cannot be
written or reopened, the line goes to standard error instead (systemd's journal collects
it), which says so once, and the file is tried again every `RETRY_SEC` and at once on
SIGHUP. Standard error itself is written only as far as it can take a line now, so a
full pipe costs lines (counted, and said), never a blocked sender.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import stat
import sys
import time
from pathlib import Path
from typing import Callable

from notifier.envelope import scrub
from notifier.redaction import escape_controls

RETRY_SEC = 5.0
"""While the log file cannot be written, how often a line tries it again."""

_CHUNK = 4096  # PIPE_BUF: a pipe that polls writable takes this much without blocking


class ScrubbingFormatter(logging.Formatter):
    """UTC timestamps, and every webhook token in a line or traceback replaced: the last
    line of defence, since exception messages from HTTP libraries quote URLs. Control
    characters are escaped, so that one event is one line (a traceback keeps its lines)
    and nothing in it reaches the terminal as a control sequence."""

    converter = time.gmtime

    def __init__(self):
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s %(message)s",
                         "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei) -> str:
        return escape_controls(super().formatException(ei), keep_newlines=True)

    def formatStack(self, stack_info: str) -> str:
        return escape_controls(super().formatStack(stack_info), keep_newlines=True)


class JsonFormatter(ScrubbingFormatter):
    """The same fields as the text line, as one JSON object per line, for log shippers:
    ``{"time": ..., "level": ..., "logger": ..., "message": ...}`` (and ``traceback``)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": f"{self.formatTime(record, self.datefmt)}.{int(record.msecs):03d}Z",
                "level": record.levelname, "logger": record.name,
                "message": escape_controls(scrub(record.getMessage()))}
        if record.exc_info:
            line["traceback"] = scrub(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False)


class StandardError:
    """Standard error, written only as far as it can take a line now: a pipe nobody reads
    (or a stuck journal) costs lines, counted and said at the next line it takes, never
    a blocked thread. Never raises."""

    def __init__(self):
        self.left_out = 0  # lines it could not take since the last it took

    def write(self, data: bytes) -> bool:
        if self.left_out:
            data = (f"({self.left_out} log lines left out: standard error could not take "
                    f"them)\n").encode() + data
        if self._write(data):
            self.left_out = 0
            return True
        self.left_out += 1
        return False

    @staticmethod
    def _write(data: bytes) -> bool:
        stream = sys.stderr
        try:
            fd = stream.fileno()
        except (AttributeError, ValueError, OSError):  # replaced (tests) or closed
            try:
                stream.write(data.decode("utf-8", "replace"))
                return True
            except Exception:
                return False
        try:
            for start in range(0, len(data), _CHUNK):
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
                events = poller.poll(0)
                if not events or events[0][1] & (select.POLLERR | select.POLLHUP
                                                  | select.POLLNVAL):
                    return False
                chunk = data[start:start + _CHUNK]
                while chunk:
                    chunk = chunk[os.write(fd, chunk):]
            return True
        except Exception:
            return False


def _open(path: Path) -> tuple[int, tuple[int, int]]:
    """A descriptor appending to `path` (created if missing) and its (device, inode);
    OSError unless it is a regular file (a FIFO fails or is refused at once)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY
                 | os.O_CLOEXEC, 0o666)
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        os.close(fd)
        raise OSError(22, "not a regular file")
    return fd, (status.st_dev, status.st_ino)


class LogHandler(logging.Handler):
    """Writes each line to the log file `path`, or to standard error without one or while
    the file cannot be written; never raises into the caller.

    The file is reopened when logrotate moves it (checked at each line, as
    WatchedFileHandler does), and on `reopen` (SIGHUP). While it cannot be written,
    `state` is ``"failed"`` and `reason` says why; the metrics report them as `log_state`
    and `log_reason`."""

    def __init__(self, path: Path | None, *, retry_sec: float = RETRY_SEC,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.path = path
        self.state, self.reason = "ok", None
        self.stderr = StandardError()
        self._retry_sec, self._clock = retry_sec, clock
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._retry_at = 0.0
        self._diverted = 0  # lines that went to standard error instead of the file
        if path is not None:  # at start, a file that cannot be opened is a start error
            self._fd, self._identity = _open(path)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception as exc:  # a bad format string or argument: say what it was
            text = escape_controls(f"unformattable log line from {record.name} "
                            f"({type(exc).__name__}): {record.msg!r} % {record.args!r}")
        self._write((text + "\n").encode("utf-8", "backslashreplace"))

    def _write(self, data: bytes) -> None:
        """Under the handler's lock (`handle` holds it)."""
        if self.path is None:
            self.stderr.write(data)
            return
        self._ensure_open(force=False)
        if self._fd is not None:
            try:
                written = os.write(self._fd, data)  # O_APPEND: one line, one write
                if written == len(data):
                    return
                with contextlib.suppress(OSError):  # a full disk took part of it:
                    os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)  # cut it
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as exc:
                self._failed(exc)
        self._diverted += 1
        self.stderr.write(data)

    def _ensure_open(self, force: bool) -> None:
        """Reopen the file if it was moved or removed (logrotate), or if it failed and it
        is time to try again (or `force`: SIGHUP)."""
        if self._fd is not None:
            try:
                status = os.stat(self.path)
                if (status.st_dev, status.st_ino) == self._identity:
                    return
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        elif not force and self._clock() < self._retry_at:
            return
        try:
            self._fd, self._identity = _open(self.path)
        except OSError as exc:
            self._failed(exc)
            return
        if self.state == "failed":
            self.state, self.reason = "ok", None
            self._notice(logging.INFO, f"log file {self.path} writable again; "
                                       f"{self._diverted} lines went to standard error meanwhile")
            self._diverted = 0

    def _failed(self, exc: OSError) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._retry_at = self._clock() + self._retry_sec
        reason = exc.strerror or str(exc)
        if self.state == "ok":
            self.stderr.write(self._line(
                logging.ERROR, f"cannot write the log file {self.path}: {reason}; logging to "
                               f"standard error until it can be written again (tried every "
                               f"{self._retry_sec:g} s and on SIGHUP)"))
        self.state, self.reason = "failed", reason[:200]

    def _line(self, level: int, message: str) -> bytes:
        record = logging.makeLogRecord({"name": __name__, "levelno": level,
                                        "levelname": logging.getLevelName(level),
                                        "msg": message})
        try:
            return (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            return (message + "\n").encode("utf-8", "backslashreplace")

    def _notice(self, level: int, message: str) -> None:
        """A line about the log itself, in the file and on standard error."""
        line = self._line(level, message)
        self.stderr.write(line)
        try:
            os.write(self._fd, line)
        except OSError:
            pass

    def reopen(self) -> None:
        """SIGHUP: reopen the file now if it was moved or had failed."""
        if self.path is not None:
            with self.lock:
                self._ensure_open(force=True)

    def check(self) -> tuple[str, str | None]:
        """(state, reason), after trying the file again if it failed and `RETRY_SEC`
        passed: a quiet relay still notices its log is back."""
        if self.path is not None:
            with self.lock:
                if self._fd is None:
                    self._ensure_open(force=False)
        return self.state, self.reason

    def close(self) -> None:
        with self.lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        super().close()


def configure(log_file: Path | None, level: str = "info", fmt: str = "text") -> None:
    """Log to `log_file` (its directory created) or to standard error, at `level` and
    above, as text or JSON lines. Raises OSError when the file cannot be opened now: the
    start check's problem."""
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = LogHandler(log_file)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ScrubbingFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("urllib3").setLevel(logging.WARNING)  # it logs every URL it opens


def _handler() -> LogHandler | None:
    return next((handler for handler in logging.getLogger().handlers
                 if isinstance(handler, LogHandler)), None)


def reopen() -> None:
    """Reopen the log file now if logrotate moved it or it had failed (on SIGHUP),
    instead of at the next line written. Never raises."""
    handler = _handler()
    if handler is not None:
        handler.reopen()


def file_state() -> tuple[str, str | None] | None:
    """The log file's (state, reason) for the metrics, or None without a log file."""
    handler = _handler()
    if handler is None or handler.path is None:
        return None
    return handler.check()


class Throttle:
    """Lets at most `burst` lines through per `interval` seconds for one recurring event;
    `allow` returns None for a line to leave out, else how many were left out before it,
    so that a flood of bad input cannot flood the log."""

    def __init__(self, burst: int = 10, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self._burst, self._interval, self._clock = burst, interval, clock
        self._window_start = float("-inf")
        self._used = 0
        self._suppressed = 0

    def allow(self, events: int = 1) -> int | None:
        """`events` alike at once get one line at most: the others are left out."""
        now = self._clock()
        if now - self._window_start >= self._interval:
            self._window_start, self._used = now, 0
        if self._used >= self._burst:
            self._suppressed += events
            return None
        self._used += 1
        suppressed, self._suppressed = self._suppressed, events - 1
        return suppressed
