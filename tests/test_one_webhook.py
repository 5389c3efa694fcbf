"""One webhook is one webhook (issue 19): whatever URL a message names it by (an API
version, a thread), the relay as a real process keeps one rate-limit
bucket, one order, one request in flight, one quarantine and one loss notice for it,
and posts each message where it asked to go. Forum posts are never combined. Tokens
that an HTTP client would rewrite (dot segments) are refused at the door."""

import json
import re
from urllib.parse import urlsplit

import pytest

from notifier import sexp
from notifier.payload import LOSS_THREAD_NAME
from notifier.standin import DiscordStandIn
from tests.harness import assert_balanced
from tests.test_discord_limits import alone

DEADLINE = 30.0  # generous: the machine may be loaded


def envelope(url, payload):
    return sexp.dumps({"type": "NOTIFIER", "webhook": url,
                       "payload_json": json.dumps(payload)}).encode("utf-8")


@pytest.fixture
def start(relays, pushers):
    """start(standin, **settings) -> (relay, push(url, payload))."""
    def begin(discord, **settings):
        relay = relays(allowed=f"127.0.0.1:{discord.port}", **settings)
        pusher = pushers(relay.endpoint)
        return relay, lambda url, payload: pusher.send(envelope(url, payload))
    return begin


def settled(relay, what, condition):
    snapshot = relay.wait_metrics(lambda m: m["pending"] == 0 and condition(m),
                                  timeout=DEADLINE, what=what)
    assert_balanced(snapshot)
    return snapshot


def posted(discord, hook):
    """(thread_id, content) of each message a webhook saved, in arrival order."""
    return [(r.query.get("thread_id"), r.json.get("content")) for r in discord.requests
            if r.webhook_id == str(hook) and r.status == 200]


def test_ten_thread_urls_of_one_webhook_share_its_bucket(start):
    """Found against Discord's imitation: the first five answers said Remaining 0, and
    the relay sent five more at once through other thread URLs (five route 429s)."""
    with DiscordStandIn(rate_limit=(5, 2.0)) as discord:
        relay, push = start(discord)
        for i in range(3):
            for thread in range(10):
                push(discord.webhook_url(1, thread=100 + thread), alone(10 * i + thread))
        settled(relay, "30 delivered", lambda m: m["delivered"] == 30)
        assert discord.count_status(429) == 0
        assert posted(discord, 1) == [(str(100 + n % 10), f"m{n}") for n in range(30)]
        assert [line["id"] for line in relay.metrics()["webhooks"]] == ["1"]


def test_a_revoked_webhook_through_twenty_thread_urls_costs_one_request(start):
    with DiscordStandIn() as discord:
        discord.set_mode(1, "status", status=401)
        relay, push = start(discord)
        for thread in range(20):
            push(discord.webhook_url(1, thread=100 + thread), alone(thread))
        snapshot = settled(relay, "20 failed", lambda m: m["failed"] == 20)
        assert len(discord.requests) == 1
        assert snapshot["invalid_requests_10m"] == 1 and snapshot["errors"] == 1
        assert len(re.findall("quarantined", relay.log())) == 1


def test_a_hanging_webhook_through_eight_thread_urls_holds_one_sender(start):
    """Found against Discord's imitation: eight thread URLs of a webhook that never
    answers took all eight senders, and a healthy webhook's message waited 14 s."""
    with DiscordStandIn() as discord:
        discord.set_mode(1, "hang")
        relay, push = start(discord, senders="8", request_deadline_sec="600")
        for thread in range(8):
            push(discord.webhook_url(1, thread=100 + thread), alone(thread))
        relay.wait_metrics(lambda m: m["unparsed"] == 0 and m["pending"] == 8,
                           timeout=DEADLINE, what="the eight held")
        assert discord.wait_for(lambda d: d.hanging == 1, DEADLINE)
        push(discord.webhook_url(2), {"content": "healthy"})
        assert discord.wait_for(lambda d: d.messages("2"), DEADLINE)  # long before 600 s
        assert discord.hanging == 1 and len(discord.requests) == 1  # the hung one not yet recorded
        discord.set_mode(1, "ok")
        discord.release_hangs()
        settled(relay, "all delivered", lambda m: m["delivered"] == 9)
        assert posted(discord, 1) == [(str(100 + n), f"m{n}") for n in range(8)]


def test_mixed_spellings_of_one_webhook_keep_its_bucket_and_its_order(start):
    """Found against Discord's imitation: alternating /api/webhooks/5/tok and
    /api/v10/webhooks/5/tok gave 3 route 429s and messages out of order."""
    with DiscordStandIn(rate_limit=(5, 2.0)) as discord:
        relay, push = start(discord)
        base = discord.webhook_url(5)
        spellings = [base, discord.webhook_url(5, version=10), discord.webhook_url(5, version=6),
                     discord.webhook_url(5, version=9), base.replace("http:", "HTTP:")]
        for i in range(20):
            push(spellings[i % len(spellings)], alone(i))
        settled(relay, "20 delivered", lambda m: m["delivered"] == 20)
        assert discord.count_status(429) == 0
        assert [content for _, content in posted(discord, 5)] == [f"m{i}" for i in range(20)]
        assert [r.path for r in discord.requests[:5]] == [urlsplit(s).path for s in spellings]


def test_forum_posts_are_never_combined(start):
    """Found against Discord's imitation: six envelopes with one thread_name to a forum
    under backlog became one request and one thread holding all six."""
    with DiscordStandIn(forums={"7"}) as discord:
        discord.set_mode(7, "hang", times=1)
        relay, push = start(discord)
        for i in range(6):
            push(discord.webhook_url(7), {"content": f"post {i}", "thread_name": "Price alert"})
        relay.wait_metrics(lambda m: m["unparsed"] == 0 and m["pending"] == 6,
                           timeout=DEADLINE, what="a backlog of six")
        assert discord.wait_for(lambda d: d.hanging == 1, DEADLINE)
        discord.release_hangs()
        settled(relay, "six delivered", lambda m: m["delivered"] == 6 and m["requests"] == 6)
        assert [name for _, name in discord.threads("7")] == ["Price alert"] * 6
        assert [r.json["content"] for r in discord.requests] == [f"post {i}" for i in range(6)]


def test_dot_segment_tokens_and_a_trailing_slash_are_refused_and_nothing_is_posted(start):
    """Found by a review: a token of `..` or `.` passed, requests removed the segment,
    and the relay posted to /api/webhooks/?wait=true and counted it delivered. A
    trailing slash, which Discord answers 404 (the webhook taken for deleted and
    quarantined an hour, every URL of it), is refused too."""
    with DiscordStandIn() as discord:
        relay, push = start(discord)
        for token in ("..", ".", "%2e%2e", "a/.."):
            push(discord.webhook_url(456, token=token), {"content": "x"})
        push(discord.webhook_url(456) + "/", {"content": "x"})
        snapshot = settled(relay, "five rejected", lambda m: m["rejected"] == 5)
        assert snapshot["delivered"] == 0 and discord.requests == []
        assert "the token of letters, digits, '_' and '-', up to 200 (not '.'" in relay.log()
        assert "without a trailing '/' (Discord answers 404 to it)" in relay.log()


def test_a_forum_webhooks_loss_notice_makes_its_own_thread_after_a_restart(start, relays):
    """Found against Discord's imitation: that a webhook creates threads was not kept,
    and after a restart its pending loss notice went without thread_name (400, code
    220001). Learned through one spelling, lost through another, kept per webhook."""
    with DiscordStandIn(forums={"7"}) as discord:
        relay, push = start(discord)
        push(discord.webhook_url(7, version=10), {"content": "report", "thread_name": "Daily"})
        settled(relay, "the first post", lambda m: m["delivered"] == 1)
        (thread, _), = discord.threads("7")
        discord.set_mode(7, "status", status=400, times=1)
        push(discord.webhook_url(7, thread=thread), {"content": "refused"})
        settled(relay, "the loss", lambda m: m["failed"] == 1)
        assert relay.stop() == 0
        again = relays(allowed=f"127.0.0.1:{discord.port}", port=relay.port)
        settled(again, "the notice", lambda m: m["notices"] == 1)
        assert [name for _, name in discord.threads("7")] == ["Daily", LOSS_THREAD_NAME]
        assert discord.count_status(400) == 1  # the scripted refusal only: no 220001
