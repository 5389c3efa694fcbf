"""The rate-limit policy on its own: chosen times, no threads, no sleeping."""

import random

from notifier.discord import Outcome, RateLimit, RetryPolicy
from notifier.limits import CHANNEL_PERIOD_SEC, PACE_DECAY_SEC, Limits

A, B, C = (f"https://discord.com/api/webhooks/{n}/token{n}" for n in (1, 2, 3))


def ok(channel=None, remaining=None, reset_after=None):
    return Outcome("delivered", rate=RateLimit("hash", 5, remaining, reset_after),
                   channel=channel)


SHARED = Outcome("rate_limited", reason="HTTP 429 (shared)", wait=40.0, scope="shared",
                 rate=RateLimit("hash", 5, 3, 1.0))
RETRY = Outcome("retry", reason="HTTP 500")


def post(limits, webhook, now, outcome):
    return limits.answered(limits.sent(webhook, now), outcome, now)


def test_the_global_pace_allows_rate_requests_in_any_second():
    limits = Limits(global_rate=3)
    for now in (0.0, 0.1, 0.2):
        assert limits.ready_at(A, now) <= now
        limits.sent(A if now < 0.2 else B, now)
    assert limits.ready_at(C, 0.3) == 1.0  # the first of the three leaves the window
    limits.sent(C, 1.0)
    assert limits.ready_at(C, 1.0) == 1.1


def test_the_global_pace_spreads_a_seconds_requests_over_its_tenths():
    limits = Limits(global_rate=45)
    for _ in range(5):
        limits.sent(A, 0.0)
    assert limits.ready_at(B, 0.0) == 0.1


def test_a_shared_429_paces_the_channel_to_what_it_delivered_in_the_period():
    limits = Limits(global_rate=1000)
    for i in range(30):  # three webhooks in one channel, 30 messages in 30 s
        post(limits, (A, B)[i % 2], float(i), ok(channel="chan"))
    post(limits, C, 30.0, ok(channel="chan"))  # C is learned to be in the channel too
    assert post(limits, A, 31.0, SHARED).wait == 40.0
    assert limits.pace_of(B, 31.0) == 31
    # B and C need no 429 of their own: the channel has used its 31 in the last 60 s
    assert limits.ready_at(B, 31.0) == 0.0 + CHANNEL_PERIOD_SEC
    assert limits.ready_at(C, 31.0) == 0.0 + CHANNEL_PERIOD_SEC
    assert limits.ready_at(A, 31.0) == 71.0  # its own retry_after is longer


def test_a_channel_met_again_while_paced_is_paced_lower():
    limits = Limits(global_rate=1000)
    for i in range(10):
        post(limits, A, float(i), ok(channel="chan"))
    post(limits, A, 10.0, SHARED)
    assert limits.pace_of(A, 10.0) == 10
    post(limits, A, 60.0, ok(channel="chan"))
    post(limits, A, 61.0, SHARED)
    assert limits.pace_of(A, 61.0) == 9


def test_the_pace_is_kept_under_sustained_traffic_and_forgotten_once_calm():
    limits = Limits(global_rate=1000)
    for i in range(4):
        post(limits, A, float(i), ok(channel="chan"))
    post(limits, A, 4.0, SHARED)
    now = 4.0
    while now < 3 * PACE_DECAY_SEC:  # as fast as the pace allows
        now = max(now, limits.ready_at(A, now))
        post(limits, A, now, ok(channel="chan"))
    assert limits.pace_of(A, now) == 4
    calm = now + PACE_DECAY_SEC + 1.0
    assert limits.pace_of(A, calm) is None and limits.ready_at(A, calm) <= calm


def test_buckets_are_per_webhook_whatever_hash_they_report():
    limits = Limits()
    post(limits, A, 0.0, ok(remaining=0, reset_after=2.0))
    post(limits, B, 0.0, ok(remaining=4, reset_after=2.0))
    assert limits.ready_at(A, 0.1) == 2.0 and limits.ready_at(B, 0.1) == 0.0


def test_errors_are_own_only_when_another_webhook_delivered_since():
    limits = Limits(retry=RetryPolicy(base=1.0, cap=4.0), rng=random.Random(3))
    assert not post(limits, A, 0.0, RETRY).own  # nothing delivered anywhere yet
    post(limits, B, 0.5, ok())
    answer = post(limits, A, 1.0, RETRY)
    assert answer.own and limits.ready_at(A, 1.0) == 1.0 + answer.wait
    assert not post(limits, A, 3.0, RETRY).own  # nobody delivered since its last error


def test_a_delivery_anywhere_ends_every_backoff():
    limits = Limits(retry=RetryPolicy(base=4.0, cap=4.0))
    for webhook in (A, B):
        post(limits, webhook, 0.0, RETRY)
    assert limits.ready_at(B, 1.0) > 1.0
    post(limits, C, 1.0, ok())
    assert limits.ready_at(A, 1.0) <= 1.0 and limits.ready_at(B, 1.0) <= 1.0


def test_a_webhooks_own_errors_keep_their_backoff_while_others_deliver():
    """Found by the soak: a webhook answering 500 while others delivered was retried at
    every delivery elsewhere, and failed ten attempts in a second."""
    limits = Limits(retry=RetryPolicy(base=1.0, cap=4.0), rng=random.Random(3))
    post(limits, B, 0.0, ok())
    answer = post(limits, A, 0.1, RETRY)
    assert answer.own
    post(limits, B, 0.2, ok())
    assert limits.ready_at(A, 0.2) == 0.1 + answer.wait > 0.2


def test_a_route_429_is_not_ended_by_a_delivery_elsewhere():
    limits = Limits()
    post(limits, A, 0.0, Outcome("rate_limited", wait=3.0, scope="route", invalid=True))
    post(limits, B, 1.0, ok())
    assert limits.ready_at(A, 1.0) == 3.0 and limits.invalid_count(1.0) == 1


def test_a_shared_429_with_nothing_delivered_teaches_no_pace():
    limits = Limits()
    post(limits, A, 0.0, SHARED)
    assert limits.pace_of(A, 0.0) is None and limits.ready_at(A, 0.0) == 40.0


def test_channels_no_webhook_posts_into_any_more_are_forgotten():
    """A forum webhook's every post is a new thread: its channels must not pile up."""
    limits = Limits()
    for thread in range(100):
        post(limits, A, float(thread), ok(channel=f"thread {thread}"))
    assert len(limits._channels) == 1
