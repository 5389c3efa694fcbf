"""What a parsed message comes to as it arrives: failed at once to a webhook in
quarantine, suppressed as a duplicate of one sent within the window, or held in its
webhook's lane; and, for copies whose parse is known already (`Admission`), the count
made at once when parsing would leave them unheld.

Called by `Outbox` under its lock, like `notifier.answers` for Discord's answers.
"""

from __future__ import annotations

import logging
from typing import Callable

from notifier.answers import Answers
from notifier.envelope import Message
from notifier.held import Dedupe, Held, Holding, Raw
from notifier.lanes import Lane, Lanes
from notifier.ledger import Ledger
from notifier.limits import Limits
from notifier.logs import Throttle

Verdict = tuple[Message | str, bytes | None]
"""What parsing gave: (message, dedupe key or None), or (rejection reason, None)."""


class Arrivals:
    """Where parsed messages go, on the outbox's parts (its caller holds its lock)."""

    def __init__(self, holding: Holding, dedupe: Dedupe, lanes: Lanes, ledger: Ledger,
                 limits: Limits, answers: Answers, say: Callable, dedupe_window: float):
        self._holding, self._dedupe, self._lanes, self._ledger = holding, dedupe, lanes, ledger
        self._limits, self._answers, self._say = limits, answers, say
        self._dedupe_window = dedupe_window
        self._dedupe_log = Throttle(burst=20)

    def place(self, message: Message, key: bytes | None, raw: Raw, now: float,
              finished: list[Raw]) -> tuple[Lane, Held] | None:
        """A message just parsed (counted as held): failed at once to a quarantined
        webhook, or suppressed as a duplicate (`finished`: for the store), else
        (its lane, itself) to wait there."""
        holding = self._holding
        lane = self._lanes.get(message.key) or self._lanes.add(message.key)
        if self._quarantined(lane, now):
            self._answers.fail([holding.parsed(message, None, raw)], lane,
                               lane.dead_reason, lane.dead_status, quiet=True)
            lane.dead_failed += 1  # (not seen, so not forgotten: key None)
            return None
        if key is not None and self._dedupe.seen(key, now):
            self._ledger.counts["deduplicated"] += 1
            holding.release(1)
            finished.append(raw)
            self._log_duplicate(lane.id)
            return None
        return lane, holding.parsed(message, key, raw)

    def settle(self, known: list[tuple[Verdict, str | None, int]], now: float) -> list[bool]:
        """For each (verdict, producer, how many such envelopes came): count them at once
        if parsing would leave them unheld (rejected; or duplicates, and not failed first
        by a quarantine, as `place` decides). Says which entries it counted."""
        settled = []
        for (result, key), producer, count in known:
            if isinstance(result, str):
                self._ledger.rejected(producer, result, count)
            elif key is not None and not self._quarantined(self._lanes.get(result.key), now) \
                    and self._dedupe.recent(key, now):
                self._ledger.counts["deduplicated"] += count
                self._log_duplicate(result.webhook_id, count)
            else:
                settled.append(False)
                continue
            self._ledger.received(count)
            self._ledger.charge(producer, "received", count)
            settled.append(True)
        return settled

    def _quarantined(self, lane: Lane | None, now: float) -> bool:
        return lane is not None and lane.dead_reason is not None \
            and self._limits.quarantined(lane.key, now)

    def _log_duplicate(self, webhook_id: str, count: int = 1) -> None:
        """A suppressed duplicate is said, not silent: the producer's send succeeded."""
        suppressed = self._dedupe_log.allow(count)
        if suppressed is not None:
            self._say(logging.INFO, "duplicate suppressed webhook=%s window_s=%g%s", webhook_id,
                      self._dedupe_window,
                      f" ({suppressed} duplicate lines left out)" if suppressed else "")
