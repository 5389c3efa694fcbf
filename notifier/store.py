"""The store: everything a restart needs, in one SQLite database. Only this module sees SQL.

``$SWIMMY_HOME/data/notifier_store.sqlite3`` by default (``SWIMMY_NOTIFIER_STORE``), mode
0600 like the ``-wal`` SQLite keeps beside it (they hold webhook URLs), in WAL mode. A
failed commit leaves the last committed state whole, and a torn end of the -wal is
ignored when the store is opened. Tables:

    batches   one row per batch the receiver took off the socket (or per up to 512
              messages written at once): the envelopes as they arrived, packed, with
              their receive times (Unix) and producers. A message's id is
              row * ROW_SLOTS + its index in the row.
    done      ranges of message ids whose outcome is final; a row is deleted once
              every message in it is done
    progress  per message: requests of it delivered, attempts on the next one, and
              whether a request of it may be in flight
    notices   per webhook: losses not yet reported in its channel
    facts     per webhook: what the relay learned that a restart must not forget
              (``forum``: its messages create threads)
    meta      the schema version and the legacy files imported

Writers: the receiver commits each batch before the outbox may hand it to a sender
(`Store.add`); a sender commits the in-flight mark of a request before posting it
(`Store.sending`); outcomes decided under the outbox's lock are queued (`done`,
`progress`, `notice`, `learned`) and committed with the next of those, or by the store's
thread (`Store.run`) within FLUSH_SEC. `save_all` writes everything held in one
transaction (a stop without durable mode, or the way back from a failure). A commit is
in the page cache when it returns (a SIGKILL loses nothing committed) and on disk within
SYNC_SEC (see SYNCHRONOUS): a power cut loses at most that.

One relay per store: a lock (an open-file-description lock on ``<store>.lock``, which
holds the holder's PID) is taken before anything else and kept for the relay's life;
`in_use` asks whether one is held without taking it.

`Database` does the SQL and raises on any fault; `Store` decides what a fault means and
never raises into the relay: a write that fails (disk full, I/O error, read-only, the
store or its directory deleted or replaced, which its thread notices by comparing the
path's inode with the open file's) turns it ``failed`` with a short reason. The relay
then runs from memory; the store's thread tries at least every RETRY_SEC to open the
store again (moving aside whatever is at its path that is not a store) and write
everything held in one transaction; only that commit makes it ``ok`` again. A store
that cannot be read at start is moved aside (renamed, never deleted) and a new one made.
Every value read back is checked like producer input: a bad row is skipped, counted and
deleted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import sqlite3
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from notifier.envelope import MAX_ENVELOPE_BYTES, own_webhook_id

log = logging.getLogger("notifier.store")

SCHEMA_VERSION = 1
ROW_BITS = 9
ROW_SLOTS = 1 << ROW_BITS
"""Messages per batches row at most (the receiver takes at most 512 off the socket at
once); message ids are row * ROW_SLOTS + index."""
MAX_ROW = (1 << (63 - ROW_BITS)) - 1
"""Largest row id whose message ids SQLite can hold (a larger one is not ours)."""
SYNCHRONOUS = "NORMAL"
"""SQLite's own fsync policy. FULL (an fsync in every commit) was measured against
NORMAL plus SYNC_SEC: FULL put about a millisecond on every message's way to Discord
(the receiver's commit and the sender's in-flight mark each wait for the disk) and
halved the rate a flood is absorbed at; see the README."""
SYNC_SEC = 0.01
"""With NORMAL, the store's thread fsyncs the -wal this long at most after a commit:
what a power cut can lose (a SIGKILL loses nothing committed)."""
WAL_PAGES = 8192
"""The -wal is folded into the database (a checkpoint, with an fsync of each) once it
holds this many pages (32 MiB), and cut back to that size after. SQLite's default, 1000
pages, checkpointed every 28 batches of a flood and made the receiver twice as slow; a
page rewritten many times between checkpoints is copied once."""
FLUSH_SEC = 0.005
"""Longest a queued outcome waits before the store's thread commits it (the receiver or
a sender usually commits it sooner, with their own writes)."""
RETRY_SEC = 1.0
"""How often a failed store is tried again, traffic or not."""
CHECK_SEC = 1.0
"""How often the store's thread checks that the files at the path are the ones open."""
REMIND_SEC = 300.0
"""While the store stays failed, the ERROR is repeated this often."""
MAX_PARTS = 10_000
MAX_ATTEMPTS = 1_000_000
MAX_COUNT = 10 ** 12
EARLIEST = 946_684_800.0  # 2000-01-01: a receive time or notice before this is not one
FUTURE_SEC = 86_400.0  # ... nor one more than a day ahead of the clock
FACTS = {"forum": bool}
"""What may be learned about a webhook, and its type."""

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value)",
    "CREATE TABLE batches (id INTEGER PRIMARY KEY, times BLOB NOT NULL, producers TEXT, "
    "sizes BLOB NOT NULL, envelopes BLOB NOT NULL)",
    "CREATE TABLE done (id INTEGER PRIMARY KEY, last INTEGER NOT NULL)",
    "CREATE TABLE progress (id INTEGER PRIMARY KEY, part INTEGER NOT NULL, "
    "attempts INTEGER NOT NULL, in_flight INTEGER NOT NULL)",
    "CREATE TABLE notices (webhook TEXT PRIMARY KEY, dropped INTEGER NOT NULL, "
    "failed INTEGER NOT NULL, since REAL)",
    "CREATE TABLE facts (webhook TEXT NOT NULL, name TEXT NOT NULL, value, "
    "PRIMARY KEY (webhook, name))",
)
_TABLES = {"meta": "key, value", "batches": "id, times, producers, sizes, envelopes",
           "done": "id, last", "progress": "id, part, attempts, in_flight",
           "notices": "webhook, dropped, failed, since", "facts": "webhook, name, value"}
_FLOCK = "hhxxxxqqixxxx"  # struct flock on Linux (64-bit off_t)
_FAULTS = (sqlite3.Error, OSError)

Notices = dict[str, tuple[int, int, float | None]]
"""Loss notices still to post, per webhook URL (or webhook id, for drops made before any
message to it was parsed): (dropped, failed, since)."""
Facts = dict[str, dict[str, object]]
"""What was learned per webhook URL: {"forum": True}."""


class InUse(Exception):
    """Another relay holds the store."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"the store {path} is in use by {holder}: one relay per store "
                         "(stop the other one, or give this one its own SWIMMY_HOME or "
                         "SWIMMY_NOTIFIER_STORE)")
        self.path, self.holder = path, holder


class Stored(NamedTuple):
    """A held message as the store gives it back."""

    sid: int
    envelope: bytes
    received_at: float  # Unix time
    producer: str | None = None
    part: int = 0
    attempts: int = 0
    in_flight: bool = False


class Contents(NamedTuple):
    """What the store held at start. `messages`: the newest `limit`, oldest first;
    `overflow`: (id, webhook id or None, producer) of older ones, for the caller to
    count as dropped (and mark done)."""

    messages: list[Stored]
    overflow: list[tuple[int, str | None, str | None]]
    notices: Notices
    facts: Facts


class Holdings(NamedTuple):
    """Everything to write at once (`save_all`): messages (objects with `sid`, `data`,
    `received_at`, `producer`, `part`, `attempts`, `in_flight`), oldest first; their
    `received_at` plus `offset` is Unix time."""

    raws: list
    notices: Notices
    facts: Facts
    offset: float


class NoStore:
    """Where the outbox records outcomes without a store (tests, benchmarks): nowhere."""

    def add(self, raws, received_at) -> None:
        pass

    def done(self, raws) -> None:
        pass

    progress = done

    def notice(self, key, dropped, failed, since) -> None:
        pass

    def learned(self, webhook, name, value) -> None:
        pass


class StoreFault(OSError):
    """A store that cannot be used for a reason of ours (not a regular file...)."""


def in_use(path: Path) -> str | None:
    """Who holds the store at `path` ("relay pid 1234"), or None if nobody does. Asks the
    lock without taking it, so it never gets in a relay's way."""
    try:
        fd = os.open(_lock_path(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, 0, 0, 0, 0))
        if struct.unpack(_FLOCK, answer)[0] == fcntl.F_UNLCK:
            return None
        return _holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def _select(table: str) -> str:
    return f"SELECT {_TABLES[table]} FROM {table}"


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _holder(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"relay pid {text}" if text.isdigit() else "another relay (pid unknown)"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only", errno.EIO: "I/O error", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied"}


def _reason(exc: BaseException) -> str:
    """A short, token-free reason for a failed operation (sqlite3.Error or OSError)."""
    if isinstance(exc, StoreFault):
        return str(exc)
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "") or ""
        for prefix, text in (("SQLITE_FULL", "disk full"), ("SQLITE_IOERR", "I/O error"),
                             ("SQLITE_READONLY", "read-only"), ("SQLITE_CANTOPEN", "cannot open"),
                             ("SQLITE_CORRUPT", "corrupt"), ("SQLITE_NOTADB", "not a database"),
                             ("SQLITE_BUSY", "locked by another process"),
                             ("SQLITE_PERM", "permission denied")):
            if name.startswith(prefix):
                return text
        return str(exc)[:100] or type(exc).__name__
    return _ERRNOS.get(exc.errno) or (exc.strerror or str(exc))[:100]


def _time(value) -> bool:
    return (type(value) in (int, float) and math.isfinite(value)
            and EARLIEST <= value <= time.time() + FUTURE_SEC)


def _count(value, most: int) -> bool:
    return type(value) is int and 0 <= value <= most


def _text(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 2048


class Files:
    """The store's files at its path: the lock file, the database (opened, checked, moved
    aside when it cannot be used) and its -wal. Every method raises on a fault
    (sqlite3.Error, OSError, InUse); `Store` decides what a fault means."""

    def __init__(self, path: Path, wall: Callable[[], float]):
        self.path = path
        self.wal = path.with_name(path.name + "-wal")
        self.moved_aside: list[str] = []  # what was moved aside, and why
        self.db: sqlite3.Connection | None = None
        self._wall = wall
        self._lock_fd = self._wal_fd = -1
        self._lock_id: tuple[int, int] | None = None
        self._file_id: tuple[int, int] | None = None  # the database file open
        self._wal_id: tuple[int, int] | None = None  # its -wal

    @property
    def is_open(self) -> bool:
        return self.db is not None

    # ------------------------------------------------------------------ the lock

    def lock(self) -> None:
        """Take the lock file (created 0600), or InUse naming its holder, whose PID it
        holds. Taken again if it was removed or replaced (a directory removed and made
        again: another relay may hold the new one)."""
        path = _lock_path(self.path)
        if self._lock_fd >= 0 and _identity(path) == self._lock_id:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreFault(f"{path.name} is not a regular file")
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, 0, 0, 0, 0))
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            holder = _holder(fd) if exc.errno in (errno.EAGAIN, errno.EACCES) else None
            os.close(fd)
            if holder is not None:
                raise InUse(self.path, holder) from None
            raise
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
        self._lock_fd, self._lock_id = fd, _identity(path)

    # ------------------------------------------------------------------ opening

    def connect(self, loaded: bool) -> None:
        """Open the database at the path. What is there and is not a usable store is
        moved aside first, and a new store created; so is a file that replaced the one
        `loaded` from."""
        self.disconnect()
        ours = self._file_id
        for path, what in ((self.path, "store"), (self.wal, "store's write-ahead log")):
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(mode):
                self._move_aside(f"the {what} is not a regular file")
            elif path == self.path and loaded and _identity(path) != ours:
                self._move_aside("the store was replaced while the relay ran")
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600))
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=0)
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")  # no -shm; one connection
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise StoreFault("cannot use WAL mode")
            db.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
            problem = _unusable(db, quick=_identity(self.path) != ours)
        except sqlite3.DatabaseError as exc:
            db.close()
            if getattr(exc, "sqlite_errorname", "") not in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                raise
            problem = f"it is not a usable database ({_reason(exc)})"
        except BaseException:
            db.close()
            raise
        if problem is not None:
            db.close()
            self._move_aside(problem)
            return self.connect(loaded)
        self.db, self._file_id = db, _identity(self.path)
        self.note_wal()

    def _move_aside(self, why: str) -> None:
        """Rename the store (and its -wal and -shm) out of the way, never deleting it."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._wall()))
        base, number = f"{self.path.name}.unreadable-{stamp}", 1
        while any(os.path.lexists(self.path.with_name(base + s)) for s in ("", "-wal", "-shm")):
            number += 1
            base = f"{self.path.name}.unreadable-{stamp}-{number}"
        moved = []
        for suffix in ("", "-wal", "-shm"):
            source = self.path.with_name(self.path.name + suffix)
            if os.path.lexists(source):
                os.rename(source, self.path.with_name(base + suffix))
                moved.append(source.name)
        text = f"{', '.join(moved)} moved aside as {base}: {why}"
        self.moved_aside.append(text)
        log.error("store unusable: %s; a new store is used", text)

    def disconnect(self) -> None:
        if self.db is not None:
            with _quietly():
                self.db.close()
            self.db = None
        if self._wal_fd >= 0:
            os.close(self._wal_fd)
            self._wal_fd = -1

    def changed(self) -> tuple[str, bool] | None:
        """Why the files at the path are not the ones open, and whether what was
        committed is gone with them; None while they are."""
        if _identity(self.path) != self._file_id:
            gone = not os.path.lexists(self.path)
            return ("deleted" if gone else "replaced") + " while the relay ran", True
        if _identity(self.wal) != self._wal_id:
            return "its -wal removed or replaced while the relay ran", True
        if _identity(_lock_path(self.path)) != self._lock_id:
            return "its lock file removed or replaced while the relay ran", False
        return None

    def note_wal(self) -> None:
        """Note the -wal SQLite writes (its inode, to notice it replaced) and keep it open
        to fsync it."""
        fd = os.open(self.wal, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        if self._wal_fd >= 0:
            os.close(self._wal_fd)
        self._wal_fd, self._wal_id = fd, (st.st_dev, st.st_ino)

    def sync(self) -> None:
        """fsync the -wal: every commit so far survives a power cut."""
        if self._wal_fd >= 0:
            os.fsync(self._wal_fd)

    def close(self) -> None:
        """Close the database (SQLite folds its -wal back in) and release the lock."""
        self.disconnect()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1




class Database:
    """The tables of the store open in `files`: read, checked, and written, each write one
    transaction. Raises on a fault, as `Files` does. `live` counts, per row of the last
    committed state, its messages not done yet."""

    def __init__(self, files: Files, wall: Callable[[], float]):
        self.files = files
        self.live: dict[int, int] = {}
        self.next_row = 1
        self._wall = wall

    # ------------------------------------------------------------------ reading

    def load(self, limit: int) -> "_Loaded":
        """Read and check everything: the newest `limit` messages, the rest as overflow,
        and what is bad, to delete. In-flight marks are read as they are: the outbox
        clears them once it holds the messages (each is counted once, by the start that
        restores it)."""
        db, now = self.files.db, self._wall()
        bad: dict[str, list] = {table: [] for table in ("batches", "done", "progress",
                                                        "notices", "facts")}
        finished: dict[int, list[tuple[int, int]]] = {}
        for first, last in db.execute(_select("done")):
            if (type(first) is int and type(last) is int and 0 <= first <= last
                    and first >> ROW_BITS == last >> ROW_BITS):
                finished.setdefault(first >> ROW_BITS, []).append((first, last))
            else:
                bad["done"].append(first)
        progress = {}
        for sid, part, attempts, in_flight in db.execute(_select("progress")):
            if (type(sid) is int and _count(part, MAX_PARTS)
                    and _count(attempts, MAX_ATTEMPTS) and in_flight in (0, 1)):
                progress[sid] = (part, attempts, bool(in_flight))
            else:
                bad["progress"].append(sid)
        messages, overflow, self.live, top = [], [], {}, 0
        for row in db.execute(_select("batches") + " ORDER BY id DESC"):
            rid, unpacked = row[0], _unpack(row, now)
            if unpacked is None:
                bad["batches"].append(rid)
                continue
            top = max(top, rid)
            ranges = finished.get(rid, ())
            for index in range(len(unpacked) - 1, -1, -1):
                sid = (rid << ROW_BITS) + index
                if any(first <= sid <= last for first, last in ranges):
                    continue
                envelope, received_at, producer = unpacked[index]
                self.live[rid] = self.live.get(rid, 0) + 1
                if len(messages) < limit:
                    messages.append(Stored(sid, envelope, received_at, producer,
                                           *progress.get(sid, (0, 0, False))))
                else:
                    overflow.append((sid, own_webhook_id(envelope), producer))
        notices: Notices = {}
        for webhook, dropped, failed, since in db.execute(_select("notices")):
            if (_text(webhook) and _count(dropped, MAX_COUNT) and _count(failed, MAX_COUNT)
                    and dropped + failed > 0 and (since is None or _time(since))):
                notices[webhook] = (dropped, failed, since)
            else:
                bad["notices"].append(webhook)
        facts: Facts = {}
        for webhook, name, value in db.execute(_select("facts")):
            if (_text(webhook) and isinstance(name, str) and FACTS.get(name) is bool
                    and type(value) is int and value in (0, 1)):
                facts.setdefault(webhook, {})[name] = bool(value)
            else:
                bad["facts"].append((webhook, name))
        self.next_row = max(self.next_row, top + 1)
        return _Loaded(messages[::-1], overflow[::-1], notices, facts, bad)

    def delete(self, bad: dict[str, list]) -> None:
        """Delete the rows `load` found bad."""
        with self._transaction() as db:
            for rid in bad["batches"]:
                db.execute("DELETE FROM batches WHERE id IS ?", (rid,))
                if type(rid) is int and 0 < rid <= MAX_ROW:
                    self._delete_ranges(rid)
            for table, column in (("done", "id"), ("progress", "id"), ("notices", "webhook")):
                db.executemany(f"DELETE FROM {table} WHERE {column} IS ?",
                               [(key,) for key in bad[table]])
            db.executemany("DELETE FROM facts WHERE webhook IS ? AND name IS ?", bad["facts"])

    # ------------------------------------------------------------------ writing

    def rows(self, raws: list, wall_of, same_time: bool = False) -> list[tuple]:
        """Batches rows for `raws`, ROW_SLOTS at most each, with the next row ids."""
        rows = []
        for start in range(0, len(raws), ROW_SLOTS):
            chunk = raws[start:start + ROW_SLOTS]
            datas = [raw.data for raw in chunk]
            producers = [raw.producer for raw in chunk]
            times = (struct.pack("<d", wall_of(chunk[0])) if same_time
                     else struct.pack(f"<{len(chunk)}d", *map(wall_of, chunk)))
            rows.append((self.next_row, times, json.dumps(producers) if any(producers) else None,
                         struct.pack(f"<{len(datas)}I", *map(len, datas)), b"".join(datas)))
            self.next_row += 1
        return rows

    @staticmethod
    def ids(raws: list, rows: list[tuple]) -> list[tuple[object, int]]:
        """(raw, the id it gets) for `raws` written as `rows`."""
        return [(raw, (rows[number >> ROW_BITS][0] << ROW_BITS) + (number & (ROW_SLOTS - 1)))
                for number, raw in enumerate(raws)]

    def write(self, rows: list[tuple], raws: list, done: list, progress: list,
              notices: Notices, facts: dict[tuple[str, str], object]) -> None:
        """One transaction: new rows for `raws`, then outcomes. Messages done lose their
        id (they are no longer in the store)."""
        with self._transaction() as db:
            db.executemany("INSERT INTO batches VALUES (?, ?, ?, ?, ?)", rows)  # no progress
            self._finish(done)
            db.executemany("INSERT OR REPLACE INTO progress VALUES (?, ?, ?, ?)",
                           [(raw.sid, raw.part, raw.attempts, int(raw.in_flight))
                            for raw in progress if self.stored(raw)])
            for key, (dropped, failed, since) in notices.items():
                if dropped or failed:
                    db.execute("INSERT OR REPLACE INTO notices VALUES (?, ?, ?, ?)",
                               (key, dropped, failed, since))
                else:
                    db.execute("DELETE FROM notices WHERE webhook = ?", (key,))
            db.executemany("INSERT OR REPLACE INTO facts VALUES (?, ?, ?)",
                           [(webhook, name, int(value)) for (webhook, name), value
                            in facts.items()])
        self._adopt(rows, raws)

    def _finish(self, done: list) -> None:
        """Record messages done: a row whose every message is done is deleted, otherwise
        the ids are written as ranges (drops are mostly runs of the oldest)."""
        by_row: dict[int, list[int]] = {}
        live = self.live
        for raw in done:
            sid = raw.sid
            if sid is not None and sid >> ROW_BITS in live:
                by_row.setdefault(sid >> ROW_BITS, []).append(sid)
            raw.sid = None
        for row, sids in by_row.items():
            if live[row] <= len(sids):
                del live[row]
                self.files.db.execute("DELETE FROM batches WHERE id = ?", (row,))
                self._delete_ranges(row)
                continue
            live[row] -= len(sids)
            sids.sort()
            runs, first = [], sids[0]
            for previous, sid in zip(sids, sids[1:]):
                if sid != previous + 1:
                    runs.append((first, previous))
                    first = sid
            runs.append((first, sids[-1]))
            self.files.db.executemany("INSERT OR REPLACE INTO done VALUES (?, ?)", runs)

    def _delete_ranges(self, row: int) -> None:
        first, last = row << ROW_BITS, (row << ROW_BITS) + ROW_SLOTS - 1
        self.files.db.execute("DELETE FROM done WHERE id BETWEEN ? AND ?", (first, last))
        self.files.db.execute("DELETE FROM progress WHERE id BETWEEN ? AND ?", (first, last))

    def replace(self, holdings: "Holdings") -> None:
        """One transaction: everything the store holds replaced by `holdings`; its
        messages get their new ids once it commits."""
        self._put(holdings, replace=True)

    def add(self, holdings: "Holdings") -> None:
        """One transaction: `holdings` added to what the store holds (new rows after its
        last one, whatever that holds)."""
        top = self.files.db.execute("SELECT max(id) FROM batches").fetchone()[0]
        if type(top) is int and top >= MAX_ROW:
            raise StoreFault("its row ids are used up (not a store of this relay)")
        if type(top) is int:
            self.next_row = max(self.next_row, top + 1)
        self._put(holdings, replace=False)

    def _put(self, holdings: "Holdings", replace: bool) -> None:
        raws = holdings.raws
        rows = self.rows(raws, lambda raw: raw.received_at + holdings.offset)
        ids = self.ids(raws, rows)
        with self._transaction() as db:
            if replace:
                for table in _TABLES:
                    if table != "meta":
                        db.execute(f"DELETE FROM {table}")
            self._insert(db, rows, ids)
            db.executemany("INSERT OR REPLACE INTO notices VALUES (?, ?, ?, ?)",
                           [(key, *state) for key, state in holdings.notices.items()
                            if state[0] or state[1]])
            db.executemany("INSERT OR REPLACE INTO facts VALUES (?, ?, ?)",
                           [(webhook, name, int(value)) for webhook, learned
                            in holdings.facts.items() for name, value in learned.items()])
        if replace:
            self.live = {}
        self._adopt(rows, raws)

    def import_legacy(self, raws: list, notices: Notices, marker: str) -> bool:
        """One transaction: `raws` with their progress, `notices` and `marker`; False
        (nothing written) if `marker` was imported before."""
        if self.files.db.execute("SELECT 1 FROM meta WHERE key = ?", (marker,)).fetchone():
            return False
        rows = self.rows(raws, lambda raw: self._wall(), same_time=True)
        ids = self.ids(raws, rows)
        with self._transaction() as db:
            self._insert(db, rows, ids)
            db.executemany("INSERT OR REPLACE INTO notices VALUES (?, ?, ?, ?)",
                           [(key, *state) for key, state in notices.items()])
            db.execute("INSERT INTO meta VALUES (?, 1)", (marker,))
        self._adopt(rows, raws)
        return True

    @staticmethod
    def _insert(db: sqlite3.Connection, rows: list[tuple], ids: list[tuple[object, int]]
                ) -> None:
        """New rows, and the progress of their messages that made some (in a transaction)."""
        db.executemany("INSERT INTO batches VALUES (?, ?, ?, ?, ?)", rows)
        db.executemany("INSERT INTO progress VALUES (?, ?, ?, ?)",
                       [(sid, raw.part, raw.attempts, int(raw.in_flight))
                        for raw, sid in ids if raw.part or raw.attempts or raw.in_flight])

    def _adopt(self, rows: list[tuple], raws: list) -> None:
        """Once committed: the rows are live and their messages have their ids."""
        for number, (rid, *_) in enumerate(rows):
            chunk = raws[number * ROW_SLOTS:(number + 1) * ROW_SLOTS]
            self.live[rid] = len(chunk)
            for sid, raw in enumerate(chunk, rid << ROW_BITS):
                raw.sid = sid

    def _transaction(self):
        """BEGIN ... COMMIT, or ROLLBACK and the fault raised."""
        return _Transaction(self.files.db)

    def stored(self, raw) -> bool:
        """Whether `raw` is in the last committed state."""
        sid = raw.sid
        return sid is not None and sid >> ROW_BITS in self.live

class _Transaction:
    def __init__(self, db: sqlite3.Connection | None):
        if db is None:
            raise StoreFault("not open")
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, exc, traceback) -> None:
        if kind is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:
            with _quietly():
                self.db.execute("ROLLBACK")


class _quietly:
    """Ignore a SQLite error (closing or rolling back what already failed)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        return kind is not None and issubclass(kind, sqlite3.Error)


class Outcomes:
    """Outcomes of stored messages decided under the outbox's lock, waiting to be
    committed (coalesced: the latest progress of a message, the latest notice of a
    webhook). Its lock is never held for I/O. Nothing is kept while the store is failed
    (`wanted` False): the way back writes everything held, these included; while it
    writes (`all`), outcomes of messages not in the store yet are kept, for the ids they
    are about to get."""

    def __init__(self):
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # the store's thread waits on it
        self.wanted = False
        self.all = False
        self.oldest: float | None = None  # when the oldest waiting was queued
        self._done: list = []
        self._progress: dict[int, object] = {}  # id(raw) -> raw
        self._notices: Notices = {}
        self._facts: dict[tuple[str, str], object] = {}

    def done(self, raws: Iterable) -> None:
        with self.lock:
            if queued := self._wanted(raws):
                self._done.extend(queued)
                self._queued()

    def progress(self, raws: Iterable) -> None:
        with self.lock:
            if queued := self._wanted(raws):
                self._progress.update((id(raw), raw) for raw in queued)
                self._queued()

    def notice(self, key: str, state: tuple[int, int, float | None]) -> None:
        with self.lock:
            if self.wanted:
                self._notices[key] = state
                self._queued()

    def learned(self, webhook: str, name: str, value: object) -> None:
        with self.lock:
            if self.wanted:
                self._facts[(webhook, name)] = value
                self._queued()

    def _wanted(self, raws: Iterable) -> list:
        if not self.wanted:
            return []
        return [raw for raw in raws if raw.sid is not None or self.all]

    def _queued(self) -> None:
        """(Lock held.) The first since the last commit wakes the store's thread."""
        if self.oldest is None:
            self.oldest = time.monotonic()
            self.changed.notify()

    def take(self) -> tuple[list, list, Notices, dict[tuple[str, str], object]]:
        """Everything waiting: (done, progress, notices, facts); the queue is empty after."""
        with self.lock:
            taken = self._done, list(self._progress.values()), self._notices, self._facts
            self.clear()
        return taken

    def clear(self) -> None:
        """(Lock held.)"""
        self._done, self._progress, self._notices, self._facts = [], {}, {}, {}
        self.oldest = None

    def __bool__(self) -> bool:
        return self.oldest is not None


class Store:
    """See the module docstring. `open` first; `run` in a thread of its own; `close` last."""

    def __init__(self, path: Path, *, wall: Callable[[], float] = time.time):
        self.path = path
        self.failure: str | None = "not open yet"
        self.skipped = 0  # rows found bad at start (skipped and deleted)
        self._files = Files(path, wall)
        self._db = Database(self._files, wall)
        self._limit = 0  # messages loaded at most (the relay's queue_max)
        self._loaded = False  # the store's contents are in the relay (else: load first)
        self._db_lock = threading.Lock()  # the database; writes happen under it
        self._outcomes = Outcomes()
        self._unsynced = False  # a commit since the last fsync of the -wal
        self._synced_at = self._checked_at = 0.0  # monotonic
        self._failed_at = self._reminded_at = self._retry_at = 0.0

    @property
    def state(self) -> str:
        return "ok" if self.failure is None else "failed"

    @property
    def moved_aside(self) -> list[str]:
        return self._files.moved_aside

    # ------------------------------------------------------------------ start

    def open(self, limit: int) -> Contents:
        """Lock the store (InUse if another relay holds it), open it (moving aside what
        cannot be read) and load the newest `limit` messages, the notices and the facts.
        Raises only InUse: a store that cannot be used leaves it failed, and `run` loads
        it once it can."""
        self._limit = limit
        with self._db_lock:
            return self._lock_and_load()

    def _lock_and_load(self) -> Contents:
        """(Db lock held.) InUse propagates; any other fault leaves the store failed."""
        try:
            self._files.lock()
            self._files.connect(loaded=False)
            loaded = self._db.load(self._limit)
        except _FAULTS as exc:
            self._files.disconnect()
            self._fail(_reason(exc))
            return Contents([], [], {}, {})
        self._loaded = True
        skipped = sum(map(len, loaded.bad.values()))
        try:
            if skipped:
                self.skipped += skipped
                log.error("store: %d unreadable rows skipped and deleted (%s)", skipped,
                          ", ".join(f"{table} {len(rows)}" for table, rows
                                    in loaded.bad.items() if rows))
                self._db.delete(loaded.bad)
            self._ok()
        except _FAULTS as exc:  # what was loaded is held: written by the way back
            self._fail(_reason(exc))
        return Contents(*loaded[:4])

    # ------------------------------------------------------------------ writes

    def add(self, raws: list, received_at: float) -> None:
        """Commit a batch the receiver took (with the queued outcomes: one transaction)
        and give each message its id; while the store is failed, nothing (the messages
        are held in memory only, and written by the way back)."""
        if self.failure is not None or not raws:
            return
        with self._db_lock:
            if self.failure is None:
                self._commit(raws, self._db.rows(raws, lambda raw: received_at,
                                                    same_time=True))

    def sending(self, raws: list) -> None:
        """A request of these messages is about to be posted: marked in flight, and
        committed before this returns (for those in the store), so a restart after a
        crash counts them as possibly posted already."""
        for raw in raws:
            raw.in_flight = True
        if self.failure is None and any(raw.sid is not None for raw in raws):
            with self._db_lock:
                if self.failure is None:
                    self.progress(raws)
                    self._commit()

    def done(self, raws: Iterable) -> None:
        """These messages have their final outcome (queued: called under the outbox's lock)."""
        self._outcomes.done(raws)

    def progress(self, raws: Iterable) -> None:
        """Their part, attempts or in-flight mark changed (queued)."""
        self._outcomes.progress(raws)

    def notice(self, key: str, dropped: int, failed: int, since: float | None) -> None:
        """A webhook's loss-notice state (queued; coalesced per webhook)."""
        self._outcomes.notice(key, (dropped, failed, since))

    def learned(self, webhook: str, name: str, value: object) -> None:
        """A fact about a webhook a restart must not forget (queued)."""
        self._outcomes.learned(webhook, name, value)

    def stored(self, raw) -> bool:
        """Whether `raw` is in the store's last committed state."""
        return self._db.stored(raw)

    def _commit(self, raws: list = (), rows: list = ()) -> bool:
        """One transaction: `rows` for `raws` and everything queued (db lock held)."""
        done, progress, notices, facts = self._outcomes.take()
        if not (rows or done or progress or notices or facts):
            return True
        try:
            self._db.write(rows, raws, done, progress, notices, facts)
        except _FAULTS as exc:
            self._fail(_reason(exc))
            return False
        self._committed()
        return True

    def _committed(self) -> None:
        """A commit to fsync within SYNC_SEC."""
        with self._outcomes.lock:
            if not self._unsynced:
                self._unsynced = True
                self._outcomes.changed.notify()

    def _fail(self, reason: str, gone: bool = False) -> None:
        """Writes failed: the relay runs from memory until the store's thread gets it
        back. `gone`: the file open is no longer the store at the path, so nothing
        committed to it will be found at the next start."""
        if self.failure is None:
            self._failed_at = self._reminded_at = time.monotonic()
            self._retry_at = 0.0
            log.error("store %s failed (%s): carrying on in memory; what is held is lost "
                      "if the relay is killed before the store is back; retrying every "
                      "%g s", self.path, reason, RETRY_SEC)
        self.failure = reason
        if gone:
            self._db.live.clear()
        with self._outcomes.lock:  # the way back writes everything: these are in it
            self._outcomes.wanted = False
            self._outcomes.clear()
            self._outcomes.changed.notify()

    # ------------------------------------------------------------------ everything at once

    def save_all(self, holdings: "Holdings") -> bool:
        """Write everything held in one transaction, replacing what the store held (the
        way back from a failure, and a stop without durable mode), or added to it if it
        could never be read (a stop before the store's thread could load it). True if
        committed."""
        with self._db_lock:
            return self._save_all(lambda: holdings)

    def _save_all(self, source: Callable[[], "Holdings"]) -> bool:
        """(Caller holds the db lock, so nothing is added between `source`'s snapshot
        and the commit; outcomes queued meanwhile are committed after it.)"""
        self._check_file_locked()
        try:
            if not self._files.is_open or self.failure is not None:
                self._files.lock()
                self._files.connect(loaded=self._loaded)
        except InUse as exc:
            self._files.disconnect()
            self._fail(f"in use by {exc.holder}")
            return False
        except _FAULTS as exc:
            self._files.disconnect()
            self._fail(_reason(exc))
            return False
        outcomes = self._outcomes
        with outcomes.lock:  # what is queued is in the snapshot; what follows it is kept
            outcomes.clear()
            outcomes.wanted = outcomes.all = True
        try:
            holdings = source()
            if self._loaded:
                self._db.replace(holdings)
            else:  # what it holds was never read: kept for the next start
                self._db.add(holdings)
        except _FAULTS as exc:
            self._fail(_reason(exc))
            return False
        finally:
            outcomes.all = False
        if self.failure is not None:
            log.warning("store writable again (it had failed: %s): %d held messages "
                        "written to it", self.failure, len(holdings.raws))
        self._ok()
        return True

    def _ok(self) -> None:
        self.failure = None
        self._outcomes.wanted = True
        self._committed()

    # ------------------------------------------------------------------ the store's thread

    def run(self, stopping: threading.Event, source: Callable[[], "Holdings"],
            restore: Callable[[Contents], None]) -> None:
        """Until `stopping` is set (then call `wake`): commit queued outcomes within
        FLUSH_SEC, fsync the -wal within SYNC_SEC of a commit, and check every CHECK_SEC
        that the files at the path are the ones open. While failed, try every RETRY_SEC
        to get the store back: load it if it could not be read at start (handing what it
        held to `restore`), then write everything `source` gives; remind the log every
        REMIND_SEC."""
        while not stopping.is_set():
            with self._outcomes.lock:
                pause = self._pause(time.monotonic())
                if pause > 0:
                    self._outcomes.changed.wait(pause)
            if stopping.is_set():
                break
            now = time.monotonic()
            if self.failure is not None:
                self._retry(source, restore, now)
                continue
            oldest = self._outcomes.oldest
            if oldest is not None and now - oldest >= FLUSH_SEC:
                with self._db_lock:
                    if self.failure is None:
                        self._commit()
            if self._unsynced and now - self._synced_at >= SYNC_SEC:
                self._sync(now)
            if now - self._checked_at >= CHECK_SEC:
                self._checked_at = now
                with self._db_lock:
                    self._check_file_locked()

    def _pause(self, now: float) -> float:
        """(Queue lock held.) Until the next thing due."""
        if self.failure is not None:
            return min(max(0.0, self._retry_at - now), RETRY_SEC)
        due = self._checked_at + CHECK_SEC
        if self._outcomes.oldest is not None:
            due = min(due, self._outcomes.oldest + FLUSH_SEC)
        if self._unsynced:
            due = min(due, self._synced_at + SYNC_SEC)
        return max(0.0, due - now)

    def _sync(self, now: float) -> None:
        self._unsynced, self._synced_at = False, now
        try:
            self._files.sync()
        except OSError as exc:
            with self._db_lock:
                self._fail(_reason(exc))

    def _check_file_locked(self) -> None:
        """(Db lock held.) Fail the store if the files at its path are not the ones open."""
        if self.failure is None and (changed := self._files.changed()) is not None:
            self._fail(*changed)

    def _retry(self, source: Callable[[], "Holdings"], restore: Callable[[Contents], None],
               now: float) -> None:
        if now >= self._retry_at:
            self._retry_at = now + RETRY_SEC
            with self._db_lock:
                if not self._loaded:
                    self._load_late(restore)
                if self._loaded and self.failure is not None:
                    self._save_all(source)
        if self.failure is not None and now - self._reminded_at >= REMIND_SEC:
            self._reminded_at = now
            log.error("store %s still failing (%s) after %.0f s: messages are held in "
                      "memory only", self.path, self.failure, now - self._failed_at)

    def _load_late(self, restore: Callable[[Contents], None]) -> None:
        """The store could not be read at start: read it now, before anything held in
        memory is written over it."""
        try:
            contents = self._lock_and_load()
        except InUse as exc:
            self._fail(f"in use by {exc.holder}")
            return
        if self._loaded:
            restore(contents)
            log.warning("store readable again: %d messages it held restored",
                        len(contents.messages))

    def wake(self) -> None:
        with self._outcomes.lock:
            self._outcomes.changed.notify()

    # ------------------------------------------------------------------ legacy files

    def import_legacy(self, messages: list[tuple[bytes, int, int, bool]], notices: Notices,
                      marker: str) -> list[Stored] | None:
        """Add what the previous version left (messages as (envelope, part, attempts, in
        flight), and loss notices) in one transaction that also records `marker`. Returns
        the messages as stored ([] if `marker` was imported before), or None if the
        store could not take them."""
        raws = [_Legacy(*message) for message in messages]
        with self._db_lock:
            if self.failure is not None:
                return None
            try:
                if not self._db.import_legacy(raws, notices, marker):
                    return []
            except _FAULTS as exc:
                self._fail(_reason(exc))
                return None
            self._committed()
        now = time.time()
        return [Stored(raw.sid, raw.data, now, None, raw.part, raw.attempts, raw.in_flight)
                for raw in raws]

    # ------------------------------------------------------------------ stop

    def flush(self) -> bool:
        """Commit what is queued now; False if the store is failed or that failed, or the
        store at the path is no longer the one open."""
        with self._db_lock:
            self._check_file_locked()
            return self.failure is None and self._commit()

    def close(self) -> None:
        """Commit what is queued, close the database (SQLite folds its -wal back in and
        syncs it) and release the lock."""
        with self._db_lock:
            if self.failure is None:
                self._commit()
            self._files.close()


class _Loaded(NamedTuple):
    messages: list[Stored]
    overflow: list[tuple[str | None, str | None]]
    notices: Notices
    facts: Facts
    bad: dict[str, list]  # what to delete


def _unusable(db: sqlite3.Connection, quick: bool) -> str | None:
    """Why `db` is not a usable store, or None. A new (empty) database gets the schema."""
    if quick:
        answer = [row[0] for row in db.execute("PRAGMA quick_check")]
        if answer != ["ok"]:
            return f"it fails SQLite's quick_check ({str(answer[0])[:60]})"
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        with _Transaction(db):
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        return None
    try:
        for table, columns in _TABLES.items():
            db.execute(f"SELECT {columns} FROM {table} LIMIT 0")
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such" not in str(exc):
            raise
        return f"it is not a store of this relay ({str(exc)[:60]})"
    if version is None or version[0] != SCHEMA_VERSION:
        return f"unknown schema_version {str(version and version[0])[:20]}"
    return None


class _Legacy:
    """A message imported from the previous version's files, shaped like a held one."""

    __slots__ = ("sid", "data", "producer", "part", "attempts", "in_flight")

    def __init__(self, data: bytes, part: int, attempts: int, in_flight: bool):
        self.sid, self.data, self.producer = None, data, None
        self.part, self.attempts, self.in_flight = part, attempts, in_flight


def _unpack(row: tuple, now: float) -> list[tuple[bytes, float, str | None]] | None:
    """(envelope, receive time, producer) of each message of a batches row, or None when
    anything in it does not check out."""
    rid, times, producers, sizes, envelopes = row
    if not (type(rid) is int and 0 < rid <= MAX_ROW and isinstance(times, bytes)
            and isinstance(sizes, bytes) and isinstance(envelopes, bytes)):
        return None
    count, odd = divmod(len(sizes), 4)
    if odd or not 0 < count <= ROW_SLOTS or len(times) not in (8, 8 * count):
        return None
    lengths = struct.unpack(f"<{count}I", sizes)
    if sum(lengths) != len(envelopes) or not all(0 < n <= MAX_ENVELOPE_BYTES for n in lengths):
        return None
    stamps = struct.unpack(f"<{len(times) // 8}d", times)
    if not all(EARLIEST <= t <= now + FUTURE_SEC for t in stamps):  # NaN fails too
        return None
    if len(stamps) == 1:
        stamps = stamps * count
    if producers is None:
        names = [None] * count
    else:
        try:
            names = json.loads(producers) if isinstance(producers, str) else None
        except ValueError:
            names = None
        if not (isinstance(names, list) and len(names) == count and all(
                name is None or (isinstance(name, str) and 0 < len(name) <= 256)
                for name in names)):
            return None
    unpacked, offset = [], 0
    for length, stamp, name in zip(lengths, stamps, names):
        unpacked.append((envelopes[offset:offset + length], stamp, name))
        offset += length
    return unpacked

