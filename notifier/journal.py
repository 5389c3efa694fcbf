"""Durable mode's journal: every accepted envelope on disk before it may be posted.

The journal is a directory of append-only segment files (``seg-<n>.log``, mode 0600:
they hold webhook URLs). Each record is ``crc32 (4 bytes) | length (4) | kind (1) |
body``, little-endian, the CRC covering kind and body:

    A  accepted    a batch of envelopes as they came off the socket: their count (4
                   bytes), journal ids (8 each), lengths (4 each), then the envelopes
    S  sending     journal ids about to be posted (a replay counts them as in flight)
    P  progress    journal id, parts delivered (4), attempts on the next part (4)
    D  done        journal ids whose outcome is final (delivered, dropped, failed,
                   rejected, deduplicated)
    N  notice      a webhook's loss-notice state, JSON
    B  base        this segment restates everything: replay forgets earlier segments

Writes happen in the caller's thread (`append`, `sending`: a `write` to the page cache,
so a SIGKILL right after loses nothing) or are queued and written at once by the
journal thread (`done`, `progress`, `notice`: called under the outbox's lock, which
never waits for I/O). The journal thread fsyncs at most every COMMIT_INTERVAL_SEC while
there are new records: that interval is what a power cut can lose. It also starts a new
segment past SEGMENT_BYTES and, when the segments hold more than twice what is live,
compacts: it writes the live state as one B segment and removes the older ones. A write
that fails (disk full, I/O error) switches the journal off: the relay carries on in
memory, and every RETRY_SEC the journal thread tries a compaction, which writes all
that is held again, and switches back on if it succeeds.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

log = logging.getLogger("notifier.journal")

SEGMENT_BYTES = 8 << 20
"""A segment past this size is closed and a new one started."""

COMMIT_INTERVAL_SEC = 0.005
"""Longest time between a record's write and its fsync: a power cut loses at most this."""

RETRY_SEC = 1.0
"""How often a journal switched off by a failed write tries to write again."""

MAX_BATCH = 512
"""Most envelopes in one A record (the receiver takes at most 512 off the socket at once)."""

MAX_RECORD_BYTES = MAX_BATCH * (64 * 1024 + 12) + 4
"""Largest record body replay believes in (a batch of the largest envelopes): a longer
length field is corruption, not data."""

_HEADER = struct.Struct("<IIc")
_ID = struct.Struct("<Q")
_PROGRESS = struct.Struct("<QII")


class Saved(NamedTuple):
    """A held message as a stop or a crash leaves it: the envelope as received, the
    requests of it already delivered, the attempts made on the next one, and whether a
    request of it may have reached Discord already (in flight at a crash)."""

    envelope: bytes
    part: int = 0
    attempts: int = 0
    in_flight: bool = False


Notices = dict[str, tuple[int, int, float | None]]
"""Loss notices still to post, per webhook URL (or webhook id, for drops made before
any message to it was parsed): (dropped, failed, since)."""


class Replay(NamedTuple):
    """What the journal held at start."""

    messages: dict[int, Saved]  # by journal id, oldest first
    notices: Notices
    corrupt: int  # records found corrupt (each ends the replay of its segment)


# ------------------------------------------------------------------ records (pure)

def record(kind: bytes, body: bytes) -> bytes:
    return _HEADER.pack(zlib.crc32(body, zlib.crc32(kind)), len(body), kind) + body


def accepted(jids, envelopes: list[bytes]) -> bytes:
    """One A record for a batch: one checksum and a few packs for the lot, so that
    journaling costs a flood little per envelope."""
    count = len(envelopes)
    head = struct.pack(f"<I{count}Q{count}I", count, *jids, *map(len, envelopes))
    data = b"".join(envelopes)
    crc = zlib.crc32(data, zlib.crc32(head, zlib.crc32(b"A")))
    return b"".join((_HEADER.pack(crc, len(head) + len(data), b"A"), head, data))


def _batch(body: bytes) -> list[tuple[int, bytes]] | None:
    """(journal id, envelope) of an A record's body; None if its sizes do not add up."""
    if len(body) < 4:
        return None
    count = struct.unpack_from("<I", body)[0]
    start = 4 + 12 * count
    if count > MAX_BATCH or len(body) < start:
        return None
    numbers = struct.unpack_from(f"<{count}Q{count}I", body, 4)
    jids, lengths = numbers[:count], numbers[count:]
    if start + sum(lengths) != len(body):
        return None
    batch, offset = [], start
    for jid, length in zip(jids, lengths):
        batch.append((jid, body[offset:offset + length]))
        offset += length
    return batch


def _ids(jids) -> bytes:
    return struct.pack(f"<{len(jids)}Q", *jids)


def _notice_body(key: str, state: tuple[int, int, float | None]) -> bytes:
    return json.dumps([key, *state]).encode("utf-8")


def read_records(data: bytes) -> Iterator[tuple[bytes, bytes] | None]:
    """(kind, body) for each whole record of a segment; None for a corrupt or torn
    record, after which nothing more of the segment can be trusted."""
    offset, size = 0, len(data)
    while offset < size:
        if size - offset < _HEADER.size:
            yield None
            return
        crc, length, kind = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        body = data[start:start + length]
        if (length > MAX_RECORD_BYTES or len(body) < length
                or zlib.crc32(body, zlib.crc32(kind)) != crc):
            yield None
            return
        yield kind, body
        offset = start + length


def apply(records: Iterator[tuple[bytes, bytes] | None], messages: dict[int, Saved],
          notices: Notices) -> int:
    """Replay `records` onto the state; returns how many were corrupt."""
    for item in records:
        if item is None:
            return 1
        kind, body = item
        if kind == b"A":
            batch = _batch(body)
            if batch is None:
                return 1
            messages.update((jid, Saved(envelope)) for jid, envelope in batch)
        elif kind in (b"S", b"D"):
            for (jid,) in _ID.iter_unpack(body):
                if kind == b"D":
                    messages.pop(jid, None)
                elif jid in messages:
                    messages[jid] = messages[jid]._replace(in_flight=True)
        elif kind == b"P":
            jid, part, attempts = _PROGRESS.unpack(body)
            if jid in messages:
                messages[jid] = messages[jid]._replace(part=part, attempts=attempts)
        elif kind == b"N":
            key, dropped, failed, since = json.loads(body)
            if dropped or failed:
                notices[key] = (dropped, failed, since)
            else:
                notices.pop(key, None)
        elif kind == b"B":
            messages.clear()
            notices.clear()
    return 0


# ------------------------------------------------------------------ the journal

class Journal:
    """See the module docstring. One instance per relay; `open` first."""

    def __init__(self, directory: Path, *, segment_bytes: int = SEGMENT_BYTES):
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.corrupt_records = 0
        self.failure: str | None = None  # why writes are off, while they are
        self._state_lock = threading.Lock()  # the live state and the queue; never I/O
        self._file_lock = threading.Lock()  # the current segment's descriptor
        self._queued: list[bytes] = []
        self._wake = threading.Condition(self._state_lock)
        self._live: dict[int, bytes] = {}  # the envelopes not done yet, by journal id
        self._progress: dict[int, tuple[int, int, bool]] = {}  # part, attempts, in flight
        self._live_bytes = 0  # envelope bytes of `_live`
        self._notices: Notices = {}
        self._dirty_notices: set[str] = set()  # notices changed since the last write
        self._next_id = 1
        self._fd = -1
        self._segment = 0  # number of the current segment
        self._segment_size = 0
        self._old_bytes = 0  # bytes in segments before the current one
        self._unsynced = False
        self._synced_at = 0.0  # monotonic
        self._retry_at = 0.0  # monotonic: next compaction attempt while writes are off

    @property
    def state(self) -> str:
        return "ok" if self.failure is None else "failed"

    # -------------------------------------------------------------- start

    def open(self) -> Replay:
        """Create the directory if needed, replay every segment, start a new one. Never
        raises: a journal that cannot be used is switched off (see `failure`)."""
        messages: dict[int, Saved] = {}
        notices: Notices = {}
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            segments = self._segments()
        except OSError as exc:
            self._fail(exc)
            return Replay(messages, notices, 0)
        for number, path in segments:
            try:
                data = path.read_bytes()
            except OSError as exc:
                log.error("journal segment %s unreadable, skipped: %s", path.name, exc)
                self.corrupt_records += 1
                continue
            self._old_bytes += len(data)
            if apply(read_records(data), messages, notices):
                self.corrupt_records += 1
                log.error("journal segment %s has a corrupt or torn record at its end; "
                          "what follows it in that segment is skipped", path.name)
        self._live = {jid: saved.envelope for jid, saved in messages.items()}
        self._progress = {jid: (saved.part, saved.attempts, saved.in_flight)
                          for jid, saved in messages.items()
                          if saved.part or saved.attempts or saved.in_flight}
        self._notices = dict(notices)
        self._live_bytes = sum(map(len, self._live.values()))
        self._next_id = max(messages, default=0) + 1
        self._segment = segments[-1][0] if segments else 0
        try:
            self._start_segment()
        except OSError as exc:
            self._fail(exc)
        if self.corrupt_records and self.failure is None:
            self._compact()  # restate what was read, so the damage is counted only once
        return Replay(messages, notices, self.corrupt_records)

    def _segments(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.glob("seg-*.log"):
            try:
                found.append((int(path.name[4:-4]), path))
            except ValueError:
                continue
        return sorted(found)

    def _path(self, number: int) -> Path:
        return self.directory / f"seg-{number:012d}.log"

    def _start_segment(self) -> None:
        """Close the current segment and open the next (caller holds the file lock or
        is alone)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                if self.failure is None:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._old_bytes += self._segment_size
        self._segment += 1
        self._fd = os.open(self._path(self._segment),
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._segment_size = os.fstat(self._fd).st_size

    # -------------------------------------------------------------- writes

    def append(self, envelopes: list[bytes]) -> list[int]:
        """Journal ids for `envelopes`, written before this returns (receiver thread)."""
        with self._state_lock:
            first = self._next_id
            self._next_id += len(envelopes)
            jids = range(first, self._next_id)
            self._live.update(zip(jids, envelopes))
            self._live_bytes += sum(map(len, envelopes))
        self._write(b"".join(accepted(jids[start:start + MAX_BATCH],
                                      envelopes[start:start + MAX_BATCH])
                             for start in range(0, len(envelopes), MAX_BATCH)))
        return list(jids)

    def restore(self, saved: list[Saved]) -> list[int]:
        """Journal ids for messages restored from a pending file, their progress kept."""
        jids = self.append([item.envelope for item in saved])
        for jid, item in zip(jids, saved):
            if item.part or item.attempts:
                self.progress(jid, item.part, item.attempts)
        return jids

    def sending(self, jids: list[int]) -> None:
        """Mark requests about to be posted, written before this returns (sender thread):
        a replay after a crash counts them as possibly delivered already."""
        with self._state_lock:
            for jid in jids:
                if jid in self._live:
                    part, attempts, _ = self._progress.get(jid, (0, 0, False))
                    self._progress[jid] = (part, attempts, True)
        self._write(record(b"S", _ids(jids)))

    def done(self, jids: list[int]) -> None:
        """These messages have their final outcome (queued; called under the outbox lock)."""
        with self._state_lock:
            live, progress = self._live, self._progress
            for jid in jids:
                data = live.pop(jid, None)
                if data is not None:
                    self._live_bytes -= len(data)
                    progress.pop(jid, None)
            self._queue(record(b"D", _ids(jids)))

    def progress(self, jid: int, part: int, attempts: int) -> None:
        with self._state_lock:
            if jid in self._live:
                in_flight = self._progress.get(jid, (0, 0, False))[2]
                self._progress[jid] = (part, attempts, in_flight)
                self._queue(record(b"P", _PROGRESS.pack(jid, part, attempts)))

    def notice(self, key: str, dropped: int, failed: int, since: float | None) -> None:
        """A webhook's loss-notice state (queued, coalesced: a flood of drops writes one
        record per webhook per flush)."""
        with self._state_lock:
            if dropped or failed:
                self._notices[key] = (dropped, failed, since)
            else:
                self._notices.pop(key, None)
            if key not in self._dirty_notices:
                self._dirty_notices.add(key)
                self._wake.notify()

    def _queue(self, data: bytes) -> None:
        self._queued.append(data)
        self._wake.notify()

    def _write(self, data: bytes) -> None:
        if self.failure is not None:
            return
        with self._file_lock:
            view = memoryview(data)
            try:
                while view:  # a full disk can take part of a write
                    written = os.write(self._fd, view)
                    self._segment_size += written
                    view = view[written:]
            except OSError as exc:
                self._fail(exc)
                return
            self._unsynced = True
        with self._state_lock:
            self._wake.notify()

    def _fail(self, exc: OSError) -> None:
        if self.failure is None:
            self.failure = exc.strerror or str(exc)
            log.error("journal write failed (%s): carrying on in memory; what is held "
                      "now is lost if the relay is killed before the journal is back",
                      self.failure)

    # -------------------------------------------------------------- the journal thread

    def run(self, stopping: threading.Event) -> None:
        """Until `stopping` is set (then call `wake`): write queued records at once,
        fsync at most every COMMIT_INTERVAL_SEC, rotate and compact."""
        while not stopping.is_set():
            with self._state_lock:
                if not (self._queued or self._dirty_notices or self._compaction_due()
                        or self._segment_size > self.segment_bytes):
                    self._wake.wait(RETRY_SEC if self.failure is not None
                                    else COMMIT_INTERVAL_SEC if self._unsynced else None)
            self._write_queued()
            now = time.monotonic()
            if self.failure is not None:
                if now >= self._retry_at:
                    self._retry_at = now + RETRY_SEC
                    self._compact()
            elif self._unsynced and now - self._synced_at >= COMMIT_INTERVAL_SEC:
                self._sync()
            if self.failure is None:
                if self._compaction_due():
                    self._compact()
                elif self._segment_size > self.segment_bytes:
                    with self._file_lock:
                        self._guarded(self._start_segment)

    def _compaction_due(self) -> bool:
        """The closed segments hold more than twice what is live (and some slack)."""
        return (self.failure is None
                and self._old_bytes > 2 * self._live_bytes + 2 * self.segment_bytes)

    def wake(self) -> None:
        with self._state_lock:
            self._wake.notify()

    def _write_queued(self) -> None:
        with self._state_lock:
            queued, self._queued = self._queued, []
            queued.extend(record(b"N", _notice_body(key, self._notices.get(key, (0, 0, None))))
                          for key in self._dirty_notices)
            self._dirty_notices.clear()
        if queued:
            self._write(b"".join(queued))

    def _sync(self) -> None:
        with self._file_lock:
            if self._unsynced and self.failure is None:
                self._unsynced = False
                self._synced_at = time.monotonic()
                self._guarded(os.fsync, self._fd)

    def _guarded(self, action, *args) -> None:
        try:
            action(*args)
        except OSError as exc:
            self._fail(exc)

    def _compact(self) -> None:
        """Restate the live state as one base segment, then remove the older ones. The
        segment for new records is started first, so nothing written meanwhile is lost:
        replay reads the base, then that segment."""
        failed_before = self.failure
        with self._file_lock:
            self._segment += 1  # the base's number; new records go after it
            base_number = self._segment
            try:
                self._start_segment()
            except OSError as exc:
                self.failure = failed_before or exc.strerror or str(exc)
                return
            self.failure = None  # new records go to the new segment from here on
        with self._state_lock:
            live, progress = dict(self._live), dict(self._progress)
            notices = dict(self._notices)
        parts = [record(b"B", b"")]
        jids = list(live)
        parts.extend(accepted(jids[start:start + MAX_BATCH],
                              [live[jid] for jid in jids[start:start + MAX_BATCH]])
                     for start in range(0, len(jids), MAX_BATCH))
        for jid in jids:
            part, attempts, in_flight = progress.get(jid, (0, 0, False))
            if part or attempts:
                parts.append(record(b"P", _PROGRESS.pack(jid, part, attempts)))
            if in_flight:
                parts.append(record(b"S", _ID.pack(jid)))
        parts.extend(record(b"N", _notice_body(key, state)) for key, state in notices.items())
        base = self._path(base_number)
        temp = base.with_suffix(".tmp")
        data = b"".join(parts)
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, base)
            for number, path in self._segments():
                if number < base_number:
                    path.unlink()
        except OSError as exc:
            temp.unlink(missing_ok=True)
            if failed_before is None:
                self._fail(exc)
            else:
                self.failure = failed_before
            return
        with self._file_lock:
            self._old_bytes = len(data)
        if failed_before is not None:
            log.warning("journal writable again: %d held messages written to it", len(live))

    def close(self) -> None:
        """Write and fsync what is queued, and close the segment."""
        self._write_queued()
        self._sync()
        with self._file_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
