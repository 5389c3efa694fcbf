"""When each webhook may send next: Discord's limits and outages as pure policy.

`Limits` is told what the relay sends (`sent`) and what Discord answered (`answered`),
with the time passed in, and answers `ready_at(webhook, now, thread)`. It has no thread,
no I/O and no clock of its own: `Outbox` consults it under its lock, tests drive it with
chosen times. A webhook is named by its key (`envelope.webhook_key`): every URL of one
webhook, whatever its spelling or thread, is one webhook here from its first request.
What it knows:

- Buckets, keyed by (X-RateLimit-Bucket, webhook): Discord counts webhook executes per
  webhook (all its threads together), even though every webhook reports the same hash.
  Requests in flight count.
- The global pace: at most `global_rate` requests in any second, all webhooks together
  (Discord allows an IP 50), spread over the second, so the relay never waits for a
  global 429 to slow down.
- Channel paces: a ``shared`` 429 reveals that a channel's hidden limit (about 30 per
  60 s) is met; from then on every webhook Discord reports in that channel (the
  ``channel_id`` of the messages it returns) follows the channel's pace, a sliding
  estimate that falls and rises again (see `Channel`). A thread is a channel of its
  own: a request into one counts against that thread's pace, not the webhook's channel.
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

PROBE_MAX_PERIODS = 16
"""A channel's pace probes upward after a period without a shared 429; each probe that
finds no more room doubles that wait, up to this many periods."""

CHANNELS_SWEPT_AT = 64
"""Channels known before the quiet ones are forgotten (then at twice those kept)."""

SAME_WINDOW_SEC = 0.25
"""Without X-RateLimit-Reset, answers whose reset times differ by less than this are
taken to be from one rate-limit window (windows last a second or more)."""


@dataclass
class Bucket:
    """A rate-limit bucket as Discord's answers describe its current window."""

    remaining: int = 0
    reset_at: float = 0.0  # monotonic
    window: float | None = None  # X-RateLimit-Reset of the current window
    limit: int | None = None
    in_flight: int = 0  # requests sent on it and not answered yet


class Channel:
    """One Discord channel's hidden limit as this relay learns it: a sliding estimate
    of how many of its messages fit in a period (`pace`), from what the channel's
    shared 429s say.

    - A shared 429 at `now` saying "retry after R" means the channel is full until
      now + R, and (the limit being a sliding window of `period`) that its oldest
      message was posted at now + R - period: everything since filled it. What this
      relay delivered since then is the pace (another poster's share is not ours to
      take). Met again at that pace without probing, the pace was too high: one less.
    - After a period without a shared 429 the pace probes upward: one message more may
      go, and the pace rises to what got through in a period, until a shared 429 says
      where the limit is now. A probe that found no more room doubles the wait before
      the next one (up to PROBE_MAX_PERIODS).
    - Once the channel has been quiet for a period (nothing sent, delivered or limited)
      the pace is forgotten: nothing of ours is in the window, and the next burst finds
      the limit again.
    """

    __slots__ = ("period", "delivered", "in_flight", "pace", "full_until", "limited_at",
                 "probe_every", "rose", "active_at")

    def __init__(self, period: float):
        self.period = period
        self.delivered: deque[float] = deque()  # our deliveries in the last period
        self.in_flight = 0
        self.pace: int | None = None  # our messages per period, once learned
        self.full_until = 0.0  # a shared 429's wait: nothing fits before
        self.limited_at = 0.0  # the last shared 429
        self.probe_every = period
        self.rose = False  # the pace rose since the last shared 429
        self.active_at = 0.0  # the last request sent, delivered or limited

    def ready_at(self, now: float) -> float | None:
        """When the channel takes one more of ours (None: not before answers come)."""
        pace = self.allowed(now)
        if pace is None:
            return self.full_until
        free = pace - self.in_flight
        if free <= 0:
            return None
        delivered = self.delivered
        at = delivered[len(delivered) - free] + self.period if len(delivered) >= free else 0.0
        if at > now and pace == self.pace:  # a probe may send sooner
            at = min(at, self._probe_at)
        return max(self.full_until, at)

    def allowed(self, now: float) -> int | None:
        """Our messages the channel takes per period now (the pace, one more while
        probing), or None when it is not paced."""
        if self.pace is None or self.quiet(now):
            return None
        return self.pace + 1 if now >= self._probe_at else self.pace

    @property
    def _probe_at(self) -> float:
        return self.limited_at + self.probe_every

    def sent(self, now: float) -> None:
        self._forget_if_quiet(now)
        self.in_flight += 1
        self.active_at = now

    def answered(self, now: float) -> None:
        self.in_flight -= 1
        self.active_at = now

    def delivered_at(self, now: float) -> None:
        delivered = self.delivered
        delivered.append(now)
        while delivered[0] <= now - self.period:
            delivered.popleft()
        if self.pace is not None and now >= self._probe_at and len(delivered) > self.pace:
            self.pace, self.rose = len(delivered), True

    def limited(self, now: float, wait: float) -> None:
        """A shared 429 asking to wait `wait` seconds."""
        self._forget_if_quiet(now)
        start = now + min(wait, self.period) - self.period  # its oldest message's time
        ours = sum(1 for t in self.delivered if t >= start)
        if self.pace is not None:
            if now >= self._probe_at:  # a probe ends
                self.probe_every = self.period if self.rose else \
                    min(2 * self.probe_every, PROBE_MAX_PERIODS * self.period)
            else:
                ours = min(ours, self.pace - 1)
        if ours > 0 or self.pace is not None:
            self.pace = max(1, ours)
        self.full_until = max(self.full_until, now + wait)
        self.limited_at = self.active_at = now
        self.rose = False

    def quiet(self, now: float) -> bool:
        """Nothing of ours in flight or in the window for a period (a wait Discord
        asked for is not quiet of our own)."""
        return self.in_flight == 0 and now - max(self.active_at, self.full_until) >= self.period

    def _forget_if_quiet(self, now: float) -> None:
        if self.pace is not None and self.quiet(now):
            self.pace, self.probe_every = None, self.period


class Hook:
    """What the policy knows of one webhook (by its key)."""

    __slots__ = ("key", "bucket_hash", "channel", "wait_until", "backoff_until",
                 "failures", "dead_until", "mark")

    def __init__(self, key: str):
        self.key = key
        self.bucket_hash: str | None = None
        self.channel = key  # the channel it posts in (not a thread): its own until named
        self.wait_until = 0.0  # a route 429
        self.backoff_until = 0.0  # errors
        self.failures = 0  # errors in a row, for the backoff
        self.dead_until = 0.0  # quarantine
        self.mark = 0  # deliveries anywhere at its last answer


@dataclass(frozen=True, slots=True)
class Ticket:
    """One request sent: what it counts against until its answer comes."""

    webhook: str  # its key
    thread: str | None
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
                 rng: random.Random | None = None, wall=None,
                 channel_period: float = CHANNEL_PERIOD_SEC):
        self.global_rate = global_rate
        self.channel_period = channel_period
        self.retry = retry
        self._rng = rng or random.Random()
        self._wall = wall
        self._hooks: dict[str, Hook] = {}
        self._buckets: dict[tuple[str | None, str], Bucket] = {}
        self._channels: dict[str, Channel] = {}
        self._sweep_at = CHANNELS_SWEPT_AT  # channels kept before quiet ones are forgotten
        self._sent = (  # the latest sends, for the second and for its slices
            (deque(maxlen=global_rate), GLOBAL_WINDOW_SEC),
            (deque(maxlen=-(-global_rate // GLOBAL_SLICES)), GLOBAL_WINDOW_SEC / GLOBAL_SLICES))
        self._invalid: deque[float] = deque()  # times of 401/403/429 answers
        self._global_until = 0.0
        self._backing_off: set[Hook] = set()
        self._deliveries = 0

    # ------------------------------------------------------------------ asking

    def ready_at(self, webhook: str, now: float, thread: str | None = None) -> float | None:
        """When `webhook` may send (<= now: at once) a request into `thread` (None: its
        channel), or None until answers come back (the new window of its bucket or its
        channel is all in flight)."""
        at = max(self._global_until, self._invalid_pause_until(), self._global_slot())
        hook = self._hooks.get(webhook)
        if hook is None:
            return at
        at = max(at, hook.wait_until, hook.backoff_until, hook.dead_until)
        bucket = self._buckets.get((hook.bucket_hash, webhook))
        if bucket is not None:
            if bucket.reset_at > now:
                if bucket.remaining - bucket.in_flight <= 0:
                    at = max(at, bucket.reset_at)
            elif bucket.limit is not None and bucket.in_flight >= bucket.limit:
                return None
        channel = self._channels.get(thread or hook.channel)
        if channel is not None:
            channel_at = channel.ready_at(now)
            if channel_at is None:
                return None
            at = max(at, channel_at)
        return at

    def waiting(self, webhook: str, now: float, thread: str | None = None) -> bool:
        """Whether a rate limit, a pause or a backoff holds `webhook` now."""
        at = self.ready_at(webhook, now, thread)
        return at is None or at > now

    def quarantined(self, webhook: str, now: float) -> bool:
        hook = self._hooks.get(webhook)
        return hook is not None and hook.dead_until > now

    def invalid_count(self, now: float) -> int:
        """Invalid requests (401/403/429) in the last 10 minutes."""
        return sum(1 for t in self._invalid if t >= now - INVALID_WINDOW_SEC)

    def pace_of(self, webhook: str, now: float, thread: str | None = None) -> int | None:
        """The learned pace of `webhook`'s channel (or `thread`), per `channel_period`."""
        hook = self._hooks.get(webhook)
        channel = self._channels.get(thread or hook.channel) if hook else None
        return None if channel is None or channel.allowed(now) is None else channel.pace

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

    def sent(self, webhook: str, now: float, thread: str | None = None) -> Ticket:
        """A request to `webhook` (into `thread`, None: its channel) leaves now; pass the
        ticket to `answered`."""
        hook = self._hook(webhook)
        for sent, _ in self._sent:
            sent.append(now)
        bucket = self._buckets.get((hook.bucket_hash, webhook))
        if bucket is not None:
            bucket.in_flight += 1
        channel = self._channels.get(thread or hook.channel)
        if channel is not None:
            channel.sent(now)
        return Ticket(webhook, thread, bucket, channel)

    def answered(self, ticket: Ticket, outcome: Outcome, now: float) -> Answer:
        """Learn from Discord's answer to the request of `ticket`."""
        if ticket.bucket is not None:
            ticket.bucket.in_flight -= 1
        if ticket.channel is not None:
            ticket.channel.answered(now)
        hook = self._hook(ticket.webhook)
        self._learn_bucket(hook, outcome, now)
        if outcome.invalid:
            self._invalid.append(now)
        while self._invalid and self._invalid[0] < now - INVALID_WINDOW_SEC:
            self._invalid.popleft()
        others_delivered = self._deliveries > hook.mark
        answer = Answer()
        if outcome.kind == "delivered":
            self._delivered(hook, ticket.thread, outcome, now)
        elif outcome.kind == "rate_limited":
            answer = Answer(outcome.wait)
            if outcome.scope in ("global", "ban"):
                self._global_until = max(self._global_until, now + outcome.wait)
            elif outcome.scope == "shared":  # the channel (or thread) is full, not the webhook
                self._channel(ticket.thread or hook.channel, now).limited(now, outcome.wait)
            else:
                hook.wait_until = max(hook.wait_until, now + outcome.wait)
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
        """`webhook` is idle and no longer tracked (nothing of it is in flight); its
        channels are forgotten once quiet (see `_channel`)."""
        hook = self._hooks.pop(webhook, None)
        if hook is None:
            return
        self._backing_off.discard(hook)
        for key in [key for key in self._buckets if key[1] == webhook]:
            del self._buckets[key]

    def _hook(self, webhook: str) -> Hook:
        hook = self._hooks.get(webhook)
        if hook is None:
            hook = self._hooks[webhook] = Hook(webhook)
        return hook

    def _delivered(self, hook: Hook, thread: str | None, outcome: Outcome, now: float) -> None:
        """Discord works: this webhook's backoff, quarantine and every other webhook's
        backoff are over. A message posted into a thread counts in that thread; one
        posted without names the webhook's channel (a forum post: a new thread each)."""
        self._deliveries += 1
        hook.failures = 0
        hook.dead_until = 0.0
        for other in self._backing_off:
            other.backoff_until = 0.0
        self._backing_off.clear()
        if thread is None and outcome.channel is not None:
            hook.channel = outcome.channel
        self._channel(thread or hook.channel, now).delivered_at(now)

    def _channel(self, name: str, now: float) -> Channel:
        """The channel `name`, made if need be. Every thread, and every forum post, is a
        channel: once they outnumber CHANNELS_SWEPT_AT and twice the last count, the
        quiet ones are forgotten (a quiet channel knows nothing a new one would not)."""
        channel = self._channels.get(name)
        if channel is None:
            if len(self._channels) >= self._sweep_at:
                self._channels = {key: kept for key, kept in self._channels.items()
                                  if not kept.quiet(now)}
                self._sweep_at = max(CHANNELS_SWEPT_AT, 2 * len(self._channels))
            channel = self._channels[name] = Channel(self.channel_period)
        return channel

    def _learn_bucket(self, hook: Hook, outcome: Outcome, now: float) -> None:
        """Answers may come back out of order (senders run in parallel): within one
        window the lowest Remaining is the true one, and an answer from a window that
        is over says nothing about the current one. Discord names each window by its
        X-RateLimit-Reset; without it, reset times within SAME_WINDOW_SEC are one."""
        rate = outcome.rate
        if rate.bucket is not None and rate.bucket != hook.bucket_hash:
            unnamed = self._buckets.pop((hook.bucket_hash, hook.key), None)
            hook.bucket_hash = rate.bucket
            if unnamed is not None:
                self._buckets.setdefault((rate.bucket, hook.key), unnamed)
        if rate.remaining is None:
            return
        bucket = self._buckets.setdefault((hook.bucket_hash, hook.key), Bucket())
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
