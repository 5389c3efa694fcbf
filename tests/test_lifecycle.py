"""Stop, restart, crash: every accepted message is delivered or accounted for. The relay as
a real process, real signals, the stand-in for Discord."""

import contextlib
import errno
import json
import os
import signal
import threading

import pytest

from notifier import journal, pending
from notifier.journal import Journal, Saved
from notifier.payload import fit
from notifier.standin import DiscordStandIn
from tests.harness import (RelayProcess, assert_balanced, contents, envelope_text, free_port,
                           saved_envelopes, wait_until)

LONG = {"content": " ".join(f"w{i}" for i in range(1000))}  # three requests


def json_envelope(webhook: str, payload: dict) -> bytes:
    return json.dumps({"type": "NOTIFIER", "webhook": webhook, "payload": payload}).encode()


def posted(standin, webhook_id="1") -> list[str]:
    return [message["content"] for message in standin.messages(webhook_id)]


def test_a_split_message_stopped_after_part_1_posts_only_the_rest_after_restart(
        tmp_path, relays, pushers):
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/api/webhooks/1/tok"
    parts = [request["content"] for request in fit(LONG)]
    assert len(parts) == 3
    with DiscordStandIn(port=port) as first:
        first.set_mode(None, "status", status=500)
        first.set_mode("1", "ok", times=1)
        first.set_mode("2", "ok")
        relay = relays(allowed=f"127.0.0.1:{port}", drain_sec="0.3")
        pusher = pushers(relay.endpoint)
        pusher.send(json_envelope(webhook, LONG))
        wait_until(lambda: posted(first) == parts[:1], 30, what="part 1")
        pusher.send(json_envelope(first.webhook_url(2), {"content": "elsewhere"}))
        # Webhook 2 delivers, so part 2's next error is its own: an attempt counted
        retries = relay.wait_metrics(lambda m: m["delivered"] == 1, what="webhook 2")["retries"]
        relay.wait_metrics(lambda m: m["retries"] > retries, what="part 2 retried")
        assert relay.stop() == 0
        assert posted(first) == parts[:1]
    saved, _ = pending.loads(relay.pending_file.read_bytes())
    assert [(item.part, item.attempts >= 1) for item in saved] == [(1, True)]

    with DiscordStandIn(port=port) as second:
        again = relays(allowed=f"127.0.0.1:{port}", port=relay.port)
        snapshot = again.wait_metrics(lambda m: m["delivered"] == 1, what="the rest delivered")
        assert posted(second) == parts[1:]
    assert snapshot["restored"] == 1 and snapshot["requests"] == 2
    assert_balanced(snapshot)


def test_a_request_answered_during_the_grace_is_delivered_not_saved(tmp_path, relays, pushers):
    with DiscordStandIn() as discord:
        discord.set_mode(None, "hang")
        relay = relays(allowed=f"127.0.0.1:{discord.port}", drain_sec="0.2")
        pushers(relay.endpoint).send(envelope_text(discord.webhook_url(1), "in flight"))
        wait_until(lambda: discord.hanging == 1, 30, what="the request to hang")
        relay.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "drain time over" in relay.log(), 30, what="the drain to end")
        discord.set_mode(None, "ok")
        discord.release_hangs()
        assert relay.process.wait(30) == 0
    final = relay.metrics()
    assert (final["delivered"], final["pending"]) == (1, 0)
    assert not relay.pending_file.exists()
    assert contents(discord, 1) == ["in flight"]


def test_a_50kb_json_envelope_is_saved_and_restored_as_it_came(tmp_path, relays, pushers):
    port = free_port()  # nothing listens: the relay retries until stopped
    webhook = f"http://127.0.0.1:{port}/api/webhooks/1/tok"
    payload = {"content": "big", "embeds": [{"title": "t", "fields": [
        {"name": f'"{i}"', "value": '"q"'} for i in range(20)]}], "x": ['"'] * 10_000}
    data = json_envelope(webhook, payload)
    assert 50_000 < len(data) < 64 * 1024
    relay = relays(allowed=f"127.0.0.1:{port}", drain_sec="0.2")
    pushers(relay.endpoint).send(data)
    relay.wait_metrics(lambda m: m["retries"] >= 1, what="a retry")
    assert relay.stop() == 0
    assert [text.encode() for text in saved_envelopes(relay.pending_file)] == [data]

    with DiscordStandIn(port=port) as discord:
        again = relays(allowed=f"127.0.0.1:{port}", port=relay.port)
        snapshot = again.wait_metrics(lambda m: m["delivered"] == 1, what="delivered")
        assert discord.messages("1")[0]["x"] == payload["x"]
    assert (snapshot["restored"], snapshot["rejected"]) == (1, 0)


def test_a_failed_save_exits_non_zero_and_says_what_was_lost(tmp_path, relays, pushers):
    port = free_port()
    relay = relays(allowed=f"127.0.0.1:{port}", drain_sec="0.2")
    pushers(relay.endpoint).send(envelope_text(f"http://127.0.0.1:{port}/api/webhooks/1/tok",
                                               "kept"))
    relay.wait_metrics(lambda m: m["retries"] >= 1, what="a retry")
    relay.pending_file.mkdir()  # the save's rename cannot replace a directory
    (relay.pending_file / "in the way").write_text("")
    assert relay.stop() == 1
    log = relay.log()
    assert "cannot save 1 pending messages" in log and "1 messages LOST" in log


def test_loss_notices_still_to_post_survive_a_restart(tmp_path, relays, pushers):
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/api/webhooks/1/tok"
    relay = relays(allowed=f"127.0.0.1:{port}", queue_max="2", drain_sec="0.2",
                   dedupe_window_sec="0")
    pusher = pushers(relay.endpoint)
    for i in range(5):
        pusher.send(envelope_text(webhook, f"m{i}"))
    relay.wait_metrics(lambda m: m["received"] == 5 and m["drops"] == 3, what="3 dropped")
    assert relay.stop() == 0

    with DiscordStandIn(port=port) as discord:
        again = relays(allowed=f"127.0.0.1:{port}", port=relay.port)
        snapshot = again.wait_metrics(lambda m: m["delivered"] == 2 and m["notices"] == 1,
                                      what="the saved messages and the loss notice")
        notices = [m["content"] for m in discord.messages("1") if "lost" in m["content"]]
    assert len(notices) == 1 and "3 dropped" in notices[0]
    assert_balanced(snapshot)


# ------------------------------------------------------------------ durable mode

def durable(relays, standin_port, **settings):
    return relays(allowed=f"127.0.0.1:{standin_port}", durable="1", **settings)


def killed_after_taking(relays, pushers, count: int):
    """A durable relay, SIGKILLed once it has taken `count` messages for a webhook whose
    port nothing listens on yet. Returns the relay, the port and the webhook."""
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/api/webhooks/1/tok"
    relay = durable(relays, port)
    pusher = pushers(relay.endpoint)
    for i in range(count):
        pusher.send(envelope_text(webhook, f"m{i}"))
    relay.wait_metrics(lambda m: m["received"] == count, what="all taken")
    relay.kill()
    return relay, port, webhook


def test_durable_sigkill_during_a_flood_loses_nothing_taken(tmp_path, relays, pushers):
    relay, port, _ = killed_after_taking(relays, pushers, 300)
    assert not relay.pending_file.exists()

    with DiscordStandIn(port=port) as discord:
        again = durable(relays, port, port=relay.port)
        snapshot = again.wait_metrics(lambda m: m["delivered"] == 300, what="all delivered")
        assert contents(discord, 1) == [f"m{i}" for i in range(300)]
        assert again.stop() == 0
    assert snapshot["restored"] == 300 and snapshot["journal_state"] == "ok"
    assert_balanced(again.metrics())


def test_durable_sigkill_during_a_delivery_counts_it_in_flight(tmp_path, relays, pushers):
    port = free_port()
    with DiscordStandIn(port=port) as discord:
        discord.set_mode(None, "hang")
        relay = durable(relays, port)
        pushers(relay.endpoint).send(envelope_text(discord.webhook_url(1), "hung"))
        wait_until(lambda: discord.hanging == 1, 30, what="the request to hang")
        relay.kill()
    with DiscordStandIn(port=port) as discord:
        again = durable(relays, port, port=relay.port)
        snapshot = again.wait_metrics(lambda m: m["delivered"] == 1, what="delivered again")
        assert contents(discord, 1) == ["hung"]
    assert (snapshot["restored"], snapshot["restored_in_flight"]) == (1, 1)


def test_durable_torn_journal_tail_is_counted_and_the_rest_delivered(tmp_path, relays, pushers):
    relay, port, webhook = killed_after_taking(relays, pushers, 20)
    segment = max((tmp_path / "data" / "notifier_journal").glob("seg-*.log"))
    with open(segment, "ab") as handle:  # a record cut short, as a crash mid-write leaves
        handle.write(journal.record(b"A", b"\0" * 8 + envelope_text(webhook, "torn"))[:30])

    with DiscordStandIn(port=port) as discord:
        again = durable(relays, port, port=relay.port)
        snapshot = again.wait_metrics(lambda m: m["delivered"] == 20, what="delivered")
        assert contents(discord, 1) == [f"m{i}" for i in range(20)]
    assert snapshot["journal_corrupt_records"] == 1
    assert "corrupt or torn record" in again.log()
    assert again.stop() == 0
    assert Journal(tmp_path / "data" / "notifier_journal").open().corrupt == 0  # counted once


def test_durable_sigterm_keeps_the_journal_and_writes_no_pending_file(tmp_path, relays,
                                                                      pushers):
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/api/webhooks/1/tok"
    relay = durable(relays, port, drain_sec="0.2")
    pushers(relay.endpoint).send(envelope_text(webhook, "kept"))
    relay.wait_metrics(lambda m: m["retries"] >= 1, what="a retry")
    assert relay.stop() == 0
    assert not relay.pending_file.exists()
    segments = list((tmp_path / "data" / "notifier_journal").glob("seg-*.log"))
    assert segments and all(os.stat(path).st_mode & 0o077 == 0 for path in segments)
    with DiscordStandIn(port=port) as discord:
        again = durable(relays, port, port=relay.port)
        again.wait_metrics(lambda m: m["delivered"] == 1, what="delivered")
        assert contents(discord, 1) == ["kept"]


# ------------------------------------------------------------------ the journal alone

@contextlib.contextmanager
def running(log: Journal):
    """The journal's thread, as the relay runs it, for the block; then a clean close."""
    stopping = threading.Event()
    thread = threading.Thread(target=log.run, args=(stopping,))
    thread.start()
    try:
        yield
    finally:
        stopping.set()
        log.wake()
        thread.join()
        log.close()


def test_a_journal_that_cannot_write_carries_on_and_comes_back(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "RETRY_SEC", 0.05)
    log = Journal(tmp_path / "j")
    assert log.open().messages == {}
    real_write = os.write
    full = threading.Event()
    full.set()

    def write(fd, data):
        if full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(journal.os, "write", write)
    with running(log):
        jids = log.append([b"one", b"two"])
        assert log.state == "failed" and log.failure == "No space left on device"
        log.done(jids[:1])
        full.clear()
        wait_until(lambda: log.state == "ok", 10, what="the journal back")
        log.notice("https://discord.com/api/webhooks/1/tok", 3, 0, 1.0)
    replay = Journal(tmp_path / "j").open()
    assert list(replay.messages.values()) == [Saved(b"two")]
    assert replay.notices == {"https://discord.com/api/webhooks/1/tok": (3, 0, 1.0)}


def journal_bytes(directory) -> int:
    """The segments' size; one that compaction removes meanwhile counts as empty."""
    total = 0
    for path in directory.glob("seg-*.log"):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_compaction_keeps_only_what_is_live(tmp_path):
    log = Journal(tmp_path / "j", segment_bytes=1000)
    log.open()
    with running(log):
        kept = []
        for _ in range(300):  # 72 KB written, never more than 10 messages live
            jids = log.append([b"x" * 100, b"y" * 100])
            log.done(jids[:1])
            kept.append(jids[1])
            if len(kept) > 10:
                log.done([kept.pop(0)])
        wait_until(lambda: journal_bytes(tmp_path / "j") < 8000, 10, what="compaction")
    replay = Journal(tmp_path / "j").open()
    assert sorted(replay.messages) == kept and replay.corrupt == 0


def test_the_final_metrics_are_the_last_written_even_after_a_slow_write(tmp_path, discord):
    """A metrics thread still inside a slow write (a loaded disk) must not land its older
    snapshot over the final one."""
    relay = RelayProcess(tmp_path, f"127.0.0.1:{discord.port}")
    relay.env["PYTHONPATH"] = str(tmp_path)
    (tmp_path / "sitecustomize.py").write_text(
        "import threading, time\n"
        "import notifier.metrics as m\n"
        "write = m.write\n"
        "def slow(path, text):\n"
        "    if threading.current_thread().name == 'metrics':\n"
        "        path.with_name('slow-write').touch()\n"
        "        time.sleep(1.0)\n"
        "    write(path, text)\n"
        "m.write = slow\n")
    relay.start()
    wait_until(lambda: relay.metrics_file.with_name("slow-write").exists(), 30,
               what="the metrics thread inside a slow write")
    assert relay.stop() == 0
    assert relay.metrics()["state"] == "stopped"


@pytest.fixture
def discord():
    with DiscordStandIn() as standin:
        yield standin
