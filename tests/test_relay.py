"""The relay as a real process: real ZeroMQ, a real HTTP stand-in for Discord, real signals."""

import os
import stat
import subprocess
import sys

import pytest

from notifier.standin import DiscordStandIn
from tests.harness import (Pusher, RelayProcess, assert_balanced, contents, envelope_text,
                           free_port, saved_envelopes, wait_until)


@pytest.fixture
def discord():
    with DiscordStandIn() as standin:
        yield standin


def test_messages_arrive_in_order_and_the_metrics_agree(discord, relays, pushers):
    relay = relays(allowed=f"127.0.0.1:{discord.port}")
    hooks = {n: discord.webhook_url(n) for n in (1, 2)}
    pusher = pushers(relay.endpoint)
    for i in range(60):
        pusher.send(envelope_text(hooks[1 + i % 2], f"m{i}"))
    snapshot = relay.wait_metrics(lambda m: m["delivered"] == 60, what="60 delivered")
    assert contents(discord, "1") == [f"m{i}" for i in range(0, 60, 2)]
    assert contents(discord, "2") == [f"m{i}" for i in range(1, 60, 2)]
    assert all(request.query.get("wait") == "true" for request in discord.requests)
    assert discord.requests[0].headers["user-agent"].startswith("DiscordBot (")
    assert (snapshot["received"], snapshot["pending"], snapshot["failed"]) == (60, 0, 0)
    assert {hook["id"]: hook["delivered"] for hook in snapshot["webhooks"]} == {"1": 30, "2": 30}
    assert_balanced(snapshot)
    assert relay.stop() == 0
    assert_balanced(relay.metrics())
    assert "delivered webhook=1" in relay.log() and "/tok" not in relay.log()


def test_outage_then_errors_then_recovery_loses_and_duplicates_nothing(tmp_path, relays, pushers):
    port = free_port()
    relay = relays(allowed=f"127.0.0.1:{port}")
    webhook = f"http://127.0.0.1:{port}/api/webhooks/1/tok"
    pusher = pushers(relay.endpoint)
    for i in range(20):
        pusher.send(envelope_text(webhook, f"m{i}"))
    relay.wait_metrics(lambda m: m["retries"] >= 1, what="a retry after connection refused")
    with DiscordStandIn(port=port) as discord:
        discord.set_mode(None, "status", status=500, times=2)
        snapshot = relay.wait_metrics(lambda m: m["delivered"] == 20, what="20 delivered")
        assert contents(discord, 1) == [f"m{i}" for i in range(20)]
        assert discord.count_status(500) == 2
    assert snapshot["failed"] == 0 and snapshot["errors"] >= 3
    assert_balanced(snapshot)
    assert "retry webhook=1" in relay.log()


@pytest.mark.parametrize("durable", ["1", "0"])
def test_sigterm_saves_what_is_pending_and_the_next_start_delivers_it_first(
        tmp_path, relays, pushers, durable):
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/api/webhooks/1/tok"
    relay = relays(allowed=f"127.0.0.1:{port}", drain_sec="0.3", durable=durable)
    wal = relay.store_file.with_name(relay.store_file.name + "-wal")
    assert stat.S_IMODE(os.stat(wal).st_mode) == 0o600  # it holds webhook URLs too
    pusher = pushers(relay.endpoint)
    for i in range(25):
        pusher.send(envelope_text(webhook, f"m{i}"))
    relay.wait_metrics(lambda m: m["received"] == 25 and m["retries"] >= 1, what="retrying")
    assert relay.stop() == 0
    final = relay.metrics()
    assert final["pending"] == 25 and final["delivered"] == 0
    assert_balanced(final)
    assert final["state"] == "stopped" and final["saved"] == 25
    assert final["webhooks"][0]["failing_since"] is not None  # connection refused, retried
    told = subprocess.run([sys.executable, "-m", "notifier", "status", "--home", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert told.returncode == 2
    assert told.stdout.startswith("NOTIFIER CRITICAL - stopped at ") and "25 saved" in told.stdout
    assert stat.S_IMODE(os.stat(relay.store_file).st_mode) == 0o600
    saved = saved_envelopes(relay.store_file)
    assert saved == [envelope_text(webhook, f"m{i}").decode() for i in range(25)]

    with DiscordStandIn(port=port) as discord:
        second = relays(allowed=f"127.0.0.1:{port}", port=relay.port, durable=durable)
        pusher.send(envelope_text(webhook, "after restart"))
        snapshot = second.wait_metrics(lambda m: m["delivered"] == 26, what="26 delivered")
        assert contents(discord, 1) == [f"m{i}" for i in range(25)] + ["after restart"]
    assert snapshot["restored"] == 25 and snapshot["received"] == 26
    assert_balanced(snapshot)
    assert second.stop() == 0 and saved_envelopes(relay.store_file) == []


def test_sigkill_never_leaves_a_missing_or_torn_metrics_file(tmp_path, discord):
    relay = RelayProcess(tmp_path, f"127.0.0.1:{discord.port}", metrics_interval_sec="0.05")
    for round_number in range(12):
        relay.start()
        relay.wait_metrics(lambda m, n=round_number: m["uptime_sec"] >= 0, what="a snapshot")
        # Let it rewrite the file a varying number of times, then kill it mid-stride.
        writes = wait_until(lambda: relay.metrics()["timestamp"], 5, what="a rewrite")
        assert writes
        relay.kill()
        snapshot = relay.metrics()
        assert snapshot is not None and snapshot["schema_version"] == 1
        assert_balanced(snapshot)
    leftovers = list((tmp_path / "data").glob(".notifier_metrics.sexp.*.tmp"))
    assert len(leftovers) <= 1, leftovers


def test_a_flood_keeps_memory_flat_drops_the_oldest_and_keeps_the_newest(discord, relays, pushers):
    discord.set_mode("1", "hang")
    relay = relays(allowed=f"127.0.0.1:{discord.port}", queue_max="1000")
    webhook = discord.webhook_url(1)
    pusher = pushers(relay.endpoint, hwm=10_000)
    pusher.send(envelope_text(webhook, "first"))
    wait_until(lambda: discord.hanging == 1, 10, what="the first request to hang")
    rss_before = relay.rss_kib()
    total = 100_000
    for i in range(total):
        pusher.send(envelope_text(webhook, f"m{i}"))
    snapshot = relay.wait_metrics(lambda m: m["received"] == total + 1 and m["unparsed"] == 0,
                                  timeout=120, what="the flood absorbed")
    growth_mib = (relay.rss_kib() - rss_before) / 1024
    assert growth_mib < 40, f"RSS grew by {growth_mib:.1f} MiB"
    assert snapshot["pending"] == 1000 and snapshot["drops"] == total + 1 - 1000
    assert_balanced(snapshot)
    assert "dropped" in relay.log() and "queue full" in relay.log()

    discord.set_mode("1", "ok")
    discord.release_hangs()
    final = relay.wait_metrics(lambda m: m["pending"] == 0, timeout=60, what="all delivered")
    delivered = contents(discord, 1)
    notices = [line for line in delivered if line.startswith("⚠️")]
    assert delivered[0] == "first"  # it was being sent, so it was never dropped
    assert delivered[1] == notices[0] and "dropped (relay queue full)" in notices[0]
    assert [line for line in delivered[1:] if line not in notices] == [
        f"m{i}" for i in range(total - 999, total)]
    assert final["delivered"] == 1000 and final["notices"] == len(notices) == 1
    assert_balanced(final)


HOSTILE = [
    b'((type . "NOTIFIER") (webhook . "x") (payload_json . "{\\"content\\": \\"unterminated',
    b'((type . "NOTIFIER") (x . #.(sb-ext:run-program "/bin/sh" nil)))',
    b"(" * 80_000,  # over the envelope cap, within the frame bound (a larger frame costs its
    # connection: tests/test_floods.py)
    b"(" * 1000 + b")" * 1000,
    bytes(range(256)) * 10,
    b"\xff\xfe garbage",
    b'{"type": "NOTIFIER", "webhook": "https://evil.example/api/webhooks/1/tok", '
    b'"payload": {"content": "x"}}',
    b'((type . "NOTIFIER") (webhook . "https://discord.com/api/webhooks/1/tok") '
    b'(payload (content . "' + b"x" * 70_000 + b'")))',
    b"",
    b"nil",
    b'((type . "HEARTBEAT"))',
]


def test_hostile_envelopes_are_rejected_and_valid_ones_still_delivered(discord, relays, pushers):
    relay = relays(allowed=f"127.0.0.1:{discord.port}")
    webhook = discord.webhook_url(1)
    pusher = pushers(relay.endpoint)
    for i, bad in enumerate(HOSTILE):
        pusher.send(envelope_text(webhook, f"good{i}"))
        pusher.send(bad)
    snapshot = relay.wait_metrics(lambda m: m["delivered"] == len(HOSTILE)
                                  and m["rejected"] == len(HOSTILE), what="all handled")
    assert contents(discord, 1) == [f"good{i}" for i in range(len(HOSTILE))]
    assert_balanced(snapshot)
    log = relay.log()
    for reason in ("unterminated string", "read-time evaluation", "nesting deeper than 64",
                   "invalid UTF-8", "is not Discord's", "over the 65536-byte limit",
                   "unknown type 'HEARTBEAT'"):
        assert reason in log, reason
    assert relay.process.poll() is None
    assert relay.stop() == 0


def test_duplicates_within_the_window_are_suppressed_and_counted(discord, relays, pushers):
    relay = relays(allowed=f"127.0.0.1:{discord.port}", dedupe_window_sec="60")
    pusher = pushers(relay.endpoint)
    for content in ("same", "same", "other", "same"):
        pusher.send(envelope_text(discord.webhook_url(1), content))
    snapshot = relay.wait_metrics(lambda m: m["delivered"] + m["deduplicated"] == 4)
    assert (snapshot["delivered"], snapshot["deduplicated"]) == (2, 2)
    assert contents(discord, 1) == ["same", "other"]
    assert_balanced(snapshot)


def test_a_port_in_use_is_a_clear_error(tmp_path, discord, relays):
    first = relays(allowed=f"127.0.0.1:{discord.port}")
    second = RelayProcess(tmp_path / "second", "", port=first.port)
    with pytest.raises(AssertionError, match="relay exited with 1"):
        second.start()
    assert f"cannot bind tcp://127.0.0.1:{first.port}" in second.log()


def test_a_bad_setting_stops_the_relay_with_a_message(tmp_path):
    relay = RelayProcess(tmp_path, "", queue_max="lots")
    with pytest.raises(AssertionError, match="SWIMMY_NOTIFIER_QUEUE_MAX: must be a whole number"):
        relay.start()


def test_the_log_file_is_reopened_after_logrotate_moves_it(discord, relays, pushers):
    relay = relays(allowed=f"127.0.0.1:{discord.port}")
    pusher = pushers(relay.endpoint)
    pusher.send(envelope_text(discord.webhook_url(1), "before"))
    relay.wait_metrics(lambda m: m["delivered"] == 1)
    wait_until(lambda: "delivered webhook=1" in relay.log(), 10, what="the first log line")
    rotated = relay.log_file.with_name("relay.log.1")
    relay.log_file.rename(rotated)  # what logrotate does, without copytruncate
    pusher.send(envelope_text(discord.webhook_url(1), "after"))
    relay.wait_metrics(lambda m: m["delivered"] == 2)
    wait_until(lambda: "delivered webhook=1" in relay.log(), 10, what="a line in the new file")
    assert "delivered webhook=1" in rotated.read_text() and "tok" not in relay.log()


def test_an_error_in_a_step_is_logged_counted_and_the_thread_carries_on(tmp_path, discord):
    """A bug that fails the intake on one batch used to end the intake thread, and with
    it the relay: now that batch is counted as rejected, the error logged with its
    traceback, and the intake takes the next batch."""
    relay = RelayProcess(tmp_path, f"127.0.0.1:{discord.port}")
    relay.patch(
        "import notifier.outbox as o\n"
        "accept = o.Outbox.accept\n"
        "def failing(self, envelopes, producers=None):\n"
        "    if any(b'poison' in e for e in envelopes):\n"
        "        raise RuntimeError('a bug')\n"
        "    return accept(self, envelopes, producers)\n"
        "o.Outbox.accept = failing\n")
    relay.start()
    with Pusher(relay.endpoint) as pusher:
        pusher.send(envelope_text(discord.webhook_url(1), "before"))
        relay.wait_metrics(lambda m: m["delivered"] == 1)
        pusher.send(envelope_text(discord.webhook_url(1), "poison"))
        relay.wait_metrics(lambda m: m["rejected"] == 1)
        pusher.send(envelope_text(discord.webhook_url(1), "after"))
        snapshot = relay.wait_metrics(lambda m: m["delivered"] == 2)
    assert contents(discord, 1) == ["before", "after"]
    assert snapshot["thread_errors"] == 1 and snapshot["senders_alive"] == 8
    assert snapshot["last_rejected_reason"] == "internal error while taking it in: RuntimeError"
    assert_balanced(snapshot)
    log = relay.log()
    assert "unexpected error in the intake thread; it carries on" in log
    assert "RuntimeError: a bug" in log  # the traceback
    assert relay.stop() == 0


def test_a_thread_that_cannot_go_on_stops_the_relay_gracefully(tmp_path, discord):
    """A thread the relay depends on that dies (here every sender's watchdog: requests
    would have no deadline) must not leave a relay running on: it stops, saves what it
    holds, and exits 1 for its supervisor to restart it."""
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/api/webhooks/1/tok"  # nothing listens: it waits
    relay = RelayProcess(tmp_path, f"127.0.0.1:{port}")
    relay.patch(
        "import os, notifier.sender as s\n"
        "run = s.Watchdog._run\n"
        "def dying(self):\n"
        "    if os.path.exists(os.environ['SWIMMY_HOME'] + '/die'):\n"
        "        raise RuntimeError('a bug')\n"
        "    run(self)\n"
        "s.Watchdog._run = dying\n")
    (tmp_path / "die").touch()
    relay.launch()
    with Pusher(relay.endpoint) as pusher:
        pusher.send(envelope_text(webhook, "kept"))
        assert relay.process.wait(30) == 1
    log = relay.log()
    assert "the watchdog of sender-1 died; stopping the relay" in log
    final = relay.metrics()
    assert final["state"] == "stopped" and final["saved"] == final["pending"]
    assert_balanced(final)
