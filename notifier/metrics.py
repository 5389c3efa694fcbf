"""The metrics file: the relay's counters as an S-expression alist, replaced atomically.

Readers (the Lisp side's safe reader, `python -m telemetry merge`, `python -m notifier
status`) see one complete snapshot or the previous one, never a torn file. Times are
Unix epoch seconds (the Lisp side's own files use universal time). Every key is
documented in the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from notifier import files, sexp

SCHEMA_VERSION = 1

# Counters in the order they are written, after the header keys.
COUNTERS = ("received", "delivered", "drops", "rejected", "deduplicated", "failed", "lost",
            "pending", "errors", "retries", "rate_limited", "requests", "notices",
            "restored", "restored_in_flight", "invalid_requests_10m")


THREADS = ("senders", "senders_alive", "thread_errors")
"""The sender threads asked for and alive, and the errors the relay's own threads caught
and carried on from (each logged)."""

MAX_WEBHOOKS = 100
"""Webhooks listed in a snapshot, the most relevant first (`relevant`); the others are
only counted, in `webhooks_left_out`: 9,000 webhooks holding messages in an outage would
otherwise grow the file past what its readers accept. Every field of an entry is
bounded (an id has at most 25 digits), so the whole file stays under `MAX_BYTES`."""

MAX_BYTES = 512 * 1024
"""The most a snapshot may take: half of the 1 MiB (`sexp.MAX_BYTES`) its readers accept."""


def relevant(webhooks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `MAX_WEBHOOKS` webhooks an operator most needs to see: failing (or
    quarantined) first, then those holding messages, then the most recently active."""
    def rank(hook: dict[str, Any]) -> tuple:
        failing = hook["failing_since"] is not None or hook["state"] == "quarantined"
        active = max(hook["last_success_at"] or 0, hook["failing_since"] or 0)
        return not failing, not hook["pending"], -active
    return sorted(webhooks, key=rank)[:MAX_WEBHOOKS]


def _unix(value: float | None) -> int | None:
    return None if value is None else int(value)


def entries(snapshot: dict[str, Any], *, now: float, started_at: float, pid: int,
            interval: float, saved: int | None = None, curve: bool = False,
            insecure_bind: bool = False) -> dict[str, Any]:
    """The metrics file's entries for an `Outbox.snapshot` (what the Prometheus
    exposition shows too); `saved` (the messages left for the next start) marks the
    final snapshot of a relay that stopped; `curve` and `insecure_bind` say how
    producers reach the relay."""
    entries: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "timestamp": int(now),
        "state": "running" if saved is None else "stopped",
        "pid": pid,
        "started_at": int(started_at),
        "uptime_sec": int(now - started_at),
        "metrics_interval_sec": interval,
        "queue_len": snapshot["queue_len"],
        "queue_max": snapshot["queue_max"],
        "unparsed": snapshot["unparsed"],
    }
    if saved is not None:
        entries["saved"] = saved
    entries.update((key, snapshot[key]) for key in COUNTERS)
    entries["delivered_unconfirmed"] = snapshot.get("delivered_unconfirmed", 0)
    entries.update((key, snapshot[key]) for key in THREADS if key in snapshot)
    entries["drops_webhook_unknown"] = snapshot.get("drops_webhook_unknown", 0)
    entries["oversized_disconnects"] = snapshot.get("oversized_disconnects", 0)
    entries.update(durable=snapshot.get("durable", False),
                   store_state=snapshot.get("store_state", "ok"),
                   store_reason=snapshot.get("store_reason"),
                   store_skipped=snapshot.get("store_skipped", 0),
                   store_moved_aside=snapshot.get("store_moved_aside"),
                   **{key: snapshot[key] for key in ("last_stop_lost", "last_stop_at")
                      if key in snapshot},
                   dead_letters=snapshot.get("dead_letters", 0),
                   dead_letters_rotated_out=snapshot.get("dead_letters_rotated_out", 0))
    # Each file the relay writes: <name>_state ("ok" or "failed") and <name>_reason.
    entries.update((key, value) for key, value in snapshot.items()
                   if key.endswith(("_state", "_reason")) and key not in entries)
    entries.update(
        last_delivery_at=_unix(snapshot["last_delivery_at"]),
        last_error_at=_unix(snapshot["last_error_at"]),
        last_error=snapshot["last_error"],
        last_rejected_at=_unix(snapshot["last_rejected_at"]),
        last_rejected_reason=snapshot.get("last_rejected_reason"),
        rate_limited_by_scope=snapshot["rate_limited_by_scope"],
        webhooks=[{**hook, "last_success_at": _unix(hook["last_success_at"]),
                   "failing_since": _unix(hook["failing_since"])}
                  for hook in relevant(snapshot["webhooks"])],
        webhooks_left_out=max(0, len(snapshot["webhooks"]) - MAX_WEBHOOKS),
        curve=curve, insecure_bind=insecure_bind, producers=snapshot["producers"],
        oversized_by_producer=snapshot.get("oversized_by_producer", []))
    return entries


def render(entries: dict[str, Any]) -> str:
    """The metrics file's text."""
    return sexp.dumps(entries) + "\n"


SUMMARY = (("received", "received"), ("delivered", "delivered"), ("rejected", "rejected"),
           ("deduplicated", "deduplicated"), ("drops", "dropped"), ("failed", "failed"),
           ("retries", "retries"), ("rate_limited", "rate-limited"))


def summary(before: dict[str, Any], after: dict[str, Any], seconds: float) -> str | None:
    """The log's periodic INFO line: what changed between two snapshots ("last 60 s:
    received 1234, delivered 1230, ...; pending 4"), or None if nothing did."""
    changes = [f"{label} {after[key] - before.get(key, 0)}" for key, label in SUMMARY]
    if all(after[key] == before.get(key, 0) for key, _ in SUMMARY):
        return None
    return f"last {seconds:.0f} s: {', '.join(changes)}; pending {after['pending']}"


def write(path: Path, text: str) -> None:
    files.write_atomic(path, text.encode("utf-8"))


def read(path: Path) -> sexp.Alist:
    """Read a metrics file: a regular file of at most `sexp.MAX_BYTES`, so a FIFO or a
    device cannot hang the reader. Raises OSError or `sexp.SexpError` (or ValueError when
    it is not an alist)."""
    value = sexp.loads(files.read_regular(path, sexp.MAX_BYTES))
    if not isinstance(value, sexp.Alist):
        raise ValueError("the metrics file is not an alist")
    return value
