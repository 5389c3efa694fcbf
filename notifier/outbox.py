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
is ready when it has work, no request in flight, and `notifier.limits` (the rate limits,
pauses and backoffs, consulted here) says it may send. Lanes are served round-robin, so
one busy webhook cannot starve another, and a webhook that hangs holds one sender
thread only.

Nothing under the lock waits for I/O: log lines and dead letters decided there are
written once it is released (`_locked`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from typing import Callable, Iterator, Sequence

from notifier import payload as discord_payload
from notifier.deadletter import DeadLetters, Letter
from notifier.discord import Outcome
from notifier.envelope import MAX_ENVELOPE_BYTES, Message, identify, too_large, webhook_id
from notifier.journal import Journal, Notices, Saved
from notifier.limits import Limits, Ticket
from notifier.logs import Throttle

log = logging.getLogger("notifier.outbox")

DEDUPE_MAX_ENTRIES = 10_000
"""Most payloads remembered for duplicate suppression; past this the oldest are
forgotten early, so a flood of distinct messages cannot grow memory."""

BATCH_LOOKAHEAD = 50
"""Waiting messages considered for one combined request: `combine` stops at Discord's
limits (10 embeds, 6000 characters of them, 2000 of content) well before."""

MAX_AGE_SEC = 6 * 3600.0
"""A message whose requests fail (network errors, 5xx) is given up once it is older than
this, unless the errors are its own sooner: Discord's outages last hours at most."""

MAX_PRODUCERS = 256
"""Producers (CURVE certificate names) counted one by one; any further ones are counted
together under OTHER_PRODUCERS."""
OTHER_PRODUCERS = "(others)"
RESTORED_PRODUCER = "(restored)"
"""What messages saved by the last run are counted under (neither the pending file nor
the journal keeps who sent them)."""

MAX_LANES = 1000
"""Webhooks tracked at once (idle ones beyond this are forgotten, least recent first)."""

EARLY_DROP_IDS = 1000
"""Webhooks whose drops are remembered before a message to them was ever parsed."""

def raw_webhook_id(envelope: bytes) -> bytes | None:
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


class Raw:
    """An envelope taken off the socket (or restored), not parsed yet."""

    __slots__ = ("data", "received_at", "jid", "part", "attempts", "in_flight", "producer")

    def __init__(self, data: bytes, received_at: float, jid: int | None = None,
                 part: int = 0, attempts: int = 0, in_flight: bool = False,
                 producer: str | None = None):
        self.data = data  # kept as received: what a stop saves and a restart parses
        self.received_at = received_at  # monotonic
        self.jid = jid  # its journal id, in durable mode
        self.part = part  # requests of it already delivered (restored mid-way)
        self.attempts = attempts  # attempts made on its next request
        self.in_flight = in_flight  # a request of it may have been delivered already
        self.producer = producer  # its CURVE certificate name, None without CURVE


class Held:
    """One accepted, parsed message and what the relay knows of it."""

    __slots__ = ("seq", "message", "key", "raw")

    def __init__(self, seq: int, message: Message, key: bytes | None, raw: Raw):
        self.seq = seq
        self.message = message
        self.key = key  # its dedupe key, forgotten if it is lost so a resend goes out
        self.raw = raw  # the envelope, its journal id and its progress

    @property
    def received_at(self) -> float:
        return self.raw.received_at

    @property
    def remaining(self) -> tuple[dict, ...]:
        """The requests still to post (at least the last one, whatever a saved part
        number says)."""
        requests = self.message.requests
        return requests[min(self.raw.part, len(requests) - 1):]


class Job:
    """The request(s) a lane is working through: its messages (or a loss notice) and
    the payloads to post, one request each, in order.

    `attempts` counts the errors of its current request that were its own (see
    `notifier.limits`); it starts again at 0 when a part is delivered. A message whose
    first part creates a forum thread (``thread_name``) posts the later parts into that
    thread (``?thread_id=``), so one message is one thread."""

    __slots__ = ("lane", "items", "parts", "part", "attempts", "notice", "ticket", "thread")

    def __init__(self, lane: "Lane", items: list[Held], parts: Sequence[dict], notice=None):
        self.lane = lane
        self.items = items
        self.parts = parts
        self.part = 0
        self.attempts = 0
        self.notice = notice  # (dropped, failed) that a loss notice reports
        self.ticket: Ticket | None = None  # what its request in flight counts against
        self.thread: str | None = None  # the thread its first part created

    @property
    def webhook(self) -> str:
        """Where the current request goes: the lane's URL, or the thread created."""
        if self.thread is None:
            return self.lane.webhook
        return f"{self.lane.webhook}?thread_id={self.thread}"

    @property
    def payload(self) -> dict:
        part = self.parts[self.part]
        if self.thread is not None:
            part = {key: value for key, value in part.items() if key != "thread_name"}
        return part


class Lane:
    """One webhook: its waiting messages, its job, its schedule and its statistics."""

    def __init__(self, webhook: str):
        self.webhook = webhook
        self.id = webhook_id(webhook)
        self.key, self.thread = identify(webhook)  # what the policy knows it by
        self.waiting: deque[Held] = deque()
        self.job: Job | None = None
        self.busy = False  # a sender is posting the job's current part
        self.dead_reason: str | None = None  # set while quarantined
        self.dead_status: int | None = None
        self.dead_failed = 0  # messages failed during this quarantine
        self.singles = 0  # send this many next messages alone (after a 400 on a batch)
        self.delivered = self.dropped = self.failed = 0
        self.last_success_at: float | None = None  # wall clock
        self.failing_since: float | None = None  # wall clock: first error since a success
        self.lost_dropped = self.lost_failed = 0  # not yet reported in the channel
        self.lost_since: float | None = None  # wall clock
        self.notice_due = False
        self.forum = False  # its messages create threads: so must its loss notices


class Outbox:
    """See the module docstring. Clocks are injected for tests, and so is the policy
    (`Limits`, with its randomness)."""

    def __init__(self, queue_max: int, dedupe_window: float, *,
                 limits: Limits | None = None, max_age: float = MAX_AGE_SEC,
                 monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 journal: Journal | None = None, dead_letters: DeadLetters | None = None):
        self.queue_max = queue_max
        self.dedupe_window = dedupe_window
        self.max_age = max_age
        self._limits = limits or Limits(wall=wall)
        self._monotonic = monotonic
        self._wall = wall
        self._dead_letters = dead_letters
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._journal = journal
        self._raw: deque[Raw] = deque()
        self._lent: deque[Raw] = deque()  # taken by take_unparsed, not back yet
        self._lanes: OrderedDict[str, Lane] = OrderedDict()
        self._lanes_by_id: dict[str, Lane] = {}
        self._early_drops: dict[str, tuple[int, float]] = {}  # webhook id -> (drops, since)
        self._dedupe: OrderedDict[bytes, float] = OrderedDict()
        self._said: list[tuple[int, str, tuple]] = []  # log lines decided under the lock
        self._letters: list[Letter] = []  # dead letters decided under the lock
        self._held = 0
        self._seq = 0
        self._closed = False
        self._dedupe_log = Throttle(burst=20)
        self.counts = dict.fromkeys(
            ("received", "delivered", "drops", "rejected", "deduplicated", "failed",
             "errors", "retries", "rate_limited", "requests", "notices", "restored",
             "restored_in_flight"), 0)
        self.counts["delivered_unconfirmed"] = 0  # 2xx answers whose body broke off
        self.last_delivery_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._producers: dict[str, dict[str, int]] = {}  # name -> received, rejected, drops
        self.last_rejected_at: float | None = None
        self.last_rejected_reason: str | None = None  # token-free, as envelope.parse says
        self.rate_limited_by_scope = dict.fromkeys(("route", "shared", "global", "ban"), 0)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The lock, and after its release the log lines and dead letters decided
        under it: a slow log handler or disk holds up no other thread."""
        with self._lock:
            try:
                yield
            finally:
                said, self._said = self._said, []
                letters, self._letters = self._letters, []
        for level, text, args in said:
            log.log(level, text, *args)
        if letters and self._dead_letters is not None:
            self._dead_letters.append(letters)

    def _say(self, level: int, text: str, *args) -> None:
        """A log line, written once the lock is released (the caller holds it)."""
        self._said.append((level, text, args))

    # ------------------------------------------------------------------ intake

    def accept(self, envelopes: list[bytes], producers: list[str] | None = None
               ) -> tuple[int, list[tuple[int, str | None]]]:
        """Take envelopes off the socket (journaled first, in durable mode), each from
        the producer at the same index of `producers` (with CURVE). Returns the number of
        messages dropped to stay within the bound and (size, producer) of the envelopes
        rejected for their size."""
        now = self._monotonic()
        senders = producers or [None] * len(envelopes)
        fresh = [(data, producer) for data, producer in zip(envelopes, senders)
                 if len(data) <= MAX_ENVELOPE_BYTES]
        oversized = [(len(data), producer) for data, producer in zip(envelopes, senders)
                     if len(data) > MAX_ENVELOPE_BYTES] if len(fresh) < len(envelopes) else []
        jids = (self._journal.append([data for data, _ in fresh])
                if self._journal is not None and fresh else [None] * len(fresh))
        raws = [Raw(data, now, jid, producer=producer)
                for (data, producer), jid in zip(fresh, jids)]
        with self._locked():
            self.counts["received"] += len(envelopes)
            self.counts["rejected"] += len(oversized)
            if oversized:
                self.last_rejected_at = self._wall()
                self.last_rejected_reason = too_large(oversized[-1][0])
            if producers is not None:
                for producer, count in Counter(producers).items():
                    self._charge(producer, "received", count)
                for _, producer in oversized:
                    self._charge(producer, "rejected")
            return self._hold(raws), oversized

    def refuse(self, producers: list[str]) -> None:
        """Count envelopes refused as they arrived, never held: from a producer whose key
        was revoked after it connected."""
        with self._locked():
            self.counts["received"] += len(producers)
            self.counts["rejected"] += len(producers)
            self.last_rejected_at = self._wall()
            self.last_rejected_reason = "the producer's key is no longer allowed"
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

    def restore(self, saved: list[Saved], jids: list[int] | None, notices: Notices,
                producer: str | None = None) -> int:
        """Take back what the last run left (ahead of anything new): messages with their
        progress, from the journal (`jids` given) or from a pending file (journaled now,
        in durable mode), and the loss notices still to post; with CURVE, counted under
        `producer` (neither file keeps who sent them). Returns the drops needed to stay
        within the bound."""
        now = self._monotonic()
        if jids is None and self._journal is not None and saved:
            jids = self._journal.restore(saved)
        raws = [Raw(item.envelope, now, jid, item.part, item.attempts, item.in_flight,
                    producer) for item, jid in zip(saved, jids or [None] * len(saved))]
        with self._locked():
            counts = self.counts
            self._charge(producer, "received", len(raws))
            counts["received"] += len(raws)
            counts["restored"] += len(raws)
            counts["restored_in_flight"] += sum(raw.in_flight for raw in raws)
            for key, (dropped, failed, since) in notices.items():
                if "/" in key:
                    lane = self._lanes.get(key) or self._new_lane(key)
                    lane.lost_dropped, lane.lost_failed, lane.lost_since = dropped, failed, since
                    lane.notice_due = True
                else:
                    self._early_drops[key] = (dropped, since)
            return self._hold(raws)

    def _hold(self, raws: list[Raw]) -> int:
        """Hold new raw envelopes within `queue_max`, dropping the oldest messages (or,
        while those are being sent, the newcomers) to make room. Returns the drops."""
        excess = self._held + len(raws) - self.queue_max
        if excess > 0:
            self.counts["drops"] += excess
            made_room = self._drop_oldest(excess)
            if made_room < excess:  # the rest is being sent: newcomers go instead
                refused, raws = raws[:excess - made_room], raws[excess - made_room:]
                self._charge_drops(refused)
                self._journal_done(refused)
            self._held -= made_room
        self._held += len(raws)
        self._raw.extend(raws)
        return max(excess, 0)

    def _journal_done(self, raws) -> None:
        """Their outcome is final: the journal no longer needs them."""
        if self._journal is not None:
            jids = [raw.jid for raw in raws if raw.jid is not None]
            if jids:
                self._journal.done(jids)

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
            self._journal_done([item.raw])
            self._charge(item.raw.producer, "drops")
            oldest.dropped += 1
            self._note_loss(oldest, dropped=1)
            dropped += 1
        raw = self._raw
        taken = [raw.popleft() for _ in range(min(count - dropped, len(raw)))]
        self._charge_drops(taken)
        self._journal_done(taken)
        return dropped + len(taken)

    def _charge_drops(self, raws: list[Raw]) -> None:
        """Charge drops of unparsed envelopes to their webhooks: to its lane, or, before
        any message to that webhook was parsed, to the lane it will get (remembered for
        at most EARLY_DROP_IDS webhooks)."""
        per_webhook: dict[bytes, int] = {}
        for raw in raws:
            self._charge(raw.producer, "drops")
            webhook = raw_webhook_id(raw.data)
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
                if self._journal is not None:
                    self._journal.notice(webhook_id, earlier + count, 0, since)

    def take_unparsed(self, limit: int) -> list[tuple[bytes, str | None]]:
        """Up to `limit` raw envelopes (with their producer), oldest first, for the
        receiver to parse. They stay held (and undroppable) until `add_parsed` takes them
        back."""
        with self._lock:
            raw = self._raw
            lent = [raw.popleft() for _ in range(min(limit, len(raw)))]
            self._lent.extend(lent)
        return [(item.data, item.producer) for item in lent]

    @property
    def unparsed(self) -> int:
        return len(self._raw)  # a deque's len is atomic

    def add_parsed(self, results: list[tuple[Message | str, bytes | None]]) -> None:
        """Give back what `take_unparsed` lent, parsed: ``(message or rejection reason,
        dedupe key or None)`` each, in the same order."""
        now = self._monotonic()
        counts = self.counts
        with self._locked():
            for result, key in results:
                raw = self._lent.popleft()
                if isinstance(result, str):
                    counts["rejected"] += 1
                    self._charge(raw.producer, "rejected")
                    self.last_rejected_at, self.last_rejected_reason = self._wall(), result
                    self._held -= 1
                    self._journal_done([raw])
                    continue
                lane = self._lanes.get(result.webhook) or self._new_lane(result.webhook)
                self._seq += 1
                if lane.dead_reason is not None and self._limits.quarantined(lane.key, now):
                    self._fail([Held(self._seq, result, None, raw)], lane,
                               lane.dead_reason, lane.dead_status, quiet=True)
                    lane.dead_failed += 1
                elif key is not None and self._seen(key, now):
                    counts["deduplicated"] += 1
                    self._held -= 1
                    self._journal_done([raw])
                    self._log_duplicate(lane)
                else:
                    lane.waiting.append(Held(self._seq, result, key, raw))
            self._changed.notify_all()

    def _log_duplicate(self, lane: Lane) -> None:
        """A suppressed duplicate is said, not silent: the producer's send succeeded."""
        suppressed = self._dedupe_log.allow()
        if suppressed is not None:
            self._say(logging.INFO, "duplicate suppressed webhook=%s window_s=%g%s", lane.id,
                      self.dedupe_window,
                      f" ({suppressed} duplicate lines left out)" if suppressed else "")

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
                    if all(other.key != old.key for other in self._lanes.values()):
                        self._limits.forget(old.key)
                    break
        lane = self._lanes[webhook] = Lane(webhook)
        self._lanes_by_id.setdefault(lane.id, lane)
        if lane.id in self._early_drops:
            lane.dropped, lane.lost_since = self._early_drops.pop(lane.id)
            lane.lost_dropped = lane.dropped
            if self._journal is not None:
                self._journal.notice(lane.id, 0, 0, None)
                self._journal.notice(webhook, lane.lost_dropped, 0, lane.lost_since)
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
        with self._locked():
            while not self._closed:
                now = self._monotonic()
                wake_at = None
                for lane in self._lanes.values():
                    at = self._ready_at(lane, now)
                    if at is None:
                        continue
                    if at <= now:
                        self._lanes.move_to_end(lane.webhook)  # round-robin
                        return self._claim(lane, now)
                    wake_at = at if wake_at is None else min(wake_at, at)
                self._changed.wait(None if wake_at is None else wake_at - now)
            return None

    def _ready_at(self, lane: Lane, now: float) -> float | None:
        """When `lane` may send next (<= now: at once), or None if it has nothing to do
        or must wait for answers."""
        if lane.busy or (lane.job is None and not lane.waiting and not lane.notice_due):
            return None
        return self._limits.ready_at(lane.key, now, lane.thread)

    def _claim(self, lane: Lane, now: float) -> Job:
        if lane.job is None:
            lane.job = self._plan(lane)
        lane.busy = True
        job = lane.job
        job.ticket = self._limits.sent(lane.key, now, lane.thread)
        return job

    def _plan(self, lane: Lane) -> Job:
        """The next job of a lane: a due loss notice, else its oldest message(s): one
        message alone when it needs several requests or nothing waits behind it, else
        as many as `combine` merges into one request."""
        if lane.notice_due and lane.job is None:
            lane.notice_due = False
            counts = (lane.lost_dropped, lane.lost_failed)
            notice = discord_payload.loss_notice(*counts, lane.lost_since, forum=lane.forum)
            return Job(lane, [], [notice], notice=counts)
        first = lane.waiting[0]
        if len(first.remaining) > 1 or len(lane.waiting) == 1 or lane.singles:
            lane.singles = max(0, lane.singles - 1)
            job = Job(lane, [lane.waiting.popleft()], first.remaining)
        else:
            candidates = []
            for i, item in enumerate(lane.waiting):
                if i == BATCH_LOOKAHEAD or len(item.remaining) != 1:
                    break
                candidates.append(item.remaining[0])
            taken, combined = discord_payload.combine(candidates)
            job = Job(lane, [lane.waiting.popleft() for _ in range(taken)], [combined])
        job.attempts = max(item.raw.attempts for item in job.items)  # restored ones
        return job

    def finish(self, job: Job, outcome: Outcome) -> None:
        """Record what one request of `job` came to and decide what the lane does next."""
        now = self._monotonic()
        lane, counts = job.lane, self.counts
        with self._locked():
            lane.busy = False
            counts["requests"] += 1
            answer = self._limits.answered(job.ticket, outcome, now)
            job.ticket = None
            kind = outcome.kind
            if kind == "delivered":
                lane.failing_since = None
                if outcome.unconfirmed:
                    counts["delivered_unconfirmed"] += 1
                    self._say(logging.WARNING, "delivered unconfirmed webhook=%s: %s (counted "
                              "delivered, not posted again)", lane.id, outcome.reason)
                self._part_delivered(job, outcome)
            elif kind == "rate_limited":
                counts["rate_limited"] += 1
                self.rate_limited_by_scope[outcome.scope] += 1
                self._say(logging.WARNING, "rate limited webhook=%s scope=%s wait_s=%.3f "
                          "reason=%s%s", lane.id, outcome.scope, outcome.wait, outcome.reason,
                          self._pace_note(lane, outcome, now))
            else:
                counts["errors"] += 1
                self.last_error, self.last_error_at = f"webhook {lane.id}: {outcome.reason}", \
                    self._wall()
                if kind in ("retry", "dead") and lane.failing_since is None:
                    lane.failing_since = self.last_error_at
                if kind == "retry":
                    self._retry_later(job, outcome, answer, now)
                elif kind == "dead":
                    self._quarantine(lane, outcome, answer.wait)
                else:
                    self._refused(job, outcome)
            self._changed.notify_all()

    def _pace_note(self, lane: Lane, outcome: Outcome, now: float) -> str:
        pace = (self._limits.pace_of(lane.key, now, lane.thread) if outcome.scope == "shared"
                else None)
        return "" if pace is None else \
            f"; channel paced to {pace} per {self._limits.channel_period:g} s"

    def _part_delivered(self, job: Job, outcome: Outcome) -> None:
        """Retries count per request: the next part starts with none used. The first
        part of a message that named a thread created it: the rest go into it."""
        if job.part == 0 and job.items and "thread_name" in job.parts[0]:
            job.lane.forum = True
            if outcome.channel is not None and "?" not in job.lane.webhook:
                job.thread = outcome.channel
        job.part += 1
        job.attempts = 0
        if job.part == len(job.parts):
            self._completed(job)
        elif len(job.items) == 1:  # several parts: always a message alone
            raw = job.items[0].raw
            raw.part, raw.attempts = raw.part + 1, 0
            if self._journal is not None and raw.jid is not None:
                self._journal.progress(raw.jid, raw.part, 0)

    def _completed(self, job: Job) -> None:
        lane, counts = job.lane, self.counts
        lane.job = None
        now = self._wall()
        if job.notice:
            counts["notices"] += 1
            self._notice_done(job)
            self._say(logging.INFO, "loss notice sent webhook=%s dropped=%d failed=%d",
                      lane.id, *job.notice)
            return
        self._journal_done([item.raw for item in job.items])
        self._held -= len(job.items)
        counts["delivered"] += len(job.items)
        lane.delivered += len(job.items)
        lane.last_success_at = self.last_delivery_at = now
        if lane.dead_reason is not None:
            self._say(logging.INFO, "webhook=%s is back after quarantine (%d messages "
                      "failed meanwhile)", lane.id, lane.dead_failed)
            lane.dead_reason, lane.dead_status, lane.dead_failed = None, None, 0
        if lane.lost_dropped or lane.lost_failed:
            lane.notice_due = True
        oldest = min(item.received_at for item in job.items)
        self._say(logging.DEBUG, "delivered webhook=%s messages=%d requests=%d "
                  "latency_ms=%.1f", lane.id, len(job.items), len(job.parts),
                  (self._monotonic() - oldest) * 1000)

    def _notice_done(self, job: Job) -> None:
        """A loss notice posted or refused: the losses it reported are cleared, so a
        refused one is not posted again after every delivery."""
        lane = job.lane
        lane.lost_dropped -= job.notice[0]
        lane.lost_failed -= job.notice[1]
        if not (lane.lost_dropped or lane.lost_failed):
            lane.lost_since = None
        self._journal_notice(lane)

    def _retry_later(self, job: Job, outcome: Outcome, answer, now: float) -> None:
        """An outage is waited out: a request is given up only after `max_attempts` of
        its own errors (others delivered meanwhile), or once its message is older than
        `max_age`. Until then the bound (drop-oldest) limits what is held."""
        lane = job.lane
        age = now - min((item.received_at for item in job.items), default=now)
        if answer.own:
            job.attempts += 1
        reason = None
        if self._limits.retry.gives_up(job.attempts):
            reason = f"{outcome.reason} after {job.attempts} attempts while others delivered"
        elif age > self.max_age:
            reason = f"{outcome.reason}, still failing {age:.0f} s after it was received"
        if reason is not None:
            lane.job = None
            if job.notice:
                self._notice_done(job)
                self._say(logging.ERROR, "loss notice given up webhook=%s dropped=%d "
                          "failed=%d: %s", lane.id, *job.notice, reason)
            self._fail(job.items, lane, reason, outcome.status)
            return
        self.counts["retries"] += 1
        for item in job.items:
            if answer.own:
                item.raw.attempts = job.attempts
                if self._journal is not None and item.raw.jid is not None:
                    self._journal.progress(item.raw.jid, item.raw.part, job.attempts)
        self._say(logging.WARNING, "retry webhook=%s attempt=%d in_s=%.2f reason=%s",
                  lane.id, job.attempts, answer.wait, outcome.reason)

    def _quarantine(self, lane: Lane, outcome: Outcome, pause: float) -> None:
        """Stop sending to a webhook that answered 401/403/404: fail what waits for it
        now and what comes for it until the pause is over, then try again."""
        lane.dead_reason, lane.dead_status = outcome.reason, outcome.status
        job, lane.job = lane.job, None
        items = (job.items if job else []) + list(lane.waiting)
        lane.waiting.clear()
        self._say(logging.ERROR, "webhook=%s quarantined for %.0f s: %s; failed now=%d, "
                  "failed during the last quarantine=%d; new messages to it fail at once "
                  "until then", lane.id, pause, outcome.reason, len(items), lane.dead_failed)
        lane.dead_failed = 0
        self._fail(items, lane, outcome.reason, outcome.status, quiet=True)

    def _refused(self, job: Job, outcome: Outcome) -> None:
        """A 400 (or another answer that will not change): never resend the same
        request. A combined batch is split so that only the message Discord refuses
        fails; a refused loss notice is logged with what it reported, and cleared."""
        lane = job.lane
        lane.job = None
        if job.notice:
            self._notice_done(job)
            self._say(logging.ERROR, "loss notice refused webhook=%s dropped=%d failed=%d "
                      "(not posted again): %s", lane.id, *job.notice, outcome.reason)
            return
        if len(job.items) > 1:
            lane.waiting.extendleft(reversed(job.items))
            lane.singles = len(job.items)
            self._say(logging.WARNING, "batch refused webhook=%s messages=%d, resending one "
                      "by one: %s", lane.id, len(job.items), outcome.reason)
            return
        self._fail(job.items, lane, outcome.reason, outcome.status)

    def _fail(self, items: list[Held], lane: Lane, reason: str, status: int | None,
              quiet=False) -> None:
        """Messages given up: counted, reported in the channel later, and kept in the
        dead-letter file (written once the lock is released)."""
        if not items:
            return
        for item in items:
            self._forget(item)
        self._journal_done([item.raw for item in items])
        self._held -= len(items)
        self.counts["failed"] += len(items)
        lane.failed += len(items)
        self._note_loss(lane, failed=len(items))
        now = self._wall()
        self._letters.extend(Letter(item.message.webhook, item.remaining, item.raw.data,
                                    item.raw.part, reason, status, now) for item in items)
        if not quiet:
            self._say(logging.ERROR, "failed webhook=%s messages=%d reason=%s", lane.id,
                      len(items), reason)

    def _forget(self, item: Held) -> None:
        """A lost message no longer counts as seen: the producer's resend must go out."""
        if item.key is not None:
            self._dedupe.pop(item.key, None)

    def _note_loss(self, lane: Lane, dropped: int = 0, failed: int = 0) -> None:
        lane.lost_dropped += dropped
        lane.lost_failed += failed
        if lane.lost_since is None:
            lane.lost_since = self._wall()
        self._journal_notice(lane)

    def _journal_notice(self, lane: Lane) -> None:
        if self._journal is not None:
            self._journal.notice(lane.webhook, lane.lost_dropped, lane.lost_failed,
                                 lane.lost_since)

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
                unparsed=len(self._raw), invalid_requests_10m=self._limits.invalid_count(now),
                last_delivery_at=self.last_delivery_at, last_error_at=self.last_error_at,
                last_error=self.last_error, last_rejected_at=self.last_rejected_at,
                last_rejected_reason=self.last_rejected_reason,
                rate_limited_by_scope=dict(self.rate_limited_by_scope),
                webhooks=[self._lane_report(lane, now) for lane in self._lanes.values()],
                producers=[{"name": name, **counts}
                           for name, counts in sorted(self._producers.items())])
        return snapshot

    def _lane_report(self, lane: Lane, now: float) -> dict:
        pending = len(lane.waiting) + (len(lane.job.items) if lane.job else 0)
        if lane.dead_reason is not None and self._limits.quarantined(lane.key, now):
            state = "quarantined"
        elif self._limits.waiting(lane.key, now, lane.thread):
            state = "waiting"
        else:
            state = "ok"
        return {"id": lane.id, "state": state, "pending": pending,
                "delivered": lane.delivered, "dropped": lane.dropped, "failed": lane.failed,
                "last_success_at": lane.last_success_at, "failing_since": lane.failing_since}

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Stop handing out jobs; requests in flight still report their answers."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False on timeout."""
        with self._lock:
            return self._changed.wait_for(
                lambda: not any(lane.busy for lane in self._lanes.values()), timeout)

    def saved(self) -> tuple[list[Saved], Notices]:
        """What a stop leaves for the next start: every message still held, oldest
        first, with the requests of it already delivered left out (one whose request
        is still in flight is marked so), and the loss notices still to post."""
        with self._lock:
            held: list[tuple[Held, bool]] = []
            for lane in self._lanes.values():
                if lane.job is not None:
                    held.extend((item, lane.busy) for item in lane.job.items)
                held.extend((item, False) for item in lane.waiting)
            held.sort(key=lambda pair: pair[0].seq)
            raws = [(item.raw, busy) for item, busy in held]
            raws.extend((raw, False) for raw in (*self._lent, *self._raw))
            saved = [Saved(raw.data, raw.part, raw.attempts, busy or raw.in_flight)
                     for raw, busy in raws]
            notices: Notices = {
                lane.webhook: (lane.lost_dropped, lane.lost_failed, lane.lost_since)
                for lane in self._lanes.values() if lane.lost_dropped or lane.lost_failed}
            notices.update((webhook_id, (dropped, 0, since))
                           for webhook_id, (dropped, since) in self._early_drops.items())
            return saved, notices

