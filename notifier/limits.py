"""When each webhook may send next: Discord's limits and outages as pure policy.

`Limits` is told what the relay sends (`sent`) and what Discord answered (`answered`),
with the time passed in, and answers `ready_at(webhook, now)`. It has no thread, no I/O
and no clock of its own: `Outbox` consults it under its lock, tests drive it with
chosen times. What it knows:

- Buckets, keyed by (X-RateLimit-Bucket, webhook): Discord counts webhook executes per
  webhook, even though every webhook reports the same hash. Requests in flight count.
- The global pace: at most `global_rate` requests in any second, all webhooks together
  (Discord allows an IP 50), spread over the second, so the relay never waits for a
  global 429 to slow down.
- Channel paces: a ``shared`` 429 reveals a channel's hidden limit (about 30 per 60 s);
  the requests its channel delivered in the CHANNEL_PERIOD_SEC before it become the
  pace of every webhook Discord reports in that channel (the ``channel_id`` of the
  messages it returns), until the channel has been calm for PACE_DECAY_SEC.
- Pauses: a global or ban 429 pauses everyone; 1,000 invalid requests in 10 minutes
  pause everyone until they age out; 401/403/404 quarantine one webhook.
- Outages: errors back off per webhook, capped at a few seconds (`RetryPolicy`); a
  success on any webhook ends every backoff (Discord is back). An error is the
  webhook's *own* when another webhook delivered since its previous answer: only own
  errors count toward giving a message up.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from notifier.discord import (GONE_PAUSE_SEC, INVALID_SOFT_LIMIT, INVALID_WINDOW_SEC,
                              MAX_WAIT_SEC, UNAUTHORIZED_PAUSE_SEC, Outcome, RetryPolicy)

GLOBAL_WINDOW_SEC = 1.0
"""Discord's global limit is per second."""

GLOBAL_SLICES = 10
"""A second's requests are also spread over this many slices (at most a tenth of the
rate in any tenth of a second): a whole second's worth sent at once, answered a few
milliseconds late, would meet the next second's worth in Discord's window."""

CHANNEL_PERIOD_SEC = 60.0
"""The window of a channel's hidden limit (Discord: about 30 messages per 60 s)."""

PACE_DECAY_SEC = 600.0
"""A learned channel pace is forgotten after this long without the channel using half
of it: under sustained traffic it is kept, so the hidden limit is met once."""

SAME_WINDOW_SEC = 0.25
"""Without X-RateLimit-Reset, answers whose reset times differ by less than this are
taken to be from one rate-limit window (windows last a second or more)."""


def base_url(webhook: str) -> str:
    """The webhook without its query: ``?thread_id=`` variants are one Discord webhook."""
    return webhook.split("?", 1)[0]


@dataclass
class Bucket:
    """A rate-limit bucket as Discord's answers describe its current window."""

    remaining: int = 0
    reset_at: float = 0.0  # monotonic
    window: float | None = None  # X-RateLimit-Reset of the current window
    limit: int | None = None
    in_flight: int = 0  # requests sent on it and not answered yet


@dataclass
class Channel:
    """Deliveries to one Discord channel in the last CHANNEL_PERIOD_SEC, and its pace."""

    delivered: deque
    in_flight: int = 0
    pace: int | None = None  # requests per CHANNEL_PERIOD_SEC, once learned
    busy_at: float = 0.0  # last time it used half its pace or more


class Hook:
    """What the policy knows of one webhook (a lane's URL)."""

    __slots__ = ("base", "bucket_hash", "channel", "wait_until", "backoff_until",
                 "failures", "dead_until", "mark")

    def __init__(self, webhook: str):
        self.base = base_url(webhook)
        self.bucket_hash: str | None = None
        self.channel = self.base  # its own until Discord names the channel
        self.wait_until = 0.0  # a route or shared 429
        self.backoff_until = 0.0  # errors
        self.failures = 0  # errors in a row, for the backoff
        self.dead_until = 0.0  # quarantine
        self.mark = 0  # deliveries anywhere at its last answer


@dataclass(frozen=True, slots=True)
class Ticket:
    """One request sent: what it counts against until its answer comes."""

    webhook: str
    bucket: Bucket | None
    channel: Channel | None


@dataclass(frozen=True, slots=True)
class Answer:
    """What `answered` decided: how long this webhook now waits, and whether an error
    was its own (another webhook delivered meanwhile)."""

    wait: float = 0.0
    own: bool = False


class Limits:
    """See the module docstring. `wall` is only for X-RateLimit-Reset (epoch seconds)."""

    def __init__(self, global_rate: int = 45, retry: RetryPolicy = RetryPolicy(), *,
                 rng: random.Random | None = None, wall=None):
        self.global_rate = global_rate
        self.retry = retry
        self._rng = rng or random.Random()
        self._wall = wall
        self._hooks: dict[str, Hook] = {}
        self._buckets: dict[tuple[str | None, str], Bucket] = {}
        self._channels: dict[str, Channel] = {}
        self._sent = (  # the latest sends, for the second and for its slices
            (deque(maxlen=global_rate), GLOBAL_WINDOW_SEC),
            (deque(maxlen=-(-global_rate // GLOBAL_SLICES)), GLOBAL_WINDOW_SEC / GLOBAL_SLICES))
        self._invalid: deque[float] = deque()  # times of 401/403/429 answers
        self._global_until = 0.0
        self._backing_off: set[Hook] = set()
        self._deliveries = 0

    # ------------------------------------------------------------------ asking

    def ready_at(self, webhook: str, now: float) -> float | None:
        """When `webhook` may send (<= now: at once), or None until answers come back
        (the new window of its bucket or its channel is all in flight)."""
        at = max(self._global_until, self._invalid_pause_until(), self._global_slot())
        hook = self._hooks.get(webhook)
        if hook is None:
            return at
        at = max(at, hook.wait_until, hook.backoff_until, hook.dead_until)
        bucket = self._buckets.get((hook.bucket_hash, hook.base))
        if bucket is not None:
            if bucket.reset_at > now:
                if bucket.remaining - bucket.in_flight <= 0:
                    at = max(at, bucket.reset_at)
            elif bucket.limit is not None and bucket.in_flight >= bucket.limit:
                return None
        channel = self._channels.get(hook.channel)
        if channel is not None and self._paced(channel, now):
            free = channel.pace - channel.in_flight
            if free <= 0:
                return None
            delivered = channel.delivered
            if len(delivered) >= free:
                at = max(at, delivered[len(delivered) - free] + CHANNEL_PERIOD_SEC)
        return at

    def waiting(self, webhook: str, now: float) -> bool:
        """Whether a rate limit, a pause or a backoff holds `webhook` now."""
        at = self.ready_at(webhook, now)
        return at is None or at > now

    def quarantined(self, webhook: str, now: float) -> bool:
        hook = self._hooks.get(webhook)
        return hook is not None and hook.dead_until > now

    def invalid_count(self, now: float) -> int:
        """Invalid requests (401/403/429) in the last 10 minutes."""
        return sum(1 for t in self._invalid if t >= now - INVALID_WINDOW_SEC)

    def pace_of(self, webhook: str, now: float) -> int | None:
        """The learned pace of `webhook`'s channel, per CHANNEL_PERIOD_SEC."""
        hook = self._hooks.get(webhook)
        channel = self._channels.get(hook.channel) if hook else None
        return channel.pace if channel is not None and self._paced(channel, now) else None

    def _paced(self, channel: Channel, now: float) -> bool:
        return channel.pace is not None and now - channel.busy_at <= PACE_DECAY_SEC

    def _global_slot(self) -> float:
        return max(sent[0] + seconds if len(sent) == sent.maxlen else 0.0
                   for sent, seconds in self._sent)

    def _invalid_pause_until(self) -> float:
        """While the relay has made INVALID_SOFT_LIMIT invalid requests in the window,
        nothing is sent until enough of them have aged out."""
        invalid = self._invalid
        if len(invalid) < INVALID_SOFT_LIMIT:
            return 0.0
        return invalid[len(invalid) - INVALID_SOFT_LIMIT] + INVALID_WINDOW_SEC

    # ------------------------------------------------------------------ telling

    def sent(self, webhook: str, now: float) -> Ticket:
        """A request to `webhook` leaves now; pass the ticket to `answered`."""
        hook = self._hook(webhook)
        for sent, _ in self._sent:
            sent.append(now)
        bucket = self._buckets.get((hook.bucket_hash, hook.base))
        channel = self._channels.get(hook.channel)
        for counted in (bucket, channel):
            if counted is not None:
                counted.in_flight += 1
        return Ticket(webhook, bucket, channel)

    def answered(self, ticket: Ticket, outcome: Outcome, now: float) -> Answer:
        """Learn from Discord's answer to the request of `ticket`."""
        for counted in (ticket.bucket, ticket.channel):
            if counted is not None:
                counted.in_flight -= 1
        hook = self._hook(ticket.webhook)
        self._learn_bucket(hook, outcome, now)
        if outcome.invalid:
            self._invalid.append(now)
        while self._invalid and self._invalid[0] < now - INVALID_WINDOW_SEC:
            self._invalid.popleft()
        others_delivered = self._deliveries > hook.mark
        answer = Answer()
        if outcome.kind == "delivered":
            self._delivered(hook, outcome, now)
        elif outcome.kind == "rate_limited":
            answer = Answer(outcome.wait)
            if outcome.scope in ("global", "ban"):
                self._global_until = max(self._global_until, now + outcome.wait)
            else:
                hook.wait_until = max(hook.wait_until, now + outcome.wait)
                if outcome.scope == "shared":
                    self._learn_pace(hook, now)
        elif outcome.kind == "retry":
            hook.failures += 1
            delay = self.retry.backoff(hook.failures, self._rng)
            hook.backoff_until = now + delay
            if others_delivered:  # its own trouble: its backoff stands whatever others do
                self._backing_off.discard(hook)
            else:  # an outage, as far as one can tell: the first delivery anywhere ends it
                self._backing_off.add(hook)
            answer = Answer(delay, own=others_delivered)
        elif outcome.kind == "dead":
            pause = GONE_PAUSE_SEC if outcome.gone else UNAUTHORIZED_PAUSE_SEC
            hook.dead_until = now + pause
            answer = Answer(pause)
        hook.mark = self._deliveries
        return answer

    def forget(self, webhook: str) -> None:
        """`webhook` is idle and no longer tracked (nothing of it is in flight)."""
        hook = self._hooks.pop(webhook, None)
        if hook is None:
            return
        self._backing_off.discard(hook)
        if all(other.base != hook.base for other in self._hooks.values()):
            for key in [key for key in self._buckets if key[1] == hook.base]:
                del self._buckets[key]
        if all(other.channel != hook.channel for other in self._hooks.values()):
            self._channels.pop(hook.channel, None)

    def _hook(self, webhook: str) -> Hook:
        hook = self._hooks.get(webhook)
        if hook is None:
            hook = self._hooks[webhook] = Hook(webhook)
        return hook

    def _delivered(self, hook: Hook, outcome: Outcome, now: float) -> None:
        """Discord works: this webhook's backoff, quarantine and every other webhook's
        backoff are over."""
        self._deliveries += 1
        hook.failures = 0
        hook.dead_until = 0.0
        for other in self._backing_off:
            other.backoff_until = 0.0
        self._backing_off.clear()
        if outcome.channel is not None and outcome.channel != hook.channel:
            old, hook.channel = hook.channel, outcome.channel  # forum posts: a new thread each
            if all(other.channel != old for other in self._hooks.values()):
                self._channels.pop(old, None)
        channel = self._channels.get(hook.channel)
        if channel is None:
            channel = self._channels[hook.channel] = Channel(deque())
        delivered = channel.delivered
        delivered.append(now)
        while delivered[0] <= now - CHANNEL_PERIOD_SEC:
            delivered.popleft()
        if channel.pace is not None and 2 * len(delivered) >= channel.pace:
            channel.busy_at = now

    def _learn_pace(self, hook: Hook, now: float) -> None:
        """A shared 429: the channel took what it delivered in the last period. Met
        again while paced, the pace was too high: one less than what got through. With
        nothing delivered to learn from, its retry_after alone is honoured."""
        channel = self._channels.get(hook.channel)
        observed = 0 if channel is None else sum(
            1 for t in channel.delivered if t > now - CHANNEL_PERIOD_SEC)
        if channel is not None and self._paced(channel, now):
            observed = min(observed, channel.pace - 1)
        elif observed == 0:
            return
        channel.pace = max(1, observed)
        channel.busy_at = now

    def _learn_bucket(self, hook: Hook, outcome: Outcome, now: float) -> None:
        """Answers may come back out of order (senders run in parallel): within one
        window the lowest Remaining is the true one, and an answer from a window that
        is over says nothing about the current one. Discord names each window by its
        X-RateLimit-Reset; without it, reset times within SAME_WINDOW_SEC are one."""
        rate = outcome.rate
        if rate.bucket is not None and rate.bucket != hook.bucket_hash:
            unnamed = self._buckets.pop((hook.bucket_hash, hook.base), None)
            hook.bucket_hash = rate.bucket
            if unnamed is not None:
                self._buckets.setdefault((rate.bucket, hook.base), unnamed)
        if rate.remaining is None:
            return
        bucket = self._buckets.setdefault((hook.bucket_hash, hook.base), Bucket())
        if rate.limit is not None:
            bucket.limit = rate.limit
        reset_after = rate.reset_after
        if reset_after is None and rate.reset is not None and self._wall is not None:
            reset_after = min(max(0.0, rate.reset - self._wall()), MAX_WAIT_SEC)
        reset_at = now + (reset_after or 0.0)
        if bucket.reset_at > now:  # a window is current: is this answer from it?
            if rate.reset is not None and bucket.window is not None:
                age = bucket.window - rate.reset
            else:
                age = bucket.reset_at - reset_at
                age = 0.0 if abs(age) < SAME_WINDOW_SEC else age
            if age > 0:
                return  # from a window already over
            if age == 0:
                bucket.remaining = min(bucket.remaining, rate.remaining)
                return
        bucket.remaining, bucket.window, bucket.reset_at = rate.remaining, rate.reset, reset_at
