"""Per webhook, a lane: its waiting messages, the job being sent, and when it may send.

A webhook is its key (`envelope.webhook_key`): messages naming it by any spelling or
thread share its lane, so everything per webhook (its order, its one request in flight,
its quarantine, its account and loss notice, its rate limits) is kept once. Each
message is still posted to the URL it asked for, thread included.

Scheduling, per lane, one request at a time (so each webhook keeps its order): a lane is
ready when it has work, no request in flight, and `notifier.limits` (the rate limits,
pauses and backoffs) says it may send. Lanes are served round-robin, so one busy webhook
cannot starve another, and a webhook that hangs holds one sender thread only. The next
job of a lane is a due loss notice, else its oldest message, combined with the ones
behind it that ask for the same URL into one request when they fit (`payload.combine`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Iterator, Sequence

from notifier import payload as discord_payload
from notifier.envelope import webhook_id, webhook_key
from notifier.held import Held
from notifier.ledger import Account, Ledger
from notifier.limits import Limits, Ticket

BATCH_LOOKAHEAD = 50
"""Waiting messages considered for one combined request: `combine` stops at Discord's
limits (10 embeds, 6000 characters of them, 2000 of content) well before."""

MAX_LANES = 1000
"""Webhooks tracked at once (idle ones beyond this are forgotten, least recent first)."""


class Job:
    """The request(s) a lane is working through: its messages (or a loss notice) and
    the payloads to post, one request each, in order.

    `attempts` counts the errors of its current request that were its own (see
    `notifier.limits`); it starts again at 0 when a part is delivered. Its requests go
    to `url`, the URL its messages asked for (into the thread `into`, or None). A message
    whose first part creates a forum thread (``thread_name``) posts the later parts into
    that thread (``?thread_id=``), so one message is one thread."""

    __slots__ = ("lane", "items", "parts", "url", "into", "part", "attempts", "notice",
                 "ticket", "created")

    def __init__(self, lane: "Lane", items: list[Held], parts: Sequence[dict], url: str,
                 into: str | None, notice=None):
        self.lane = lane
        self.items = items
        self.parts = parts
        self.url = url
        self.into = into
        self.part = 0
        self.attempts = 0
        self.notice = notice  # (dropped, failed) that a loss notice reports
        self.ticket: Ticket | None = None  # what its request in flight counts against
        self.created: str | None = None  # the thread its first part created

    @property
    def webhook(self) -> str:
        """Where the current request goes: the URL asked for, or the thread created."""
        if self.created is None:
            return self.url
        return f"{self.url}?thread_id={self.created}"

    @property
    def thread(self) -> str | None:
        """The thread the current request goes into (None: the webhook's channel)."""
        return self.created or self.into

    @property
    def payload(self) -> dict:
        part = self.parts[self.part]
        if self.created is not None:
            part = {key: value for key, value in part.items() if key != "thread_name"}
        return part

    @property
    def raws(self) -> list:
        return [item.raw for item in self.items]

    def part_delivered(self, channel: str | None) -> bool:
        """Its current request was delivered; retries count per request, so the next part
        starts with none used. The first part of a message that named a thread created
        it: the rest go into it (`channel`, the thread Discord made), and the webhook is
        then known to create threads. Returns whether that was learned just now."""
        lane, learned = self.lane, False
        if self.part == 0 and self.items and "thread_name" in self.parts[0]:
            learned, lane.forum = not lane.forum, True
            if channel is not None and self.into is None:
                self.created = channel
        self.part += 1
        self.attempts = 0
        if self.part < len(self.parts) and len(self.items) == 1:  # a message alone
            raw = self.items[0].raw
            raw.part, raw.attempts = raw.part + 1, 0
        return learned

    @property
    def complete(self) -> bool:
        return self.part == len(self.parts)

    def gives_up(self, reason: str, own: bool, now: float, retry, max_age: float) -> str | None:
        """After an error (`own`: its own, not an outage's): why it is given up now, or
        None to retry. An outage is waited out: only `retry.max_attempts` of its own
        errors, or its oldest message passing `max_age`, give it up."""
        if own:
            self.attempts += 1
        if retry.gives_up(self.attempts):
            return f"{reason} after {self.attempts} attempts while others delivered"
        age = now - min((item.received_at for item in self.items), default=now)
        if age > max_age:
            return f"{reason}, still failing {age:.0f} s after it was received"
        return None


class Lane:
    """One webhook (by its key): its waiting messages, its job, its schedule and its
    account. A loss notice goes where its last message was delivered (`url`, into the
    thread `into`), the webhook's own URL until then."""

    def __init__(self, key: str, forum: bool = False):
        self.key = key
        self.id = webhook_id(key)
        self.url, self.into = key, None
        self.waiting: deque[Held] = deque()
        self.job: Job | None = None
        self.busy = False  # a sender is posting the job's current part
        self.dead_reason: str | None = None  # set while quarantined
        self.dead_status: int | None = None
        self.dead_failed = 0  # messages failed during this quarantine
        self.singles = 0  # send this many next messages alone (after a 400 on a batch)
        self.notice_due = False  # a loss notice goes out before its next message
        self.forum = forum  # its messages create threads: so must its loss notices
        self.account = Account(key)

    @property
    def pending(self) -> int:
        return len(self.waiting) + (len(self.job.items) if self.job else 0)

    def idle(self) -> bool:
        return not (self.busy or self.job or self.waiting or self.notice_due)

    @property
    def thread(self) -> str | None:
        """The thread its next request goes into (None: the webhook's channel)."""
        if self.job is not None:
            return self.job.thread
        if self.notice_due:
            return self.into
        return self.waiting[0].message.thread if self.waiting else None

    def plan(self) -> Job:
        """The next job: a due loss notice, else its oldest message(s): one message alone
        when it needs several requests or nothing waits behind it, else as many as
        `combine` merges into one request (only messages asking for the same URL: a
        thread, or an API version, is not another's)."""
        if self.notice_due:
            self.notice_due = False
            account = self.account
            counts = (account.lost_dropped, account.lost_failed)
            notice = discord_payload.loss_notice(*counts, account.lost_since, forum=self.forum)
            return Job(self, [], [notice], self.url, self.into, notice=counts)
        first = self.waiting[0]
        url, into = first.message.webhook, first.message.thread
        if len(first.remaining) > 1 or len(self.waiting) == 1 or self.singles:
            self.singles = max(0, self.singles - 1)
            job = Job(self, [self.waiting.popleft()], first.remaining, url, into)
        else:
            candidates = []
            for i, item in enumerate(self.waiting):
                if (i == BATCH_LOOKAHEAD or len(item.remaining) != 1
                        or item.message.webhook != url):
                    break
                candidates.append(item.remaining[0])
            taken, combined = discord_payload.combine(candidates)
            job = Job(self, [self.waiting.popleft() for _ in range(taken)], [combined], url,
                      into)
        job.attempts = max(item.raw.attempts for item in job.items)  # restored ones
        return job

    def quarantine(self, reason: str, status: int | None) -> list[Held]:
        """Dead (401/403/404) until the pause is over: returns everything it holds, its
        job's first, to fail now."""
        self.dead_reason, self.dead_status = reason, status
        job, self.job = self.job, None
        items = (job.items if job else []) + list(self.waiting)
        self.waiting.clear()
        return items

    def resend_singly(self, job: Job) -> None:
        """A combined request was refused: its messages go again one by one, so only the
        one Discord refuses fails."""
        self.job = None
        self.waiting.extendleft(reversed(job.items))
        self.singles = len(job.items)


class Lanes:
    """The lanes by webhook key, in round-robin order, and the policy they ask."""

    def __init__(self, limits: Limits, ledger: Ledger):
        self.limits = limits
        self.ledger = ledger
        self._lanes: OrderedDict[str, Lane] = OrderedDict()
        self._by_id: dict[str, Lane] = {}
        self.forums: set[str] = set()  # webhooks (keys) known to create threads

    def __iter__(self) -> Iterator[Lane]:
        return iter(self._lanes.values())

    def get(self, key: str) -> Lane | None:
        return self._lanes.get(key)

    def account_of(self, webhook_id: str) -> Account | None:
        lane = self._by_id.get(webhook_id)
        return None if lane is None else lane.account

    def add(self, key: str) -> Lane:
        """A lane for a webhook seen for the first time. Beyond MAX_LANES, the least
        recently served idle lane is forgotten (its statistics with it), so a producer
        cycling through webhook URLs cannot grow memory."""
        if len(self._lanes) >= MAX_LANES:
            for old in self._lanes.values():
                if old.idle():
                    del self._lanes[old.key]
                    if self._by_id.get(old.id) is old:
                        del self._by_id[old.id]
                    self.limits.forget(old.key)
                    break
        lane = self._lanes[key] = Lane(key, forum=key in self.forums)
        self._by_id.setdefault(lane.id, lane)
        self.ledger.adopt_early(lane.id, lane.account)
        return lane

    def restore(self, notices: dict[str, tuple[int, int, float | None]],
                facts: dict[str, dict]) -> None:
        """What the store kept: the webhooks known to create threads, and the losses
        still to report (per webhook key; per webhook id for early drops). Those an
        earlier version kept per URL (a thread, an API version) are merged per key."""
        self.forums.update(webhook_key(webhook) for webhook, learned in facts.items()
                           if learned.get("forum"))
        for lane in self._lanes.values():
            lane.forum = lane.key in self.forums
        for name, (dropped, failed, since) in notices.items():
            if "/" not in name:
                self.ledger.early[name] = (dropped, since)
                continue
            key = webhook_key(name)
            lane = self._lanes.get(key) or self.add(key)
            self.ledger.restored_notice(lane.account, name, dropped, failed, since)
            lane.notice_due = True

    def ready(self, now: float) -> tuple[Lane | None, float | None]:
        """The lane that may send now (moved to the back: round-robin), or None and when
        the next one may."""
        wake_at = None
        for lane in self._lanes.values():
            at = self.ready_at(lane, now)
            if at is None:
                continue
            if at <= now:
                self._lanes.move_to_end(lane.key)
                return lane, None
            wake_at = at if wake_at is None else min(wake_at, at)
        return None, wake_at

    def ready_at(self, lane: Lane, now: float) -> float | None:
        """When `lane` may send next (<= now: at once), or None if it has nothing to do
        or must wait for answers."""
        if lane.busy or (lane.job is None and not lane.waiting and not lane.notice_due):
            return None
        return self.limits.ready_at(lane.key, now, lane.thread)

    def claim(self, lane: Lane, now: float) -> Job:
        """The lane's job (planned if need be), with a sender's claim on it."""
        if lane.job is None:
            lane.job = lane.plan()
        lane.busy = True
        lane.job.ticket = self.limits.sent(lane.key, now, lane.job.thread)
        return lane.job

    def held(self) -> list[tuple[Held, bool]]:
        """Every parsed message held, oldest first, with whether a request of it is being
        posted."""
        held = []
        for lane in self._lanes.values():
            if lane.job is not None:
                held.extend((item, lane.busy) for item in lane.job.items)
            held.extend((item, False) for item in lane.waiting)
        held.sort(key=lambda pair: pair[0].seq)
        return held

    def busy(self) -> bool:
        return any(lane.busy for lane in self._lanes.values())

    def report(self, now: float) -> list[dict]:
        """A line per webhook for the snapshot."""
        return [{"id": lane.id, "state": self._state(lane, now), "pending": lane.pending,
                 **self.ledger.report(lane.account)} for lane in self._lanes.values()]

    def _state(self, lane: Lane, now: float) -> str:
        if lane.dead_reason is not None and self.limits.quarantined(lane.key, now):
            return "quarantined"
        return "waiting" if self.limits.waiting(lane.key, now, lane.thread) else "ok"
