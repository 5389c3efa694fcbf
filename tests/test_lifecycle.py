"""Stop, restart, crash: every accepted message is delivered or accounted for. The relay as
a real process, real signals, the stand-in for Discord."""

import json
import os
import signal

import pytest

from notifier.payload import fit
from notifier.standin import DiscordStandIn
from tests.harness import (RelayProcess, assert_balanced, contents, envelope_text, free_port,
                           saved_envelopes, stored, wait_until)

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
    saved = stored(relay.store_file).messages
    assert [(item.part, item.attempts >= 1, item.in_flight) for item in saved] == [(1, True, False)]

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
    assert saved_envelopes(relay.store_file) == []
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
    assert [text.encode() for text in saved_envelopes(relay.store_file)] == [data]

    with DiscordStandIn(port=port) as discord:
        again = relays(allowed=f"127.0.0.1:{port}", port=relay.port)
        snapshot = again.wait_metrics(lambda m: m["delivered"] == 1, what="delivered")
        assert discord.messages("1")[0]["x"] == payload["x"]
    assert (snapshot["restored"], snapshot["rejected"]) == (1, 0)


def test_a_failed_save_exits_1_and_counts_what_was_lost(tmp_path, relays, pushers):
    """Without durable mode, SIGTERM writes what is held to the store; when that cannot
    be done (here its directory was replaced by a file), the messages are counted lost,
    not pending, and status says so first."""
    port = free_port()
    where = tmp_path / "store"
    relay = relays(allowed=f"127.0.0.1:{port}", drain_sec="0.2", durable="0",
                   store=str(where / "notifier_store.sqlite3"))
    pushers(relay.endpoint).send(envelope_text(f"http://127.0.0.1:{port}/api/webhooks/1/tok",
                                               "kept"))
    relay.wait_metrics(lambda m: m["retries"] >= 1, what="a retry")
    where.rename(tmp_path / "elsewhere")
    where.write_text("not a directory")
    assert relay.stop() == 1
    final = relay.metrics()
    assert (final["lost"], final["pending"], final["saved"]) == (1, 0, 0)
    assert final["store_state"] == "failed"
    assert_balanced(final)
    assert "1 messages LOST" in relay.log()
    told = relay.status()
    assert told.returncode == 2 and "1 messages LOST" in told.stdout.splitlines()[0]


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

    with DiscordStandIn(port=port) as discord:
        again = durable(relays, port, port=relay.port)
        snapshot = again.wait_metrics(lambda m: m["delivered"] == 300, what="all delivered")
        assert contents(discord, 1) == [f"m{i}" for i in range(300)]
        assert again.stop() == 0
    assert snapshot["restored"] == 300 and snapshot["store_state"] == "ok"
    assert_balanced(again.metrics())


@pytest.mark.parametrize("durable_mode", ["1", "0"])
def test_a_sigkill_during_a_delivery_counts_it_in_flight_once(tmp_path, relays, pushers,
                                                               durable_mode):
    """In flight at a crash: posted again, counted once in restored_in_flight, by the
    start that restores it, not at every later start. (Without durable mode a message
    is in the store only once a stop saved it.)"""
    port = free_port()
    with DiscordStandIn(port=port) as discord:
        discord.set_mode(None, "hang")
        relay = durable(relays, port)
        pushers(relay.endpoint).send(envelope_text(discord.webhook_url(1), "hung"))
        wait_until(lambda: discord.hanging == 1, 30, what="the request to hang")
        relay.kill()
    with DiscordStandIn(port=port) as discord:
        discord.set_mode(None, "status", status=500)
        again = relays(allowed=f"127.0.0.1:{port}", port=relay.port, durable=durable_mode,
                       drain_sec="0")
        first = again.wait_metrics(lambda m: m["errors"] >= 1, what="posted again, a 500")
        assert again.stop() == 0
        discord.set_mode(None, "ok")
        third = relays(allowed=f"127.0.0.1:{port}", port=relay.port, durable=durable_mode)
        last = third.wait_metrics(lambda m: m["delivered"] == 1, what="delivered")
        assert contents(discord, 1) == ["hung"]
    assert (first["restored"], first["restored_in_flight"]) == (1, 1)
    assert (last["restored"], last["restored_in_flight"]) == (1, 0)  # answered "not delivered"


def test_a_torn_write_ahead_log_tail_is_ignored_and_the_rest_delivered(tmp_path, relays,
                                                                       pushers):
    relay, port, webhook = killed_after_taking(relays, pushers, 20)
    wal = relay.store_file.with_name(relay.store_file.name + "-wal")
    with open(wal, "ab") as handle:  # half a frame, as a crash mid-write leaves
        handle.write(os.urandom(3000))

    with DiscordStandIn(port=port) as discord:
        again = durable(relays, port, port=relay.port)
        snapshot = again.wait_metrics(lambda m: m["delivered"] == 20, what="delivered")
        assert contents(discord, 1) == [f"m{i}" for i in range(20)]
    assert (snapshot["store_skipped"], snapshot["store_moved_aside"]) == (0, None)
    assert again.stop() == 0


def test_the_final_metrics_are_the_last_written_even_after_a_slow_write(tmp_path, discord):
    """A metrics thread still inside a slow write (a loaded disk) must not land its older
    snapshot over the final one."""
    relay = RelayProcess(tmp_path, f"127.0.0.1:{discord.port}")
    relay.patch(
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
