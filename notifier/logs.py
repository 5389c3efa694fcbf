"""Logging: one greppable line per event, tokens scrubbed, rotation-safe files.

Only entry points call `configure`; every module logs through its own named logger.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from pathlib import Path
from typing import Callable

from notifier.envelope import scrub
from notifier.redaction import escape_controls


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


def configure(log_file: Path | None, level: str = "info", fmt: str = "text") -> None:
    """Log to `log_file` (reopened when logrotate moves it) or to standard error, at
    `level` and above, as text or JSON lines."""
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ScrubbingFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("urllib3").setLevel(logging.WARNING)  # it logs every URL it opens


def reopen() -> None:
    """Reopen the log file now if logrotate moved it (on SIGHUP), instead of at the next
    line written."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.handlers.WatchedFileHandler):
            with handler.lock:
                handler.reopenIfNeeded()


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

    def allow(self) -> int | None:
        now = self._clock()
        if now - self._window_start >= self._interval:
            self._window_start, self._used = now, 0
        if self._used >= self._burst:
            self._suppressed += 1
            return None
        self._used += 1
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed
