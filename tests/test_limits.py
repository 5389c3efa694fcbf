"""The rate-limit policy on its own: chosen times, no threads, no sleeping."""

import random

from notifier.discord import Outcome, RateLimit, RetryPolicy
from notifier.limits import CHANNEL_PERIOD_SEC, Limits

A, B, C = (f"https://discord.com/api/webhooks/{n}/token{n}" for n in (1, 2, 3))


def ok(channel=None, remaining=None, reset_after=None):
    return Outcome("delivered", rate=RateLimit("hash", 5, remaining, reset_after),
                   channel=channel)


RETRY = Outcome("retry", reason="HTTP 500")


def post(limits, webhook, now, outcome, thread=None):
    return limits.answered(limits.sent(webhook, now, thread), outcome, now)


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


def shared(wait):
    return Outcome("rate_limited", reason="HTTP 429 (shared)", wait=wait, scope="shared",
                   rate=RateLimit("hash", 5, 3, 1.0))


class HiddenLimit:
    """A channel's hidden limit as the stand-in keeps it: `count` messages in any
    `period`, whoever posts them; a shared 429 says when the oldest leaves."""

    def __init__(self, count, period=CHANNEL_PERIOD_SEC):
        self.count, self.period, self.accepted = count, period, []

    def post(self, now):
        window = sorted(t for t in self.accepted if t > now - self.period)
        if len(window) >= self.count:
            return shared(window[-self.count] + self.period - now)
        self.accepted.append(now)
        return ok(channel="chan")


def drive(limits, channel, messages, *, hooks=(A,), now=0.0, latency=0.05, until=3600.0):
    """Post `messages` through `hooks` in turn, each as soon as the policy allows, one
    request at a time; returns (time of the last delivery, shared 429s)."""
    left, limited = messages, 0
    while left and now < until:
        ready = [(limits.ready_at(hook, now), hook) for hook in hooks]
        at, hook = min((at, hook) for at, hook in ready if at is not None)
        now = max(now, at)
        ticket = limits.sent(hook, now)
        outcome = channel.post(now + latency / 2)
        now += latency
        limits.answered(ticket, outcome, now)
        if outcome.kind == "delivered":
            left -= 1
        else:
            limited += 1
    return now, limited


def test_a_shared_429_paces_the_channel_to_what_it_delivered_since_the_window_began():
    limits = Limits(global_rate=1000)
    for i in range(30):  # two webhooks in one channel, 30 messages in 30 s
        post(limits, (A, B)[i % 2], float(i), ok(channel="chan"))
    post(limits, C, 30.0, ok(channel="chan"))  # C is learned to be in the channel too
    # "retry after 29 s": the oldest message in the channel (ours, at 0) leaves at 60
    assert post(limits, A, 31.0, shared(29.0)).wait == 29.0
    assert limits.pace_of(B, 31.0) == 31
    # B and C need no 429 of their own: the channel is full until its oldest leaves
    assert limits.ready_at(B, 31.0) == limits.ready_at(C, 31.0) == 0.0 + CHANNEL_PERIOD_SEC


def test_what_went_before_the_window_began_is_not_counted():
    """The 429's wait dates the channel's oldest message: ours before it have left."""
    limits = Limits(global_rate=1000)
    for i in range(10):
        post(limits, A, float(i), ok(channel="chan"))
    post(limits, A, 10.0, shared(55.0))  # the window began at 5
    assert limits.pace_of(A, 10.0) == 5


def test_a_shared_429_holds_every_webhook_of_the_channel_for_its_wait():
    limits = Limits(global_rate=1000)
    post(limits, A, 0.0, ok(channel="chan"))
    post(limits, B, 0.5, ok(channel="chan"))
    post(limits, A, 1.0, shared(90.0))  # a window that has just begun: nothing to pace by
    assert limits.pace_of(B, 1.0) is None and limits.ready_at(B, 1.0) == 91.0


def test_a_channel_partly_used_by_someone_else_recovers_its_room():
    """The issue's case: 28 of a channel's 30 per 60 s used by another poster. The
    relay learns a pace of 2 from its first 429, probes upward after a quiet period,
    finds the 30 and delivers 40 within about two minutes, with two shared 429s."""
    channel = HiddenLimit(30)
    channel.accepted = [0.0] * 28
    limits = Limits(global_rate=1000)
    last, limited = drive(limits, channel, 40, now=0.1)
    assert limited == 2 and last < 130.0
    assert limits.pace_of(A, last) == 30


def test_a_channel_met_by_webhooks_not_yet_known_in_it_recovers_too():
    channel = HiddenLimit(30)
    channel.accepted = [0.0] * 28
    limits = Limits(global_rate=1000)
    last, limited = drive(limits, channel, 39, hooks=(A, B, C), now=0.1)
    assert limited <= 4 and last < 130.0  # B and C learn their channel by a 429 each


def test_a_probe_that_finds_no_room_waits_twice_as_long_for_the_next():
    """The relay alone fills a 30-per-60 s channel from a backlog: its pace is exact,
    and each probe costs one shared 429, further and further apart."""
    limits = Limits(global_rate=1000)
    last, limited = drive(limits, HiddenLimit(30), 300)
    assert limits.pace_of(A, last) == 30
    assert 540.0 < last < 620.0  # 30 per 60 s
    assert limited == 4  # the limit found at 0 s, probes at 1, 2 and 4 periods on


def test_a_channel_met_again_at_its_pace_without_probing_is_paced_lower():
    limits = Limits(global_rate=1000)
    for i in range(10):
        post(limits, A, float(i), ok(channel="chan"))
    post(limits, A, 10.0, shared(50.0))
    assert limits.pace_of(A, 10.0) == 10
    post(limits, A, 60.0, ok(channel="chan"))  # 1-9 and this one: 10 in the window
    post(limits, A, 60.5, shared(0.5))  # someone else posts there too
    assert limits.pace_of(A, 60.5) == 9


def test_the_pace_is_forgotten_once_the_channel_has_been_quiet_for_a_period():
    limits = Limits(global_rate=1000)
    for i in range(4):
        post(limits, A, float(i), ok(channel="chan"))
    post(limits, A, 4.0, shared(30.0))
    assert limits.pace_of(A, 33.0) == 4  # waiting for Discord is not being quiet
    quiet = 34.0 + CHANNEL_PERIOD_SEC
    assert limits.pace_of(A, quiet) is None and limits.ready_at(A, quiet) <= quiet


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
    post(limits, A, 0.0, shared(40.0))
    assert limits.pace_of(A, 0.0) is None and limits.ready_at(A, 0.0) == 40.0


def test_channels_quiet_for_a_period_are_forgotten():
    """A forum webhook's every post is a new thread, and so is every thread a webhook
    posts into: the channels must not pile up beyond about twice a period's worth."""
    limits = Limits()
    for thread in range(2000):
        post(limits, A, float(thread), ok(channel=f"thread {thread}"))
        post(limits, B, float(thread), ok(channel=str(thread)), thread=str(thread))
        assert len(limits._channels) <= 4 * CHANNEL_PERIOD_SEC + 2


def test_threads_of_one_webhook_share_its_bucket_from_the_first_answer():
    """Found against Discord's imitation: ten thread URLs of one webhook each sent as if
    its bucket were its own. Its requests left count once, whichever thread answers."""
    limits = Limits()
    tickets = [limits.sent(A, 0.0, thread=str(thread)) for thread in range(5)]
    for remaining, ticket in zip(range(4, -1, -1), tickets):
        limits.answered(ticket, ok(channel=ticket.thread, remaining=remaining, reset_after=2.0), 0.1)
    for thread in (None, "0", "9"):
        assert limits.ready_at(A, 0.2, thread) == 2.1
    assert limits.ready_at(B, 0.2) <= 0.2


def test_a_webhook_quarantined_through_one_thread_is_quarantined_in_all():
    limits = Limits()
    post(limits, A, 0.0, Outcome("dead", reason="HTTP 401", invalid=True), thread="7")
    assert limits.quarantined(A, 1.0) and limits.ready_at(A, 1.0, "8") > 60.0
    assert limits.invalid_count(1.0) == 1


def test_a_thread_is_a_channel_of_its_own():
    """A shared 429 in a thread paces that thread: the webhook's channel and its other
    threads go on, and alternating between them forgets no pace."""
    limits = Limits(global_rate=1000)
    for i in range(10):
        post(limits, A, float(i), ok(channel=str(i % 2 + 70)), thread=str(i % 2 + 70))
        post(limits, A, i + 0.5, ok(channel="chan"))
    post(limits, A, 10.0, shared(50.0), thread="70")
    assert limits.pace_of(A, 10.0, "70") == 5
    assert limits.pace_of(A, 10.0) is None and limits.pace_of(A, 10.0, "71") is None
    assert limits.ready_at(A, 10.0, "70") == 60.0
    assert limits.ready_at(A, 10.0) <= 10.0 and limits.ready_at(A, 10.0, "71") <= 10.0
    post(limits, A, 60.0, ok(channel="chan"))
    post(limits, A, 60.1, ok(channel="71"), thread="71")
    assert limits.pace_of(A, 60.2, "70") == 5 and limits.ready_at(A, 60.2) <= 60.2


def test_a_late_answer_does_not_give_back_requests_its_bucket_has_spent():
    """Answers can come back out of order: the one Discord gave first says more
    requests are left than the one it gave last."""
    limits = Limits()
    for remaining in (4, 3, 2):
        post(limits, A, 0.0, ok(remaining=remaining, reset_after=2.0))
    early, late = limits.sent(A, 0.1), limits.sent(A, 0.1)  # the bucket's last two
    assert limits.ready_at(A, 0.1) == 2.0
    limits.answered(late, ok(remaining=0, reset_after=1.9), 0.2)
    limits.answered(early, ok(remaining=1, reset_after=1.9), 0.2)
    assert limits.ready_at(A, 0.2) == 2.0  # one window: Remaining 0 holds, not 1


def test_a_new_window_counts_the_requests_put_in_flight_in_it():
    limits = Limits()
    post(limits, A, 0.0, Outcome("delivered", rate=RateLimit("hash", 2, 0, 2.0)))
    for _ in range(2):  # the new window's two, sent before any of its answers
        assert limits.ready_at(A, 2.0) <= 2.0
        limits.sent(A, 2.0)
    assert limits.ready_at(A, 2.0) is None  # until answers say more
