"""Everything the relay holds, and where every message it accepted went.

One `Outbox`, one lock, and under it three parts: `Holding` and `Dedupe`
(`notifier.held`: the bound on what is held, which message is dropped to make room, the
duplicate window), `Lanes` (`notifier.lanes`: per webhook the waiting messages, the job
being sent and the schedule) and `Ledger` (`notifier.ledger`: the counters, per webhook
and per producer). The receiver thread puts raw envelopes in (`accept`), parses them
when the socket is idle (`take_unparsed`, then `add_parsed`); sender threads take
requests out (`next_job`) and report what Discord answered (`finish`). Messages,
counters and schedule under one lock make the accounting exact at every snapshot:

    received = delivered + drops + rejected + deduplicated + failed + lost + pending

The store (`notifier.store`): in durable mode `accept` commits envelopes to it before
they are held, so no sender can post one the store does not have; every outcome of a
stored message is queued to it under the lock, and it writes them after. Nothing under
the lock waits for I/O: log lines and dead letters decided there are written once it is
released (`_locked`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from itertools import repeat
from typing import Callable, Iterator

from notifier.answers import MAX_AGE_SEC, Answers
from notifier.arrivals import Arrivals, Verdict
from notifier.deadletter import DeadLetters, Letter
from notifier.discord import Outcome
from notifier.envelope import MAX_ENVELOPE_BYTES, own_webhook_id, too_large
from notifier.held import Dedupe, Holding, Raw
from notifier.lanes import Job, Lane, Lanes
from notifier.ledger import Ledger
from notifier.limits import Limits
from notifier.store import Contents, Holdings, NoStore

log = logging.getLogger("notifier.outbox")



class Deferred:
    """Log lines and dead letters decided under the outbox's lock: taken while it is
    held, carried out once it is released, so a slow log handler or disk holds up no
    other thread."""

    def __init__(self, dead_letters: DeadLetters | None):
        self._dead_letters = dead_letters
        self._said: list[tuple[int, str, tuple]] = []
        self.letters: list[Letter] = []

    def say(self, level: int, text: str, *args) -> None:
        self._said.append((level, text, args))

    def take(self) -> tuple[list, list[Letter]]:
        taken = self._said, self.letters
        self._said, self.letters = [], []
        return taken

    def carry_out(self, taken: tuple[list, list[Letter]]) -> None:
        said, letters = taken
        for level, text, args in said:
            log.log(level, text, *args)
        if letters and self._dead_letters is not None:
            self._dead_letters.append(letters)


class Outbox:
    """See the module docstring. Clocks are injected for tests, and so is the policy
    (`Limits`, with its randomness). `durable`: commit every envelope to `store` before
    holding it (without it only restored messages are in the store)."""

    def __init__(self, queue_max: int, dedupe_window: float, *,
                 limits: Limits | None = None, max_age: float = MAX_AGE_SEC,
                 monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 store=None, durable: bool = False, dead_letters: DeadLetters | None = None):
        self.queue_max = queue_max
        self.dedupe_window = dedupe_window
        self._limits = limits or Limits(wall=wall)
        self._monotonic = monotonic
        self._wall = wall
        self._store = store or NoStore()
        self._durable = durable and store is not None
        self._deferred = Deferred(dead_letters)
        self._say = self._deferred.say
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._holding = Holding(queue_max)
        self._dedupe = Dedupe(dedupe_window)
        self._ledger = Ledger(wall, self._store)
        self._lanes = Lanes(self._limits, self._ledger)
        self._answers = Answers(self._holding, self._dedupe, self._lanes, self._ledger,
                                self._store, self._limits, self._deferred, max_age,
                                monotonic, wall)
        self._arrivals = Arrivals(self._holding, self._dedupe, self._lanes, self._ledger,
                                  self._limits, self._answers, self._say, dedupe_window)
        self._closed = False  # no more jobs handed out
        self._written_off = False  # the final count is made: answers no longer change it

    @property
    def counts(self) -> dict[str, int]:
        return self._ledger.counts

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The lock; what it decided to log or keep is done once it is released."""
        with self._lock:
            try:
                yield
            finally:
                taken = self._deferred.take()
        self._deferred.carry_out(taken)

    # ------------------------------------------------------------------ intake

    def accept(self, envelopes: list[bytes], producers: list[str] | None = None
               ) -> tuple[int, list[tuple[int, str | None]]]:
        """Take envelopes off the socket (committed to the store first, in durable mode),
        each from the producer at the same index of `producers` (with CURVE). Returns the
        messages dropped to stay within the bound and (size, producer) of the envelopes
        rejected for their size."""
        now, fitting, senders = self._monotonic(), envelopes, producers or repeat(None)
        oversized = []
        if max(map(len, envelopes), default=0) > MAX_ENVELOPE_BYTES:  # rare: set them apart
            pairs = list(zip(envelopes, senders))
            oversized = [(len(data), producer) for data, producer in pairs
                         if len(data) > MAX_ENVELOPE_BYTES]
            fitting = [data for data, _ in pairs if len(data) <= MAX_ENVELOPE_BYTES]
            senders = [producer for data, producer in pairs if len(data) <= MAX_ENVELOPE_BYTES]
        raws = list(map(Raw, fitting, repeat(now), repeat(None), repeat(0), repeat(0), senders))
        if self._durable and raws:
            self._store.add(raws, self._wall())
        with self._locked():
            self._ledger.received(len(envelopes), producers)
            for size, producer in oversized:
                self._ledger.rejected(producer, too_large(size))
            return self._hold(raws), oversized

    @property
    def room(self) -> int:
        """Messages that fit before the bound (read without the lock: only the thread
        that takes envelopes in makes it smaller, restores aside)."""
        return self.queue_max - self._holding.count

    def accept_parsed(self, envelopes: list[bytes], producers: list[str] | None,
                      results: list[Verdict]) -> int:
        """`accept` at the bound, for envelopes the receiver parsed first (`results`, one
        each, as `add_parsed` takes them): a rejected one is counted with its reason and
        never held, so it takes no message's place; the valid ones are held as the
        newest, the oldest waiting messages dropped to make room for them (or, when
        nothing waits, the oldest of them). Returns the drops."""
        now = self._monotonic()
        senders = producers or [None] * len(envelopes)
        valid = [(Raw(data, now, producer=producer), result, key)
                 for data, producer, (result, key) in zip(envelopes, senders, results)
                 if not isinstance(result, str)]
        if self._durable and valid:
            self._store.add([raw for raw, _, _ in valid], self._wall())
        with self._locked():
            self._ledger.received(len(envelopes), producers)
            for producer, (result, _) in zip(senders, results):
                if isinstance(result, str):
                    self._ledger.rejected(producer, result)
            holding, finished, held = self._holding, [], []
            holding.count += len(valid)  # as if held: `place` releases what it does not hold
            for raw, message, key in valid:
                if (placed := self._arrivals.place(message, key, raw, now, finished)) is not None:
                    held.append(placed)
            holding.count -= len(held)  # held again below, within the bound
            dropped, _ = holding.make_room(len(held), self._lanes)
            cut = max(0, holding.count + len(held) - self.queue_max)
            for lane, item in held[cut:]:
                lane.waiting.append(item)
            holding.count += len(held) - cut
            self._store.done(finished)
            self._dropped(dropped + held[:cut])
            self._changed.notify_all()
            return len(dropped) + cut

    def settle(self, known: list[tuple[Verdict, str | None, int]]) -> list[bool]:
        """Count at once, never holding nor storing them, envelopes whose parse is known
        (their bytes were parsed before, `Admission`: each entry a verdict, the producer
        and how many such envelopes came) when parsing would leave them unheld: rejected,
        or duplicates of a message sent to a webhook not in quarantine within the window.
        Says which entries it counted; the others are for `accept`. (Without this, a
        producer resending one envelope in a loop is parsed at every copy once the queue
        is full.)"""
        now = self._monotonic()
        with self._locked():
            return self._arrivals.settle(known, now)

    def refuse(self, producers: list[str | None],
               reason: str = "the producer's key is no longer allowed") -> None:
        """Count envelopes refused as they arrived, never held: from a producer whose key
        was revoked after it connected (or, `reason` says so, a batch the relay failed
        to take in: a bug)."""
        with self._locked():
            self._ledger.received(len(producers), producers)
            for producer in producers:
                self._ledger.rejected(producer, reason)

    def restore(self, contents: Contents, producer: str | None = None,
                stale: bool = False) -> int:
        """Take back what the store held at start, ahead of anything new: messages with
        their progress, the loss notices still to post and what was learned about
        webhooks. Messages beyond the bound (`contents.overflow`, and the oldest if more
        are held) are dropped and reported. With CURVE (`producer` given) each is counted
        under its producer, or `producer` when the store does not know it. `stale`: the
        store may not know what was delivered (the last run's store had failed), so every
        message counts as possibly posted already. Returns the drops."""
        now, wall = self._monotonic(), self._wall()
        raws = [Raw(item.envelope, now - max(0.0, wall - item.received_at), item.sid,
                    item.part, item.attempts, producer and (item.producer or producer))
                for item in contents.messages]
        overflow = [(webhook, producer and (sender or producer))
                    for _, webhook, sender in contents.overflow]
        with self._locked():
            self._ledger.restored(len(raws) + len(overflow), len(raws) if stale else
                                  sum(item.in_flight for item in contents.messages),
                                  [raw.producer for raw in raws]
                                  + [sender for _, sender in overflow] if producer else None)
            self._lanes.restore(contents.notices, contents.facts)
            self._ledger.dropped([], overflow, self._lanes.account_of)
            self._store.done([Raw(b"", now, sid) for sid, _, _ in contents.overflow])
            self._store.progress([raw for raw, item in zip(raws, contents.messages)
                                  if item.in_flight])  # counted once: cleared
            return self._hold(raws) + len(overflow)

    def _hold(self, raws: list[Raw]) -> int:
        """Hold new raw envelopes within the bound, dropping the oldest messages (or,
        while those are being sent, the newcomers) to make room. Returns the drops."""
        room = self._holding.admit(raws, self._lanes)
        unparsed = room.dropped_raw + room.refused
        self._dropped(room.dropped, unparsed)
        return len(room.dropped) + len(unparsed)

    def _dropped(self, parsed: list[tuple[Lane, Held]], unparsed: list[Raw] = ()) -> None:
        """Count messages dropped to make room, each charged to its own webhook (an
        unparsed one to the webhook its envelope's own field names), and forget them."""
        if not (parsed or unparsed):
            return
        for _, item in parsed:
            self._dedupe.forget(item)
        self._ledger.dropped([(lane.account, item.raw.producer) for lane, item in parsed],
                             [(own_webhook_id(raw.data), raw.producer) for raw in unparsed],
                             self._lanes.account_of)
        self._store.done([item.raw for _, item in parsed] + list(unparsed))

    def take_unparsed(self, limit: int) -> list[tuple[bytes, str | None]]:
        """Up to `limit` raw envelopes (with their producer), oldest first, for the
        receiver to parse. They stay held (and undroppable) until `add_parsed` takes them
        back."""
        with self._lock:
            lent = self._holding.lend(limit)
        return [(raw.data, raw.producer) for raw in lent]

    @property
    def unparsed(self) -> int:
        return len(self._holding.raw)  # a deque's len is atomic

    def add_parsed(self, results: list[Verdict]) -> None:
        """Give back what `take_unparsed` lent, parsed: ``(message or rejection reason,
        dedupe key or None)`` each, in the same order."""
        now = self._monotonic()
        holding, finished = self._holding, []
        with self._locked():
            for result, key in results:
                raw = holding.give_back()
                if isinstance(result, str):
                    self._ledger.rejected(raw.producer, result)
                    holding.release(1)
                    finished.append(raw)
                elif (placed := self._arrivals.place(result, key, raw, now, finished)) is not None:
                    lane, item = placed
                    lane.waiting.append(item)
            self._store.done(finished)
            self._changed.notify_all()

    # ------------------------------------------------------------------ sending

    def next_job(self) -> Job | None:
        """Block until some lane may send, and return its job with the sender's claim on
        it; None once the outbox is closed."""
        with self._locked():
            while not self._closed:
                now = self._monotonic()
                lane, wake_at = self._lanes.ready(now)
                if lane is not None:
                    return self._lanes.claim(lane, now)
                self._changed.wait(None if wake_at is None else wake_at - now)
            return None

    def finish(self, job: Job, outcome: Outcome) -> None:
        """Record what one request of `job` came to; `Answers` decides what the lane and
        its messages do next."""
        now = self._monotonic()
        with self._locked():
            if self._written_off:
                return
            job.lane.busy = False
            self._ledger.counts["requests"] += 1
            answer = self._limits.answered(job.ticket, outcome, now)
            job.ticket = None
            for raw in job.raws:  # answered: no longer in flight
                raw.in_flight = False
            self._store.progress(job.raws)
            self._answers.apply(job, outcome, answer, now)
            self._changed.notify_all()

    def wait_empty(self, timeout: float) -> bool:
        """Wait until nothing is held (all delivered or failed); False on timeout."""
        with self._lock:
            return self._changed.wait_for(lambda: self._holding.count == 0, timeout)

    # ------------------------------------------------------------------ reporting

    def snapshot(self) -> dict:
        """The counters, consistent with each other, and a line per webhook."""
        now = self._monotonic()
        with self._lock:
            snapshot = self._ledger.snapshot()
            held = self._holding.count
            snapshot.update(pending=held, queue_len=held, queue_max=self.queue_max,
                            unparsed=len(self._holding.raw) + len(self._holding.lent),
                            invalid_requests_10m=self._limits.invalid_count(now),
                            webhooks=self._lanes.report(now))
        return snapshot

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Stop handing out jobs; requests in flight still report their answers."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False on timeout."""
        with self._lock:
            return self._changed.wait_for(lambda: not self._lanes.busy(), timeout)

    def holdings(self, everything: bool = True) -> Holdings:
        """What the store must hold: every message held, oldest first (or, without
        `everything`, only those the store has already: restored ones), the loss notices
        still to post and what was learned about webhooks."""
        with self._lock:
            raws = [item.raw for item, _ in self._lanes.held()]
            raws.extend(self._holding.unparsed())
            if not everything:
                raws = [raw for raw in raws if raw.sid is not None]
            facts = {webhook: {"forum": True} for webhook in self._lanes.forums}
            return Holdings(raws, self._ledger.notices(lane.account for lane in self._lanes),
                            facts, self._wall() - self._monotonic())

    def write_off(self, lost: int) -> None:
        """The final count at a stop: `lost` of the messages held could not be saved.
        Answers that come in later change nothing."""
        with self._lock:
            self._written_off = True
            self._ledger.counts["lost"] += lost
            self._holding.release(lost)

