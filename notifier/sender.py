"""One sender thread's HTTP side: a keep-alive session that posts a request to Discord
and reads the answer as an `Outcome`, with a watchdog that holds each request to its
total deadline."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from notifier import PROJECT_URL, __version__
from notifier.discord import Outcome, classify, network_error
from notifier.envelope import post_url
from notifier.lanes import Job

if TYPE_CHECKING:
    from notifier.outbox import Outbox
    from notifier.store import Store

log = logging.getLogger("notifier.relay")

USER_AGENT = f"DiscordBot ({PROJECT_URL}, {__version__})"
TIMEOUT = (5.0, 15.0)
"""Connect and read timeouts of one request (the read timeout is per socket read)."""
DEADLINE_SEC = 20.0
"""The longest one request may take, connect and the whole answer: a server that
trickles its answer a byte at a time holds a sender no longer than this."""


class Watchdog:
    """Shuts the socket of a request still unanswered at its deadline (`requests` has
    timeouts per socket read only). One per sender thread, idle between requests.

    It holds the socket itself, taken as the connection connects or is reused: once an
    answer says ``Connection: close``, http.client hands the socket to the response and
    the connection no longer has one, yet the body is still read from it."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.sock: socket.socket | None = None  # the one carrying the request
        self.fired = False
        self._deadline: float | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Watchdog":
        with self._changed:
            self._deadline, self.fired = time.monotonic() + self.seconds, False
            self.sock = None
            self._changed.notify()
        return self

    def __exit__(self, *exc_info) -> None:
        with self._changed:
            self._deadline = None

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    def alive(self) -> bool:
        """False if its thread died (the relay's supervisor watches it): its sender's
        requests would have no deadline."""
        return self._closed or self._thread.is_alive()

    def adapter(self) -> HTTPAdapter:
        """An adapter whose connections tell this watchdog the socket of each request."""
        watchdog = self

        class Watched:
            def connect(self):
                super().connect()
                watchdog.sock = self.sock

            def request(self, *args, **kwargs):
                if self.sock is not None:  # a kept-alive connection: no connect()
                    watchdog.sock = self.sock
                return super().request(*args, **kwargs)

        adapter = HTTPAdapter()
        adapter.poolmanager.pool_classes_by_scheme = {
            "http": type("Pool", (HTTPConnectionPool,), {
                "ConnectionCls": type("Connection", (Watched, HTTPConnection), {})}),
            "https": type("Pool", (HTTPSConnectionPool,), {
                "ConnectionCls": type("Connection", (Watched, HTTPSConnection), {})})}
        return adapter

    def _run(self) -> None:
        with self._changed:
            while not self._closed:
                left = None if self._deadline is None else self._deadline - time.monotonic()
                if left is None or left > 0:
                    self._changed.wait(left)
                    continue
                self._deadline, self.fired = None, True
                if self.sock is not None:
                    try:
                        self.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


class Sender:
    """One sender thread's HTTP side: a keep-alive session, and per webhook the request
    prepared once. Preparing it anew costs about a third of a millisecond per
    notification in requests, and a session left to read the environment (proxies,
    CA bundle, ~/.netrc) does that on every request; both are done once per webhook here
    (HTTPS_PROXY, NO_PROXY and REQUESTS_CA_BUNDLE still apply, as read at first use)."""

    MAX_TEMPLATES = 256

    def __init__(self, deadline: float = DEADLINE_SEC):
        self.watchdog = Watchdog(deadline)
        self.session = requests.Session()
        for prefix in ("http://", "https://"):
            self.session.mount(prefix, self.watchdog.adapter())
        self.session.trust_env = False
        self.session.headers.update({"Content-Type": "application/json",
                                     "User-Agent": USER_AGENT})
        self._templates: dict[str, tuple[requests.PreparedRequest, dict, bool | str]] = {}

    def _template(self, webhook: str) -> tuple[requests.PreparedRequest, dict, bool | str]:
        template = self._templates.get(webhook)
        if template is None:
            if len(self._templates) >= self.MAX_TEMPLATES:
                self._templates.clear()
            url = post_url(webhook)
            verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            template = self._templates[webhook] = (
                self.session.prepare_request(requests.Request("POST", url)),
                requests.utils.get_environ_proxies(url), verify or True)
        return template

    def post(self, job: Job) -> Outcome:
        """One request to Discord, read as an `Outcome`. The status line and the headers
        are read first, then the body, all within the deadline: a body that breaks off
        after a 2xx status still means delivered (see `classify`)."""
        template, proxies, verify = self._template(job.webhook)
        request = template.copy()
        request.body = json.dumps(job.payload, ensure_ascii=False,
                                  separators=(",", ":")).encode("utf-8")
        request.headers["Content-Length"] = str(len(request.body))
        with self.watchdog:
            try:
                response = self.session.send(request, timeout=TIMEOUT, allow_redirects=False,
                                             proxies=proxies, verify=verify, stream=True)
            except requests.RequestException as exc:
                if self.watchdog.fired:
                    return Outcome("retry", reason=self._late())
                return network_error(exc)
            broken = None
            try:
                body = response.content
            except requests.RequestException as exc:
                body, broken = b"", f"the answer broke off ({type(exc).__name__})"
            finally:
                response.close()
            if self.watchdog.fired:  # a body without a length ends at the shut socket
                broken = self._late()
        return classify(response.status_code, response.headers, body, broken)

    def _late(self) -> str:
        return f"no whole answer within {self.watchdog.seconds:g} s"

    def close(self) -> None:
        self.session.close()
        self.watchdog.close()


class SenderWorker:
    """A sender thread's unit: the next request a webhook may send, posted, its answer
    reported; False once the outbox is closed (the relay's stop)."""

    def __init__(self, outbox: "Outbox", store: "Store", deadline: float):
        self.outbox, self.store = outbox, store
        self.sender = Sender(deadline)

    def loop(self) -> bool:
        job = self.outbox.next_job()
        if job is None:
            return False
        try:
            if job.items:
                self.store.sending(job.raws)
            outcome = self.sender.post(job)
        except Exception as exc:  # a bug, not Discord: retry, and say so
            log.exception("sending failed unexpectedly")
            outcome = Outcome("retry", reason=f"internal error {type(exc).__name__}")
        self.outbox.finish(job, outcome)
        return True

    def close(self) -> None:
        self.sender.close()
