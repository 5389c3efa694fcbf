"""Prometheus exposition of the relay's metrics (the optional extra ``prometheus``).

The relay hands each snapshot it writes to `Exporter.update`, so these series and
``notifier_metrics.sexp`` always show the same numbers, and the accounting identity
holds here too::

    notifier_received_total = sum(notifier_messages_total) + notifier_queue_messages

Exposed as a text file for node_exporter's textfile collector (rewritten atomically each
interval) and/or on ``/metrics`` over HTTP. `prometheus_client` does the formatting and
the serving. Names follow Prometheus conventions: ``_total`` counters, base units
(seconds, messages), and labels with bounded values; per-webhook series are labelled by
webhook id (never the token), for at most `MAX_WEBHOOKS` webhooks.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

MAX_WEBHOOKS = 100
"""Webhooks with series of their own (in the snapshot's order), so that a producer that
cycles through webhook URLs cannot grow the number of series without bound."""

OUTCOMES = (("delivered", "delivered"), ("drops", "dropped"), ("rejected", "rejected"),
            ("deduplicated", "deduplicated"), ("failed", "failed"), ("lost", "lost"))
WEBHOOK_OUTCOMES = (("delivered", "delivered"), ("dropped", "dropped"), ("failed", "failed"))


def _family(kind: type, name: str, doc: str, samples, labels: tuple[str, ...] = ()) -> Metric:
    family = kind(name, doc, labels=list(labels))
    for label_values, value in samples:
        if value is not None:
            family.add_metric(list(label_values), value)
    return family


def families(entries: dict[str, Any]) -> list[Metric]:
    """The metric families of one snapshot (`metrics.entries`)."""
    counter, gauge = CounterMetricFamily, GaugeMetricFamily
    hooks = entries["webhooks"][:MAX_WEBHOOKS]
    requests_ok = entries["requests"] - entries["errors"] - entries["rate_limited"]
    return [
        _family(counter, "notifier_received_total", "Envelopes taken off the socket, and "
                "restored from the last run", [((), entries["received"])]),
        _family(counter, "notifier_messages_total", "Messages received, by where they ended "
                "up (the rest are in notifier_queue_messages)",
                [((outcome,), entries.get(key)) for key, outcome in OUTCOMES], ("outcome",)),
        _family(gauge, "notifier_queue_messages", "Messages held now (pending)",
                [((), entries["queue_len"])]),
        _family(gauge, "notifier_queue_capacity_messages", "Bound on messages held",
                [((), entries["queue_max"])]),
        _family(counter, "notifier_requests_total", "Requests made to Discord, by result",
                [(("ok",), requests_ok), (("error",), entries["errors"]),
                 (("rate_limited",), entries["rate_limited"])], ("result",)),
        _family(counter, "notifier_rate_limited_total", "429 responses from Discord, by scope",
                [((scope,), count) for scope, count in entries["rate_limited_by_scope"].items()],
                ("scope",)),
        _family(counter, "notifier_retries_total", "Requests scheduled again after an error",
                [((), entries["retries"])]),
        _family(counter, "notifier_delivered_unconfirmed_total", "2xx answers whose body "
                "broke off or outlasted the deadline: delivered, not posted again",
                [((), entries.get("delivered_unconfirmed", 0))]),
        _family(counter, "notifier_drops_webhook_unknown_total", "Drops no webhook could be "
                "charged with (in notifier_messages_total{outcome=\"dropped\"})",
                [((), entries.get("drops_webhook_unknown", 0))]),
        _family(counter, "notifier_oversized_disconnects_total", "Producer connections "
                "dropped for a frame over the bound (what they queued behind it was lost)",
                [((str(entry["producer"]),), entry["disconnects"])
                 for entry in entries.get("oversized_by_producer", [])], ("producer",)),
        _family(gauge, "notifier_invalid_requests", "401/403/429 responses in the last 10 "
                "minutes (Discord bans an IP at 10,000)", [((), entries["invalid_requests_10m"])]),
        _family(gauge, "notifier_running", "1 while the relay runs, 0 once it has stopped",
                [((), int(entries["state"] == "running"))]),
        _family(gauge, "notifier_file_ok", "1 while the relay can write this file, 0 once "
                "a write failed (its <file>_reason in the metrics file says why)",
                [((key[:-len("_state")],), int(value == "ok")) for key, value in entries.items()
                 if key.endswith("_state") and value in ("ok", "failed")], ("file",)),
        _family(gauge, "notifier_snapshot_timestamp_seconds", "When these numbers were taken",
                [((), entries["timestamp"])]),
        _family(gauge, "notifier_start_time_seconds", "When the relay started",
                [((), entries["started_at"])]),
        _family(gauge, "notifier_last_delivery_timestamp_seconds", "When Discord last "
                "confirmed a message (absent before the first)",
                [((), entries["last_delivery_at"])]),
        _family(counter, "notifier_webhook_messages_total", "Messages per webhook, by outcome",
                [((str(hook["id"]), outcome), hook[key]) for hook in hooks
                 for key, outcome in WEBHOOK_OUTCOMES], ("webhook", "outcome")),
        _family(gauge, "notifier_webhook_queue_messages", "Messages held per webhook",
                [((str(hook["id"]),), hook["pending"]) for hook in hooks], ("webhook",)),
        _family(gauge, "notifier_webhook_last_success_timestamp_seconds", "When a webhook last "
                "delivered", [((str(hook["id"]),), hook["last_success_at"]) for hook in hooks],
                ("webhook",)),
        _family(gauge, "notifier_webhook_failing_since_timestamp_seconds", "The first failed "
                "request since a webhook's last success (absent while it works)",
                [((str(hook["id"]),), hook["failing_since"]) for hook in hooks], ("webhook",)),
    ]


class Exporter:
    """Holds the latest snapshot for the registry, writes the text file, serves /metrics."""

    def __init__(self, path: Path | None, listen: tuple[str, int] | None):
        self._path = path
        self._entries: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._server = None
        if listen is not None:  # OSError when the address cannot be bound
            self._server, _ = start_http_server(listen[1], listen[0], registry=self.registry)

    def collect(self) -> list[Metric]:
        with self._lock:
            entries = self._entries
        return [] if entries is None else families(entries)

    def update(self, entries: dict[str, Any]) -> None:
        """Take a new snapshot; rewrite the text file (atomically) if there is one.
        Raises OSError when it cannot be written."""
        with self._lock:
            self._entries = entries
        if self._path is not None:
            write_to_textfile(str(self._path), self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
