"""The relay service: ZeroMQ in, Discord out, never blocking a producer.

Threads (only at the edges; decisions live in `Outbox` and `discord`):

* receiver: polls the PULL socket (no timeout while idle: no CPU), drains it with
  non-blocking receives into the `Outbox`, and parses envelopes when the socket is
  empty, so a flood is taken off the socket at close to ZeroMQ's own speed and parsing
  catches up after (a few are still parsed per batch, so a sustained flood cannot starve
  delivery);
* senders (``--senders``, default 4): take the next request a webhook may send, post it
  with their own `requests.Session`, report the answer;
* metrics: writes the snapshot every interval;
* the main thread: signals. SIGTERM or SIGINT stops receiving, delivers what it can
  within ``--drain-sec``, saves the rest to ``data/notifier_pending.sexp`` (mode 0600:
  it holds webhook URLs), writes the final metrics and returns. The next start delivers
  the saved messages first. SIGHUP reopens the log file and re-reads the CURVE clients
  directory; it never stops the relay.

With CURVE (`notifier.curve`) the socket admits only the producers whose keys are in
the clients directory, and each envelope is counted under its producer's name.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time

import requests
import zmq
import zmq.utils.monitor

from notifier import PROJECT_URL, __version__, curve, envelope, files, logs, metrics, sexp
from notifier.config import Config
from notifier.discord import Outcome, RetryPolicy, classify, network_error
from notifier.logs import Throttle
from notifier.outbox import RESTORED_PRODUCER, Job, Outbox, dedupe_key

log = logging.getLogger("notifier.relay")

USER_AGENT = f"DiscordBot ({PROJECT_URL}, {__version__})"
TIMEOUT = (5.0, 15.0)
"""Connect and read timeouts of one request: a hanging webhook holds a sender this long."""

RECEIVE_BATCH = 512  # envelopes taken off the socket per lock acquisition
PARSE_WHEN_IDLE = 64  # envelopes parsed per turn when the socket is empty
PARSE_WHEN_BUSY = 2  # ... and when it is not, so delivery still makes progress
PREVIEW_CHARS = 80
PENDING_SCHEMA = 1


class RelayError(RuntimeError):
    """The relay cannot start (port taken, data directory not writable...)."""


class Sender:
    """One sender thread's HTTP side: a keep-alive session, and per webhook the request
    prepared once. Preparing it anew costs about a third of a millisecond per
    notification in requests, and a session left to read the environment (proxies,
    CA bundle, ~/.netrc) does that on every request; both are done once per webhook here
    (HTTPS_PROXY, NO_PROXY and REQUESTS_CA_BUNDLE still apply, as read at first use)."""

    MAX_TEMPLATES = 256

    def __init__(self):
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers.update({"Content-Type": "application/json",
                                     "User-Agent": USER_AGENT})
        self._templates: dict[str, tuple[requests.PreparedRequest, dict, bool | str]] = {}

    def _template(self, webhook: str) -> tuple[requests.PreparedRequest, dict, bool | str]:
        template = self._templates.get(webhook)
        if template is None:
            if len(self._templates) >= self.MAX_TEMPLATES:
                self._templates.clear()
            # wait=true: Discord confirms the message was saved (without it, a message
            # Discord drops still answers 204).
            url = webhook + ("&" if "?" in webhook else "?") + "wait=true"
            verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            template = self._templates[webhook] = (
                self.session.prepare_request(requests.Request("POST", url)),
                requests.utils.get_environ_proxies(url), verify or True)
        return template

    def post(self, job: Job) -> Outcome:
        """One request to Discord, read as an `Outcome`."""
        template, proxies, verify = self._template(job.webhook)
        request = template.copy()
        request.body = json.dumps(job.payload, ensure_ascii=False,
                                  separators=(",", ":")).encode("utf-8")
        request.headers["Content-Length"] = str(len(request.body))
        try:
            response = self.session.send(request, timeout=TIMEOUT, allow_redirects=False,
                                         proxies=proxies, verify=verify)
        except requests.RequestException as exc:
            return network_error(exc)
        return classify(response.status_code, response.headers, response.content)

    def close(self) -> None:
        self.session.close()


def preview(data: bytes) -> str:
    """The start of a refused envelope for the log: one line, token-free."""
    text = data[:PREVIEW_CHARS * 4].decode("utf-8", "replace")[:PREVIEW_CHARS]
    return envelope.scrub(repr(text))


class Relay:
    """Owns the socket, the threads and the files; `Outbox` owns the messages."""

    def __init__(self, settings: Config, *, retry: RetryPolicy = RetryPolicy()):
        self.settings = settings
        self.outbox = Outbox(settings.queue_max, settings.dedupe_window, retry=retry)
        self._context = zmq.Context()
        self._wake: zmq.Socket | None = None
        self._requests: queue.SimpleQueue = queue.SimpleQueue()  # for the main thread:
        # a signal number, or "stop" from a failed thread
        self._clients: curve.Clients | None = None  # with CURVE
        self._monitor: zmq.Socket | None = None  # the PULL socket's failed handshakes
        self._refusal_log = Throttle(burst=10, interval=60.0)
        self._insecure = (settings.insecure_bind and not settings.curve
                          and not curve.is_loopback(settings.bind_addr))
        self.failed = False  # a thread died of an unexpected error
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started_at = time.time()
        self._accept_log = Throttle(burst=20)
        self._reject_log = Throttle(burst=20)
        self._drop_log = Throttle(burst=1)
        self._unreported_drops = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind, restore what the last run saved, start the threads."""
        settings = self.settings
        try:
            for path in (settings.metrics_file, settings.pending_file):
                path.parent.mkdir(parents=True, exist_ok=True)
                files.remove_stale_temps(path)
        except OSError as exc:
            raise RelayError(f"cannot use the data directory: {exc}") from None
        refusal = curve.bind_refusal(settings.bind_addr, settings.curve, settings.insecure_bind)
        if refusal is not None:
            raise RelayError(refusal)
        pull = self._context.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        try:
            if settings.curve_secret_key or settings.curve_clients:
                self._set_up_curve(pull)
            pull.bind(settings.endpoint)
        except (RelayError, zmq.ZMQError) as exc:
            pull.close()
            if self._clients is not None:
                self._clients.stop()
            if isinstance(exc, RelayError):
                raise
            raise RelayError(f"cannot bind {settings.endpoint}: {exc}") from None
        wake_address = f"inproc://relay-wake-{id(self)}"
        self._wake = self._context.socket(zmq.PAIR)
        self._wake.bind(wake_address)
        wake_receiver = self._context.socket(zmq.PAIR)
        wake_receiver.connect(wake_address)
        self._restore()
        self._write_metrics()
        self._spawn("receiver", self._receive_loop, pull, wake_receiver)
        for number in range(settings.senders):
            self._spawn(f"sender-{number + 1}", self._send_loop)
        self._spawn("metrics", self._metrics_loop)
        log.info("relay started endpoint=%s curve=%s queue_max=%d senders=%d metrics=%s pid=%d",
                 settings.endpoint, "on" if self._clients else "off", settings.queue_max,
                 settings.senders, settings.metrics_file, os.getpid())
        if self._insecure:
            log.warning("INSECURE: listening on %s without CURVE (SWIMMY_NOTIFIER_INSECURE_BIND"
                        "=1): anyone who reaches the port can post to the webhooks, and "
                        "webhook tokens cross the network in the clear", settings.bind_addr)

    def _set_up_curve(self, pull: zmq.Socket) -> None:
        """Make `pull` a CURVE server, with the authenticator answering before the bind."""
        settings = self.settings
        if not settings.curve:
            raise RelayError("CURVE needs both SWIMMY_NOTIFIER_CURVE_SECRET_KEY (--curve-"
                             "secret-key) and SWIMMY_NOTIFIER_CURVE_CLIENTS (--curve-clients)")
        try:
            public, secret = curve.load_secret(settings.curve_secret_key)
            self._clients = curve.Clients(self._context, settings.curve_clients)
            curve.set_server(pull, public, secret)
            self._monitor = pull.get_monitor_socket(curve.HANDSHAKE_FAILURES)
        except (curve.CurveError, zmq.ZMQError) as exc:
            raise RelayError(f"cannot set up CURVE: {exc}") from None
        log.info("CURVE on: %d producers allowed from %s: %s", len(self._clients.names),
                 settings.curve_clients, ", ".join(sorted(self._clients.names.values())))

    def _spawn(self, name: str, target, *args) -> None:
        thread = threading.Thread(target=self._guarded, args=(target, *args), name=name,
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    def _guarded(self, target, *args) -> None:
        """A thread that dies of an unexpected error (a bug) stops the whole relay the
        graceful way, so it exits non-zero for its supervisor to restart it, instead of
        running on without receiving or sending."""
        try:
            target(*args)
        except Exception:
            log.exception("%s thread failed; stopping the relay",
                          threading.current_thread().name)
            self.failed = True
            self._requests.put("stop")

    def stop(self) -> None:
        """Stop receiving, deliver for up to ``drain_sec``, save the rest, write the final
        metrics. Threads stuck in a request are left to die with the process."""
        log.info("stopping: no longer receiving; draining for up to %.1f s",
                 self.settings.drain_sec)
        try:
            self._wake.send(b"stop", zmq.NOBLOCK)
        except zmq.Again:
            pass  # the receiver is gone already
        self._threads[0].join()
        while self.outbox.unparsed:  # only if the receiver died before parsing them
            self._parse(PARSE_WHEN_IDLE)
        delivered = self.outbox.wait_empty(self.settings.drain_sec)
        self._stopping.set()
        messages = self.outbox.close()
        self._save_pending(messages)
        self._write_metrics()
        for thread in self._threads[1:]:
            thread.join(timeout=1.0)
        self._wake.close()
        if self._clients is not None:
            self._clients.stop()
        self._context.destroy(linger=0)
        log.info("stopped: %s; %d messages saved for the next start",
                 "all delivered" if delivered else "drain time over", len(messages))

    def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully; on SIGHUP, reload. The
        handlers only queue the signal: the work happens here, on the main thread,
        outside signal context."""
        previous = {sig: signal.signal(sig, lambda signum, _: self._requests.put(signum))
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            self.start()
            while self._requests.get() == signal.SIGHUP:
                self._hangup()
            self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _hangup(self) -> None:
        """SIGHUP: reopen the log file (logrotate's postrotate) and re-read the CURVE
        clients directory. Whatever goes wrong is logged; the relay runs on."""
        try:
            logs.reopen()
            if self._clients is None:
                log.info("SIGHUP: log reopened")
                return
            try:
                added, removed = self._clients.reload()
            except curve.CurveError as exc:
                log.error("SIGHUP: log reopened; CURVE clients not reloaded: %s", exc)
                return
            log.info("SIGHUP: log reopened; CURVE clients reloaded from %s: %d allowed, "
                     "added=%s removed=%s", self.settings.curve_clients,
                     len(self._clients.names), ",".join(added) or "-",
                     ",".join(removed) or "-")
        except Exception:
            log.exception("SIGHUP handling failed; the relay runs on")

    # ------------------------------------------------------------------ receiver

    def _receive_loop(self, pull: zmq.Socket, wake: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        outbox = self.outbox
        receive_batch = self._receive_curve_batch if self._clients else self._receive_batch
        try:
            while True:
                # Never sleep with envelopes to parse; wake once a second while drops
                # wait to be reported; otherwise block until something arrives.
                timeout = 0 if outbox.unparsed else 1000 if self._unreported_drops else None
                events = dict(poller.poll(timeout))
                if wake in events:
                    break
                if self._monitor in events:
                    self._log_refused_connection()
                busy = receive_batch(pull)
                if outbox.unparsed:
                    self._parse(PARSE_WHEN_BUSY if busy else PARSE_WHEN_IDLE)
                self._report_drops()
            while receive_batch(pull):  # what already arrived is accepted too
                pass
            while outbox.unparsed:
                self._parse(PARSE_WHEN_IDLE)
            self._report_drops(final=True)
        finally:
            if self._monitor is not None:
                pull.disable_monitor()
                self._monitor.close()
            pull.close()
            wake.close()

    def _receive_batch(self, pull: zmq.Socket) -> bool:
        """Take up to RECEIVE_BATCH envelopes; True if more may be waiting."""
        frames: list[bytes] = []
        receive, append = pull.recv, frames.append
        try:
            for _ in range(RECEIVE_BATCH):
                append(receive(zmq.NOBLOCK))
        except zmq.Again:
            pass
        if frames:
            self._hold(frames)
        return len(frames) == RECEIVE_BATCH

    def _receive_curve_batch(self, pull: zmq.Socket) -> bool:
        """`_receive_batch` on a CURVE socket: each frame's ZAP User-Id (its client's
        key) names its producer, and what a connection admitted before its key was
        revoked still sends is refused. (A Frame costs about 1.4 µs more than plain bytes
        in pyzmq 27, hence this loop only with CURVE. A frame without a User-Id would mean
        ZAP never ran: Frame.get raises, and the relay stops rather than take it.)"""
        frames, producers, refused = [], [], []
        receive, name_of = pull.recv, self._clients.names.get
        try:
            for _ in range(RECEIVE_BATCH):
                frame = receive(zmq.NOBLOCK, copy=False)
                user_id = frame.get("User-Id")
                name = name_of(user_id)
                if name is None:
                    refused.append(self._clients.former.get(user_id, f"key {user_id[:8]}…"))
                else:
                    frames.append(frame.bytes)
                    producers.append(name)
        except zmq.Again:
            pass
        if refused:
            self.outbox.refuse(refused)
            for name in refused:
                self._log_rejection("the producer's key is no longer allowed", b"", name)
        if frames:
            self._hold(frames, producers)
        return len(frames) + len(refused) == RECEIVE_BATCH

    def _hold(self, frames: list[bytes], producers: list[str] | None = None) -> None:
        dropped, oversized = self.outbox.accept(frames, producers=producers)
        self._unreported_drops += dropped
        for size, producer in oversized:
            self._log_rejection(envelope.too_large(size), b"", producer)

    def _parse(self, limit: int) -> None:
        allowed_hosts = self.settings.allowed_hosts
        dedupe = self.settings.dedupe_window > 0
        results, accepted = [], []
        for data, received_at, producer in self.outbox.take_unparsed(limit):
            try:
                message = envelope.parse(data, allowed_hosts)
            except envelope.EnvelopeError as exc:
                self._log_rejection(exc.reason, data, producer)
                results.append((received_at, exc.reason, None, producer))
                continue
            results.append((received_at, message, dedupe_key(message) if dedupe else None,
                            producer))
            accepted.append((message.webhook_id, len(data)))
        self.outbox.add_parsed(results)
        for webhook_id, size in accepted:  # after the senders have the messages
            suppressed = self._accept_log.allow()
            if suppressed is not None:
                log.info("accepted webhook=%s bytes=%d%s", webhook_id, size,
                         f" ({suppressed} accepted lines left out)" if suppressed else "")

    def _log_rejection(self, reason: str, data: bytes, producer: str | None = None) -> None:
        suppressed = self._reject_log.allow()
        if suppressed is not None:
            log.warning("rejected %sreason=%s preview=%s%s",
                        f"producer={producer} " if producer else "", reason, preview(data),
                        f" ({suppressed} rejection lines left out)" if suppressed else "")

    def _log_refused_connection(self) -> None:
        """A producer failed the CURVE handshake: nothing of it gets in; say why."""
        event = zmq.utils.monitor.recv_monitor_message(self._monitor)
        suppressed = self._refusal_log.allow()
        if suppressed is not None:
            log.warning("refused a connection: CURVE handshake failed, %s%s",
                        curve.handshake_failure(event["event"], event["value"]),
                        f" ({suppressed} such lines left out)" if suppressed else "")

    def _report_drops(self, final: bool = False) -> None:
        if self._unreported_drops and (final or self._drop_log.allow() is not None):
            log.warning("dropped %d oldest messages: queue full (queue_max=%d)",
                        self._unreported_drops, self.settings.queue_max)
            self._unreported_drops = 0

    # ------------------------------------------------------------------ senders

    def _send_loop(self) -> None:
        sender = Sender()
        try:
            while (job := self.outbox.next_job()) is not None:
                try:
                    outcome = sender.post(job)
                except Exception as exc:  # a bug, not Discord: retry, and say so
                    log.exception("sending failed unexpectedly")
                    outcome = Outcome("retry", reason=f"internal error {type(exc).__name__}")
                self.outbox.finish(job, outcome)
        finally:
            sender.close()

    # ------------------------------------------------------------------ files

    def _metrics_loop(self) -> None:
        while not self._stopping.wait(self.settings.metrics_interval):
            self._write_metrics()
            if self._clients is not None and not self._clients.alive():
                raise RelayError("the CURVE authenticator thread died: no producer can connect")

    def _write_metrics(self) -> None:
        now = time.time()
        text = metrics.render(self.outbox.snapshot(), now=now, started_at=self._started_at,
                              pid=os.getpid(), interval=self.settings.metrics_interval,
                              curve=self._clients is not None, insecure_bind=self._insecure)
        try:
            metrics.write(self.settings.metrics_file, text)
        except OSError as exc:
            log.error("cannot write metrics to %s: %s", self.settings.metrics_file, exc)

    def _save_pending(self, messages: list[envelope.Message]) -> None:
        path = self.settings.pending_file
        if not messages:
            path.unlink(missing_ok=True)
            return
        texts = [sexp.dumps({"type": "NOTIFIER", "schema_version": 1, "action": "SEND",
                             "webhook": m.webhook,
                             "payload_json": json.dumps(m.payload, ensure_ascii=False)})
                 for m in messages]
        data = sexp.dumps({"schema_version": PENDING_SCHEMA, "saved_at": int(time.time()),
                           "envelopes": texts})
        try:
            files.write_atomic(path, data.encode("utf-8"), mode=0o600)
        except OSError as exc:
            log.error("cannot save %d pending messages to %s: %s", len(messages), path, exc)

    def _restore(self) -> None:
        """Take back what the last run saved, ahead of anything new, and remove the
        file: from here on those messages are held (and accounted) like any other."""
        path = self.settings.pending_file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot read saved messages %s: %s", path, exc)
            return
        try:
            saved = sexp.loads(data, max_bytes=max(len(data), sexp.MAX_BYTES))
            texts = saved["envelopes"] if isinstance(saved, dict) else None
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError("no list of envelopes in it")
        except (sexp.SexpError, ValueError, KeyError) as exc:
            kept = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
            path.replace(kept)
            log.error("saved messages unreadable (%s); kept as %s", exc, kept)
            return
        self.outbox.accept([text.encode("utf-8") for text in texts], restored=True,
                           producers=[RESTORED_PRODUCER] * len(texts) if self._clients else None)
        while self.outbox.unparsed:
            self._parse(PARSE_WHEN_IDLE)
        path.unlink()
        log.info("restored %d messages saved by the last run", len(texts))


def run(settings: Config) -> int:
    """``python -m notifier``: serve until signalled. Returns the exit code."""
    relay = Relay(settings)
    try:
        relay.serve()
    except RelayError as exc:
        log.error("%s", exc)
        return 1
    return 1 if relay.failed else 0
