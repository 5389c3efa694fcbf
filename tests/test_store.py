"""The store on its own: what it keeps, the lock, every hostile thing it may find at its path
or in its rows, and the previous version's files. Real files, real SQLite; the relay as
a process is in test_store_faults.py."""

import contextlib
import json
import logging
import math
import os
import sqlite3
import struct
import threading
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notifier import migrate, store
from notifier.held import Raw
from notifier.store import Holdings, InUse, Store
from tests.harness import wait_until

HOOK = "https://discord.com/api/webhooks/7/tok"
SINCE = float(int(time.time()) - 3600)  # a loss an hour ago


def envelope(n: int) -> bytes:
    return json.dumps({"type": "NOTIFIER", "webhook": HOOK, "payload": {"content": f"m{n}"}}
                      ).encode()


def raws(count: int, start: int = 0, producer=None) -> list[Raw]:
    return [Raw(envelope(start + n), time.monotonic(), producer=producer) for n in range(count)]


@pytest.fixture
def path(tmp_path):
    return tmp_path / "data" / "notifier_store.sqlite3"


@pytest.fixture
def opened(path):
    """Stores opened on `path`, closed however the test ends."""
    made = []

    def open_store(limit=1000):
        made.append(Store(path))
        contents = made[-1].open(limit)
        return made[-1], contents
    yield open_store
    for each in made:
        each.close()


def reopen(path, limit=1000):
    again = Store(path)
    try:
        return again.open(limit), again
    finally:
        again.close()


def texts(contents) -> list[str]:
    return [json.loads(item.envelope)["payload"]["content"] for item in contents.messages]


# ------------------------------------------------------------------ what it keeps

def test_what_is_added_stays_until_done_with_its_progress_notices_and_facts(path, opened):
    keeper, contents = opened()
    assert contents.messages == [] and keeper.state == "ok"
    batch = raws(700)  # two rows: 512 and 188
    keeper.add(batch, time.time())
    assert [raw.sid for raw in batch[:2]] == [512, 513] and batch[-1].sid == 2 * 512 + 187
    keeper.done(batch[:600])
    batch[650].part, batch[650].attempts = 2, 3
    keeper.progress([batch[650]])
    keeper.sending([batch[651]])
    keeper.notice(HOOK, 3, 1, SINCE)
    keeper.learned(HOOK, "forum", True)
    assert keeper.flush()
    keeper.close()
    (contents, _) = reopen(path)
    assert texts(contents) == [f"m{n}" for n in range(600, 700)]
    by_text = dict(zip(texts(contents), contents.messages))
    assert (by_text["m650"].part, by_text["m650"].attempts) == (2, 3)
    assert by_text["m651"].in_flight and not by_text["m652"].in_flight
    assert contents.notices == {HOOK: (3, 1, SINCE)}
    assert contents.facts == {HOOK: {"forum": True}}
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_a_row_whose_every_message_is_done_is_deleted(path, opened):
    keeper, _ = opened()
    batch = raws(10)
    keeper.add(batch, time.time())
    keeper.done(batch)
    assert keeper.flush()
    keeper.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM batches").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM done").fetchone() == (0,)


def test_more_than_the_limit_gives_the_newest_and_the_rest_as_overflow(path, opened):
    keeper, _ = opened()
    keeper.add(raws(30, producer="guardian"), time.time())
    keeper.close()
    contents, _ = reopen(path, limit=10)
    assert texts(contents) == [f"m{n}" for n in range(20, 30)]
    assert [(webhook, producer) for _, webhook, producer in contents.overflow] == \
        [("7", "guardian")] * 20
    assert [item.producer for item in contents.messages] == ["guardian"] * 10


def test_save_all_replaces_everything_in_one_transaction(path, opened):
    keeper, _ = opened()
    old = raws(5)
    keeper.add(old, time.time())
    kept = [old[3], *raws(2, start=100)]
    kept[0].part = 1
    assert keeper.save_all(Holdings(kept, {"7": (4, 0, None)}, {HOOK: {"forum": True}},
                                    time.time() - time.monotonic()))
    assert all(keeper.stored(raw) for raw in kept) and not keeper.stored(old[0])
    keeper.close()
    contents, _ = reopen(path)
    assert texts(contents) == ["m3", "m100", "m101"] and contents.messages[0].part == 1
    assert contents.notices == {"7": (4, 0, None)} and contents.facts == {HOOK: {"forum": True}}


def test_the_restored_receive_time_is_kept(path, opened):
    keeper, _ = opened()
    keeper.add(raws(1), 1_700_000_000.5)
    keeper.close()
    contents, _ = reopen(path)
    assert contents.messages[0].received_at == 1_700_000_000.5


# ------------------------------------------------------------------ one relay per store

def test_a_second_store_on_the_same_path_is_refused_naming_the_holder(path, opened):
    keeper, _ = opened()
    assert store.in_use(path) == f"relay pid {os.getpid()}"
    with pytest.raises(InUse) as refused:
        Store(path).open(10)
    assert str(path) in str(refused.value) and f"pid {os.getpid()}" in str(refused.value)
    assert keeper.state == "ok" and keeper.flush()
    keeper.close()
    assert store.in_use(path) is None
    assert oct(os.stat(path.with_name(path.name + ".lock")).st_mode & 0o777) == "0o600"


def test_in_use_never_takes_the_lock(path, opened):
    assert store.in_use(path) is None  # nothing there
    keeper, _ = opened()
    for _ in range(50):
        assert store.in_use(path) is not None
    keeper.close()
    again = Store(path)
    again.open(10)  # nothing in_use did kept it
    again.close()


# ------------------------------------------------------------------ hostile files at start

def _junk(path):
    path.write_bytes(b"this is not a database" * 100)


def _truncated(path):
    keeper = Store(path)
    keeper.open(10)
    keeper.add(raws(600), time.time())
    keeper.close()
    with open(path, "r+b") as handle:
        handle.seek(4096 * 3)
        handle.write(os.urandom(4096))  # a page of garbage in the middle


def _fifo(path):
    os.mkfifo(path)


def _directory(path):
    path.mkdir()


def _device(path):
    path.symlink_to("/dev/zero")


def _wal_fifo(path):
    keeper = Store(path)
    keeper.open(10)
    keeper.close()
    os.mkfifo(path.with_name(path.name + "-wal"))


def _other_schema(path):
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
        db.execute("INSERT INTO meta VALUES ('schema_version', 99)")


def _foreign(path):
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE trades (id INTEGER)")


@pytest.mark.parametrize("make", [_junk, _truncated, _fifo, _directory, _device, _wal_fifo,
                                  _other_schema, _foreign])
def test_an_unusable_store_is_moved_aside_never_deleted_and_a_new_one_used(path, make):
    path.parent.mkdir()
    make(path)
    keeper = Store(path)
    started = time.monotonic()
    contents = keeper.open(100)
    assert time.monotonic() - started < 10  # a FIFO must not hang it
    try:
        assert keeper.state == "ok" and contents.messages == []
        assert len(keeper.moved_aside) == 1, keeper.moved_aside
        aside = [p for p in path.parent.iterdir() if ".unreadable-" in p.name]
        assert aside and path.name in keeper.moved_aside[0]
        keeper.add(raws(1), time.time())
        assert keeper.flush()
    finally:
        keeper.close()
    contents, again = reopen(path)
    assert texts(contents) == ["m0"] and again.moved_aside == []


def _rows(db):
    now = time.time()
    good = (1, struct.pack("<d", now), None, struct.pack("<I", len(envelope(0))), envelope(0))
    db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?)", good)
    bad = [
        (2, struct.pack("<d", 1e15), None, struct.pack("<I", 3), b"abc"),  # time far ahead
        (3, struct.pack("<d", math.nan), None, struct.pack("<I", 3), b"abc"),
        (4, struct.pack("<d", now), None, struct.pack("<I", 5), b"abc"),  # sizes do not add up
        (5, struct.pack("<d", now), None, b"\x01\x02", b"ab"),  # not a whole size
        (6, struct.pack("<d", now), "not json", struct.pack("<I", 3), b"abc"),
        (7, struct.pack("<d", now), json.dumps([1]), struct.pack("<I", 3), b"abc"),
        (8, "text", None, struct.pack("<I", 3), b"abc"),
        (10, struct.pack("<d", now), None, struct.pack("<I", 0), b""),  # an empty envelope
    ]
    db.executemany("INSERT INTO batches VALUES (?, ?, ?, ?, ?)", bad)
    db.executemany("INSERT INTO done VALUES (?, ?)", [(5000, 4000), (512 * 20 + 5, 512 * 21)])
    db.executemany("INSERT INTO progress VALUES (?, ?, ?, ?)",
                   [(513, -1, 0, 0), (514, 0, "x", 0), (515, 0, 0, 7)])
    db.executemany("INSERT INTO notices VALUES (?, ?, ?, ?)", [
        (HOOK, 3, 0, 1e15), ("8", 0, 0, None), ("9", -1, 2, None), ("10", "x", 1, None),
        ("11", 1, 0, math.inf), ("12", 2, 0, None)])
    db.executemany("INSERT INTO facts VALUES (?, ?, ?)",
                   [(HOOK, "forum", 5), (HOOK, "colour", 1), (HOOK + "x", "forum", 1)])
    return len(bad) + 2 + 3 + 5 + 2


def test_every_row_is_checked_like_producer_input_and_a_bad_one_skipped_counted_deleted(
        path, opened):
    keeper, _ = opened()
    keeper.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        bad = _rows(db)
    contents, again = reopen(path)
    assert texts(contents) == ["m0"]
    assert contents.notices == {"12": (2, 0, None)}
    assert contents.facts == {HOOK + "x": {"forum": True}}
    assert again.skipped == bad and again.moved_aside == []
    _, third = reopen(path)
    assert third.skipped == 0  # counted once: the bad rows are gone


ANY = st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=30),
                st.binary(max_size=40))
"""Any value SQLite can hold, in any column: a store written by anything."""


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.dictionaries(st.sampled_from(["batches", "done", "progress", "notices",
                                             "facts"]),
                            st.lists(st.lists(ANY, min_size=5, max_size=5), max_size=4)),
       sizes=st.lists(st.integers(0, 70_000), min_size=1, max_size=3))
def test_whatever_the_rows_hold_restore_never_raises_and_gives_only_checked_values(
        tmp_path_factory, rows, sizes):
    path = tmp_path_factory.mktemp("store") / "notifier_store.sqlite3"
    made = Store(path)
    made.open(10)
    made.close()
    columns = {"batches": 5, "done": 2, "progress": 4, "notices": 4, "facts": 3}
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO batches VALUES (1, ?, NULL, ?, ?)",
                   (struct.pack("<d", time.time()), struct.pack(f"<{len(sizes)}I", *sizes),
                    b"x" * sum(sizes)))
        for table, values in rows.items():
            for value in values:
                with contextlib.suppress(sqlite3.Error):  # a key SQLite itself refuses
                    db.execute(f"INSERT OR REPLACE INTO {table} VALUES "
                               f"({', '.join('?' * columns[table])})",
                               value[:columns[table]])
    contents, again = reopen(path)
    for item in contents.messages:
        assert 0 < len(item.envelope) <= 64 * 1024 and math.isfinite(item.received_at)
        assert 0 <= item.part <= store.MAX_PARTS and 0 <= item.attempts <= store.MAX_ATTEMPTS
    for dropped, failed, since in contents.notices.values():
        assert dropped >= 0 and failed >= 0 and dropped + failed > 0
        assert since is None or store.EARLIEST <= since <= time.time() + store.FUTURE_SEC
    assert all(learned == {"forum": True} or learned == {"forum": False}
               for learned in contents.facts.values())
    assert again.state == "ok"


# ------------------------------------------------------------------ faults while running

def test_a_store_deleted_while_open_is_noticed_and_written_again_from_memory(path, opened,
                                                                            caplog):
    keeper, _ = opened()
    held = raws(3)
    keeper.add(held, time.time())
    for name in (path.name, path.name + "-wal"):
        path.with_name(name).unlink(missing_ok=True)
    stopping = threading.Event()
    thread = threading.Thread(target=keeper.run, args=(
        stopping, lambda: Holdings(held, {}, {}, time.time() - time.monotonic()),
        lambda contents: None))
    thread.start()
    try:
        with caplog.at_level(logging.WARNING, "notifier.store"):
            wait_until(lambda: "store writable again (it had failed: deleted while the relay "
                               "ran): 3 held messages" in caplog.text, 10,
                       what="noticed and written again")
        assert keeper.state == "ok" and "failed (deleted while the relay ran)" in caplog.text
    finally:
        stopping.set()
        keeper.wake()
        thread.join()
    keeper.close()
    contents, _ = reopen(path)
    assert texts(contents) == ["m0", "m1", "m2"]


def unreadable_at_start(path) -> Store:
    """A store holding m0 and m1 that a relay could not take at start (its lock file was
    a directory), and can now."""
    keeper = Store(path)
    keeper.open(10)
    keeper.add(raws(2), time.time())
    keeper.close()
    lock = path.with_name(path.name + ".lock")
    lock.unlink()
    lock.mkdir()
    later = Store(path)
    assert later.open(10).messages == [] and later.state == "failed"
    lock.rmdir()
    return later


def test_a_store_that_could_not_be_read_at_start_is_loaded_before_it_is_written(path):
    """Never overwrite what a store holds with what memory holds before reading it."""
    later = unreadable_at_start(path)
    restored = []
    stopping = threading.Event()
    thread = threading.Thread(target=later.run, args=(
        stopping, lambda: Holdings(raws(1, start=50), {}, {}, 0.0), restored.append))
    thread.start()
    try:
        wait_until(lambda: later.state == "ok", 10, what="the store back")
    finally:
        stopping.set()
        later.wake()
        thread.join()
        later.close()
    assert [texts(contents) for contents in restored] == [["m0", "m1"]]


def test_a_stop_before_an_unreadable_store_was_loaded_adds_to_it_never_over_it(path):
    later = unreadable_at_start(path)
    held = raws(1, start=50)
    assert later.save_all(Holdings(held, {}, {}, time.time() - time.monotonic()))
    later.close()
    contents, _ = reopen(path)
    assert texts(contents) == ["m0", "m1", "m50"]


# ------------------------------------------------------------------ the previous version's files

def journal_record(kind: bytes, body: bytes) -> bytes:
    return struct.pack("<IIc", zlib.crc32(body, zlib.crc32(kind)), len(body), kind) + body


def journal_batch(pairs) -> bytes:
    count = len(pairs)
    head = struct.pack(f"<I{count}Q{count}I", count, *[jid for jid, _ in pairs],
                       *[len(data) for _, data in pairs])
    return journal_record(b"A", head + b"".join(data for _, data in pairs))


def test_a_legacy_journal_is_read_record_by_record_and_bad_records_end_their_segment(
        tmp_path):
    directory = tmp_path / "notifier_journal"
    directory.mkdir()
    (directory / "seg-000000000001.log").write_bytes(
        journal_batch([(1, envelope(1)), (2, envelope(2)), (3, envelope(3))])
        + journal_record(b"D", struct.pack("<Q", 1))
        + journal_record(b"P", struct.pack("<QII", 2, 1, 4))
        + journal_record(b"S", struct.pack("<Q", 3))
        + journal_record(b"N", json.dumps([HOOK, 2, 0, int(SINCE)]).encode()))
    (directory / "seg-000000000002.log").write_bytes(
        journal_batch([(4, envelope(4))]) + journal_record(b"P", b"abc")  # 3 bytes
        + journal_batch([(5, envelope(5))]))
    (directory / "seg-000000000003.log").write_bytes(journal_record(b"D", b"12345"))
    (directory / "seg-000000000004.log").write_bytes(journal_record(b"N", b"not json"))
    (directory / "seg-000000000005.log").write_bytes(
        journal_record(b"N", json.dumps(["9", 1, 0, 1e15]).encode()))
    os.mkfifo(directory / "seg-000000000006.log")
    (directory / "seg-000000000007.log").symlink_to("/dev/zero")
    (directory / "seg-000000000008.log").write_bytes(journal_batch([(6, envelope(6))])[:30])
    legacy = migrate.read(directory)
    assert legacy.messages == [(envelope(2), 1, 4, False), (envelope(3), 0, 0, True),
                               (envelope(4), 0, 0, False)]
    assert legacy.notices == {HOOK: (2, 0, int(SINCE))}
    assert legacy.skipped == 7


def test_a_legacy_pending_file_of_either_schema_is_read_and_bad_entries_skipped(tmp_path):
    one = tmp_path / "one" / "notifier_pending.sexp"
    one.parent.mkdir()
    one.write_text('((schema_version . 1) (envelopes "a" "b" 7))')
    assert migrate.read(one) == ([(b"a", 0, 0, False), (b"b", 0, 0, False)], {}, 1)
    two = tmp_path / "notifier_pending.sexp"
    two.write_text(
        '((schema_version . 2) (saved_at . 1764201597) (messages '
        '((envelope . "a") (part . 1) (attempts . 2) (in_flight . t)) ((envelope . 7)) '
        '((envelope . "c") (part . -1))) (notices '
        f'((webhook . "{HOOK}") (dropped . 2) (failed . 0) (since . 1764201500)) '
        '((webhook . "5") (dropped . 0) (failed . 0)) '
        '((webhook . "6") (dropped . 1) (failed . 0) (since . 1e15))))')
    legacy = migrate.read(two)
    assert legacy.messages == [(b"a", 1, 2, True)]
    assert legacy.notices == {HOOK: (2, 0, 1764201500)} and legacy.skipped == 4


def test_an_import_is_recorded_with_its_marker_so_it_happens_once(path, opened, tmp_path):
    keeper, _ = opened()
    stored = keeper.import_legacy([(envelope(1), 1, 0, False)], {"7": (2, 0, None)}, "m1")
    assert [(item.part, item.envelope) for item in stored] == [(1, envelope(1))]
    assert keeper.import_legacy([(envelope(1), 1, 0, False)], {}, "m1") == []
    keeper.close()
    contents, _ = reopen(path)
    assert texts(contents) == ["m1"] and contents.notices == {"7": (2, 0, None)}


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segment=st.binary(max_size=300), records=st.lists(
    st.tuples(st.sampled_from([b"A", b"S", b"P", b"D", b"N", b"B", b"Z"]),
              st.binary(max_size=60)), max_size=6),
       pending=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_whatever_the_previous_versions_files_hold_reading_them_never_raises(
        tmp_path_factory, segment, records, pending):
    """Only "cannot be read at all" (ValueError, OSError: the file is moved aside) or what
    was read, bad records skipped."""
    directory = tmp_path_factory.mktemp("legacy") / "notifier_journal"
    directory.mkdir()
    (directory / "seg-000000000001.log").write_bytes(segment)
    (directory / "seg-000000000002.log").write_bytes(
        b"".join(journal_record(kind, body) for kind, body in records))
    legacy = migrate.read(directory)
    assert all(0 < len(message[0]) <= 64 * 1024 for message in legacy.messages)
    path = directory.parent / "notifier_pending.sexp"
    path.write_bytes(pending)
    try:
        migrate.read(path)
    except ValueError:
        pass
