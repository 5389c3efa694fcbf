"""The dead-letter file: every message the relay gave up on, kept to be read and sent again.

``data/notifier_failed.sexp`` (mode 0600: it holds webhook URLs), one S-expression per
line, appended as messages fail:

    ((id . "1764201597123-4242-1") (failed_at . 1764201597) (webhook_id . "42")
     (status . 400) (reason . "HTTP 400: ...") (envelopes . ("<envelope>" ...)))

`envelopes` is what sends the message again: the envelope as received when nothing of
it was delivered, else one JSON envelope per request still to post. An envelope holding
a line break or another control character (Lisp's pretty printer writes them; Lisp
strings have no escape for them) goes in `envelopes_json` instead, a JSON array with
every such character escaped, so that an entry is always one line. `status` is nil when
no answer came (network errors).

Whole or absent: each entry is one ``write`` of one whole line, and its result is
checked. A short write (a full disk) is cut back at once; a tail that could not be cut
(or that a crash tore) is cut back to the last whole line when the file is next opened.
`written` counts only entries that reached the file; one that did not is logged at ERROR
and shown as `state` "failed" with its `reason` until a later entry is written.

Nothing here can hold up a sender: senders only format their letters and queue them;
one writer thread does the I/O (opening, writing, fsync, rotation). The file is opened
non-blocking and used only if it is a regular file, so a FIFO cannot hang the writer
either. Past `max_bytes` the file becomes ``notifier_failed.sexp.1``, replacing the one
before (whose entries are counted in `rotated_out`); rotation only renames, and anything
but a regular file found at ``.1`` (a FIFO, a device, a directory, a symlink) is first
moved aside, never opened.

`read` checks every entry's shape for `replay`; ``notifier_failed.sexp.replayed`` lists
the ids replayed already.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from notifier import files, sexp
from notifier.envelope import MAX_ENVELOPE_BYTES, webhook_id
from notifier.logs import Throttle
from notifier.redaction import CONTROL, escape_controls

log = logging.getLogger("notifier.deadletter")

MAX_BYTES = 16 * 1024 * 1024
"""Size past which the file is rotated: room for thousands of the largest messages."""

MAX_QUEUED_BYTES = 16 * 1024 * 1024
"""Entries waiting for the writer thread at most; past it an entry is not written (the
disk is far slower than messages fail), which is logged like any failed write."""

MAX_LINE_BYTES = 4 * 1024 * 1024
"""Longest line `read` accepts (an entry holds at most a few envelopes of 64 KiB)."""


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


def format_entry(entry_id: str, letter: Letter) -> bytes:
    """The entry's line: one S-expression, one line, newline-terminated."""
    entry = {"id": entry_id, "failed_at": int(letter.failed_at),
             "webhook_id": webhook_id(letter.webhook), "status": letter.status,
             "reason": escape_controls(letter.reason)}
    envelopes = letter.envelopes()
    if any(CONTROL.search(text) for text in envelopes):
        entry["envelopes_json"] = json.dumps(envelopes, ensure_ascii=True)
    else:
        entry["envelopes"] = envelopes
    return (sexp.dumps(entry) + "\n").encode("utf-8")


class DeadLetters:
    """Queues letters from any thread (`append` never waits for the disk) and writes
    them from a thread of its own, started at the first letter. `flush` waits until what
    was queued is written; `close` flushes and ends the thread (the relay's stop)."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES,
                 max_queued: int = MAX_QUEUED_BYTES):
        self.path = path
        self.max_bytes = max_bytes
        self.max_queued = max_queued
        self.written = 0  # entries written by this process
        self.rotated_out = 0  # entries removed by rotation
        self.unwritten = 0  # entries that could not be written
        self.state = "ok"  # "failed" from a failed write until an entry is written again
        self.reason: str | None = None
        self._ids = itertools.count(1)
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._busy = False  # the writer holds lines taken off the queue
        self._closed = False
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition()
        self._tail_checked = False  # a torn tail is cut back at the next open
        self._error_log = Throttle(burst=10, interval=60.0)  # a full disk fails every entry

    # ------------------------------------------------------------------ senders' side

    def append(self, letters: list[Letter]) -> None:
        """Queue `letters` for the writer thread; never waits for I/O."""
        lines, refused = [], 0
        for letter in letters:
            entry_id = f"{int(letter.failed_at * 1000)}-{os.getpid()}-{next(self._ids)}"
            try:
                lines.append(format_entry(entry_id, letter))
            except (ValueError, UnicodeError):  # a letter with no text form: a bug
                refused += 1
        with self._changed:
            for line in lines:
                if self._closed or self._queued_bytes + len(line) > self.max_queued:
                    refused += 1
                    continue
                self._queue.append(line)
                self._queued_bytes += len(line)
            if self._thread is None and self._queue:
                self._thread = threading.Thread(target=self._run, name="dead-letters",
                                                daemon=True)
                self._thread.start()
            self._changed.notify_all()
        if refused:
            self._failed(refused, "the writer is behind (or stopped), or an entry has "
                                  "no text form")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every letter queued so far is written (or failed); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float = 5.0) -> bool:
        """Write what is queued and end the writer thread; later letters are not written."""
        done = self.flush(timeout)
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        return done

    def alive(self) -> bool:
        """False if the writer thread died (the relay's supervisor watches it)."""
        with self._changed:
            return self._closed or self._thread is None or self._thread.is_alive()

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                lines, self._queue = list(self._queue), deque()
                self._queued_bytes, self._busy = 0, True
            try:
                self._write(lines)
            except Exception:  # a bug: the letters are lost, the relay goes on
                log.exception("writing dead letters failed unexpectedly")
                self._failed(len(lines), "internal error")
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _write(self, lines: list[bytes]) -> None:
        try:
            fd = self._open()
        except OSError as exc:
            self._failed(len(lines), exc.strerror or str(exc))
            return
        written, error = 0, None
        try:
            for line in lines:
                if os.fstat(fd).st_size + len(line) > self.max_bytes:
                    fd = self._rotate(fd)
                end = os.fstat(fd).st_size
                try:
                    count = os.write(fd, line)  # O_APPEND: at `end`, the writer's alone
                except OSError as exc:
                    count, error = 0, exc
                if count == len(line):
                    written += 1
                    continue
                if count:  # a short write: cut the torn line back off
                    error = error or OSError(28, os.strerror(28))
                    try:
                        os.ftruncate(fd, end)
                    except OSError:
                        self._tail_checked = False  # cut back at the next open
            try:
                os.fsync(fd)
            except OSError as exc:
                error = error or exc
        finally:
            os.close(fd)
        with self._changed:
            self.written += written
        if written == len(lines):
            with self._changed:
                self.state, self.reason = "ok", None
            if error is not None:  # only the fsync failed
                log.error("dead-letter file %s: fsync failed: %s", self.path, error.strerror)
        else:
            if written:
                with self._changed:
                    self.state, self.reason = "ok", None
            self._failed(len(lines) - written, error.strerror if error else "short write")

    def _open(self) -> int:
        """The file for appending, if it is a regular file (a FIFO fails or is refused at
        once: O_NONBLOCK); a torn tail is cut back to the last whole line first."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
                     | os.O_NOCTTY | os.O_CLOEXEC, 0o600)
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise OSError(22, "not a regular file")
            if not self._tail_checked:
                self._cut_torn_tail(fd, status.st_size)
                self._tail_checked = True
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _cut_torn_tail(self, fd: int, size: int) -> None:
        if size == 0:
            return
        reader = files.open_regular(self.path)
        try:
            if os.pread(reader, 1, size - 1) == b"\n":
                return
            keep = _last_line_end(reader, size)
        finally:
            os.close(reader)
        os.ftruncate(fd, keep)
        log.warning("dead-letter file %s ended in a torn entry (%d bytes, from a full disk "
                    "or a crash): cut back to the last whole entry", self.path, size - keep)

    def _rotate(self, fd: int) -> int:
        """Rename the file to ``.1`` and return a descriptor of a new one; if that cannot
        be done, log it and keep `fd` (the file grows past its bound meanwhile)."""
        older = rotated(self.path)
        try:
            try:
                mode = os.lstat(older).st_mode
            except FileNotFoundError:
                mode = None
            if mode is not None and not stat.S_ISREG(mode):
                aside = older.with_name(f"{older.name}.not-a-file-{int(time.time())}")
                os.rename(older, aside)  # a rename opens nothing, whatever it is
                log.error("dead-letter rotation: %s was not a regular file: moved aside to "
                          "%s", older, aside)
            elif mode is not None:
                data = files.read_regular(older, 4 * MAX_BYTES)
                self.rotated_out += data.count(b"\n")
            os.replace(self.path, older)
            new = self._open()
        except OSError as exc:
            log.error("cannot rotate the dead-letter file %s to %s: %s; it grows past %d "
                      "bytes meanwhile", self.path, older, exc.strerror or exc, self.max_bytes)
            return fd
        os.close(fd)
        log.warning("dead-letter file %s rotated to %s", self.path, older)
        return new

    def _failed(self, count: int, why: str) -> None:
        with self._changed:
            self.unwritten += count
            self.state = "failed"
            self.reason = f"{self.unwritten} not written since the start, the last: {why}"[:200]
            suppressed = self._error_log.allow()
        if suppressed is not None:
            log.error("cannot write %d failed messages to the dead-letter file %s: %s; they "
                      "are counted as failed but cannot be replayed%s", count, self.path, why,
                      f" ({suppressed} such lines left out)" if suppressed else "")


def _last_line_end(fd: int, size: int) -> int:
    """Offset just past the last newline before `size` (0 if there is none)."""
    end = size
    while end > 0:
        start = max(0, end - 65536)
        cut = os.pread(fd, end - start, start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


# ---------------------------------------------------------------------- reading (replay)

def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def replayed_file(path: Path) -> Path:
    return path.with_name(path.name + ".replayed")


@dataclass(frozen=True)
class Entry:
    """A dead letter that can be sent again."""

    id: str
    envelopes: tuple[bytes, ...]
    where: str  # FILE:LINE


@dataclass(frozen=True)
class Refused:
    """A line that is not a dead letter `replay` can send, and why."""

    where: str
    reason: str


def _kind(value: object) -> str:
    if value is None:
        return "nil"
    return {str: "a string", int: "a number", float: "a number", list: "a list",
            sexp.Alist: "an alist", bool: "t"}.get(type(value), type(value).__name__)


def check(line: bytes, where: str) -> Entry | Refused:
    """One line of the file as an `Entry`, or why it is `Refused`."""
    try:
        value = sexp.loads(line, max_bytes=MAX_LINE_BYTES)
    except sexp.SexpError as exc:
        return Refused(where, f"not an S-expression: {exc}")
    if not isinstance(value, sexp.Alist):
        return Refused(where, f"not an alist but {_kind(value)}")
    entry_id = value.get("id")
    if not isinstance(entry_id, str) or not entry_id or any(c.isspace() for c in entry_id):
        return Refused(where, f"its id is {_kind(entry_id)}, not a string without spaces")
    plain, escaped = value.get("envelopes"), value.get("envelopes_json")
    if (plain is None) == (escaped is None):
        return Refused(where, "it needs envelopes or envelopes_json, exactly one of them")
    name = "envelopes"
    if escaped is not None:
        name = "envelopes_json"
        try:
            plain = json.loads(escaped) if isinstance(escaped, str) else escaped
        except ValueError:
            return Refused(where, "envelopes_json is not JSON")
    if not isinstance(plain, list) or not plain:
        return Refused(where, f"{name} is {_kind(plain)}, not a list of envelopes")
    envelopes = []
    for number, item in enumerate(plain, 1):
        if not isinstance(item, str):
            return Refused(where, f"{name} item {number} is {_kind(item)}, not a string")
        if not item.strip():
            return Refused(where, f"{name} item {number} is blank")
        try:
            data = item.encode("utf-8")
        except UnicodeError:
            return Refused(where, f"{name} item {number} is not valid Unicode")
        if len(data) > MAX_ENVELOPE_BYTES:
            return Refused(where, f"{name} item {number} is over {MAX_ENVELOPE_BYTES} bytes")
        envelopes.append(data)
    return Entry(entry_id, tuple(envelopes), where)


def read(path: Path) -> Iterator[Entry | Refused]:
    """Every line of the rotated file, then of `path` (oldest first), checked; blank
    lines are skipped. Raises OSError for a file that cannot be read, ValueError for one
    too big to be a dead-letter file."""
    for source in (rotated(path), path):
        try:
            data = files.read_regular(source, 4 * MAX_BYTES)
        except FileNotFoundError:
            continue
        if len(data) > 4 * MAX_BYTES:
            raise ValueError(f"{source} is over {4 * MAX_BYTES} bytes: not a dead-letter file")
        *lines, torn = data.split(b"\n")
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield check(line, f"{source}:{number}")
        if torn.strip():
            yield Refused(f"{source}:{len(lines) + 1}", "cut off (no end of line): a write "
                          "torn by a full disk or a crash; the relay cuts it off when it "
                          "next writes a dead letter")


def replayed_ids(path: Path) -> set[str]:
    """The ids recorded as replayed already."""
    try:
        return set(files.read_regular(replayed_file(path), 4 * MAX_BYTES).decode(
            "utf-8", "replace").split())
    except FileNotFoundError:
        return set()


def mark_replayed(path: Path, entry_ids: list[str]) -> None:
    """Record entries as replayed (appended and fsynced), so no later replay sends them."""
    fd = os.open(replayed_file(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
                 | os.O_CLOEXEC, 0o600)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(22, f"{replayed_file(path)} is not a regular file")
        data = "".join(f"{entry_id}\n" for entry_id in entry_ids).encode("utf-8")
        if os.write(fd, data) != len(data):  # a full disk: no half id left behind
            os.ftruncate(fd, status.st_size)
            raise OSError(28, os.strerror(28))
        os.fsync(fd)
    finally:
        os.close(fd)
