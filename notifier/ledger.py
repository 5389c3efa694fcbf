"""Where every message the relay accepted went: the counters, per webhook and per producer.

Every message received lands in exactly one final counter, or is still pending:

    received = delivered + drops + rejected + deduplicated + failed + lost + pending

`lost` counts messages held at a stop that could not be saved. The `Outbox` moves
messages and updates the ledger under its one lock, so a snapshot is always consistent.
Losses still to be reported in a webhook's channel (its loss notice) are kept per
webhook too, and messages dropped before any message to their webhook was parsed are
charged to its id until it has a lane (`early`).
"""

from __future__ import annotations

from typing import Callable, Iterable

COUNTERS = ("received", "delivered", "drops", "rejected", "deduplicated", "failed", "lost",
            "errors", "retries", "rate_limited", "requests", "notices", "restored",
            "restored_in_flight", "delivered_unconfirmed", "drops_webhook_unknown")
"""The totals; `delivered_unconfirmed` counts 2xx answers whose body broke off (their
messages are in `delivered`), `drops_webhook_unknown` the drops no webhook could be
charged with (in `drops`: an envelope dropped unparsed whose own webhook field could
not be read)."""

MAX_PRODUCERS = 256
"""Producers (CURVE certificate names) counted one by one; any further ones are counted
together under OTHER_PRODUCERS."""
OTHER_PRODUCERS = "(others)"
RESTORED_PRODUCER = "(restored)"
"""What restored messages whose producer the store does not know are counted under."""

EARLY_DROP_IDS = 1000
"""Webhooks whose drops are remembered before a message to them was ever parsed."""


class Account:
    """One webhook's share of the counters, and its losses not yet reported (`webhook`:
    its key, `envelope.webhook_key`)."""

    __slots__ = ("webhook", "delivered", "dropped", "failed", "last_success_at",
                 "failing_since", "lost_dropped", "lost_failed", "lost_since")

    def __init__(self, webhook: str):
        self.webhook = webhook
        self.delivered = self.dropped = self.failed = 0
        self.last_success_at: float | None = None  # wall clock
        self.failing_since: float | None = None  # wall clock: first error since a success
        self.lost_dropped = self.lost_failed = 0  # not yet reported in the channel
        self.lost_since: float | None = None  # wall clock

    @property
    def notice(self) -> tuple[int, int, float | None]:
        """The loss-notice state, as the store keeps it."""
        return self.lost_dropped, self.lost_failed, self.lost_since


class Ledger:
    """The counters and their per-producer and per-webhook shares. Loss-notice states
    are handed to `store` as they change; the wall clock is injected."""

    def __init__(self, wall: Callable[[], float], store):
        self._wall = wall
        self._store = store
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.last_delivery_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_rejected_at: float | None = None
        self.last_rejected_reason: str | None = None  # token-free, as envelope.parse says
        self.rate_limited_by_scope = dict.fromkeys(("route", "shared", "global", "ban"), 0)
        self.early: dict[str, tuple[int, float]] = {}  # webhook id -> (drops, since)
        self._producers: dict[str, dict[str, int]] = {}  # name -> received, rejected, drops

    def charge(self, producer: str | None, key: str, count: int = 1) -> None:
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

    def received(self, count: int, producers: list[str | None] | None = None) -> None:
        """`count` messages received; with CURVE, from `producers` (one name each)."""
        self.counts["received"] += count
        for producer in producers or ():
            self.charge(producer, "received")

    def restored(self, count: int, in_flight: int, producers: list[str | None] | None) -> None:
        """Messages taken back from the store at start, `in_flight` of them possibly
        posted already."""
        self.received(count, producers)
        self.counts["restored"] += count
        self.counts["restored_in_flight"] += in_flight

    def rejected(self, producer: str | None, reason: str, count: int = 1) -> None:
        self.counts["rejected"] += count
        self.charge(producer, "rejected", count)
        self.last_rejected_at, self.last_rejected_reason = self._wall(), reason

    def note_loss(self, account: Account, dropped: int = 0, failed: int = 0,
                  store: bool = True) -> None:
        """Messages of a webhook dropped or failed: counted, and kept for its notice."""
        account.dropped += dropped
        account.failed += failed
        account.lost_dropped += dropped
        account.lost_failed += failed
        if account.lost_since is None:
            account.lost_since = self._wall()
        if store:
            self._store.notice(account.webhook, *account.notice)

    def restored_notice(self, account: Account, name: str, dropped: int, failed: int,
                        since: float | None) -> None:
        """Losses the last run (or the version before the store) left to report, kept
        under `name`: the webhook's key, or a URL of it (a thread, an API version) as an
        earlier version kept them. Added to its account, and kept by its key from now."""
        account.lost_dropped += dropped
        account.lost_failed += failed
        if since is not None and (account.lost_since is None or since < account.lost_since):
            account.lost_since = since
        if name != account.webhook:
            self._store.notice(name, 0, 0, None)
        self._store.notice(account.webhook, *account.notice)

    def noticed(self, account: Account, dropped: int, failed: int) -> None:
        """A loss notice reporting these counts was posted (or refused, or given up)."""
        account.lost_dropped -= dropped
        account.lost_failed -= failed
        if not (account.lost_dropped or account.lost_failed):
            account.lost_since = None
        self._store.notice(account.webhook, *account.notice)

    def dropped(self, parsed: list[tuple[Account, str | None]],
                unparsed: list[tuple[str | None, str | None]],
                account_of: Callable[[str], Account | None]) -> None:
        """Messages dropped to make room: parsed ones as (its webhook's account, producer),
        unparsed ones as (webhook id found in the envelope, producer). An unparsed drop
        is charged to the account of its webhook id (`account_of`), or, before any
        message to that webhook was parsed, to the id itself (for at most EARLY_DROP_IDS
        ids), which the account it gets later adopts; one whose webhook is not known
        (None) is counted as such, and no channel hears of it."""
        self.counts["drops"] += len(parsed) + len(unparsed)
        accounts = {}
        for account, producer in parsed:
            self.charge(producer, "drops")
            self.note_loss(account, dropped=1, store=False)
            accounts[id(account)] = account
        for account in accounts.values():
            self._store.notice(account.webhook, *account.notice)
        per_webhook: dict[str, int] = {}
        for webhook_id, producer in unparsed:
            self.charge(producer, "drops")
            if webhook_id is None:
                self.counts["drops_webhook_unknown"] += 1
            else:
                per_webhook[webhook_id] = per_webhook.get(webhook_id, 0) + 1
        for webhook_id, count in per_webhook.items():
            account = account_of(webhook_id)
            if account is not None:
                self.note_loss(account, dropped=count)
            elif webhook_id in self.early or len(self.early) < EARLY_DROP_IDS:
                earlier, since = self.early.get(webhook_id, (0, self._wall()))
                self.early[webhook_id] = (earlier + count, since)
                self._store.notice(webhook_id, earlier + count, 0, since)

    def adopt_early(self, webhook_id: str, account: Account) -> None:
        """A webhook with early drops got its account: they become the account's."""
        if webhook_id in self.early:
            account.dropped, account.lost_since = self.early.pop(webhook_id)
            account.lost_dropped = account.dropped
            self._store.notice(webhook_id, 0, 0, None)
            self._store.notice(account.webhook, *account.notice)

    def answered(self, account: Account, unconfirmed: bool) -> None:
        """A request to the webhook was delivered (`unconfirmed`: its 2xx body broke
        off): it is not failing."""
        account.failing_since = None
        self.counts["delivered_unconfirmed"] += unconfirmed

    def delivered(self, account: Account, count: int) -> None:
        self.counts["delivered"] += count
        account.delivered += count
        account.last_success_at = self.last_delivery_at = self._wall()

    def error(self, account: Account, reason: str, failing: bool) -> None:
        """A request that failed; `failing`: the webhook's own fault (network, 5xx,
        401/403/404), which starts its `failing_since`."""
        self.counts["errors"] += 1
        self.last_error, self.last_error_at = reason, self._wall()
        if failing and account.failing_since is None:
            account.failing_since = self.last_error_at

    def rate_limited(self, scope: str) -> None:
        self.counts["rate_limited"] += 1
        self.rate_limited_by_scope[scope] += 1

    def notices(self, accounts: Iterable[Account]) -> dict[str, tuple[int, int, float | None]]:
        """The loss notices still to post, per webhook URL (or id, for early drops)."""
        notices = {account.webhook: account.notice for account in accounts
                   if account.lost_dropped or account.lost_failed}
        notices.update((webhook_id, (dropped, 0, since))
                       for webhook_id, (dropped, since) in self.early.items())
        return notices

    def snapshot(self) -> dict:
        """The totals and per-producer counts (the caller adds what it holds)."""
        return {**self.counts, "last_delivery_at": self.last_delivery_at,
                "last_error_at": self.last_error_at, "last_error": self.last_error,
                "last_rejected_at": self.last_rejected_at,
                "last_rejected_reason": self.last_rejected_reason,
                "rate_limited_by_scope": dict(self.rate_limited_by_scope),
                "producers": [{"name": name, **counts}
                              for name, counts in sorted(self._producers.items())]}

    def report(self, account: Account) -> dict:
        """A webhook's counters for the snapshot (its id, state and pending are the
        lanes')."""
        return {"delivered": account.delivered, "dropped": account.dropped,
                "failed": account.failed, "last_success_at": account.last_success_at,
                "failing_since": account.failing_since}
