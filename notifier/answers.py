"""What an answer from Discord does to a lane and its messages.

Called by `Outbox.finish` under its lock, once the request is counted and the rate-limit
policy has read the answer: a part delivered (the message done after its last part, a
webhook learned to create threads), a rate limit (waited out by the policy), an error to
retry later or give up on, a dead webhook quarantined, a request Discord refuses. Each
message that leaves goes to exactly one counter of the ledger, and out of the store.
"""

from __future__ import annotations

import logging
from typing import Callable

from notifier.deadletter import Letter
from notifier.discord import Outcome
from notifier.held import Dedupe, Held, Holding
from notifier.lanes import Job, Lane, Lanes
from notifier.ledger import Ledger
from notifier.limits import Limits

MAX_AGE_SEC = 6 * 3600.0
"""A message whose requests fail (network errors, 5xx) is given up once it is older than
this, unless the errors are its own sooner: Discord's outages last hours at most."""


class Answers:
    """The consequences of answers, on the outbox's parts (its caller holds its lock)."""

    def __init__(self, holding: Holding, dedupe: Dedupe, lanes: Lanes, ledger: Ledger, store,
                 limits: Limits, deferred, max_age: float, monotonic: Callable[[], float],
                 wall: Callable[[], float]):
        self._holding, self._dedupe, self._lanes, self._ledger = holding, dedupe, lanes, ledger
        self._store, self._limits, self._deferred = store, limits, deferred
        self._say = deferred.say
        self._max_age = max_age
        self._monotonic, self._wall = monotonic, wall

    def apply(self, job: Job, outcome: Outcome, answer, now: float) -> None:
        lane, ledger, kind = job.lane, self._ledger, outcome.kind
        if kind == "delivered":
            ledger.answered(lane.account, outcome.unconfirmed)
            if outcome.unconfirmed:
                self._say(logging.WARNING, "delivered unconfirmed webhook=%s: %s (counted "
                          "delivered, not posted again)", lane.id, outcome.reason)
            if job.part_delivered(outcome.channel):
                self._lanes.forums.add(lane.key)
                self._store.learned(lane.key, "forum", True)
            if job.complete:
                self._completed(job)
        elif kind == "rate_limited":
            ledger.rate_limited(outcome.scope)
            self._say(logging.WARNING, "rate limited webhook=%s scope=%s wait_s=%.3f "
                      "reason=%s%s", lane.id, outcome.scope, outcome.wait, outcome.reason,
                      self._pace_note(job, outcome, now))
        else:
            ledger.error(lane.account, f"webhook {lane.id}: {outcome.reason}",
                         failing=kind in ("retry", "dead"))
            if kind == "retry":
                self._retry_later(job, outcome, answer, now)
            elif kind == "dead":
                self._quarantine(lane, outcome, answer.wait)
            else:
                self._refused(job, outcome)

    def _pace_note(self, job: Job, outcome: Outcome, now: float) -> str:
        pace = (self._limits.pace_of(job.lane.key, now, job.thread)
                if outcome.scope == "shared" else None)
        return "" if pace is None else \
            f"; channel paced to {pace} per {self._limits.channel_period:g} s"

    def _completed(self, job: Job) -> None:
        lane = job.lane
        lane.job = None
        if job.notice:
            self._ledger.counts["notices"] += 1
            self._ledger.noticed(lane.account, *job.notice)
            self._say(logging.INFO, "loss notice sent webhook=%s dropped=%d failed=%d",
                      lane.id, *job.notice)
            return
        self._store.done(job.raws)
        self._holding.release(len(job.items))
        self._ledger.delivered(lane.account, len(job.items))
        lane.url, lane.into = job.url, job.into  # where a loss notice now goes
        if lane.dead_reason is not None:
            self._say(logging.INFO, "webhook=%s is back after quarantine (%d messages "
                      "failed meanwhile)", lane.id, lane.dead_failed)
            lane.dead_reason, lane.dead_status, lane.dead_failed = None, None, 0
        if lane.account.lost_dropped or lane.account.lost_failed:
            lane.notice_due = True
        oldest = min(item.received_at for item in job.items)
        self._say(logging.DEBUG, "delivered webhook=%s messages=%d requests=%d "
                  "latency_ms=%.1f", lane.id, len(job.items), len(job.parts),
                  (self._monotonic() - oldest) * 1000)

    def _retry_later(self, job: Job, outcome: Outcome, answer, now: float) -> None:
        """Retried later, or given up (see `Job.gives_up`): until then the bound
        (drop-oldest) limits what is held. A loss notice given up is cleared."""
        lane = job.lane
        reason = job.gives_up(outcome.reason, answer.own, now, self._limits.retry, self._max_age)
        if reason is not None:
            lane.job = None
            if job.notice:
                self._ledger.noticed(lane.account, *job.notice)
                self._say(logging.ERROR, "loss notice given up webhook=%s dropped=%d "
                          "failed=%d: %s", lane.id, *job.notice, reason)
            self.fail(job.items, lane, reason, outcome.status)
            return
        self._ledger.counts["retries"] += 1
        if answer.own:
            for raw in job.raws:
                raw.attempts = job.attempts
        self._say(logging.WARNING, "retry webhook=%s attempt=%d in_s=%.2f reason=%s",
                  lane.id, job.attempts, answer.wait, outcome.reason)

    def _quarantine(self, lane: Lane, outcome: Outcome, pause: float) -> None:
        """Stop sending to a webhook that answered 401/403/404: fail what waits for it
        now and what comes for it until the pause is over, then try again."""
        items = lane.quarantine(outcome.reason, outcome.status)
        self._say(logging.ERROR, "webhook=%s quarantined for %.0f s: %s; failed now=%d, "
                  "failed during the last quarantine=%d; new messages to it fail at once "
                  "until then", lane.id, pause, outcome.reason, len(items), lane.dead_failed)
        lane.dead_failed = 0
        self.fail(items, lane, outcome.reason, outcome.status, quiet=True)

    def _refused(self, job: Job, outcome: Outcome) -> None:
        """A 400 (or another answer that will not change): never resend the same
        request. A combined batch is split so that only the message Discord refuses
        fails; a refused loss notice is logged with what it reported, and cleared."""
        lane = job.lane
        if job.notice:
            lane.job = None
            self._ledger.noticed(lane.account, *job.notice)
            self._say(logging.ERROR, "loss notice refused webhook=%s dropped=%d failed=%d "
                      "(not posted again): %s", lane.id, *job.notice, outcome.reason)
            return
        if len(job.items) > 1:
            lane.resend_singly(job)
            self._say(logging.WARNING, "batch refused webhook=%s messages=%d, resending one "
                      "by one: %s", lane.id, len(job.items), outcome.reason)
            return
        lane.job = None
        self.fail(job.items, lane, outcome.reason, outcome.status)

    def fail(self, items: list[Held], lane: Lane, reason: str, status: int | None,
             quiet=False) -> None:
        """Messages given up: counted, reported in the channel later, and kept in the
        dead-letter file (written once the lock is released)."""
        if not items:
            return
        for item in items:
            self._dedupe.forget(item)
        self._store.done([item.raw for item in items])
        self._holding.release(len(items))
        self._ledger.counts["failed"] += len(items)
        self._ledger.note_loss(lane.account, failed=len(items))
        now = self._wall()
        self._deferred.letters.extend(
            Letter(item.message.webhook, item.remaining, item.raw.data, item.raw.part, reason,
                   status, now) for item in items)
        if not quiet:
            self._say(logging.ERROR, "failed webhook=%s messages=%d reason=%s", lane.id,
                      len(items), reason)

