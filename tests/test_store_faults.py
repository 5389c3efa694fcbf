"""Every way the store was seen to lose or repeat messages, as an operator meets it: the
relay as a real process, real signals, the Discord stand-in, and a real tmpfs for a full
disk (mounted by the test: root only; it skips elsewhere, saying why)."""

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
import zlib

import pytest

from notifier import store
from notifier.standin import DiscordStandIn
from tests.harness import (RelayProcess, assert_balanced, contents, envelope_text, free_port,
                           saved_envelopes, wait_until)


@pytest.fixture
def discord():
    with DiscordStandIn() as standin:
        yield standin


def messages(pusher, webhook, count, start=0):
    for i in range(start, start + count):
        pusher.send(envelope_text(webhook, f"m{i}"))


def held_relay(relays, home, webhook_port, **settings):
    """A relay whose webhook's port nothing listens on yet: what it takes, it holds."""
    return relays(home, allowed=f"127.0.0.1:{webhook_port}", **settings)


# ------------------------------------------------------------------ a real full disk

class Disk:
    """A small tmpfs at `path`, filled and freed on demand."""

    def __init__(self, path):
        self.path = path
        self.filler = path / "filler"

    def fill(self):
        with open(self.filler, "ab") as handle:
            chunk = b"\0" * 65536
            while True:
                try:
                    handle.write(chunk)
                    handle.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
            with contextlib.suppress(OSError):  # the last few bytes
                while True:
                    os.write(handle.fileno(), b"\0" * 512)

    def free(self):
        self.filler.unlink()


@pytest.fixture
def disk(tmp_path):
    """The relay's data directory on a real 8 MiB tmpfs."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is tested on a real tmpfs, which only root can mount")
    where = tmp_path / "data"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield Disk(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def on_disk(relays, tmp_path, webhook_port, **settings):
    """A relay with its store on the tmpfs and its metrics beside it, on the real disk
    (so they are read whatever the tmpfs is going through)."""
    return held_relay(relays, tmp_path, webhook_port,
                      metrics_file=str(tmp_path / "metrics.sexp"), **settings)


def failed_by_filling(relay, disk, pusher, webhook, sent):
    """Fill the disk and send until the store says so (a write-ahead log with room left
    takes a few batches first). Returns how many messages were sent in all."""
    disk.fill()
    for _ in range(50):
        messages(pusher, webhook, 100, start=sent)
        sent += 100
        snapshot = relay.wait_metrics(lambda m, n=sent: m["received"] == n, what="taken")
        if snapshot["store_state"] == "failed":
            return sent
    raise AssertionError("the store never failed on a full disk")


@pytest.mark.parametrize("traffic_after", [True, False], ids=["traffic", "no traffic"])
def test_disk_full_then_freed_then_sigkill_loses_nothing(tmp_path, relays, pushers, disk,
                                                         traffic_after):
    """Full while messages arrive: the relay runs on from memory, says store_state failed
    and why, retries every second on its own (without traffic to wake it), writes all it
    holds once the disk has room, and only then says ok. A SIGKILL after that loses
    nothing."""
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/api/webhooks/1/tok"
    relay = on_disk(relays, tmp_path, port, queue_max="5000")
    pusher = pushers(relay.endpoint)
    messages(pusher, webhook, 200)
    relay.wait_metrics(lambda m: m["received"] == 200 and m["store_state"] == "ok")
    sent = failed_by_filling(relay, disk, pusher, webhook, 200)
    failed = relay.metrics()
    assert failed["store_reason"] == "disk full" and failed["pending"] == sent
    told = relay.status()
    assert told.returncode == 1 and "the message store cannot be written: disk full" in told.stdout
    assert relay.log().count("ERROR notifier.store") == 1  # said once, not per retry
    before = sorted(os.listdir(disk.path))
    stamp = failed["timestamp"]
    relay.wait_metrics(lambda m: m["timestamp"] >= stamp + 3, what="three retries")
    assert sorted(os.listdir(disk.path)) == before  # nothing piles up while it fails
    if traffic_after:
        messages(pusher, webhook, 50, start=sent)
        sent += 50
        relay.wait_metrics(lambda m: m["received"] == sent)
    disk.free()
    back = relay.wait_metrics(lambda m: m["store_state"] == "ok", timeout=15,
                              what="the store back without traffic")
    assert back["store_reason"] is None
    assert f"store writable again (it had failed: disk full): {sent} held" in relay.log()
    relay.kill()

    with DiscordStandIn(port=port) as standin:
        again = on_disk(relays, tmp_path, port, queue_max="5000", port=relay.port)
        again.wait_metrics(lambda m: m["delivered"] == sent, timeout=120, what="all delivered")
        assert sorted(contents(standin, 1), key=lambda text: int(text[1:])) == \
            [f"m{i}" for i in range(sent)]
        assert again.stop() == 0


def test_a_failed_save_at_sigterm_counts_the_messages_lost_and_status_says_so(
        tmp_path, relays, pushers, disk):
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/api/webhooks/1/tok"
    relay = on_disk(relays, tmp_path, port, durable="0", drain_sec="0.2")
    messages(pushers(relay.endpoint), webhook, 30)
    relay.wait_metrics(lambda m: m["received"] == 30 and m["retries"] >= 1)
    disk.fill()
    assert relay.stop() == 1
    final = relay.metrics()
    assert (final["lost"], final["pending"], final["saved"]) == (30, 0, 0)
    assert_balanced(final)
    assert "30 messages LOST" in relay.log()
    first = relay.status().stdout.splitlines()[0]
    assert first.startswith("NOTIFIER CRITICAL - stopped at ") and "30 messages LOST" in first
    disk.free()
    again = on_disk(relays, tmp_path, port, durable="0", port=relay.port)
    told = again.status()
    assert told.stdout.startswith("NOTIFIER WARNING - 30 messages LOST at the last stop")
    assert again.stop() == 0


# ------------------------------------------------------------------ the store under the relay's feet

def _delete_store(data):
    for name in ("notifier_store.sqlite3", "notifier_store.sqlite3-wal"):
        (data / name).unlink()


def _delete_wal(data):
    (data / "notifier_store.sqlite3-wal").unlink()


def _delete_directory(data):
    shutil.rmtree(data)


def _replace_by_fifo(data):
    (data / "notifier_store.sqlite3").unlink()
    os.mkfifo(data / "notifier_store.sqlite3")


def _replace_by_a_copy(data):
    shutil.copy(data / "notifier_store.sqlite3", data / "copy")
    os.replace(data / "copy", data / "notifier_store.sqlite3")


@pytest.mark.parametrize("harm", [_delete_store, _delete_wal, _delete_directory,
                                  _replace_by_fifo, _replace_by_a_copy])
def test_a_store_removed_or_replaced_while_running_is_rewritten_then_sigkill_loses_nothing(
        tmp_path, relays, pushers, harm):
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/api/webhooks/1/tok"
    relay = held_relay(relays, tmp_path, port, metrics_file=str(tmp_path / "metrics.sexp"))
    messages(pushers(relay.endpoint), webhook, 40)
    relay.wait_metrics(lambda m: m["received"] == 40)
    harm(tmp_path / "data")
    wait_until(lambda: "store writable again" in relay.log(), 15,
               what="noticed and written again")
    assert "40 held messages written" in relay.log()
    relay.wait_metrics(lambda m: m["store_state"] == "ok")
    relay.kill()

    with DiscordStandIn(port=port) as standin:
        again = held_relay(relays, tmp_path, port, port=relay.port,
                           metrics_file=str(tmp_path / "metrics.sexp"))
        again.wait_metrics(lambda m: m["delivered"] == 40, what="all delivered")
        assert contents(standin, 1) == [f"m{i}" for i in range(40)]
        assert again.stop() == 0


# ------------------------------------------------------------------ one relay per data directory

@pytest.mark.parametrize("durable", ["1", "0"])
def test_a_second_relay_on_the_same_store_exits_2_and_the_first_carries_on(
        tmp_path, discord, relays, pushers, durable):
    first = relays(allowed=f"127.0.0.1:{discord.port}", durable=durable)
    pusher = pushers(first.endpoint)
    messages(pusher, discord.webhook_url(1), 5)
    first.wait_metrics(lambda m: m["delivered"] == 5)
    second = RelayProcess(tmp_path, f"127.0.0.1:{discord.port}", durable=durable)
    started = time.monotonic()
    second.process = subprocess.Popen(second.command, env=second.env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert second.process.wait(30) == 2
    assert time.monotonic() - started < 15
    second.process.stderr.close()
    said = f"the store {first.store_file} is in use by relay pid {first.process.pid}"
    assert said in first.log()
    validated = subprocess.run([sys.executable, "-m", "notifier", "validate"], env=second.env,
                               capture_output=True, text=True, timeout=60)
    assert validated.returncode != 0 and said in validated.stderr
    messages(pusher, discord.webhook_url(1), 5, start=5)  # the first carries on untouched
    snapshot = first.wait_metrics(lambda m: m["delivered"] == 10)
    assert snapshot["pid"] == first.process.pid and snapshot["store_state"] == "ok"
    assert contents(discord, 1) == [f"m{i}" for i in range(10)]
    assert first.stop() == 0


# ------------------------------------------------------------------ settings that change between runs

@pytest.mark.parametrize("before, after", [("1", "0"), ("0", "1")])
def test_what_one_mode_saved_the_other_restores(tmp_path, relays, pushers, before, after):
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/api/webhooks/1/tok"
    relay = held_relay(relays, tmp_path, port, durable=before, drain_sec="0.2")
    messages(pushers(relay.endpoint), webhook, 30)
    relay.wait_metrics(lambda m: m["received"] == 30)
    assert relay.stop() == 0 and relay.metrics()["saved"] == 30
    with DiscordStandIn(port=port) as standin:
        again = held_relay(relays, tmp_path, port, durable=after, port=relay.port)
        snapshot = again.wait_metrics(lambda m: m["delivered"] == 30, what="delivered")
        assert contents(standin, 1) == [f"m{i}" for i in range(30)]
        assert again.stop() == 0
    assert snapshot["restored"] == 30 and bool(snapshot["durable"]) == (after == "1")


def test_a_lower_queue_max_restores_the_newest_and_reports_the_rest_dropped(tmp_path, relays,
                                                                           pushers):
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/api/webhooks/1/tok"
    relay = held_relay(relays, tmp_path, port, queue_max="200", drain_sec="0.2",
                       dedupe_window_sec="0")
    messages(pushers(relay.endpoint), webhook, 100)
    relay.wait_metrics(lambda m: m["received"] == 100)
    assert relay.stop() == 0
    with DiscordStandIn(port=port) as standin:
        again = held_relay(relays, tmp_path, port, queue_max="10", port=relay.port)
        snapshot = again.wait_metrics(lambda m: m["delivered"] == 10 and m["notices"] == 1,
                                      what="the newest 10 and a loss notice")
        posted = contents(standin, 1)
        assert posted[:10] == [f"m{i}" for i in range(90, 100)]
        assert "90 dropped" in posted[10]
        assert again.stop() == 0
    assert (snapshot["restored"], snapshot["drops"], snapshot["pending"]) == (100, 90, 0)
    assert_balanced(snapshot)
    assert saved_envelopes(relay.store_file) == []


# ------------------------------------------------------------------ hostile stores at start

def _junk(data):
    (data / "notifier_store.sqlite3").write_bytes(os.urandom(20_000))


def _directory(data):
    (data / "notifier_store.sqlite3").unlink()
    (data / "notifier_store.sqlite3").mkdir()


def _device(data):
    (data / "notifier_store.sqlite3").unlink()
    (data / "notifier_store.sqlite3").symlink_to("/dev/zero")


def _wal_fifo(data):
    os.mkfifo(data / "notifier_store.sqlite3-wal")


def _corrupt_page(data):
    path = data / "notifier_store.sqlite3"
    with open(path, "r+b") as handle:
        handle.seek(4096)
        handle.write(os.urandom(8192))


def _truncated(data):
    path = data / "notifier_store.sqlite3"
    os.truncate(path, os.path.getsize(path) // 3)


@pytest.mark.parametrize("harm", [_junk, _replace_by_fifo, _directory, _device, _wal_fifo,
                                  _corrupt_page, _truncated])
def test_a_hostile_store_is_moved_aside_and_the_relay_starts_within_seconds(
        tmp_path, discord, relays, pushers, harm):
    first = relays(allowed="127.0.0.1", queue_max="5000", drain_sec="0")
    messages(pushers(first.endpoint), f"http://127.0.0.1:{free_port()}/api/webhooks/9/tok",
             300)  # held for a webhook nobody answers: a store of some pages
    first.wait_metrics(lambda m: m["received"] == 300)
    assert first.stop() == 0 and first.metrics()["saved"] == 300
    harm(tmp_path / "data")
    started = time.monotonic()
    relay = relays(allowed="127.0.0.1", port=first.port, drain_sec="0")
    assert time.monotonic() - started < 30
    snapshot = relay.wait_metrics(lambda m: m["store_state"] == "ok")
    assert "moved aside as notifier_store.sqlite3.unreadable-" in snapshot["store_moved_aside"]
    assert "ERROR notifier.store store unusable" in relay.log() and "Traceback" not in relay.log()
    assert list((tmp_path / "data").glob("notifier_store.sqlite3*.unreadable-*")) or \
        list((tmp_path / "data").glob("notifier_store.sqlite3.unreadable-*"))
    told = relay.status()
    assert told.returncode == 1 and "moved aside" in told.stdout
    messages(pushers(relay.endpoint), discord.webhook_url(1), 1)
    relay.wait_metrics(lambda m: m["delivered"] == 1)
    assert relay.stop() == 0
    clean = relays(allowed="127.0.0.1", port=first.port, drain_sec="0")
    assert clean.metrics()["store_moved_aside"] is None  # shown until the next clean start
    assert "moved aside" not in clean.status().stdout
    assert clean.stop() == 0


def test_hostile_rows_are_skipped_counted_and_never_stop_the_relay(tmp_path, discord, relays,
                                                                   pushers):
    """A loss notice dated 1e15 used to kill a sender at every start; counts of zero, a
    row whose sizes do not add up, a producer list that is not one: each skipped."""
    first = relays(allowed=f"127.0.0.1:{discord.port}")
    assert first.stop() == 0
    good = envelope_text(discord.webhook_url(1), "good")
    with contextlib.closing(sqlite3.connect(first.store_file)) as db, db:
        now = struct.pack("<d", time.time())
        db.executemany("INSERT INTO batches VALUES (?, ?, ?, ?, ?)", [
            (1, now, None, struct.pack("<I", len(good)), good),
            (2, now, None, struct.pack("<I", 3), b"abcdef"),
            (3, now, "[7]", struct.pack("<I", 3), b"abc"),
            (4, struct.pack("<d", 1e15), None, struct.pack("<I", 3), b"abc")])
        db.executemany("INSERT INTO notices VALUES (?, ?, ?, ?)", [
            (discord.webhook_url(1), 3, 0, 1e15), (discord.webhook_url(2), 0, 0, None),
            (discord.webhook_url(3), 2, 0, time.time() - 60),
            ("https://evil.example/api/webhooks/4/tok", 2, 0, None)])
        db.execute("INSERT INTO progress VALUES (512, -1, 0, 0)")
    relay = relays(allowed=f"127.0.0.1:{discord.port}", port=first.port)
    snapshot = relay.wait_metrics(lambda m: m["delivered"] == 1, what="the good one")
    assert contents(discord, 1) == ["good"]
    assert snapshot["store_skipped"] == 7 and snapshot["store_state"] == "ok"
    assert relay.status().returncode == 1 and "7 unreadable entries" in relay.status().stdout
    relay.wait_metrics(lambda m: m["notices"] == 1)  # the one good notice, posted first
    assert "2 dropped" in contents(discord, 3)[0]
    assert relay.stop() == 0
    again = relays(allowed=f"127.0.0.1:{discord.port}", port=first.port)
    assert again.metrics()["store_skipped"] == 0  # counted once: deleted
    assert again.stop() == 0


# ------------------------------------------------------------------ what the previous version left

def journal_record(kind: bytes, body: bytes) -> bytes:
    return struct.pack("<IIc", zlib.crc32(body, zlib.crc32(kind)), len(body), kind) + body


def legacy_journal(directory, envelopes):
    directory.mkdir(parents=True)
    count = len(envelopes)
    head = struct.pack(f"<I{count}Q{count}I", count, *range(1, count + 1), *map(len, envelopes))
    (directory / "seg-000000000001.log").write_bytes(
        journal_record(b"A", head + b"".join(envelopes))
        + journal_record(b"D", struct.pack("<Q", 1)))  # the first was delivered


def legacy_pending(path, envelopes, webhook):
    from notifier import sexp
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(sexp.dumps({
        "schema_version": 2, "saved_at": int(time.time()),
        "messages": [{"envelope": data.decode(), "part": 0, "attempts": 0, "in_flight": False}
                     for data in envelopes],
        "notices": [{"webhook": webhook, "dropped": 4, "failed": 0, "since": int(time.time())}]}))


def test_the_previous_versions_pending_file_and_journal_are_imported_and_delivered_once(
        tmp_path, discord, relays):
    data = tmp_path / "data"
    legacy_journal(data / "notifier_journal",
                   [envelope_text(discord.webhook_url(1), f"j{i}") for i in range(4)])
    legacy_pending(data / "notifier_pending.sexp",
                   [envelope_text(discord.webhook_url(2), f"p{i}") for i in range(3)],
                   discord.webhook_url(2))
    relay = relays(allowed=f"127.0.0.1:{discord.port}")
    snapshot = relay.wait_metrics(lambda m: m["delivered"] == 6 and m["notices"] == 1)
    assert contents(discord, 1) == ["j1", "j2", "j3"]
    assert "4 dropped" in contents(discord, 2)[0]  # a restored notice goes first
    assert contents(discord, 2)[1:] == ["p0", "p1", "p2"]
    assert (data / "notifier_journal.imported").is_dir()
    assert (data / "notifier_pending.sexp.imported").is_file()
    assert snapshot["restored"] == 6
    assert relay.stop() == 0
    again = relays(allowed=f"127.0.0.1:{discord.port}", port=relay.port)
    assert again.metrics()["restored"] == 0
    assert again.stop() == 0
    assert contents(discord, 1) == ["j1", "j2", "j3"]  # once each


def test_an_import_interrupted_before_the_rename_is_not_imported_twice(tmp_path, discord,
                                                                        relays):
    """A crash between the import's commit and the rename: the store knows the file."""
    from notifier import migrate
    data = tmp_path / "data"
    pending = data / "notifier_pending.sexp"
    legacy_pending(pending, [envelope_text(discord.webhook_url(1), "once")],
                   discord.webhook_url(1))
    keeper = store.Store(data / "notifier_store.sqlite3")
    keeper.open(10)
    legacy = migrate.read(pending)
    keeper.import_legacy(legacy.messages, legacy.notices, migrate.marker(pending))
    keeper.close()
    relay = relays(allowed=f"127.0.0.1:{discord.port}")
    relay.wait_metrics(lambda m: m["delivered"] == 1 and m["notices"] == 1)
    assert contents(discord, 1)[1:] == ["once"]
    assert not pending.exists() and pending.with_name(pending.name + ".imported").exists()
    assert relay.stop() == 0


# ------------------------------------------------------------------ what a restart must not forget

def test_a_forum_webhooks_loss_notice_after_a_restart_creates_a_thread(tmp_path, relays,
                                                                       pushers):
    port = free_port()
    post = {"content": "alert", "thread_name": "Alert"}
    with DiscordStandIn(port=port, forums={"7"}) as forum:
        relay = relays(allowed=f"127.0.0.1:{port}", queue_max="2", drain_sec="0.2",
                       dedupe_window_sec="0")
        pusher = pushers(relay.endpoint)
        pusher.send(json.dumps({"type": "NOTIFIER", "webhook": forum.webhook_url(7),
                                "payload": post}).encode())
        relay.wait_metrics(lambda m: m["delivered"] == 1, what="the first post")
        forum.set_mode(None, "status", status=500)
        for i in range(5):
            pusher.send(json.dumps({"type": "NOTIFIER", "webhook": forum.webhook_url(7),
                                    "payload": {**post, "content": f"p{i}"}}).encode())
        relay.wait_metrics(lambda m: m["received"] == 6 and m["drops"] == 3, what="3 dropped")
        assert relay.stop() == 0
    with DiscordStandIn(port=port, forums={"7"}) as forum:
        again = relays(allowed=f"127.0.0.1:{port}", port=relay.port)
        again.wait_metrics(lambda m: m["delivered"] == 2 and m["notices"] == 1,
                           what="the two kept and the loss notice")
        notices = [message for message in forum.messages("7") if "lost" in message["content"]]
        assert len(notices) == 1 and notices[0]["thread_name"] == "Notifications lost"
        assert again.stop() == 0
