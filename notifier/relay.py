"""The relay service: ZeroMQ in, Discord out, never blocking a producer.

Threads (only at the edges; decisions live in `Outbox`, `limits` and `discord`):

* receiver: polls the PULL socket (no timeout while idle: no CPU) and drains it with
  non-blocking receives; in durable mode into the `Intake`, otherwise into the `Outbox`
  itself, and then it parses as the intake does;
* intake (durable mode): commits what the receiver took to the store (several batches in
  one transaction while the receiver goes on receiving, the GIL released inside SQLite),
  holds it in the `Outbox`, and parses envelopes when the socket is empty, so a flood is
  taken off the socket at close to ZeroMQ's own speed and parsing catches up after (a
  few are still parsed per batch, so a sustained flood cannot starve delivery). Without
  durable mode there is nothing to overlap: a second thread would only take the GIL
  from the receiver, which pyzmq releases at every receive;
* senders (``--senders``, default 8): take the next request a webhook may send, post it
  with their own `requests.Session`, report the answer;
* metrics: writes the snapshot every interval (and the Prometheus text file, when asked),
  with an INFO summary line of what changed once a minute;
* store (`notifier.store`): commits outcomes, notices a store removed or replaced, and
  gets a failed store back;
* the main thread: signals. SIGTERM or SIGINT stops receiving, delivers what it can
  within ``--drain-sec``, gives requests in flight a short grace, makes sure the store
  holds what is still undelivered (in durable mode it does already), writes the final
  metrics and returns. The next start delivers the saved messages first. SIGHUP reopens
  the log file and re-reads the CURVE clients directory; it never stops the relay.

The store is locked first, before anything is written: a second relay on the same
store exits 2 without touching anything.

With CURVE (`notifier.curve`) the socket admits only the producers whose keys are in
the clients directory, and each envelope is counted under its producer's name.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time

import zmq

from notifier import curve, door, envelope, files, logs, metrics, migrate, redaction, validate
from notifier.config import Config
from notifier.deadletter import DeadLetters
from notifier.discord import Outcome, RetryPolicy
from notifier.held import dedupe_key
from notifier.intake import Intake
from notifier.ledger import RESTORED_PRODUCER
from notifier.limits import Limits
from notifier.logs import Throttle
from notifier.outbox import Outbox
from notifier.sender import Sender
from notifier.store import Contents, InUse, Store

log = logging.getLogger("notifier.relay")

RECEIVE_BATCH = 512  # envelopes taken off the socket per lock acquisition
PARSE_WHEN_IDLE = 64  # envelopes parsed per turn when the socket is empty
PARSE_WHEN_BUSY = 2  # ... and when it is not, so delivery still makes progress
PREVIEW_CHARS = 80
GRACE_SEC = 3.0
"""After the drain, how long requests still in flight get to come back: what Discord
answers in that time is recorded, so a delivered message is not saved and posted again."""
SUMMARY_EVERY_SEC = 60.0  # the INFO line of what the relay did, instead of a line per message


class RelayError(RuntimeError):
    """The relay cannot start; `code` is its exit code: `validate.OPERATOR` (2: a bad
    setting or key file) or `validate.TRANSIENT` (1: a port in use...)."""

    def __init__(self, message: str, code: int = validate.TRANSIENT):
        super().__init__(message)
        self.code = code


class StoreInUse(RelayError):
    """Another relay holds the store: only an operator can fix that (exit 2)."""

    def __init__(self, message: str):
        super().__init__(message, validate.OPERATOR)


def preview(data: bytes) -> str:
    """The start of a refused envelope for the log: one line (repr escapes every control
    character), token-free (hidden before the cut, and what the cut leaves of a run too:
    `redaction`)."""
    text = data[:PREVIEW_CHARS * 4].decode("utf-8", "replace")
    if len(data) > PREVIEW_CHARS * 4:
        text += redaction.CUT
    return repr(redaction.shorten(text, PREVIEW_CHARS))


class Relay:
    """Owns the socket, the threads and the files; `Outbox` owns the messages."""

    def __init__(self, settings: Config, *, retry: RetryPolicy = RetryPolicy()):
        self.settings = settings
        self.store = Store(settings.store)
        self.dead_letters = DeadLetters(settings.dead_letter_file)
        self.outbox = Outbox(settings.queue_max, settings.dedupe_window,
                             limits=Limits(settings.global_rate, retry, wall=time.time,
                                           channel_period=settings.channel_period),
                             max_age=settings.max_age, store=self.store,
                             durable=settings.durable, dead_letters=self.dead_letters)
        self._context = zmq.Context()
        self._wake: zmq.Socket | None = None
        self._requests: queue.SimpleQueue = queue.SimpleQueue()  # for the main thread:
        # a signal number, or "stop" from a failed thread
        self._clients: curve.Clients | None = None  # with CURVE
        self._door: door.Door | None = None  # the PULL socket's monitor
        self._refusal_log = Throttle(burst=10, interval=60.0)
        self._oversized_log = Throttle(burst=10, interval=60.0)
        self._insecure = (settings.insecure_bind and not settings.curve
                          and not curve.is_loopback(settings.bind_addr))
        self.failed = False  # a thread died of an unexpected error
        self._stopping = threading.Event()  # the metrics and store threads' signal
        self._threads: list[threading.Thread] = []
        self._background: list[threading.Thread] = []  # metrics and store threads
        self._started_at = time.time()
        self._accept_log = Throttle(burst=20)
        self._reject_log = Throttle(burst=20)
        self._drop_log = Throttle(burst=1)
        self._unreported_drops = 0  # the intake thread's
        self._intake = Intake()
        self._parser_bugs: set[type] = set()  # kinds of parser exception logged already
        self._summarized: dict = {}  # the counters when the last summary line was logged
        self._summarized_at = time.monotonic()
        self._exporter = None  # notifier.prometheus.Exporter, when asked for
        self._last_stop: dict = {}  # the messages the last run lost at its stop, if any
        self._stale = False  # the last run's store had failed: what it holds may be old

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Check that it can start (`validate.problems`), lock the store (StoreInUse if
        another relay holds it: nothing else is touched), then bind, restore what the
        store holds and start the threads."""
        found = validate.problems(self.settings, trial=False)
        if found:
            raise RelayError("; ".join(problem.text for problem in found),
                             validate.exit_code(found))
        try:
            contents = self.store.open(self.settings.queue_max)
        except InUse as exc:
            raise StoreInUse(str(exc)) from None
        try:
            self._start(contents)
        except BaseException:
            self.store.close()
            raise

    def _start(self, contents: Contents) -> None:
        settings = self.settings
        try:
            for path in (settings.metrics_file, settings.dead_letter_file):
                path.parent.mkdir(parents=True, exist_ok=True)
                files.remove_stale_temps(path)
        except OSError as exc:
            raise RelayError(f"cannot use the data directory: {exc}", validate.code_for(exc)) \
                from None
        if settings.prometheus_file or settings.metrics_listen:
            self._exporter = _exporter(settings)
        pull = self._context.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.IPV6, settings.ipv6)
        door.configure(pull)
        try:
            if settings.curve:
                self._set_up_curve(pull)
            pull.bind(settings.endpoint)
        except (RelayError, zmq.ZMQError) as exc:
            pull.close()
            if self._clients is not None:
                self._clients.stop()
            if isinstance(exc, RelayError):
                raise
            raise RelayError(f"cannot bind {settings.endpoint}: {exc}",
                             validate.code_for(exc)) from None
        self._door = door.Door(pull, self._clients.name_at if self._clients else door.unnamed)
        wake_address = f"inproc://relay-wake-{id(self)}"
        self._wake = self._context.socket(zmq.PAIR)
        self._wake.bind(wake_address)
        wake_receiver = self._context.socket(zmq.PAIR)
        wake_receiver.connect(wake_address)
        self._last_stop, self._stale = _previous_run(settings.metrics_file)
        self._restore(contents)
        self._import_legacy()
        self._write_metrics()
        self._intake_side = [self._spawn("receiver", self._receive_loop, pull, wake_receiver)]
        if settings.durable:
            self._intake_side.append(self._spawn("intake", self._intake_loop))
        for number in range(settings.senders):
            self._spawn(f"sender-{number + 1}", self._send_loop)
        self._background.append(self._spawn("metrics", self._metrics_loop))
        self._background.append(self._spawn(
            "store", self.store.run, self._stopping,
            lambda: self.outbox.holdings(everything=settings.durable), self._restore))
        log.info("relay started endpoint=%s curve=%s durable=%s queue_max=%d senders=%d "
                 "store=%s metrics=%s pid=%d", settings.endpoint,
                 "on" if self._clients else "off", "on" if settings.durable else "off",
                 settings.queue_max, settings.senders, settings.store, settings.metrics_file,
                 os.getpid())
        if self._insecure:
            log.warning("INSECURE: listening on %s without CURVE (SWIMMY_NOTIFIER_INSECURE_BIND"
                        "=1): anyone who reaches the port can post to the webhooks, and "
                        "webhook tokens cross the network in the clear", settings.bind_addr)

    def _set_up_curve(self, pull: zmq.Socket) -> None:
        """Make `pull` a CURVE server, with the authenticator answering before the bind."""
        settings = self.settings
        try:
            public, secret = curve.load_secret(settings.curve_secret_key)
            self._clients = curve.Clients(self._context, settings.curve_clients)
            curve.set_server(pull, public, secret)
        except curve.CurveError as exc:  # changed since the start check
            raise RelayError(f"cannot set up CURVE: {exc}", validate.OPERATOR) from None
        except zmq.ZMQError as exc:
            raise RelayError(f"cannot set up CURVE: {exc}") from None
        log.info("CURVE on: %d producers allowed from %s: %s", len(self._clients.names),
                 settings.curve_clients, ", ".join(sorted(self._clients.names.values())))

    def _spawn(self, name: str, target, *args) -> threading.Thread:
        thread = threading.Thread(target=self._guarded, args=(target, *args), name=name,
                                  daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

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

    def stop(self) -> bool:
        """Stop receiving; deliver for up to ``drain_sec``; give requests in flight
        GRACE_SEC to come back; stop the metrics and store threads; make sure the store
        holds what is still undelivered (in durable mode it does already), counting what
        it cannot take as lost; then write the final metrics. True if nothing was lost.
        Threads stuck in a request are left to die with the process (their messages are
        saved, marked in flight)."""
        log.info("stopping: no longer receiving; draining for up to %.1f s",
                 self.settings.drain_sec)
        try:
            self._wake.send(b"stop", zmq.NOBLOCK)
        except zmq.Again:
            pass  # the receiver is gone already
        for thread in self._intake_side:  # the receiver, then the intake
            thread.join()
        while self.outbox.unparsed:  # only if the receiver died before parsing them
            self._parse(PARSE_WHEN_IDLE)
        delivered = self.outbox.wait_empty(self.settings.drain_sec)
        self.outbox.close()
        if not delivered:
            log.info("drain time over; up to %.1f s for requests in flight to come back",
                     GRACE_SEC)
        if not self.outbox.wait_idle(GRACE_SEC):
            log.warning("requests still in flight after %.1f s: their messages are saved "
                        "and may be posted twice", GRACE_SEC)
        self.dead_letters.close()  # what failed is in the file before the final metrics
        self._stopping.set()
        self.store.wake()
        for thread in self._background:
            thread.join()
        held = self.outbox.holdings()
        lost = self._save(held)
        self.outbox.write_off(lost)
        self.store.close()
        self._write_metrics(saved=len(held.raws) - lost)
        for thread in self._threads[len(self._intake_side):]:
            thread.join(timeout=1.0)
        if self._exporter is not None:
            self._exporter.close()
        self._wake.close()
        if self._clients is not None:
            self._clients.stop()
        self._context.destroy(linger=0)
        if lost:
            log.error("stopped: %d messages LOST: the store could not take them (%s); %d "
                      "saved for the next start", lost, self.store.failure,
                      len(held.raws) - lost)
        else:
            log.info("stopped: %s; %d messages saved in %s for the next start",
                     "all delivered" if delivered else "drain time over", len(held.raws),
                     self.settings.store)
        return not lost

    def _save(self, held) -> int:
        """Make sure the store holds `held` (in durable mode it does, unless it failed);
        returns how many of its messages it does not: those are lost."""
        if self.store.flush() and all(map(self.store.stored, held.raws)):
            return 0
        if self.store.save_all(held):
            return 0
        return sum(not self.store.stored(raw) for raw in held.raws)

    def serve(self) -> bool:
        """Run until SIGTERM or SIGINT, then stop gracefully (returns what `stop` does);
        on SIGHUP, reload. The handlers only queue the signal: the work happens here, on
        the main thread, outside signal context."""
        previous = {sig: signal.signal(sig, lambda signum, _: self._requests.put(signum))
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            self.start()
            while self._requests.get() == signal.SIGHUP:
                self._hangup()
            return self.stop()
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
        poller.register(self._door.socket, zmq.POLLIN)
        receive_batch = self._receive_curve_batch if self._clients else self._receive_batch
        inline = not self.settings.durable  # no intake thread: parse here
        try:
            while True:
                # Inline, never sleep with envelopes to parse, and wake once a second
                # while drops wait to be reported; otherwise block until something comes.
                timeout = self._idle_timeout(not self.outbox.unparsed) if inline else None
                events = dict(poller.poll(None if timeout is None else timeout * 1000))
                if wake in events:
                    break
                if self._door.socket in events:
                    self._read_door()
                busy = receive_batch(pull)
                if inline:
                    self._digest(busy)
            while receive_batch(pull):  # what already arrived is taken too
                pass
            if inline:
                self._digest_all()
        finally:
            self._intake.close()
            self._door.close()
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
        full = len(frames) == RECEIVE_BATCH
        self._hand_over(frames, None, full)
        return full

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
        full = len(frames) + len(refused) == RECEIVE_BATCH
        self._hand_over(frames, producers, full)
        return full

    def _hand_over(self, frames: list[bytes], producers: list[str] | None, full: bool) -> None:
        """To the intake thread (an empty batch: the socket is empty, parse ahead), or
        without durable mode (or once that thread is gone: a bug) to the outbox."""
        if not (self.settings.durable and self._intake.put(frames, producers, more=full)):
            self._take_in(frames, producers)

    def _take_in(self, frames: list[bytes], producers: list[str] | None) -> None:
        """Hold what the socket gave. At the bound, parse before anything is dropped, so
        that junk never takes a valid message's place: first what is held unparsed (the
        junk leaves), then, if the newcomers still do not fit, the newcomers themselves
        (junk is never held; the valid ones make room by dropping the oldest waiting
        messages). Taking in slows to parsing speed while the queue is full; ZeroMQ's
        queues and the producers' own absorb that."""
        if not frames:
            return
        outbox = self.outbox
        while outbox.room < len(frames) and outbox.unparsed:
            self._parse(PARSE_WHEN_IDLE)
        if outbox.room >= len(frames):
            dropped, oversized = outbox.accept(frames, producers)
            for size, producer in oversized:
                self._log_rejection(envelope.too_large(size), b"", producer)
        else:
            senders = producers or [None] * len(frames)
            dropped = outbox.accept_parsed(frames, producers, [
                self._parse_one(data, producer) for data, producer in zip(frames, senders)])
        self._unreported_drops += dropped

    def _idle_timeout(self, parsed: bool) -> float | None:
        """How long the thread that parses may wait for envelopes: not at all with some
        to parse, a second while drops wait to be reported, else for ever."""
        return 0 if not parsed else 1.0 if self._unreported_drops else None

    def _digest(self, busy: bool) -> None:
        """Parse a few (the socket is busy) or more (it is not), report drops."""
        if self.outbox.unparsed:
            self._parse(PARSE_WHEN_BUSY if busy else PARSE_WHEN_IDLE)
        self._report_drops()

    def _digest_all(self) -> None:
        while self.outbox.unparsed:
            self._parse(PARSE_WHEN_IDLE)
        self._report_drops(final=True)

    # ------------------------------------------------------------------ intake

    def _intake_loop(self) -> None:
        """Commit and hold what the receiver took; parse when the socket is empty (a few
        per batch while a flood keeps it full); until the receiver is done."""
        intake = self._intake
        try:
            # While the socket is busy, wait for the next batch (parsing a few per batch).
            while (batch := intake.take(self._idle_timeout(
                    intake.busy or not self.outbox.unparsed))) is not None:
                self._take_in(*batch)
                self._digest(intake.busy)
            self._digest_all()
        finally:
            self._intake.close()

    def _parse(self, limit: int) -> None:
        """Parse what the outbox lends and give every envelope back, parsed or rejected,
        whatever happens: one bad envelope costs only itself."""
        lent = self.outbox.take_unparsed(limit)
        results, accepted = [], []
        try:
            for data, producer in lent:
                result = self._parse_one(data, producer)
                results.append(result)
                if not isinstance(result[0], str):
                    accepted.append((result[0].webhook_id, len(data)))
        finally:
            results.extend(("internal error while parsing", None)
                           for _ in lent[len(results):])
            self.outbox.add_parsed(results)
        for webhook_id, size in accepted:  # after the senders have the messages
            suppressed = self._accept_log.allow()
            if suppressed is not None:
                log.debug("accepted webhook=%s bytes=%d%s", webhook_id, size,
                          f" ({suppressed} accepted lines left out)" if suppressed else "")

    def _parse_one(self, data: bytes, producer: str | None
                   ) -> tuple[envelope.Message | str, bytes | None]:
        """(message, dedupe key or None), or (rejection reason, None). An unexpected
        exception is a bug in the parser: the envelope is rejected for it, and the first
        of each kind is logged with its traceback."""
        try:
            message = envelope.parse(data, self.settings.allowed_hosts)
            return message, dedupe_key(message) if self.settings.dedupe_window > 0 else None
        except envelope.EnvelopeError as exc:
            reason = exc.reason
        except Exception as exc:
            reason = f"internal error while parsing: {type(exc).__name__}"
            if type(exc) not in self._parser_bugs:
                self._parser_bugs.add(type(exc))
                log.exception("envelope rejected for a bug in the parser (further %s "
                              "errors are logged without a traceback); preview=%s",
                              type(exc).__name__, preview(data))
        self._log_rejection(reason, data, producer)
        return reason, None

    def _log_rejection(self, reason: str, data: bytes, producer: str | None = None) -> None:
        suppressed = self._reject_log.allow()
        if suppressed is not None:
            webhook = envelope.own_webhook_id(data)
            log.warning("rejected %s%sreason=%s preview=%s%s",
                        f"producer={producer} " if producer else "",
                        f"webhook={webhook} " if webhook else "", reason, preview(data),
                        f" ({suppressed} rejection lines left out)" if suppressed else "")

    def _read_door(self) -> None:
        """What the PULL socket's monitor saw: a connection libzmq dropped for a frame
        over the bound (what that producer queued behind it is lost with it), or a
        failed CURVE handshake (nothing of that producer gets in)."""
        for found in self._door.read():
            if isinstance(found, door.Oversized):
                suppressed = self._oversized_log.allow()
                if suppressed is not None:
                    log.warning("dropped the connection of producer=%s: a frame over %d bytes; "
                                "what it had queued behind that frame is lost with the "
                                "connection%s", found.producer, door.MAX_FRAME_BYTES,
                                f" ({suppressed} such lines left out)" if suppressed else "")
            elif self._clients is not None:
                suppressed = self._refusal_log.allow()
                if suppressed is not None:
                    log.warning("refused a connection: CURVE handshake failed, %s%s",
                                curve.handshake_failure(found.event, found.value),
                                f" ({suppressed} such lines left out)" if suppressed else "")

    def _report_drops(self, final: bool = False) -> None:
        if self._unreported_drops and (final or self._drop_log.allow() is not None):
            log.warning("dropped %d oldest messages: queue full (queue_max=%d)",
                        self._unreported_drops, self.settings.queue_max)
            self._unreported_drops = 0

    # ------------------------------------------------------------------ senders

    def _send_loop(self) -> None:
        sender = Sender(self.settings.request_deadline)
        try:
            while (job := self.outbox.next_job()) is not None:
                if job.items:
                    self.store.sending(job.raws)
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

    def _write_metrics(self, saved: int | None = None) -> None:
        now = time.time()
        snapshot = self.outbox.snapshot()
        snapshot.update(dead_letters=self.dead_letters.written,
                        dead_letters_rotated_out=self.dead_letters.rotated_out,
                        dead_letters_state=self.dead_letters.state,
                        dead_letters_reason=self.dead_letters.reason)
        store = self.store
        snapshot.update(durable=self.settings.durable, store_state=store.state,
                        store_reason=store.failure, store_skipped=store.skipped,
                        store_moved_aside="; ".join(store.moved_aside) or None,
                        **self._last_stop)
        oversized = self._door.oversized if self._door is not None else {}
        snapshot.update(oversized_disconnects=sum(oversized.values()), oversized_by_producer=[
            {"producer": name, "disconnects": count} for name, count in sorted(oversized.items())])
        self._summarize(snapshot, final=saved is not None)
        entries = metrics.entries(snapshot, now=now, started_at=self._started_at,
                                  pid=os.getpid(), interval=self.settings.metrics_interval,
                                  saved=saved, curve=self._clients is not None,
                                  insecure_bind=self._insecure)
        try:
            metrics.write(self.settings.metrics_file, metrics.render(entries))
        except OSError as exc:
            log.error("cannot write metrics to %s: %s", self.settings.metrics_file, exc)
        if self._exporter is not None:
            try:
                self._exporter.update(entries)
            except OSError as exc:
                log.error("cannot write Prometheus metrics to %s: %s",
                          self.settings.prometheus_file, exc)

    def _summarize(self, snapshot: dict, final: bool) -> None:
        elapsed = time.monotonic() - self._summarized_at
        if final or elapsed >= SUMMARY_EVERY_SEC:
            line = metrics.summary(self._summarized, snapshot, elapsed)
            if line is not None:
                log.info("%s", line)
            self._summarized, self._summarized_at = snapshot, time.monotonic()

    @property
    def _restored_producer(self) -> str | None:
        return RESTORED_PRODUCER if self._clients is not None else None

    def _restore(self, contents: Contents) -> None:
        """Take back what the store held (at start, or once it could be read): loss
        notices and facts are kept only for webhooks the relay may still post to."""
        allowed = self.settings.allowed_hosts
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
            self.outbox.restore(contents, self._restored_producer, stale=self._stale)
            log.info("restored %d messages from the store (%d possibly posted already: %s)%s",
                     len(contents.messages), len(contents.messages) if self._stale else
                     sum(item.in_flight for item in contents.messages),
                     "the last run's store had failed, so it may not know what that run "
                     "delivered" if self._stale else "they were in flight",
                     f"; {len(contents.overflow)} more dropped: over queue_max"
                     if contents.overflow else "")

    def _import_legacy(self) -> None:
        """What the previous version left (its pending file, its journal) goes into the
        store in one transaction, then is renamed ``*.imported``: delivered exactly once.
        One that cannot be read is moved aside; one the store cannot take waits for the
        next start."""
        for path in migrate.sources(self.settings.data_dir):
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
            self._restore(Contents(stored, [], legacy.notices, {}))
            log.info("imported %d messages and %d loss notices from %s (%d entries "
                     "unreadable); renamed %s.imported", len(stored), len(legacy.notices),
                     path, legacy.skipped, path.name)


def _previous_run(metrics_file) -> tuple[dict, bool]:
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


def _exporter(settings: Config):
    """The Prometheus exposition the settings ask for; RelayError if it cannot be had."""
    try:
        from notifier.prometheus import Exporter
    except ImportError:
        raise RelayError("Prometheus metrics need prometheus_client: pip install "
                         "'swimmy-notifier[prometheus]'", validate.OPERATOR) from None
    try:
        return Exporter(settings.prometheus_file, settings.metrics_listen)
    except OSError as exc:
        host, port = settings.metrics_listen
        raise RelayError(f"cannot serve metrics on {host}:{port}: {exc.strerror}",
                         validate.code_for(exc)) from None


def run(settings: Config) -> int:
    """``python -m notifier``: serve until signalled. Returns the exit code."""
    relay = Relay(settings)
    try:
        saved = relay.serve()
    except RelayError as exc:
        log.error("cannot start: %s", exc)
        return exc.code
    return 1 if relay.failed or not saved else 0
