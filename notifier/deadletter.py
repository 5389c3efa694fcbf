"""The dead-letter file: every message the relay gave up on, kept to be read and sent again.

``data/notifier_failed.sexp`` (mode 0600: it holds webhook URLs), one S-expression per
line, appended as messages fail:

    ((id . "1764201597123-4242-1") (failed_at . 1764201597) (webhook_id . "42")
     (status . 400) (reason . "HTTP 400: ...") (envelopes . ("<envelope>" ...)))

`envelopes` is what sends the message again: the envelope as received when nothing of
it was delivered, else one JSON envelope per request still to post. `status` is nil
when no answer came (network errors). The file is bounded: past `max_bytes` it becomes
``notifier_failed.sexp.1`` (replacing the one before, whose entries are counted in
`rotated_out`). `replay` sends both files' entries to the relay, oldest first, and
records each id sent in ``notifier_failed.sexp.replayed``, so a second replay skips them.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from notifier import files, sexp
from notifier.envelope import webhook_id

log = logging.getLogger("notifier.deadletter")

MAX_BYTES = 16 * 1024 * 1024
"""Size past which the file is rotated: room for thousands of the largest messages."""


@dataclass(frozen=True, slots=True)
class Letter:
    """A message given up on, as `Outbox` decides it (written after its lock is released)."""

    webhook: str
    remaining: tuple[dict, ...]  # the requests still to post
    envelope: bytes  # as received
    part: int  # requests of it already delivered
    reason: str
    status: int | None
    failed_at: float  # Unix time

    def envelopes(self) -> list[str]:
        if self.part == 0:
            return [self.envelope.decode("utf-8")]
        return [json.dumps({"type": "NOTIFIER", "schema_version": 1, "action": "SEND",
                            "webhook": self.webhook, "payload": request}, ensure_ascii=False)
                for request in self.remaining]


class DeadLetters:
    """Appends letters to the file; safe to call from several threads."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES):
        self.path = path
        self.max_bytes = max_bytes
        self.written = 0  # letters written by this process
        self.rotated_out = 0  # letters removed by rotation
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def append(self, letters: list[Letter]) -> None:
        """Write `letters`; on an I/O error log it (the messages count as failed anyway)."""
        lines = "".join(self._line(letter) for letter in letters).encode("utf-8")
        with self._lock:
            try:
                if self._size() + len(lines) > self.max_bytes:
                    self._rotate()
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                             0o600)
                try:
                    os.write(fd, lines)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self.written += len(letters)
            except OSError as exc:
                log.error("cannot write %d failed messages to %s: %s", len(letters),
                          self.path, exc)

    def _line(self, letter: Letter) -> str:
        entry = {"id": f"{int(letter.failed_at * 1000)}-{os.getpid()}-{next(self._ids)}",
                 "failed_at": int(letter.failed_at), "webhook_id": webhook_id(letter.webhook),
                 "status": letter.status, "reason": letter.reason,
                 "envelopes": letter.envelopes()}
        return sexp.dumps(entry) + "\n"

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def _rotate(self) -> None:
        older = rotated(self.path)
        try:
            self.rotated_out += sum(1 for _ in older.open("rb"))
        except FileNotFoundError:
            pass
        os.replace(self.path, older)
        log.warning("dead-letter file %s rotated to %s", self.path, older)


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def replayed_file(path: Path) -> Path:
    return path.with_name(path.name + ".replayed")


def entries(path: Path) -> Iterator[sexp.Alist]:
    """The entries of the rotated file, then of `path`, oldest first; a line that
    cannot be read (cut by a crash) is skipped."""
    for source in (rotated(path), path):
        try:
            data = files.read_regular(source, 4 * MAX_BYTES)
        except FileNotFoundError:
            continue
        for line in data.splitlines():
            try:
                entry = sexp.loads(line)
            except sexp.SexpError:
                continue
            if isinstance(entry, sexp.Alist) and isinstance(entry.get("id"), str):
                yield entry


def unreplayed(path: Path) -> list[sexp.Alist]:
    """The entries not sent again yet, oldest first."""
    try:
        done = set(replayed_file(path).read_text(encoding="utf-8").split())
    except FileNotFoundError:
        done = set()
    return [entry for entry in entries(path) if entry["id"] not in done]


def mark_replayed(path: Path, entry_ids: list[str]) -> None:
    """Record entries as sent again, so the next replay skips them."""
    fd = os.open(replayed_file(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        os.write(fd, "".join(f"{entry_id}\n" for entry_id in entry_ids).encode())
    finally:
        os.close(fd)
