"""Everything the relay holds, and where every message it accepted went.

One `Outbox`, one lock. The receiver thread puts raw envelopes in (`accept`), parses
them when the socket is idle (`take_unparsed`, then `add_parsed`), and sender threads
take requests out (`next_job`) and report what Discord answered (`finish`). Keeping the
messages, the counters and the schedule under the same lock is what makes the
accounting exact at every snapshot:

    received = delivered + drops + rejected + deduplicated + failed + pending

Holding: raw envelopes not yet parsed (the newest), then per webhook a *lane*: a FIFO of
parsed messages plus the job being sent (taken messages stay held until they are
delivered or failed). All of it counts against `queue_max`; when full, the oldest
waiting message is dropped (a job being sent is never dropped).

Scheduling, per lane, one request at a time (so each webhook keeps its order): a lane
is ready when it has work, no request in flight, its backoff or quarantine is over, its
rate-limit bucket has requests left (or its window has reset), and no global pause is
on. Lanes are served round-robin, so one busy webhook cannot starve another, and a
webhook that hangs holds one sender thread only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

from notifier import payload as discord_payload
from notifier.discord import (GONE_PAUSE_SEC, INVALID_SOFT_LIMIT, INVALID_WINDOW_SEC,
                              MAX_WAIT_SEC, UNAUTHORIZED_PAUSE_SEC, Outcome, RetryPolicy)
from notifier.envelope import MAX_ENVELOPE_BYTES, Message, webhook_id

log = logging.getLogger("notifier.outbox")

DEDUPE_MAX_ENTRIES = 10_000
"""Most payloads remembered for duplicate suppression; past this the oldest are
forgotten early, so a flood of distinct messages cannot grow memory."""

BATCH_LOOKAHEAD = 50
"""Waiting messages considered for one combined request: `combine` stops at Discord's
limits (10 embeds, 6000 characters of them, 2000 of content) well before."""

SAME_WINDOW_SEC = 0.25
"""Without X-RateLimit-Reset, answers whose reset times differ by less than this are
taken to be from one rate-limit window (windows last a second or more)."""

MAX_LANES = 1000
"""Webhooks tracked at once (idle ones beyond this are forgotten, least recent first)."""

EARLY_DROP_IDS = 1000
"""Webhooks whose drops are remembered before a message to them was ever parsed."""

MAX_PRODUCERS = 256
"""Producers (CURVE certificate names) counted one by one; any further ones are counted
together under OTHER_PRODUCERS."""
OTHER_PRODUCERS = "(others)"
RESTORED_PRODUCER = "(restored)"
"""What messages saved by the last run are counted under (the file does not keep who
sent them)."""

def _webhook_id_of(envelope: bytes) -> bytes | None:
    """The id of the first webhook URL in an envelope not parsed yet (a fair guess for
    any real envelope), found with bytes.find: this runs for every envelope a flood
    drops, at hundreds of thousands a second."""
    start = envelope.find(b"/webhooks/")
    if start < 0:
        return None
    start += len(b"/webhooks/")
    end = envelope.find(b"/", start, start + 26)
    webhook = envelope[start:end]
    return webhook if end > start and webhook.isdigit() else None


def dedupe_key(message: Message) -> bytes:
    """Same webhook and same payload (key order aside) give the same 16 bytes."""
    text = json.dumps(message.payload, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(f"{message.webhook}\0{text}".encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


class Held:
    """One accepted, parsed message and what the relay knows of it."""

    __slots__ = ("seq", "received_at", "message", "key", "parts", "producer")

    def __init__(self, seq: int, received_at: float, message: Message, key: bytes | None,
                 producer: str | None = None):
        self.seq = seq
        self.received_at = received_at  # monotonic
        self.message = message
        self.key = key  # its dedupe key, forgotten if it is lost so a resend goes out
        self.parts: list[dict] | None = None  # what fit() made of it, once asked
        self.producer = producer  # its CURVE certificate name, None without CURVE


class Job:
    """The request(s) a lane is working through: its messages (or a loss notice) and
    the payloads to post, one request each, in order."""

    __slots__ = ("lane", "items", "parts", "part", "attempts", "notice", "bucket")

    def __init__(self, lane: "Lane", items: list[Held], parts: list[dict], notice=None):
        self.lane = lane
        self.items = items
        self.parts = parts
        self.part = 0
        self.attempts = 0
        self.notice = notice  # (dropped, failed) that a loss notice reports
        self.bucket: Bucket | None = None  # the bucket its request in flight counts on

    @property
    def webhook(self) -> str:
        return self.lane.webhook

    @property
    def payload(self) -> dict:
        return self.parts[self.part]


class Lane:
    """One webhook: its waiting messages, its job, its schedule and its statistics."""

    def __init__(self, webhook: str):
        self.webhook = webhook
        self.id = webhook_id(webhook)
        self.waiting: deque[Held] = deque()
        self.job: Job | None = None
        self.busy = False  # a sender is posting the job's current part
        self.not_before = 0.0  # monotonic: backoff, 429, or quarantine
        self.bucket = webhook  # rate-limit bucket key, Discord's once it names it
        self.dead_reason: str | None = None  # set while quarantined
        self.dead_failed = 0  # messages failed during this quarantine
        self.singles = 0  # send this many next messages alone (after a 400 on a batch)
        self.delivered = self.dropped = self.failed = 0
        self.last_success_at: float | None = None  # wall clock
        self.lost_dropped = self.lost_failed = 0  # not yet reported in the channel
        self.lost_since: float | None = None  # wall clock
        self.notice_due = False


@dataclass
class Bucket:
    """A rate-limit bucket as Discord's answers describe its current window."""

    remaining: int = 0
    reset_at: float = 0.0  # monotonic
    window: float | None = None  # X-RateLimit-Reset of the current window
    limit: int | None = None
    in_flight: int = 0  # requests sent on it and not answered yet


class Outbox:
    """See the module docstring. Clocks and randomness are injected for tests."""

    def __init__(self, queue_max: int, dedupe_window: float, *,
                 retry: RetryPolicy = RetryPolicy(),
                 monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 rng: random.Random | None = None):
        self.queue_max = queue_max
        self.dedupe_window = dedupe_window
        self._retry = retry
        self._monotonic = monotonic
        self._wall = wall
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # (envelope, received_at, producer)
        self._raw: deque[tuple[bytes, float, str | None]] = deque()
        self._lanes: OrderedDict[str, Lane] = OrderedDict()
        self._lanes_by_id: dict[str, Lane] = {}
        self._early_drops: dict[str, tuple[int, float]] = {}  # webhook id -> (drops, since)
        self._buckets: dict[str, Bucket] = {}
        self._dedupe: OrderedDict[bytes, float] = OrderedDict()
        self._invalid: deque[float] = deque()  # times of 401/403/429 responses
        self._global_until = 0.0
        self._held = 0
        self._seq = 0
        self._closed = False
        self.counts = dict.fromkeys(
            ("received", "delivered", "drops", "rejected", "deduplicated", "failed",
             "errors", "retries", "rate_limited", "requests", "notices", "restored"), 0)
        self.last_delivery_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._producers: dict[str, dict[str, int]] = {}  # name -> received, rejected, drops

    # ------------------------------------------------------------------ intake

    def accept(self, envelopes: list[bytes], restored: bool = False,
               producers: list[str] | None = None) -> tuple[int, list[tuple[int, str | None]]]:
        """Take envelopes off the socket, each from the producer at the same index of
        `producers` (with CURVE). Returns the number of messages dropped to stay within
        the bound and (size, producer) of the envelopes rejected for their size."""
        now = self._monotonic()
        counts = self.counts
        if producers is None:
            fresh = [(data, now, None) for data in envelopes if len(data) <= MAX_ENVELOPE_BYTES]
        else:
            fresh = [(data, now, producer) for data, producer in zip(envelopes, producers)
                     if len(data) <= MAX_ENVELOPE_BYTES]
        oversized = [(len(data), None if producers is None else producers[i])
                     for i, data in enumerate(envelopes) if len(data) > MAX_ENVELOPE_BYTES] \
            if len(fresh) < len(envelopes) else []
        with self._lock:
            counts["received"] += len(envelopes)
            if restored:
                counts["restored"] += len(envelopes)
            if producers is not None:
                for producer, count in Counter(producers).items():
                    self._charge(producer, "received", count)
            counts["rejected"] += len(oversized)
            for _, producer in oversized:
                self._charge(producer, "rejected")
            excess = self._held + len(fresh) - self.queue_max
            if excess > 0:
                counts["drops"] += excess
                made_room = self._drop_oldest(excess)
                if made_room < excess:  # the rest is being sent: newcomers go instead
                    self._charge_drops(fresh[:excess - made_room])
                    fresh = fresh[excess - made_room:]
                self._held -= made_room
            self._held += len(fresh)
            self._raw.extend(fresh)
        return max(excess, 0), oversized

    def refuse(self, producers: list[str]) -> None:
        """Count envelopes refused as they arrived, never held: from a producer whose key
        was revoked after it connected."""
        with self._lock:
            self.counts["received"] += len(producers)
            self.counts["rejected"] += len(producers)
            for producer in producers:
                self._charge(producer, "received")
                self._charge(producer, "rejected")

    def _charge(self, producer: str | None, key: str, count: int = 1) -> None:
        """Count against a producer (nothing without CURVE), for at most MAX_PRODUCERS."""
        if producer is None:
            return
        counts = self._producers.get(producer)
        if counts is None:
            if len(self._producers) >= MAX_PRODUCERS:
                producer = OTHER_PRODUCERS
            counts = self._producers.setdefault(
                producer, dict.fromkeys(("received", "rejected", "drops"), 0))
        counts[key] += count

    def _drop_oldest(self, count: int) -> int:
        """Drop up to `count` of the oldest waiting messages (parsed ones are older than
        raw ones), each charged to its webhook where it can be told. Returns how many."""
        dropped = 0
        while dropped < count:
            oldest = None
            for lane in self._lanes.values():
                if lane.waiting and (oldest is None
                                     or lane.waiting[0].seq < oldest.waiting[0].seq):
                    oldest = lane
            if oldest is None:
                break
            item = oldest.waiting.popleft()
            self._forget(item)
            self._charge(item.producer, "drops")
            oldest.dropped += 1
            self._note_loss(oldest, dropped=1)
            dropped += 1
        raw = self._raw
        taken = [raw.popleft() for _ in range(min(count - dropped, len(raw)))]
        self._charge_drops(taken)
        return dropped + len(taken)

    def _charge_drops(self, envelopes: list[tuple[bytes, float, str | None]]) -> None:
        """Charge drops of unparsed envelopes to their producers and webhooks: to its
        lane, or, before any message to that webhook was parsed, to the lane it will get
        (remembered for at most EARLY_DROP_IDS webhooks)."""
        per_webhook: dict[bytes, int] = {}
        for data, _, producer in envelopes:
            self._charge(producer, "drops")
            webhook = _webhook_id_of(data)
            if webhook is not None:
                per_webhook[webhook] = per_webhook.get(webhook, 0) + 1
        for webhook, count in per_webhook.items():
            webhook_id = webhook.decode()
            lane = self._lanes_by_id.get(webhook_id)
            if lane is not None:
                lane.dropped += count
                self._note_loss(lane, dropped=count)
            elif webhook_id in self._early_drops or len(self._early_drops) < EARLY_DROP_IDS:
                earlier, since = self._early_drops.get(webhook_id, (0, self._wall()))
                self._early_drops[webhook_id] = (earlier + count, since)

    def take_unparsed(self, limit: int) -> list[tuple[bytes, float, str | None]]:
        """Up to `limit` raw envelopes (with their time and producer), oldest first, for
        the receiver to parse. They
        stay held (and undroppable) until `add_parsed` takes them back."""
        with self._lock:
            raw = self._raw
            return [raw.popleft() for _ in range(min(limit, len(raw)))]

    @property
    def unparsed(self) -> int:
        return len(self._raw)  # a deque's len is atomic

    def add_parsed(self, results: list[tuple[float, Message | str, bytes | None,
                                             str | None]]) -> None:
        """Give back what `take_unparsed` lent, parsed: ``(received_at, message or
        rejection reason, dedupe key or None, producer)`` each, in the same order."""
        now = self._monotonic()
        counts = self.counts
        with self._lock:
            for received_at, result, key, producer in results:
                if isinstance(result, str):
                    counts["rejected"] += 1
                    self._charge(producer, "rejected")
                    self._held -= 1
                    continue
                lane = self._lanes.get(result.webhook) or self._new_lane(result.webhook)
                self._seq += 1
                if lane.dead_reason is not None and lane.not_before > now:
                    self._fail([Held(self._seq, received_at, result, None, producer)], lane,
                               lane.dead_reason, quiet=True)
                    lane.dead_failed += 1
                elif key is not None and self._seen(key, now):
                    counts["deduplicated"] += 1
                    self._held -= 1
                else:
                    lane.waiting.append(Held(self._seq, received_at, result, key, producer))
            self._changed.notify_all()

    def _new_lane(self, webhook: str) -> Lane:
        """A lane for a webhook seen for the first time. Beyond MAX_LANES, the least
        recently served idle lane is forgotten (its statistics with it), so a producer
        cycling through webhook URLs cannot grow memory."""
        if len(self._lanes) >= MAX_LANES:
            for old in self._lanes.values():
                if not (old.busy or old.job or old.waiting or old.notice_due):
                    del self._lanes[old.webhook]
                    if self._lanes_by_id.get(old.id) is old:
                        del self._lanes_by_id[old.id]
                    if all(other.bucket != old.bucket for other in self._lanes.values()):
                        self._buckets.pop(old.bucket, None)
                    break
        lane = self._lanes[webhook] = Lane(webhook)
        self._lanes_by_id.setdefault(lane.id, lane)
        if lane.id in self._early_drops:
            lane.dropped, lane.lost_since = self._early_drops.pop(lane.id)
            lane.lost_dropped = lane.dropped
        return lane

    def _seen(self, key: bytes, now: float) -> bool:
        """Whether an identical payload went to the same webhook within the window."""
        dedupe = self._dedupe
        horizon = now - self.dedupe_window
        while dedupe and (next(iter(dedupe.values())) < horizon
                          or len(dedupe) >= DEDUPE_MAX_ENTRIES):
            dedupe.popitem(last=False)
        if key in dedupe:
            return True
        dedupe[key] = now
        return False

    # ------------------------------------------------------------------ sending

    def next_job(self) -> Job | None:
        """Block until some lane may send, and return its job with the sender's claim on
        it; None once the outbox is closed."""
        with self._lock:
            while not self._closed:
                now = self._monotonic()
                wake_at = None
                for lane in self._lanes.values():
                    at = self._ready_at(lane, now)
                    if at is None:
                        continue
                    if at <= now:
                        self._lanes.move_to_end(lane.webhook)  # round-robin
                        return self._claim(lane)
                    wake_at = at if wake_at is None else min(wake_at, at)
                self._changed.wait(None if wake_at is None else wake_at - now)
            return None

    def _ready_at(self, lane: Lane, now: float) -> float | None:
        """When `lane` may send next (<= now: at once), or None if it has nothing to do."""
        if lane.busy or (lane.job is None and not lane.waiting and not lane.notice_due):
            return None
        at = max(lane.not_before, self._global_until, self._invalid_pause_until())
        bucket = self._buckets.get(lane.bucket)
        if bucket is not None:
            if bucket.reset_at > now:
                if bucket.remaining - bucket.in_flight <= 0:
                    at = max(at, bucket.reset_at)
            elif bucket.limit is not None and bucket.in_flight >= bucket.limit:
                return None  # a new window is full already; its answers will say more
        return at

    def _invalid_pause_until(self) -> float:
        """While the relay has made INVALID_SOFT_LIMIT invalid requests in the window,
        nothing is sent until enough of them have aged out."""
        invalid = self._invalid
        if len(invalid) < INVALID_SOFT_LIMIT:
            return 0.0
        return invalid[len(invalid) - INVALID_SOFT_LIMIT] + INVALID_WINDOW_SEC

    def _claim(self, lane: Lane) -> Job:
        if lane.job is None:
            lane.job = self._plan(lane)
        lane.busy = True
        job = lane.job
        job.bucket = self._buckets.get(lane.bucket)
        if job.bucket is not None:
            job.bucket.in_flight += 1
        return job

    def _plan(self, lane: Lane) -> Job:
        """The next job of a lane: a due loss notice, else its oldest message(s): one
        message alone when it needs several requests or nothing waits behind it, else
        as many as `combine` merges into one request."""
        if lane.notice_due and lane.job is None:
            lane.notice_due = False
            counts = (lane.lost_dropped, lane.lost_failed)
            notice = discord_payload.loss_notice(*counts, lane.lost_since)
            return Job(lane, [], [notice], notice=counts)
        first = lane.waiting[0]
        parts = self._parts(first)
        if len(parts) > 1 or len(lane.waiting) == 1 or lane.singles:
            lane.singles = max(0, lane.singles - 1)
            return Job(lane, [lane.waiting.popleft()], parts)
        candidates = []
        for i, item in enumerate(lane.waiting):
            if i == BATCH_LOOKAHEAD:
                break
            item_parts = self._parts(item)
            if len(item_parts) != 1:
                break
            candidates.append(item_parts[0])
        taken, combined = discord_payload.combine(candidates)
        return Job(lane, [lane.waiting.popleft() for _ in range(taken)], [combined])

    @staticmethod
    def _parts(item: Held) -> list[dict]:
        if item.parts is None:
            item.parts = discord_payload.fit(item.message.payload)
        return item.parts

    def finish(self, job: Job, outcome: Outcome) -> None:
        """Record what one request of `job` came to and decide what the lane does next."""
        now = self._monotonic()
        lane, counts = job.lane, self.counts
        with self._lock:
            lane.busy = False
            counts["requests"] += 1
            if job.bucket is not None:
                job.bucket.in_flight -= 1
                job.bucket = None
            self._update_bucket(lane, outcome.rate, now)
            if outcome.invalid:
                self._invalid.append(now)
            while self._invalid and self._invalid[0] < now - INVALID_WINDOW_SEC:
                self._invalid.popleft()
            kind = outcome.kind
            if kind == "delivered":
                job.part += 1
                if job.part == len(job.parts):
                    self._completed(job)
            elif kind == "rate_limited":
                counts["rate_limited"] += 1
                if outcome.scope in ("global", "ban"):
                    self._global_until = max(self._global_until, now + outcome.wait)
                else:
                    lane.not_before = max(lane.not_before, now + outcome.wait)
                log.warning("rate limited webhook=%s scope=%s wait_s=%.3f reason=%s",
                            lane.id, outcome.scope, outcome.wait, outcome.reason)
            else:
                counts["errors"] += 1
                self.last_error, self.last_error_at = f"webhook {lane.id}: {outcome.reason}", \
                    self._wall()
                if kind == "retry":
                    self._retry_later(job, outcome, now)
                elif kind == "dead":
                    self._quarantine(lane, outcome, now)
                else:
                    self._refused(job, outcome)
            self._changed.notify_all()

    def _update_bucket(self, lane: Lane, rate, now: float) -> None:
        """Answers may come back out of order (senders run in parallel): within one
        window the lowest Remaining is the true one, and an answer from a window that
        is over says nothing about the current one. Discord names each window by its
        X-RateLimit-Reset; without it, reset times within SAME_WINDOW_SEC are one."""
        if rate.bucket is not None:
            lane.bucket = rate.bucket  # webhooks sharing a bucket now share its state
        if rate.remaining is None:
            return
        bucket = self._buckets.setdefault(lane.bucket, Bucket())
        if rate.limit is not None:
            bucket.limit = rate.limit
        reset_after = rate.reset_after
        if reset_after is None and rate.reset is not None:
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

    def _completed(self, job: Job) -> None:
        lane, counts = job.lane, self.counts
        lane.job = None
        lane.not_before = 0.0
        now = self._wall()
        if job.notice:
            counts["notices"] += 1
            lane.lost_dropped -= job.notice[0]
            lane.lost_failed -= job.notice[1]
            if not (lane.lost_dropped or lane.lost_failed):
                lane.lost_since = None
            log.info("loss notice sent webhook=%s dropped=%d failed=%d",
                     lane.id, *job.notice)
            return
        self._held -= len(job.items)
        counts["delivered"] += len(job.items)
        lane.delivered += len(job.items)
        lane.last_success_at = self.last_delivery_at = now
        if lane.dead_reason is not None:
            log.info("webhook=%s is back after quarantine (%d messages failed meanwhile)",
                     lane.id, lane.dead_failed)
            lane.dead_reason, lane.dead_failed = None, 0
        if lane.lost_dropped or lane.lost_failed:
            lane.notice_due = True
        oldest = min(item.received_at for item in job.items)
        log.info("delivered webhook=%s messages=%d requests=%d latency_ms=%.1f",
                 lane.id, len(job.items), len(job.parts),
                 (self._monotonic() - oldest) * 1000)

    def _retry_later(self, job: Job, outcome: Outcome, now: float) -> None:
        lane = job.lane
        job.attempts += 1
        if self._retry.gives_up(job.attempts):
            lane.job = None
            self._fail(job.items, lane, f"{outcome.reason} after {job.attempts} attempts")
            return
        self.counts["retries"] += 1
        delay = self._retry.backoff(job.attempts, self._rng)
        lane.not_before = now + delay
        log.warning("retry webhook=%s attempt=%d in_s=%.2f reason=%s",
                    lane.id, job.attempts, delay, outcome.reason)

    def _quarantine(self, lane: Lane, outcome: Outcome, now: float) -> None:
        """Stop sending to a webhook that answered 401/403/404: fail what waits for it
        now and what comes for it until the pause is over, then try again."""
        pause = GONE_PAUSE_SEC if outcome.gone else UNAUTHORIZED_PAUSE_SEC
        lane.not_before = now + pause
        lane.dead_reason = outcome.reason
        job, lane.job = lane.job, None
        items = (job.items if job else []) + list(lane.waiting)
        lane.waiting.clear()
        log.error("webhook=%s quarantined for %.0f s: %s; failed now=%d, failed during the "
                  "last quarantine=%d; new messages to it fail at once until then",
                  lane.id, pause, outcome.reason, len(items), lane.dead_failed)
        lane.dead_failed = 0
        self._fail(items, lane, outcome.reason, quiet=True)

    def _refused(self, job: Job, outcome: Outcome) -> None:
        """A 400 (or another answer that will not change): never resend the same
        request. A combined batch is split so that only the message Discord refuses
        fails."""
        lane = job.lane
        lane.job = None
        if job.notice:
            log.error("loss notice refused webhook=%s: %s", lane.id, outcome.reason)
            return
        if len(job.items) > 1:
            lane.waiting.extendleft(reversed(job.items))
            lane.singles = len(job.items)
            log.warning("batch refused webhook=%s messages=%d, resending one by one: %s",
                        lane.id, len(job.items), outcome.reason)
            return
        self._fail(job.items, lane, outcome.reason)

    def _fail(self, items: list[Held], lane: Lane, reason: str, quiet=False) -> None:
        if not items:
            return
        for item in items:
            self._forget(item)
        self._held -= len(items)
        self.counts["failed"] += len(items)
        lane.failed += len(items)
        self._note_loss(lane, failed=len(items))
        if not quiet:
            log.error("failed webhook=%s messages=%d reason=%s", lane.id, len(items), reason)

    def _forget(self, item: Held) -> None:
        """A lost message no longer counts as seen: the producer's resend must go out."""
        if item.key is not None:
            self._dedupe.pop(item.key, None)

    def _note_loss(self, lane: Lane, dropped: int = 0, failed: int = 0) -> None:
        lane.lost_dropped += dropped
        lane.lost_failed += failed
        if lane.lost_since is None:
            lane.lost_since = self._wall()

    def wait_empty(self, timeout: float) -> bool:
        """Wait until nothing is held (all delivered or failed); False on timeout."""
        with self._lock:
            return self._changed.wait_for(lambda: self._held == 0, timeout)

    # ------------------------------------------------------------------ reporting

    def snapshot(self) -> dict:
        """The counters, consistent with each other, and a line per webhook."""
        now = self._monotonic()
        with self._lock:
            snapshot = dict(self.counts)
            snapshot.update(
                pending=self._held, queue_len=self._held, queue_max=self.queue_max,
                unparsed=len(self._raw), invalid_requests_10m=sum(
                    1 for t in self._invalid if t >= now - INVALID_WINDOW_SEC),
                last_delivery_at=self.last_delivery_at, last_error_at=self.last_error_at,
                last_error=self.last_error, webhooks=[self._lane_report(lane, now)
                                                      for lane in self._lanes.values()],
                producers=[{"name": name, **counts}
                           for name, counts in sorted(self._producers.items())])
        return snapshot

    def _lane_report(self, lane: Lane, now: float) -> dict:
        pending = len(lane.waiting) + (len(lane.job.items) if lane.job else 0)
        if lane.dead_reason is not None and lane.not_before > now:
            state = "quarantined"
        elif max(lane.not_before, self._global_until) > now:
            state = "waiting"
        else:
            state = "ok"
        return {"id": lane.id, "state": state, "pending": pending,
                "delivered": lane.delivered, "dropped": lane.dropped, "failed": lane.failed,
                "last_success_at": lane.last_success_at}

    # ------------------------------------------------------------------ shutdown

    def close(self) -> list[Message]:
        """Stop handing out jobs and return the parsed messages still held, oldest first
        (the caller parses raw envelopes before)."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()
            held: list[Held] = []
            for lane in self._lanes.values():
                if lane.job is not None:
                    held.extend(lane.job.items)
                held.extend(lane.waiting)
            held.sort(key=lambda item: item.seq)
            return [item.message for item in held]

