"""Prometheus exposition of the relay's metrics (the optional extra ``prometheus``).

The relay hands each snapshot it writes to `Exporter.update`, so these series and
``notifier_metrics.sexp`` always show the same numbers, and the accounting identity
holds here too::

    notifier_received_total = sum(notifier_messages_total) + notifier_queue_messages

Exposed as a text file for node_exporter's textfile collector (rewritten atomically each
interval) and/or on ``/metrics`` over HTTP (`Listener`). `prometheus_client` does the
formatting; the serving is ours, because its server starts a thread per connection and
waits for a request without a timeout: idle connections would take the descriptors the
relay needs. Names follow Prometheus conventions: ``_total`` counters, base units
(seconds, messages), and labels with bounded values; per-webhook series are labelled by
webhook id (never the token), for the webhooks the snapshot lists (at most
`metrics.MAX_WEBHOOKS`, the most relevant).
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from notifier import curve, files

log = logging.getLogger("notifier.prometheus")

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
    hooks = entries["webhooks"]  # capped by the snapshot: series cannot grow without bound
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
        _family(gauge, "notifier_webhooks_left_out", "Webhooks without series of their own "
                "(beyond the 100 most relevant)", [((), entries.get("webhooks_left_out", 0))]),
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
    """Holds the latest snapshot for the registry and writes the text file."""

    def __init__(self, path: Path | None):
        self.path = path
        self.file = files.WriteState("Prometheus text file", path)
        self._entries: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self) -> list[Metric]:
        with self._lock:
            entries = self._entries
        return [] if entries is None else families(entries)

    def exposition(self) -> bytes:
        """The latest snapshot in Prometheus' text format."""
        return generate_latest(self.registry)

    def update(self, entries: dict[str, Any]) -> None:
        """Take a new snapshot; rewrite the text file (atomically) if there is one. A
        write that fails is logged once and shown as `file.state` until one works."""
        with self._lock:
            self._entries = entries
        if self.path is not None:
            with self.file:
                files.write_atomic(self.path, self.exposition())


MAX_CONNECTIONS = 16
"""Connections served at once; beyond it a new one is closed at once. Prometheus opens one
per scrape: 16 leaves room for several scrapers and a curl or two."""

TIMEOUT_SEC = 3.0
"""The longest a connection may take to send its request and read the answer."""

MAX_REQUEST_BYTES = 8192
"""A request's line and headers at most (a scrape sends a few hundred bytes)."""

ACCEPT_PAUSE_SEC = 0.5
"""After the process ran out of descriptors, how long the listener stops accepting: the
relay's own files and sockets come first."""

REPORT_EVERY_SEC = 60.0


@dataclass
class _Connection:
    deadline: float
    request: bytes = b""
    answer: bytes | None = None


class Listener:
    """``/metrics`` over HTTP, served from one thread by `loop` steps; no client can
    starve the relay through it: at most `max_connections` at once (further ones are
    closed at once), each closed at its deadline whatever it sent, so the listener never
    holds more than ``max_connections + 2`` descriptors. Connections refused or cut are
    counted and said at WARNING once a minute."""

    def __init__(self, address: tuple[str, int], body: Callable[[], bytes], *,
                 max_connections: int = MAX_CONNECTIONS, timeout: float = TIMEOUT_SEC,
                 clock: Callable[[], float] = time.monotonic):
        host, port = address
        family, *_, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
        self._server = socket.create_server(sockaddr[:2], family=family)  # OSError: taken
        self._server.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ)
        self._body, self._max, self._timeout, self._clock = body, max_connections, timeout, clock
        self._connections: dict[socket.socket, _Connection] = {}
        self._accepting_at: float | None = None  # paused until then, out of descriptors
        self.refused = self.cut = 0  # since the last report
        self._report_at = clock() + REPORT_EVERY_SEC
        if not curve.is_loopback(sockaddr[0]):
            log.warning("/metrics on %s:%d is reachable from other hosts: anyone who can "
                        "reach it can read the relay's metrics and hold its connections; "
                        "keep it on loopback or behind a firewall", host, port)

    def loop(self, timeout: float = 0.5) -> None:
        """One step: wait at most `timeout` (less when a deadline comes first), then
        accept, read, answer, and close connections past their deadline."""
        now = self._clock()
        if self._accepting_at is not None and now >= self._accepting_at:
            self._selector.register(self._server, selectors.EVENT_READ)
            self._accepting_at = None
        soonest = min((c.deadline for c in self._connections.values()), default=now + timeout)
        for key, _ in self._selector.select(max(0.0, min(timeout, soonest - now))):
            if key.fileobj is self._server:
                self._accept()
            else:
                self._serve(key.fileobj, key.data)
        self._expire(self._clock())

    def _accept(self) -> None:
        for _ in range(4 * self._max):  # a bounded turn, then the others' deadlines
            try:
                sock, _ = self._server.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._selector.unregister(self._server)
                    self._accepting_at = self._clock() + ACCEPT_PAUSE_SEC
                    log.warning("/metrics: cannot accept a connection: %s; paused for "
                                "%.1f s", exc.strerror, ACCEPT_PAUSE_SEC)
                return  # ECONNABORTED and the like: that connection only
            if len(self._connections) >= self._max:
                sock.close()
                self.refused += 1
                continue
            sock.setblocking(False)
            connection = _Connection(self._clock() + self._timeout)
            self._connections[sock] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _serve(self, sock: socket.socket, connection: _Connection) -> None:
        try:
            if connection.answer is None:
                data = sock.recv(4096)
                if not data:
                    self._close(sock)
                    return
                connection.request += data
                if b"\r\n\r\n" not in connection.request and b"\n\n" not in connection.request:
                    if len(connection.request) > MAX_REQUEST_BYTES:
                        connection.answer = _response(431, b"request too large\n")
                        self._selector.modify(sock, selectors.EVENT_WRITE, connection)
                    return
                connection.answer = self._answer(connection.request)
                self._selector.modify(sock, selectors.EVENT_WRITE, connection)
            sent = sock.send(connection.answer)
            connection.answer = connection.answer[sent:]
            if not connection.answer:
                self._close(sock)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # reset by the peer, and the like
            self._close(sock)

    def _answer(self, request: bytes) -> bytes:
        method, _, rest = request.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET\n")
        if path != b"/metrics":
            return _response(404, b"see /metrics\n")
        try:
            body = self._body()
        except Exception:  # a bug: this scrape fails, the listener goes on
            log.exception("/metrics: cannot render the metrics")
            return _response(500, b"internal error\n")
        return _response(200, b"" if method == b"HEAD" else body, len(body))

    def _expire(self, now: float) -> None:
        for sock in [s for s, c in self._connections.items() if c.deadline <= now]:
            self._close(sock)
            self.cut += 1
        if now >= self._report_at:
            if self.refused or self.cut:
                log.warning("/metrics: in the last %.0f s, %d connections refused (%d at "
                            "once at most) and %d closed after %.0f s without a whole "
                            "exchange", REPORT_EVERY_SEC, self.refused, self._max, self.cut,
                            self._timeout)
            self.refused = self.cut = 0
            self._report_at = now + REPORT_EVERY_SEC

    def _close(self, sock: socket.socket) -> None:
        self._selector.unregister(sock)
        del self._connections[sock]
        sock.close()

    @property
    def address(self) -> tuple[str, int]:
        return self._server.getsockname()[:2]

    def close(self) -> None:
        for sock in list(self._connections):
            self._close(sock)
        self._selector.close()
        self._server.close()


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


def _response(status: int, body: bytes, length: int | None = None) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection."""
    content_type = ("text/plain; version=0.0.4; charset=utf-8" if status == 200
                    else "text/plain; charset=utf-8")
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode("ascii") + body
