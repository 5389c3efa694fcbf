"""Delivering to Discord the way Discord asks, seen from outside: the relay as a real
process, a real HTTP stand-in limiting each webhook to 5 requests per 2 s.

Every wait is on a condition with a deadline. Times compared with the stand-in's
records are `time.monotonic()`, the clock it stamps requests with. A test that checks
that nothing happens (no request during a pause) waits for it with a deadline derived
from the pause, and fails as soon as it does happen.
"""

import json
import time

import pytest

from notifier import sexp
from notifier.standin import DiscordStandIn
from tests.harness import assert_balanced, contents, wait_until

LIMIT = (5, 2.0)  # Discord's usual per-webhook limit
DEADLINE = 30.0  # generous: the machine may be loaded


@pytest.fixture
def discord():
    with DiscordStandIn(rate_limit=LIMIT) as standin:
        yield standin


@pytest.fixture
def relay(discord, relays):
    return relays(allowed=f"127.0.0.1:{discord.port}")


@pytest.fixture
def push(relay, discord, pushers):
    return sender(pushers(relay.endpoint), discord)


def sender(pusher, standin):
    """send(webhook id, content or payload dict, ...): envelopes as the Lisp side sends
    them, to the stand-in's webhook of that id."""
    def send(hook, *payloads):
        for payload in payloads:
            if isinstance(payload, str):
                payload = {"content": payload}
            pusher.send(sexp.dumps({"type": "NOTIFIER", "schema_version": 1, "action": "SEND",
                                    "webhook": standin.webhook_url(hook),
                                    "payload_json": json.dumps(payload)}).encode("utf-8"))
    return send


def requests_to(standin, hook, after=float("-inf")):
    return [r for r in standin.requests if r.webhook_id == str(hook) and r.time > after]


def arrived(standin, hook, count, timeout=DEADLINE):
    """Wait until `count` lines were delivered to `hook`."""
    assert standin.wait_for(lambda s: len(contents(s, hook)) >= count, timeout), \
        f"webhook {hook} got {contents(standin, hook)}"


def first_429(standin):
    assert standin.wait_for(lambda s: s.count_status(429), DEADLINE), "no 429 answered"
    return next(r for r in standin.requests if r.status == 429)


def webhook_line(snapshot, hook):
    return next(line for line in snapshot["webhooks"] if line["id"] == str(hook))


def finished(relay, condition, what):
    """The relay's snapshot once `condition` holds, checked for the accounting identity."""
    snapshot = relay.wait_metrics(condition, timeout=DEADLINE, what=what)
    assert_balanced(snapshot)
    return snapshot


# Rate limits followed before they bite


def test_steady_traffic_goes_out_as_sent_with_no_429(discord, relay, push):
    for i in range(20):
        push(1, f"m{i}")
        arrived(discord, 1, i + 1)
    assert [r.json for r in discord.requests] == [{"content": f"m{i}"} for i in range(20)]
    assert discord.count_status(429) == 0
    snapshot = finished(relay, lambda m: m["delivered"] == 20, "20 delivered")
    assert (snapshot["rate_limited"], snapshot["requests"]) == (0, 20)


def test_a_burst_of_60_is_batched_into_few_requests_with_no_429(discord, relay, push):
    started = time.monotonic()
    push(1, *[f"m{i}" for i in range(60)])
    arrived(discord, 1, 60)
    elapsed = time.monotonic() - started
    assert contents(discord, 1) == [f"m{i}" for i in range(60)]
    assert discord.count_status(429) == 0
    assert len(discord.requests) <= 12, len(discord.requests)
    assert elapsed < 10, f"{elapsed:.1f} s"
    finished(relay, lambda m: m["delivered"] == 60 and m["pending"] == 0, "60 delivered")


# 429s by kind


def test_a_global_429_pauses_every_webhook_then_everything_arrives(discord, relay, push):
    discord.set_mode(None, "global_429", retry_after=1.5, times=1)
    push(1, "a0")
    limited = first_429(discord)
    relay.wait_metrics(lambda m: m["rate_limited"] == 1, timeout=DEADLINE, what="the 429 seen")
    push(2, "b0", "b1")
    push(1, "a1")
    arrived(discord, 1, 2)
    arrived(discord, 2, 2)
    later = [r for r in discord.requests if r.time > limited.time]
    assert {r.webhook_id for r in later} == {"1", "2"}
    assert min(r.time for r in later) >= limited.time + 1.5
    assert contents(discord, 1) == ["a0", "a1"] and contents(discord, 2) == ["b0", "b1"]
    finished(relay, lambda m: m["delivered"] == 4, "4 delivered")


def test_a_channel_429_is_honoured_while_remaining_is_above_zero(discord, relay, push):
    discord.set_mode("1", "channel_429", retry_after=3.0, times=1)
    push(1, "a0")
    limited = first_429(discord)
    relay.wait_metrics(lambda m: m["rate_limited"] == 1, timeout=DEADLINE, what="the 429 seen")
    push(1, "a1")
    push(2, "b0")
    arrived(discord, 2, 1)
    assert requests_to(discord, 2)[0].time < limited.time + 3.0  # another channel goes on
    arrived(discord, 1, 2)
    assert min(r.time for r in requests_to(discord, 1, after=limited.time)) >= limited.time + 3.0
    assert contents(discord, 1) == ["a0", "a1"]
    finished(relay, lambda m: m["delivered"] == 3 and m["invalid_requests_10m"] == 0,
             "3 delivered")


def test_an_html_429_pauses_everything_without_crash_or_loop(discord, relay, push):
    discord.set_mode("1", "html_429", times=1)
    push(1, "a0")
    limited = first_429(discord)
    relay.wait_metrics(lambda m: m["rate_limited"] == 1, timeout=DEADLINE, what="the 429 seen")
    push(1, "a1")
    push(2, "b0")
    quiet_until = limited.time + 2.0
    assert not discord.wait_for(lambda s: len(s.requests) > 1, quiet_until - time.monotonic())
    assert relay.process.poll() is None
    snapshot = finished(relay, lambda m: m["pending"] == 3, "3 pending")
    assert (snapshot["rate_limited"], snapshot["invalid_requests_10m"]) == (1, 1)
    assert {line["state"] for line in snapshot["webhooks"]} == {"waiting"}
    assert "scope=ban" in relay.log()
    assert relay.stop() == 0
    assert_balanced(relay.metrics())


# Dead webhooks


@pytest.mark.parametrize("status", [404, 401])
def test_a_dead_webhook_gets_a_handful_of_requests_and_the_others_go_on(discord, relay, push,
                                                                         status):
    discord.set_mode("1", "status", status=status)
    for i in range(50):
        push(1, f"a{i}")
        if i % 5 == 0:
            push(2, f"b{i // 5}")
    snapshot = finished(relay, lambda m: m["failed"] == 50 and m["delivered"] == 10,
                        "50 failed, 10 delivered")
    assert len(requests_to(discord, 1)) <= 2
    assert contents(discord, 2) == [f"b{i}" for i in range(10)]
    dead = webhook_line(snapshot, 1)
    assert (dead["state"], dead["failed"], dead["pending"]) == ("quarantined", 50, 0)
    log = relay.log()
    assert len([line for line in log.splitlines() if "quarantined" in line]) == 1
    assert f"HTTP {status}" in log and "/tok" not in log


# Payload limits


def words(count):
    return " ".join(f"w{i:05d}" for i in range(count))


def test_over_limit_payloads_arrive_fitted(discord, relay, push):
    text = words(700)  # 4899 characters
    push(10, text)
    push(11, {"embeds": [{"title": f"e{i}"} for i in range(15)]})
    push(12, {"embeds": [{"title": "t" * 300}]})
    push(13, {"embeds": [{"title": "fields", "fields": [
        {"name": f"f{i}", "value": "v"} for i in range(30)]}]})
    push(14, {"embeds": [{"description": "d" * 3500}, {"description": "e" * 3500}]})
    finished(relay, lambda m: m["delivered"] == 5 and m["pending"] == 0, "5 delivered")
    assert discord.count_status(400) == 0
    split = [m["content"] for m in discord.messages(10)]
    assert len(split) == 3 and " ".join(split).split() == text.split()
    assert [[e["title"] for e in m["embeds"]] for m in discord.messages(11)] == [
        [f"e{i}" for i in range(10)], [f"e{i}" for i in range(10, 15)]]
    [clipped] = discord.messages(12)
    assert clipped["embeds"][0]["title"] == "t" * 255 + "…"
    fields = [f["name"] for m in discord.messages(13) for e in m["embeds"] for f in e["fields"]]
    assert fields == [f"f{i}" for i in range(30)]
    descriptions = [e["description"] for m in discord.messages(14) for e in m["embeds"]]
    assert len(discord.messages(14)) == 2 and descriptions == ["d" * 3500, "e" * 3500]


def test_a_payload_discord_still_refuses_is_failed_with_its_reason_once(discord, relay, push):
    refusal = {"code": 50035, "message": "Invalid Form Body", "errors": {"content": {"_errors": [
        {"code": "BASE_TYPE_BAD_LENGTH", "message": "Must be between 1 and 2000 in length."}]}}}
    discord.set_mode("1", "status", status=400, body=refusal, times=1)
    push(1, "refused")
    finished(relay, lambda m: m["failed"] == 1, "1 failed")
    push(1, "next")
    finished(relay, lambda m: m["delivered"] == 1 and m["notices"] == 1, "1 delivered")
    sent = [r.json["content"] for r in requests_to(discord, 1)]
    assert sent[:2] == ["refused", "next"] and "1 failed" in sent[2] and len(sent) == 3
    assert "Invalid Form Body (code 50035): content: Must be between 1 and 2000" in relay.log()


# Isolation


def test_a_hanging_webhook_does_not_delay_another(discord, relay, push):
    discord.set_mode("1", "hang")
    push(1, "a0")
    wait_until(lambda: discord.hanging == 1, DEADLINE, what="webhook 1 to hang")
    for i in range(5):
        pushed = time.monotonic()
        push(2, f"b{i}")
        arrived(discord, 2, i + 1)
        assert requests_to(discord, 2)[-1].time - pushed < 3.0
    assert discord.hanging == 1
    discord.set_mode("1", "ok")
    discord.release_hangs()
    push(1, "a1")
    arrived(discord, 1, 2)
    assert contents(discord, 1) == ["a0", "a1"]
    finished(relay, lambda m: m["delivered"] == 7, "7 delivered")


# Visible loss


def test_drops_while_a_webhook_hangs_are_reported_there_after_recovery(discord, relays, pushers):
    relay = relays(allowed=f"127.0.0.1:{discord.port}", queue_max="5")
    push = sender(pushers(relay.endpoint), discord)
    discord.set_mode("1", "hang")
    push(1, "first")
    wait_until(lambda: discord.hanging == 1, DEADLINE, what="webhook 1 to hang")
    push(1, *[f"m{i}" for i in range(1, 50)])
    snapshot = finished(relay, lambda m: m["received"] == 50 and m["unparsed"] == 0,
                        "50 received")
    assert (snapshot["drops"], snapshot["pending"]) == (45, 5)
    discord.set_mode("1", "ok")
    discord.release_hangs()
    snapshot = finished(relay, lambda m: m["pending"] == 0, "recovery")
    delivered = contents(discord, 1)
    assert snapshot["notices"] == 1, delivered
    assert delivered[0] == "first" and "45 dropped (relay queue full)" in delivered[1]
    assert delivered[2:] == [f"m{i}" for i in range(46, 50)]  # "first" was the fifth
    line = webhook_line(snapshot, 1)
    assert (line["dropped"], line["delivered"]) == (45, 5)
    assert line["last_success_at"] >= snapshot["started_at"]


def test_drops_charged_to_a_webhook_get_one_notice_there_and_show_in_its_metrics(
        discord, relays, pushers):
    """The same as above with each envelope parsed before the next arrives, so every drop
    is of a message whose webhook is known."""
    relay = relays(allowed=f"127.0.0.1:{discord.port}", queue_max="3")
    push = sender(pushers(relay.endpoint), discord)
    discord.set_mode("1", "hang")
    push(1, "first")
    wait_until(lambda: discord.hanging == 1, DEADLINE, what="webhook 1 to hang")
    for i in range(1, 7):
        push(1, f"m{i}")
        relay.wait_metrics(lambda m, n=i + 1: m["received"] == n and m["webhooks"][0]["pending"]
                           == min(n, 3), timeout=DEADLINE, what=f"m{i} parsed")
    discord.set_mode("1", "ok")
    discord.release_hangs()
    snapshot = finished(relay, lambda m: m["pending"] == 0, "recovery")
    delivered = contents(discord, 1)
    assert delivered[0] == "first" and "4 dropped (relay queue full)" in delivered[1]
    assert delivered[2:] == ["m5", "m6"]
    line = webhook_line(snapshot, 1)
    assert (line["dropped"], line["delivered"], snapshot["notices"]) == (4, 3, 1)
    assert line["last_success_at"] >= snapshot["started_at"]
