"""Discord as it really behaves, seen from outside: the relay as a real process against
the stand-in with one bucket hash for every webhook, the global limit, hidden channel
limits (partly used by someone else too) and forum channels; messages it gives up on
kept in the dead-letter file; answers read for what they mean (a 2xx whose body breaks
off is delivered once, the deadline holds whatever the framing, a bad retry_after is
no ban)."""

import json
import os
import re
import stat
import subprocess
import sys

import pytest

from notifier import deadletter, sexp
from notifier.payload import LOSS_THREAD_NAME, fit
from notifier.standin import DiscordStandIn
from tests.harness import assert_balanced, contents

DEADLINE = 30.0  # generous: the machine may be loaded
LONG = " ".join(f"w{i}" for i in range(1000))  # three requests


def envelope(standin, hook, payload, query=""):
    return sexp.dumps({"type": "NOTIFIER", "schema_version": 1, "action": "SEND",
                       "webhook": standin.webhook_url(hook) + query,
                       "payload_json": json.dumps(payload)}).encode("utf-8")


def alone(i):
    """A message that cannot be combined with the others: one request each."""
    return {"content": f"m{i}", "username": f"bot {i}"}


@pytest.fixture
def run(relays, pushers):
    """run(standin, **settings) -> (relay, push(hook, payload, query=""))."""
    def start(standin, **settings):
        relay = relays(allowed=f"127.0.0.1:{standin.port}", **settings)
        pusher = pushers(relay.endpoint)
        return relay, lambda hook, payload, query="": pusher.send(
            envelope(standin, hook, payload, query))
    return start


def delivered(relay, count, **more):
    """The snapshot once `count` are delivered, nothing is pending and the counters in
    `more` have their values."""
    snapshot = relay.wait_metrics(
        lambda m: m["delivered"] == count and m["pending"] == 0
        and all(m[key] == value for key, value in more.items()),
        timeout=DEADLINE, what=f"{count} delivered, {more}")
    assert_balanced(snapshot)
    return snapshot


def test_webhooks_reporting_one_bucket_hash_do_not_throttle_each_other(run):
    with DiscordStandIn(rate_limit=(5, 2.0)) as discord:
        relay, push = run(discord)
        for i in range(6):
            for hook in range(1, 6):
                push(hook, alone(i))
        delivered(relay, 30)
        assert discord.count_status(429) == 0


def test_the_relay_paces_itself_below_the_global_limit(run):
    with DiscordStandIn(global_limit=50) as discord:
        relay, push = run(discord, global_rate="45")
        for hook in range(1, 151):
            push(hook, {"content": "hi"})
        delivered(relay, 150)
        assert discord.count_status(429) == 0


def test_a_hidden_channel_limit_is_met_at_most_once_per_webhook(run):
    with DiscordStandIn(channel_limit=(6, 60.0), channels={"900": ["1", "2", "3"]}) as discord:
        relay, push = run(discord)
        for i in range(4):
            for hook in (1, 2, 3):
                push(hook, alone(i))
        assert discord.wait_for(lambda s: s.count_status(429), DEADLINE)
        snapshot = relay.wait_metrics(
            lambda m: m["delivered"] == 6 and m["rate_limited"] >= 1 and all(
                line["state"] == "waiting" for line in m["webhooks"]),
            timeout=DEADLINE, what="the channel's three webhooks paced")
        assert snapshot["rate_limited_by_scope"]["shared"] == snapshot["rate_limited"]
        assert all(discord.count_status(429, hook) <= 1 for hook in (1, 2, 3))
        # Six got through; answers still in flight at the 429 may be counted after it,
        # so the pace learned is at most six (erring on the slow side).
        paces = [int(n) for n in re.findall(r"channel paced to (\d+) per 60 s", relay.log())]
        assert paces and all(1 <= pace <= 6 for pace in paces)


def test_a_channel_partly_used_by_someone_else_is_used_again_once_it_has_room(run):
    """The issue's case, ten times faster (a 6 s window, 5 requests per 0.5 s): 28 of
    the channel's 30 are used by another poster. The first shared 429 teaches a pace
    of 2; the pace probes upward after a window and finds the room again, so the 40
    go out in three windows, not at 2 a window (two minutes)."""
    with DiscordStandIn(rate_limit=(5, 0.5), channel_limit=(30, 6.0),
                        channels={"900": ["1"]}) as discord:
        relay, push = run(discord, channel_period_sec="6")
        discord.use_channel("900", 28)
        for i in range(40):
            push(1, alone(i))
        snapshot = delivered(relay, 40)
        assert 1 <= snapshot["rate_limited_by_scope"]["shared"] <= 2, relay.log()
        paces = [int(n) for n in re.findall(r"channel paced to (\d+) per 6 s", relay.log())]
        assert paces[0] <= 2  # learned from the first 429: all the relay had delivered


def test_a_split_message_to_a_forum_makes_one_thread_and_a_loss_notice_its_own(run):
    with DiscordStandIn(forums={"7"}) as discord:
        relay, push = run(discord)
        push(7, {"content": "no thread"})  # a forum refuses it: lost, to be reported
        relay.wait_metrics(lambda m: m["failed"] == 1, timeout=DEADLINE, what="refused")
        push(7, {"content": LONG, "thread_name": "Daily report"})
        delivered(relay, 1)
        assert discord.wait_for(lambda s: len(s.threads("7")) == 2, DEADLINE)
        report, notice = discord.threads("7")
        assert [name for _, name in (report, notice)] == ["Daily report", LOSS_THREAD_NAME]
        posted = [r for r in discord.requests if r.status == 200]
        assert [r.json["content"] for r in posted[:3]] == [p["content"] for p in fit({"content": LONG})]
        assert [r.query.get("thread_id") for r in posted[:3]] == [None, report[0], report[0]]
        assert ["thread_name" in r.json for r in posted] == [True, False, False, True]


def test_a_thread_id_in_the_url_takes_every_part_and_the_notice_there(run):
    with DiscordStandIn(forums={"7"}) as discord:
        relay, push = run(discord)
        discord.set_mode("7", "status", status=400, times=1)
        push(7, {"content": "refused"}, query="?thread_id=555")
        relay.wait_metrics(lambda m: m["failed"] == 1, timeout=DEADLINE, what="refused")
        push(7, {"content": LONG}, query="?thread_id=555")
        delivered(relay, 1)
        relay.wait_metrics(lambda m: m["notices"] == 1, timeout=DEADLINE, what="the notice")
        assert len(discord.requests) == 5  # refused, three parts, the notice
        assert all(r.query.get("thread_id") == "555" for r in discord.requests)
        assert discord.threads() == []


def test_a_failed_message_is_kept_in_the_dead_letter_file_and_replayed_once(run, tmp_path):
    with DiscordStandIn() as discord:
        discord.set_mode(None, "status", status=502)
        relay, push = run(discord, max_age_sec="1")
        push(1, {"content": "lost in the outage"})
        relay.wait_metrics(lambda m: m["failed"] == 1 and m["dead_letters"] == 1,
                           timeout=DEADLINE, what="failed past the maximum age")
        path = tmp_path / "data" / "notifier_failed.sexp"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        (entry,) = map(sexp.loads, path.read_bytes().splitlines())
        assert (entry["webhook_id"], entry["status"]) == ("1", 502)
        assert entry["reason"].startswith("HTTP 502, still failing")
        discord.set_mode(None, "ok")
        env = {**relay.env, "SWIMMY_NOTIFIER_LOG_FILE": ""}
        env.pop("SWIMMY_NOTIFIER_LOG_FILE")
        replay = [sys.executable, "-m", "notifier", "replay"]
        first = subprocess.run(replay, env=env, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0, first.stderr
        relay.wait_metrics(lambda m: m["delivered"] == 1, timeout=DEADLINE, what="replayed")
        again = subprocess.run(replay, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "nothing to replay" in again.stdout
        replayed, notice = [m["content"] for m in discord.messages()]
        assert replayed == "lost in the outage" and notice.startswith("⚠️ Notifications lost")
        assert os.stat(deadletter.replayed_file(path)).st_mode & 0o077 == 0


# Answers read for what they mean


def test_a_200_whose_connection_resets_mid_body_is_delivered_once_and_counted(run):
    with DiscordStandIn() as discord:
        discord.set_mode("1", "reset", times=1)
        relay, push = run(discord)
        push(1, {"content": "once"})
        snapshot = delivered(relay, 1, delivered_unconfirmed=1)
        assert (snapshot["errors"], snapshot["retries"], snapshot["requests"]) == (0, 0, 1)
        assert contents(discord, 1) == ["once"]
        assert "delivered unconfirmed webhook=1: HTTP 200, then the answer broke off" in relay.log()


@pytest.mark.parametrize("framing", ["length", "close"])
def test_a_200_trickled_past_the_deadline_is_delivered_once_and_frees_its_sender(run, framing):
    """One sender thread: the other webhook's message goes out once the deadline cut
    the trickle (a minute and more), not after it."""
    with DiscordStandIn() as discord:
        discord.set_mode("1", "trickle", interval=0.2, framing=framing, times=1)
        relay, push = run(discord, senders="1", request_deadline_sec="1")
        push(1, {"content": "slow"})
        assert discord.wait_for(1, DEADLINE)
        push(2, {"content": "next"})
        snapshot = delivered(relay, 2, delivered_unconfirmed=1)
        assert (snapshot["errors"], snapshot["requests"]) == (0, 2)
        assert (contents(discord, 1), contents(discord, 2)) == (["slow"], ["next"])
        assert "HTTP 200, then no whole answer within 1 s" in relay.log()


def test_bad_retry_after_values_hold_their_webhook_only_and_are_no_ban(run):
    with DiscordStandIn() as discord:
        discord.set_mode("1", "route_429", retry_after=None, times=1)
        relay, push = run(discord)
        push(1, {"content": "limited"})
        relay.wait_metrics(lambda m: m["rate_limited"] == 1, timeout=DEADLINE, what="a 429")
        for count, bad in enumerate((-1, float("nan")), 2):
            relay.wait_metrics(lambda m: m["pending"] == 0, timeout=DEADLINE, what="idle")
            discord.set_mode("1", "route_429", retry_after=bad, times=1)
            push(1, {"content": f"limited {bad}"})
            push(2, {"content": f"free {bad}"})
            relay.wait_metrics(lambda m: m["rate_limited"] == count, timeout=DEADLINE,
                               what=f"429 number {count}")
        snapshot = delivered(relay, 5, rate_limited=3)
        assert snapshot["rate_limited_by_scope"] == {"route": 3, "shared": 0, "global": 0,
                                                     "ban": 0}
        assert "limited" in contents(discord, 1) and len(contents(discord, 2)) == 2
        log = relay.log()
        assert log.count("scope=route wait_s=0.500 reason=HTTP 429 (route), retry after 0.5 s") == 3
        assert "banned" not in log
