"""The store: everything a restart needs, in one SQLite database. Only this module sees SQL.

``$SWIMMY_HOME/data/notifier_store.sqlite3`` by default (``SWIMMY_NOTIFIER_STORE``), mode
0600 like the ``-wal`` SQLite keeps beside it (they hold webhook URLs), in WAL mode with
``synchronous=FULL``: a commit is on disk before it returns, so a power cut loses nothing
committed, and a failed commit leaves the last committed state whole. Tables:

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
(`add`); a sender commits the in-flight mark of a request before posting it
(`sending`); outcomes decided under the outbox's lock are queued (`done`, `progress`,
`notice`, `learned`) and committed with the next of those, or by the store's thread
(`run`) within FLUSH_SEC. `save_all` writes everything held in one transaction (a stop,
or the way back from a failure).

One relay per store: a lock (an open-file-description lock on ``<store>.lock``, which
holds the holder's PID) is taken before anything else and kept for the relay's life;
`in_use` asks whether one is held without taking it.

Faults never raise into the relay: a write that fails (disk full, I/O error, read-only,
the store or its directory deleted or replaced, which `run` notices by comparing the
path's inode with the open file's) turns the store ``failed`` with a short reason. The
relay then runs from memory; `run` tries at least every RETRY_SEC to open the store
again (moving aside whatever is at its path that is not a store) and write everything
held with `save_all`; only that commit makes it ``ok`` again. A store that cannot be
read at start is moved aside (renamed, never deleted) and a new one made. Every value
read back is checked like producer input: a bad row is skipped, counted and deleted.
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

from notifier.envelope import MAX_ENVELOPE_BYTES
from notifier.held import webhook_of

log = logging.getLogger("notifier.store")

SCHEMA_VERSION = 1
ROW_SLOTS = 512
"""Messages per batches row at most (the receiver takes at most 512 off the socket at
once); message ids are row * ROW_SLOTS + index."""
SYNCHRONOUS = "FULL"
"""fsync every commit: measured, it costs the receiver little per batch of 512 and a
sender a fraction of a millisecond per request (see the README), and it makes a power
cut lose nothing that was committed."""
FLUSH_SEC = 0.005
"""Longest a queued outcome waits before the store's thread commits it (the receiver or
a sender usually commits it sooner, with their own writes)."""
RETRY_SEC = 1.0
"""How often a failed store is tried again, traffic or not."""
CHECK_SEC = 1.0
"""How often the store's thread checks that the file at the path is still the one open."""
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


class StoreFault(Exception):
    """Internal: a write or an open that failed, with the reason to show."""


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


def _reason(exc: BaseException) -> str:
    """A short, token-free reason for a failed operation."""
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
    if isinstance(exc, OSError):
        return (exc.strerror or str(exc))[:100]
    return f"{type(exc).__name__}: {str(exc)[:80]}"


def _time(value) -> bool:
    return (type(value) in (int, float) and math.isfinite(value)
            and EARLIEST <= value <= time.time() + FUTURE_SEC)


def _count(value, most: int) -> bool:
    return type(value) is int and 0 <= value <= most


class Store:
    """See the module docstring. `open` first; `run` in a thread of its own; `close` last."""

    def __init__(self, path: Path, *, wall: Callable[[], float] = time.time):
        self.path = path
        self.failure: str | None = "not open yet"
        self.skipped = 0  # rows found bad at start (skipped and deleted)
        self.moved_aside: list[str] = []  # what was moved aside, and why
        self._wall = wall
        self._limit = 0  # messages loaded at most (the relay's queue_max)
        self._loaded = False  # the store's contents are in the relay (else: load first)
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()  # the connection, _live and ids; writes under it
        self._queue_lock = threading.Lock()  # the queue only: taken under the outbox's lock
        self._queued = threading.Condition(self._queue_lock)
        self._saving = False  # save_all between its snapshot and its commit
        self._done: list = []  # messages whose outcome is final
        self._progress: dict[int, object] = {}  # id(raw) -> raw, progress to write
        self._notices: Notices = {}
        self._facts: dict[tuple[str, str], object] = {}
        self._live: dict[int, int] = {}  # row -> messages in it not done (committed rows)
        self._next_row = 1
        self._lock_fd = -1
        self._lock_id: tuple[int, int] | None = None
        self._file_id: tuple[int, int] | None = None  # the database file open
        self._wal_id: tuple[int, int] | None = None  # its -wal, once seen
        self._failed_at = self._reminded_at = self._retry_at = 0.0  # monotonic

    @property
    def state(self) -> str:
        return "ok" if self.failure is None else "failed"

    # ------------------------------------------------------------------ start

    def open(self, limit: int) -> Contents:
        """Lock the store (InUse if another relay holds it), open it (moving aside what
        cannot be read) and load the newest `limit` messages, the notices and the facts.
        Raises only InUse: a store that cannot be used leaves it failed, and `run` loads
        it once it can."""
        self._limit = limit
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
        except (OSError, StoreFault) as exc:
            self._fail(_reason(exc))
            return Contents([], [], {}, {})
        with self._db_lock:
            return self._open_and_load()

    def _open_and_load(self) -> Contents:
        try:
            self._connect(loaded=False)
            contents = self._load()
        except (sqlite3.Error, OSError, StoreFault) as exc:
            self._disconnect()
            self._fail(_reason(exc))
            return Contents([], [], {}, {})
        self._loaded = True
        if not any(contents.bad.values()):
            self.failure = None
            return Contents(*contents[:4])
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._delete_bad(contents.bad)
            self._db.execute("COMMIT")
            self.failure = None
        except (sqlite3.Error, OSError) as exc:  # the state loaded is held: written later
            self._rollback()
            self._fail(_reason(exc))
        return Contents(*contents[:4])

    def _lock(self) -> None:
        """Take the lock file (created 0600); InUse if another relay holds it. The
        holder's PID is written into it for the next one to name."""
        path = _lock_path(self.path)
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
        except BaseException:
            os.close(fd)
            raise
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
        self._lock_fd, self._lock_id = fd, _identity(path)

    def _lock_again(self) -> None:
        """Take the lock again if its file was removed or replaced (a directory removed
        and recreated): another relay may have started meanwhile (InUse)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._lock_fd < 0 or _identity(_lock_path(self.path)) != self._lock_id:
            self._lock()

    def _connect(self, loaded: bool) -> None:
        """Open the database at the path (caller holds the db lock). What is there and is
        not a usable store is moved aside first, and a new store created; so is a file
        that replaced the one `loaded` from."""
        self._disconnect()
        ours = self._file_id
        for suffix, what in (("", "store"), ("-wal", "store's write-ahead log")):
            path = self.path.with_name(self.path.name + suffix)
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(mode):
                self._move_aside(f"the {what} is not a regular file")
            elif suffix == "" and loaded and _identity(path) != ours:
                self._move_aside("the store was replaced while the relay ran")
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600))
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=0)
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise StoreFault("cannot use WAL mode")
            db.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
            db.execute("PRAGMA journal_size_limit=16777216")
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
            return self._connect(loaded)
        self._db, self._file_id, self._wal_id = db, _identity(self.path), None

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

    def _disconnect(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    # ------------------------------------------------------------------ loading

    def _load(self) -> "_Loaded":
        """Read and check everything; what is bad is returned to be deleted. In-flight
        marks are read as they are: the outbox clears them once it holds the messages
        (each is counted once, by the start that restores it)."""
        db, limit, now = self._db, self._limit, self._wall()
        bad: dict[str, list] = {"batches": [], "done": [], "progress": [], "notices": [],
                                "facts": []}
        finished: dict[int, list[tuple[int, int]]] = {}
        for first, last in db.execute("SELECT id, last FROM done"):
            if (type(first) is int and type(last) is int and 0 <= first <= last
                    and first // ROW_SLOTS == last // ROW_SLOTS):
                finished.setdefault(first // ROW_SLOTS, []).append((first, last))
            else:
                bad["done"].append(first)
        progress = {}
        for sid, part, attempts, in_flight in db.execute(
                "SELECT id, part, attempts, in_flight FROM progress"):
            if (type(sid) is int and _count(part, MAX_PARTS)
                    and _count(attempts, MAX_ATTEMPTS) and in_flight in (0, 1)):
                progress[sid] = (part, attempts, bool(in_flight))
            else:
                bad["progress"].append(sid)
        messages: list[Stored] = []
        overflow = []
        self._live, top = {}, 0
        for row in db.execute("SELECT id, times, producers, sizes, envelopes FROM batches "
                              "ORDER BY id DESC"):
            rid = row[0]
            unpacked = _unpack(row, now)
            if unpacked is None:
                bad["batches"].append(rid)
                continue
            top = max(top, rid)
            ranges = finished.get(rid, ())
            for index in range(len(unpacked) - 1, -1, -1):
                sid = rid * ROW_SLOTS + index
                if any(first <= sid <= last for first, last in ranges):
                    continue
                envelope, received_at, producer = unpacked[index]
                self._live[rid] = self._live.get(rid, 0) + 1
                if len(messages) < limit:
                    part, attempts, in_flight = progress.get(sid, (0, 0, False))
                    messages.append(Stored(sid, envelope, received_at, producer, part,
                                           attempts, in_flight))
                else:
                    overflow.append((sid, webhook_of(envelope), producer))
        messages.reverse()
        overflow.reverse()
        notices: Notices = {}
        for webhook, dropped, failed, since in db.execute(
                "SELECT webhook, dropped, failed, since FROM notices"):
            if (isinstance(webhook, str) and 0 < len(webhook) <= 2048
                    and _count(dropped, MAX_COUNT) and _count(failed, MAX_COUNT)
                    and dropped + failed > 0 and (since is None or _time(since))):
                notices[webhook] = (dropped, failed, since)
            else:
                bad["notices"].append(webhook)
        facts: Facts = {}
        for webhook, name, value in db.execute("SELECT webhook, name, value FROM facts"):
            kind = FACTS.get(name) if isinstance(name, str) else None
            if (isinstance(webhook, str) and 0 < len(webhook) <= 2048 and kind is bool
                    and type(value) is int and value in (0, 1)):
                facts.setdefault(webhook, {})[name] = bool(value)
            else:
                bad["facts"].append((webhook, name))
        skipped = sum(map(len, bad.values()))
        self.skipped += skipped
        if skipped:
            log.error("store: %d unreadable rows skipped and deleted (%s)", skipped,
                      ", ".join(f"{table} {len(ids)}" for table, ids in bad.items() if ids))
        self._next_row = max(self._next_row, top + 1)
        return _Loaded(messages, overflow, notices, facts, bad)

    def _delete_bad(self, bad: dict[str, list]) -> None:
        db = self._db
        for rid in bad["batches"]:
            db.execute("DELETE FROM batches WHERE id IS ?", (rid,))
            if type(rid) is int:
                self._delete_ranges(rid)
        for table, column in (("done", "id"), ("progress", "id"), ("notices", "webhook")):
            db.executemany(f"DELETE FROM {table} WHERE {column} IS ?",
                           [(key,) for key in bad[table]])
        db.executemany("DELETE FROM facts WHERE webhook IS ? AND name IS ?", bad["facts"])

    def _delete_ranges(self, row: int) -> None:
        first, last = row * ROW_SLOTS, row * ROW_SLOTS + ROW_SLOTS - 1
        self._db.execute("DELETE FROM done WHERE id BETWEEN ? AND ?", (first, last))
        self._db.execute("DELETE FROM progress WHERE id BETWEEN ? AND ?", (first, last))

    # ------------------------------------------------------------------ writes

    def add(self, raws: list, received_at: float) -> None:
        """Commit a batch the receiver took (with the queued outcomes: one transaction)
        and give each message its id; while the store is failed, nothing (the messages
        are held in memory only, and written by the way back)."""
        if self.failure is not None or not raws:
            return
        with self._db_lock:
            if self.failure is None:
                rows = self._rows(raws, lambda raw: received_at, same_time=True)
                if self._commit(rows):
                    for raw, sid in self._ids(raws, rows):
                        raw.sid = sid

    def sending(self, raws: list) -> None:
        """A request of these messages is about to be posted: marked in flight, and
        committed before this returns (for those in the store), so a restart after a
        crash counts them as possibly posted already."""
        for raw in raws:
            raw.in_flight = True
        if self.failure is None and any(raw.sid is not None for raw in raws):
            with self._db_lock:
                if self.failure is None:
                    with self._queue_lock:
                        self._progress.update((id(raw), raw) for raw in raws)
                    self._commit([])

    def done(self, raws: Iterable) -> None:
        """These messages have their final outcome (queued: called under the outbox's lock)."""
        with self._queue_lock:
            if self.failure is None or self._saving:
                before = len(self._done)
                self._done.extend(raw for raw in raws if raw.sid is not None or self._saving)
                if len(self._done) > before:
                    self._queued.notify()

    def progress(self, raws: Iterable) -> None:
        """Their part, attempts or in-flight mark changed (queued)."""
        with self._queue_lock:
            if self.failure is None or self._saving:
                before = len(self._progress)
                self._progress.update((id(raw), raw) for raw in raws
                                      if raw.sid is not None or self._saving)
                if len(self._progress) > before:
                    self._queued.notify()

    def notice(self, key: str, dropped: int, failed: int, since: float | None) -> None:
        """A webhook's loss-notice state (queued; coalesced per webhook)."""
        with self._queue_lock:
            if self.failure is None or self._saving:
                self._notices[key] = (dropped, failed, since)
                self._queued.notify()

    def learned(self, webhook: str, name: str, value: object) -> None:
        """A fact about a webhook a restart must not forget (queued)."""
        with self._queue_lock:
            if self.failure is None or self._saving:
                self._facts[(webhook, name)] = value
                self._queued.notify()

    def stored(self, raw) -> bool:
        """Whether `raw` is in the store's last committed state."""
        return raw.sid is not None and raw.sid // ROW_SLOTS in self._live

    def _rows(self, raws: list, wall_of, same_time: bool = False) -> list[tuple]:
        """Batches rows for `raws`, ROW_SLOTS at most each: (row id, times, producers,
        sizes, envelopes)."""
        rows = []
        for start in range(0, len(raws), ROW_SLOTS):
            chunk = raws[start:start + ROW_SLOTS]
            count = len(chunk)
            times = (struct.pack("<d", wall_of(chunk[0])) if same_time
                     else struct.pack(f"<{count}d", *map(wall_of, chunk)))
            producers = [raw.producer for raw in chunk]
            rows.append((self._next_row, times,
                         json.dumps(producers) if any(producers) else None,
                         struct.pack(f"<{count}I", *[len(raw.data) for raw in chunk]),
                         b"".join([raw.data for raw in chunk])))
            self._next_row += 1
        return rows

    def _ids(self, raws: list, rows: list[tuple]) -> list[tuple[object, int]]:
        """(raw, its id) for `raws` written as `rows`; the rows are counted live."""
        pairs = []
        for number, (rid, *_) in enumerate(rows):
            chunk = raws[number * ROW_SLOTS:(number + 1) * ROW_SLOTS]
            pairs.extend((raw, rid * ROW_SLOTS + index) for index, raw in enumerate(chunk))
            self._live[rid] = len(chunk)
        return pairs

    def _commit(self, rows: list[tuple]) -> bool:
        """One transaction: `rows` and everything queued (caller holds the db lock)."""
        with self._queue_lock:
            done, self._done = self._done, []
            progress, self._progress = self._progress, {}
            notices, self._notices = self._notices, {}
            facts, self._facts = self._facts, {}
        finished = [raw for raw in done if self.stored(raw)]
        written = [raw for raw in progress.values() if self.stored(raw)]
        if not (rows or finished or written or notices or facts):
            return True
        db = self._db
        try:
            if db is None:
                raise StoreFault("not open")
            db.execute("BEGIN IMMEDIATE")
            if rows:
                db.executemany("INSERT INTO batches VALUES (?, ?, ?, ?, ?)", rows)
            self._finish([raw.sid for raw in finished])
            for raw in finished:
                raw.sid = None
            db.executemany("INSERT OR REPLACE INTO progress VALUES (?, ?, ?, ?)",
                           [(raw.sid, raw.part, raw.attempts, int(raw.in_flight))
                            for raw in written if raw.sid is not None])
            for key, (dropped, failed, since) in notices.items():
                if dropped or failed:
                    db.execute("INSERT OR REPLACE INTO notices VALUES (?, ?, ?, ?)",
                               (key, dropped, failed, since))
                else:
                    db.execute("DELETE FROM notices WHERE webhook = ?", (key,))
            db.executemany("INSERT OR REPLACE INTO facts VALUES (?, ?, ?)",
                           [(webhook, name, int(value)) for (webhook, name), value
                            in facts.items()])
            db.execute("COMMIT")
        except (sqlite3.Error, OSError, StoreFault) as exc:
            self._rollback()
            self._fail(_reason(exc))
            return False
        if self._wal_id is None:
            self._wal_id = _identity(self.path.with_name(self.path.name + "-wal"))
        return True

    def _finish(self, sids: list[int]) -> None:
        """Record these message ids done: a row whose every message is done is deleted,
        otherwise the ids are written as ranges (drops are mostly runs of the oldest)."""
        by_row: dict[int, list[int]] = {}
        for sid in sids:
            by_row.setdefault(sid // ROW_SLOTS, []).append(sid)
        db = self._db
        for row, ids in by_row.items():
            live = self._live.get(row)
            if live is None:
                continue
            if live <= len(ids):
                del self._live[row]
                db.execute("DELETE FROM batches WHERE id = ?", (row,))
                self._delete_ranges(row)
                continue
            self._live[row] = live - len(ids)
            ids.sort()
            runs, first = [], ids[0]
            for previous, sid in zip(ids, ids[1:]):
                if sid != previous + 1:
                    runs.append((first, previous))
                    first = sid
            runs.append((first, ids[-1]))
            db.executemany("INSERT OR REPLACE INTO done VALUES (?, ?)", runs)

    def _rollback(self) -> None:
        try:
            if self._db is not None and self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _fail(self, reason: str, gone: bool = False) -> None:
        """Writes failed: the relay runs from memory until `run` gets the store back.
        `gone`: the file open is no longer the store at the path, so nothing committed
        to it will be found at the next start."""
        if self.failure is None:
            self._failed_at = self._reminded_at = time.monotonic()
            self._retry_at = 0.0
            log.error("store %s failed (%s): carrying on in memory; what is held is lost "
                      "if the relay is killed before the store is back; retrying every "
                      "%g s", self.path, reason, RETRY_SEC)
        self.failure = reason
        if gone:
            self._live.clear()
        with self._queue_lock:  # the way back writes everything: these are in it
            self._done, self._progress, self._notices, self._facts = [], {}, {}, {}

    # ------------------------------------------------------------------ everything at once

    def save_all(self, holdings: Holdings) -> bool:
        """Write everything held in one transaction, replacing what the store held (the
        way back from a failure, and a stop without durable mode). True if committed."""
        with self._db_lock:
            return self._save_all(lambda: holdings)

    def _save_all(self, source: Callable[[], Holdings]) -> bool:
        """(Caller holds the db lock, so nothing is added between `source`'s snapshot
        and the commit; outcomes queued meanwhile are committed after it.)"""
        self._check_file_locked()
        try:
            if self._db is None or self.failure is not None:
                self._lock_again()
                self._connect(loaded=True)
        except InUse as exc:
            self._disconnect()
            self._fail(f"in use by {exc.holder}")
            return False
        except (sqlite3.Error, OSError, StoreFault) as exc:
            self._disconnect()
            self._fail(_reason(exc))
            return False
        with self._queue_lock:
            self._saving = True
            self._done, self._progress, self._notices, self._facts = [], {}, {}, {}
        try:
            return self._write_all(source())
        finally:
            with self._queue_lock:
                self._saving = False

    def _write_all(self, holdings: Holdings) -> bool:
        raws = holdings.raws
        rows = self._rows(raws, lambda raw: raw.received_at + holdings.offset)
        live, self._live = self._live, {}
        ids = self._ids(raws, rows)
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            for table in _TABLES:
                if table != "meta":
                    db.execute(f"DELETE FROM {table}")
            db.executemany("INSERT INTO batches VALUES (?, ?, ?, ?, ?)", rows)
            db.executemany("INSERT INTO progress VALUES (?, ?, ?, ?)",
                           [(sid, raw.part, raw.attempts, int(raw.in_flight))
                            for raw, sid in ids if raw.part or raw.attempts or raw.in_flight])
            db.executemany("INSERT INTO notices VALUES (?, ?, ?, ?)",
                           [(key, *state) for key, state in holdings.notices.items()
                            if state[0] or state[1]])
            db.executemany("INSERT INTO facts VALUES (?, ?, ?)",
                           [(webhook, name, int(value)) for webhook, learned
                            in holdings.facts.items() for name, value in learned.items()])
            db.execute("COMMIT")
        except (sqlite3.Error, OSError, StoreFault) as exc:
            self._rollback()
            self._live = live
            self._fail(_reason(exc))
            return False
        for raw, sid in ids:
            raw.sid = sid
        self._wal_id = _identity(self.path.with_name(self.path.name + "-wal"))
        if self.failure is not None:
            log.warning("store writable again (it had failed: %s): %d held messages "
                        "written to it", self.failure, len(raws))
        self.failure = None
        return True

    # ------------------------------------------------------------------ the store's thread

    def run(self, stopping: threading.Event, source: Callable[[], Holdings],
            restore: Callable[[Contents], None]) -> None:
        """Until `stopping` is set (then call `wake`): commit queued outcomes within
        FLUSH_SEC; check every CHECK_SEC that the store at the path is the one open;
        while failed, try every RETRY_SEC to get it back: load it if it could not be read
        at start (handing what it held to `restore`), then write everything `source`
        gives; and remind the log every REMIND_SEC."""
        checked_at = time.monotonic()
        while not stopping.is_set():
            with self._queue_lock:
                if self.failure is not None or not self._has_queued():
                    self._queued.wait(min(RETRY_SEC, CHECK_SEC))
            if stopping.is_set():
                break
            now = time.monotonic()
            if self.failure is None and now - checked_at >= CHECK_SEC:
                checked_at = now
                self._check_file()
            if self.failure is not None:
                self._retry(source, restore, now)
            elif self._has_queued():
                stopping.wait(FLUSH_SEC)  # the receiver or a sender may commit it first
                with self._db_lock:
                    if self.failure is None:
                        self._commit([])

    def _has_queued(self) -> bool:
        return bool(self._done or self._progress or self._notices or self._facts)

    def _check_file(self) -> None:
        with self._db_lock:
            self._check_file_locked()

    def _check_file_locked(self) -> None:
        """Fail the store if the files at its path are no longer the ones open."""
        if self.failure is None:
            wal = self.path.with_name(self.path.name + "-wal")
            if _identity(self.path) != self._file_id:
                self._fail("deleted while the relay ran" if not os.path.lexists(self.path)
                           else "replaced while the relay ran", gone=True)
            elif self._wal_id is not None and _identity(wal) != self._wal_id:
                self._fail("its -wal removed or replaced while the relay ran", gone=True)
            elif _identity(_lock_path(self.path)) != self._lock_id:
                self._fail("its lock file removed or replaced while the relay ran")

    def _retry(self, source: Callable[[], Holdings], restore: Callable[[Contents], None],
               now: float) -> None:
        if now >= self._retry_at:
            self._retry_at = now + RETRY_SEC
            with self._db_lock:
                if not self._loaded:
                    try:
                        self._lock_again()
                    except InUse as exc:
                        self._fail(f"in use by {exc.holder}")
                    except (OSError, StoreFault) as exc:
                        self._fail(_reason(exc))
                    else:
                        contents = self._open_and_load()
                        if self._loaded:
                            restore(contents)
                            log.warning("store readable again: %d messages it held restored",
                                        len(contents.messages))
                if self._loaded and self.failure is not None:
                    self._save_all(source)
        if self.failure is not None and now - self._reminded_at >= REMIND_SEC:
            self._reminded_at = now
            log.error("store %s still failing (%s) after %.0f s: messages are held in "
                      "memory only", self.path, self.failure, now - self._failed_at)

    def wake(self) -> None:
        with self._queue_lock:
            self._queued.notify()

    # ------------------------------------------------------------------ legacy files

    def import_legacy(self, messages: list[tuple[bytes, int, int, bool]], notices: Notices,
                      marker: str) -> list[Stored] | None:
        """Add what the previous version left (messages as (envelope, part, attempts, in
        flight), and loss notices) in one transaction that also records `marker`. Returns
        the messages as stored ([] if `marker` was imported before), or None if the
        store could not take them."""
        with self._db_lock:
            if self.failure is not None:
                return None
            db = self._db
            if db.execute("SELECT 1 FROM meta WHERE key = ?", (marker,)).fetchone():
                return []
            now = self._wall()
            raws = [_Legacy(*message) for message in messages]
            rows = self._rows(raws, lambda raw: now, same_time=True)
            ids = self._ids(raws, rows)
            try:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT INTO batches VALUES (?, ?, ?, ?, ?)", rows)
                db.executemany("INSERT INTO progress VALUES (?, ?, ?, ?)",
                               [(sid, raw.part, raw.attempts, int(raw.in_flight))
                                for raw, sid in ids if raw.part or raw.attempts or raw.in_flight])
                db.executemany("INSERT OR REPLACE INTO notices VALUES (?, ?, ?, ?)",
                               [(key, *state) for key, state in notices.items()])
                db.execute("INSERT INTO meta VALUES (?, 1)", (marker,))
                db.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                self._rollback()
                for rid, *_ in rows:
                    self._live.pop(rid, None)
                self._fail(_reason(exc))
                return None
            return [Stored(sid, raw.data, now, None, raw.part, raw.attempts, raw.in_flight)
                    for raw, sid in ids]

    # ------------------------------------------------------------------ stop

    def flush(self) -> bool:
        """Commit what is queued now; False if the store is failed or that failed, or the
        store at the path is no longer the one open."""
        with self._db_lock:
            self._check_file_locked()
            return self.failure is None and self._commit([])

    def close(self) -> None:
        """Commit what is queued, close the database (SQLite folds its -wal back in) and
        release the lock."""
        with self._db_lock:
            if self.failure is None:
                self._commit([])
            self._disconnect()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


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
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK") if db.in_transaction else None
            raise
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
    if not (type(rid) is int and rid > 0 and isinstance(times, bytes)
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

