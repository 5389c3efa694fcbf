"""The relay service: ZeroMQ in, Discord out, never blocking a producer.

Each thread runs one unit's ``loop()`` step after step under the `Supervisor` (huey's
consumer is the model); decisions live in `Outbox`, `limits` and `discord`:

* receiver (`notifier.receiver`): takes envelopes off the PULL socket; in durable mode
  into the intake, otherwise into the outbox itself, and parses them (`Admission`);
* intake (`notifier.intake`, durable mode): commits what the receiver took to the store
  (several batches in one transaction while the receiver goes on receiving), holds it in
  the outbox, parses it;
* senders (`notifier.sender`, ``--senders``, default 8): post the next request a webhook
  may send and report the answer;
* metrics (`notifier.reporting`): the snapshot every interval, and the Prometheus text
  file; /metrics (`notifier.prometheus.Listener`), when asked;
* store (`notifier.store`): commits outcomes, notices a store removed or replaced, and
  gets a failed store back;
* the main thread (`Relay`, here): starts all that, then waits for signals
  (`notifier.signals`) and looks at the threads (`Supervisor.check`) between them, and
  stops. SIGTERM or SIGINT, or a thread that cannot go on, stops receiving, delivers what
  it can within ``--drain-sec``, gives requests in flight a short grace, makes sure the
  store holds what is still undelivered, writes the final metrics and returns (exit 1 if
  a thread failed or messages were lost). SIGHUP reopens the log file and re-reads the
  CURVE clients directory; it never stops the relay.

The store is locked first, before anything is written: a second relay on the same
store exits 2 without touching anything.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import zmq

from notifier import curve, files, logs, receiver, signals, validate
from notifier.admission import Admission
from notifier.config import Config
from notifier.deadletter import DeadLetters
from notifier.discord import RetryPolicy
from notifier.intake import Intake, IntakeWorker
from notifier.limits import Limits
from notifier.outbox import Outbox
from notifier.reporting import Reporter
from notifier.restore import Restorer
from notifier.sender import SenderWorker
from notifier.store import Contents, InUse, Store
from notifier.supervisor import Supervisor
from notifier.validate import OPERATOR, StartError

log = logging.getLogger("notifier.relay")

GRACE_SEC = 3.0
"""After the drain, how long requests still in flight get to come back: what Discord
answers in that time is recorded, so a delivered message is not saved and posted again."""
TICK_SEC = 1.0
"""How long the main thread waits for a signal before it looks at the threads again."""
JOIN_SEC = 5.0
"""The longest the stop waits for a thread that should end at once (the receiver, the
metrics thread...): the main thread never waits without a timeout."""


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
        self.admission = Admission(self.outbox, settings)
        self.supervisor = Supervisor()
        self._context = zmq.Context()
        self._receiver: receiver.Receiver | None = None
        self._clients: curve.Clients | None = None  # with CURVE
        self._listener = None  # notifier.prometheus.Listener, with a /metrics address
        self._insecure = (settings.insecure_bind and not settings.curve
                          and not curve.is_loopback(settings.bind_addr))
        self._restorer = Restorer(self.outbox, self.store, settings.allowed_hosts,
                                  settings.data_dir, curve=settings.curve)
        self.reporter = Reporter(settings, self.outbox, self.store, self.dead_letters,
                                 self.supervisor, curve=settings.curve,
                                 insecure_bind=self._insecure,
                                 carried=lambda: self._restorer.last_stop)

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Check that it can start (`validate.problems`), lock the store (another relay
        holding it: exit 2, nothing else touched), then bind, restore what the store
        holds and start the threads. StartError if it cannot."""
        found = validate.problems(self.settings, trial=False)
        if found:
            raise StartError("; ".join(problem.text for problem in found),
                             validate.exit_code(found))
        try:
            contents = self.store.open(self.settings.queue_max)
        except InUse as exc:
            raise StartError(str(exc), OPERATOR) from None
        try:
            self._start(contents)
        except BaseException:
            self.store.close()
            raise

    def _start(self, contents: Contents) -> None:
        settings, supervisor = self.settings, self.supervisor
        _make_directories(settings)
        exporter = None
        if settings.prometheus_file or settings.metrics_listen:
            exporter, self._listener = _exporter(settings)
        pull, self._clients = receiver.open_socket(self._context, settings)
        intake = Intake() if settings.durable else None
        self._receiver = receiver.Receiver(self._context, pull, self._clients, self.admission,
                                           intake)
        self._restorer.start(contents, settings.metrics_file)
        self.reporter.exporter, self.reporter.oversized = exporter, self._receiver.door.oversized
        supervisor.start("receiver", self._receiver)
        if intake is not None:
            supervisor.start("intake", IntakeWorker(intake, self.admission))
        for number in range(1, settings.senders + 1):
            worker = SenderWorker(self.outbox, self.store, settings.request_deadline)
            supervisor.start(f"sender-{number}", worker)
            supervisor.watch(f"the watchdog of sender-{number}", worker.sender.watchdog.alive)
        supervisor.start("metrics", self.reporter, background=True)
        supervisor.start("store", _StoreWorker(self), background=True)
        if self._listener is not None:
            supervisor.start("metrics-http", self._listener, background=True)
        self.reporter.write()  # the first snapshot, of a relay with all its threads
        supervisor.watch("the dead-letter writer thread", self.dead_letters.alive)
        if self._clients is not None:
            supervisor.watch("the CURVE authenticator thread (no producer can connect)",
                             self._clients.alive)
        log.info("relay started endpoint=%s curve=%s durable=%s queue_max=%d senders=%d "
                 "store=%s metrics=%s pid=%d", settings.endpoint,
                 "on" if self._clients else "off", "on" if settings.durable else "off",
                 settings.queue_max, settings.senders, settings.store, settings.metrics_file,
                 os.getpid())
        if self._insecure:
            log.warning("INSECURE: listening on %s without CURVE (SWIMMY_NOTIFIER_INSECURE_BIND"
                        "=1): anyone who reaches the port can post to the webhooks, and "
                        "webhook tokens cross the network in the clear", settings.bind_addr)

    # ------------------------------------------------------------------ run

    def serve(self, caught: signals.Signals) -> bool:
        """Start, run until SIGTERM or SIGINT or a thread that cannot go on, then stop
        gracefully (returns what `stop` does); on SIGHUP, reload. The signals come
        through `caught`, whichever thread the kernel gave them to; the work happens
        here, on the main thread, outside signal context."""
        self.start()
        while self.supervisor.check() is None:
            received = caught.wait(TICK_SEC)
            if signal.SIGHUP in received:
                self._hangup()
            if any(signum in signals.STOP for signum in received):
                break
        return self.stop()

    def _hangup(self) -> None:
        """SIGHUP: reopen the log file (after logrotate, or tried again at once if it had
        failed) and re-read the CURVE clients directory. Whatever goes wrong is logged;
        the relay runs on."""
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

    # ------------------------------------------------------------------ stop

    def stop(self) -> bool:
        """Stop receiving; deliver for up to ``drain_sec``; give requests in flight
        GRACE_SEC to come back; stop the metrics and store threads; make sure the store
        holds what is still undelivered (in durable mode it does already), counting what
        it cannot take as lost; then write the final metrics. True if nothing was lost.
        Every wait is bounded: a thread stuck in a request, or in a bug, is left to die
        with the process (its messages are saved, marked in flight)."""
        settings, supervisor, outbox = self.settings, self.supervisor, self.outbox
        log.info("stopping: no longer receiving; draining for up to %.1f s", settings.drain_sec)
        self._receiver.wake()
        self._join(["receiver", "intake"])
        if outbox.unparsed:  # only if the receiver or the intake died before parsing them
            self.admission.digest_all()
        delivered = outbox.wait_empty(settings.drain_sec)
        outbox.close()
        if not delivered:
            log.info("drain time over; up to %.1f s for requests in flight to come back",
                     GRACE_SEC)
        if not outbox.wait_idle(GRACE_SEC):
            log.warning("requests still in flight after %.1f s: their messages are saved "
                        "and may be posted twice", GRACE_SEC)
        self.dead_letters.close()  # what failed is in the file before the final metrics
        supervisor.stopping.set()
        self.store.wake()
        self._join(["metrics", "store", "metrics-http"])
        held = outbox.holdings()
        lost = self._save(held)
        outbox.write_off(lost)
        self.store.close()
        self.reporter.write_final(saved=len(held.raws) - lost)
        supervisor.join([f"sender-{n}" for n in range(1, settings.senders + 1)], 1.0)
        if self._listener is not None:
            self._listener.close()
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
                     settings.store)
        return not lost

    def _join(self, names: list[str]) -> None:
        stuck = self.supervisor.join(names, JOIN_SEC)
        if stuck:
            log.error("the %s thread%s did not end within %.0f s; stopping without",
                      ", ".join(stuck), "s" if len(stuck) > 1 else "", JOIN_SEC)

    def _save(self, held) -> int:
        """Make sure the store holds `held` (in durable mode it does, unless it failed);
        returns how many of its messages it does not: those are lost."""
        if self.store.flush() and all(map(self.store.stored, held.raws)):
            return 0
        if self.store.save_all(held):
            return 0
        return sum(not self.store.stored(raw) for raw in held.raws)


class _StoreWorker:
    """The store thread's unit: `Store.run` until the stop (entered again after an error
    the supervisor logged)."""

    def __init__(self, relay: Relay):
        self._relay = relay

    def loop(self) -> None:
        relay = self._relay
        relay.store.run(relay.supervisor.stopping,
                        lambda: relay.outbox.holdings(everything=relay.settings.durable),
                        relay._restorer.restore)


def _make_directories(settings: Config) -> None:
    """The directories of the files the relay writes, and no temp file a killed run left."""
    try:
        for path in (settings.metrics_file, settings.dead_letter_file,
                     settings.prometheus_file):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                files.remove_stale_temps(path)
    except OSError as exc:
        raise StartError(f"cannot use the data directory: {exc}",
                         validate.code_for(exc)) from None


def _exporter(settings: Config):
    """The Prometheus exposition the settings ask for, and its /metrics listener when
    asked; StartError if they cannot be had."""
    try:
        from notifier.prometheus import Exporter, Listener
    except ImportError:
        raise StartError("Prometheus metrics need prometheus_client: pip install "
                         "'swimmy-notifier[prometheus]'", OPERATOR) from None
    exporter = Exporter(settings.prometheus_file)
    if settings.metrics_listen is None:
        return exporter, None
    try:
        return exporter, Listener(settings.metrics_listen, exporter.exposition)
    except OSError as exc:
        host, port = settings.metrics_listen
        raise StartError(f"cannot serve metrics on {host}:{port}: {exc.strerror}",
                         validate.code_for(exc)) from None


def run(settings: Config, caught: signals.Signals) -> int:
    """``python -m notifier``: serve until signalled. Returns the exit code: 0, 1 if a
    thread could not go on or messages were lost, the start's code if it could not."""
    relay = Relay(settings)
    try:
        saved = relay.serve(caught)
    except StartError as exc:
        log.error("cannot start: %s", exc)
        return exc.code
    finally:
        caught.ignore()
    return 1 if relay.supervisor.failure or not saved else 0
