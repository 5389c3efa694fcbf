"""What the last run left, taken back at start: the messages and loss notices the store
holds (ahead of anything new), what an older version left in its own files, and what the
last run's final snapshot says this one must carry on saying."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from notifier import envelope, metrics, migrate
from notifier.ledger import RESTORED_PRODUCER
from notifier.outbox import Outbox
from notifier.store import Contents, Store

log = logging.getLogger("notifier.relay")


class Restorer:
    """Hands what the store held to the outbox: at start (`start`), and later from the
    store thread, once a store that could not be read at start could be (`restore`)."""

    def __init__(self, outbox: Outbox, store: Store, allowed_hosts, data_dir: Path, *,
                 curve: bool):
        self.outbox, self.store = outbox, store
        self._allowed_hosts, self._data_dir = allowed_hosts, data_dir
        self._producer = RESTORED_PRODUCER if curve else None
        self.last_stop: dict = {}  # the messages the last run lost at its stop, if any
        self._stale = False  # the last run's store had failed: what it holds may be old

    def start(self, contents: Contents, metrics_file: Path) -> None:
        self.last_stop, self._stale = previous_run(metrics_file)
        self.restore(contents)
        self.import_legacy()

    def restore(self, contents: Contents) -> None:
        """Take back what the store held: loss notices and facts are kept only for
        webhooks the relay may still post to."""
        allowed = self._allowed_hosts
        notices = {key: state for key, state in contents.notices.items()
                   if "/" not in key or _allowed(key, allowed)}
        facts = {webhook: learned for webhook, learned in contents.facts.items()
                 if _allowed(webhook, allowed)}
        for key in contents.notices.keys() - notices.keys():
            self.store.notice(key, 0, 0, None)
        self.store.skipped += len(contents.notices) - len(notices) + len(contents.facts) \
            - len(facts)
        contents = contents._replace(notices=notices, facts=facts)
        if contents.messages or contents.overflow or notices:
            self.outbox.restore(contents, self._producer, stale=self._stale)
            log.info("restored %d messages from the store (%d possibly posted already: %s)%s",
                     len(contents.messages), len(contents.messages) if self._stale else
                     sum(item.in_flight for item in contents.messages),
                     "the last run's store had failed, so it may not know what that run "
                     "delivered" if self._stale else "they were in flight",
                     f"; {len(contents.overflow)} more dropped: over queue_max"
                     if contents.overflow else "")

    def import_legacy(self) -> None:
        """What the previous version left (its pending file, its journal) goes into the
        store in one transaction, then is renamed ``*.imported``: delivered exactly once.
        One that cannot be read is moved aside; one the store cannot take waits for the
        next start."""
        for path in migrate.sources(self._data_dir):
            try:
                legacy = migrate.read(path)
                marker = migrate.marker(path)
            except (OSError, ValueError) as exc:
                kept = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
                try:
                    path.rename(kept)
                except OSError as move:
                    log.error("%s unreadable (%s) and cannot be moved aside: %s", path,
                              str(exc)[:200], move)
                    continue
                self.store.moved_aside.append(f"{path.name} moved aside as {kept.name}: "
                                              f"{str(exc)[:100]}")
                log.error("%s unreadable (%s); kept as %s", path, str(exc)[:200], kept)
                continue
            stored = self.store.import_legacy(legacy.messages, legacy.notices, marker)
            if stored is None:
                log.error("%s not imported: the store cannot take it (%s); it stays for the "
                          "next start", path, self.store.failure)
                continue
            try:
                path.rename(path.with_name(path.name + ".imported"))
            except OSError as exc:  # the store knows it is imported: renamed next time
                log.error("%s imported but not renamed: %s", path, exc)
            if not stored and not legacy.notices:
                continue  # imported by a start that stopped before renaming it
            self.store.skipped += legacy.skipped
            self.restore(Contents(stored, [], legacy.notices, {}))
            log.info("imported %d messages and %d loss notices from %s (%d entries "
                     "unreadable); renamed %s.imported", len(stored), len(legacy.notices),
                     path, legacy.skipped, path.name)


def previous_run(metrics_file: Path) -> tuple[dict, bool]:
    """What the last run's last snapshot says that this one must carry on: the messages
    it lost at its stop (``last_stop_lost``, ``last_stop_at``, so that `status` still
    says so after a restart), and whether its store had failed (then the store may still
    hold messages that run delivered)."""
    try:
        previous = metrics.read(metrics_file)
    except (OSError, ValueError):
        return {}, False
    lost, at = previous.get("lost"), previous.get("timestamp")
    stale = previous.get("store_state") == "failed"
    if previous.get("state") == "stopped" and type(lost) is int and lost > 0 \
            and type(at) is int:
        return {"last_stop_lost": lost, "last_stop_at": at}, stale
    return {}, stale


def _allowed(webhook: str, allowed_hosts) -> bool:
    try:
        envelope.check_webhook(webhook, allowed_hosts)
    except envelope.EnvelopeError:
        return False
    return True
