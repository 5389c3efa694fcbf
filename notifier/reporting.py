"""The metrics thread's unit: a snapshot of everything the relay knows about itself,
written every interval to the metrics file (and the Prometheus exposition), with an INFO
line of what changed once a minute.

A snapshot gathers the outbox's counters and, for every file the relay writes, whether
the last write worked (`<name>_state`, `<name>_reason`: the store, the dead letters, the
log, the Prometheus text file, this file), and the threads: the sender threads alive, and
the errors the relay's own threads met and carried on from. A file that cannot be written
is reported here, never only in a line of the log.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

from notifier import files, logs, metrics
from notifier.config import Config
from notifier.deadletter import DeadLetters
from notifier.outbox import Outbox
from notifier.store import Store
from notifier.supervisor import Supervisor

log = logging.getLogger("notifier.relay")  # the summary line operators grep

SUMMARY_EVERY_SEC = 60.0  # the INFO line of what the relay did, instead of a line per message


class Reporter:
    """Writes the snapshot: every interval from the metrics thread (`loop`), and once
    more at the stop (`write_final`), which no late periodic write can overwrite."""

    def __init__(self, settings: Config, outbox: Outbox, store: Store,
                 dead_letters: DeadLetters, supervisor: Supervisor, *, curve: bool = False,
                 insecure_bind: bool = False,
                 carried: Callable[[], dict] = dict, clock: Callable[[], float] = time.time):
        self.settings, self.outbox, self.store = settings, outbox, store
        self.dead_letters, self.supervisor = dead_letters, supervisor
        self.exporter = None  # the Prometheus exposition, when the settings ask (at start)
        self._curve, self._insecure, self._carried, self._clock = curve, insecure_bind, \
            carried, clock
        self.oversized: dict[str, int] = {}  # the door's count per producer (at start)
        self._started_at = clock()
        self._file = files.WriteState("metrics file", settings.metrics_file)
        self._lock = threading.Lock()  # one write at a time; none after the final one
        self._final = False
        self._summarized: dict = {}  # the counters when the last summary line was logged
        self._summarized_at = time.monotonic()

    def loop(self) -> bool:
        """One interval: wait for it (or the stop), then write."""
        if not self.supervisor.stopping.wait(self.settings.metrics_interval):
            self.write()
        return True

    def write(self) -> None:
        self._write(None)

    def write_final(self, saved: int) -> None:
        """The last snapshot: ``state stopped``, `saved` messages left for the next start."""
        self._write(saved)

    def _write(self, saved: int | None) -> None:
        with self._lock:
            if self._final:
                return
            self._final = saved is not None
            snapshot = self.snapshot()
            self._summarize(snapshot, final=saved is not None)
            entries = metrics.entries(snapshot, now=self._clock(), started_at=self._started_at,
                                      pid=os.getpid(), interval=self.settings.metrics_interval,
                                      saved=saved, curve=self._curve,
                                      insecure_bind=self._insecure)
            with self._file:
                metrics.write(self.settings.metrics_file, metrics.render(entries))
            if self.exporter is not None:
                self.exporter.update(entries)

    def snapshot(self) -> dict[str, Any]:
        snapshot = self.outbox.snapshot()
        store, letters = self.store, self.dead_letters
        snapshot.update(durable=self.settings.durable, store_state=store.state,
                        store_reason=store.failure, store_skipped=store.skipped,
                        store_moved_aside="; ".join(store.moved_aside) or None,
                        dead_letters=letters.written, dead_letters_rotated_out=letters.rotated_out,
                        dead_letters_state=letters.state, dead_letters_reason=letters.reason,
                        metrics_state=self._file.state, metrics_reason=self._file.reason,
                        senders=self.settings.senders,
                        senders_alive=self.supervisor.alive("sender-"),
                        thread_errors=self.supervisor.errors, **self._carried())
        oversized = dict(self.oversized)  # the receiver thread adds to it
        snapshot.update(oversized_disconnects=sum(oversized.values()), oversized_by_producer=[
            {"producer": name, "disconnects": count} for name, count in sorted(oversized.items())])
        log_file = logs.file_state()
        if log_file is not None:
            snapshot.update(log_state=log_file[0], log_reason=log_file[1])
        if self.settings.prometheus_file is not None:
            snapshot.update(prometheus_state=self.exporter.file.state,
                            prometheus_reason=self.exporter.file.reason)
        return snapshot

    def _summarize(self, snapshot: dict, final: bool) -> None:
        elapsed = time.monotonic() - self._summarized_at
        if final or elapsed >= SUMMARY_EVERY_SEC:
            line = metrics.summary(self._summarized, snapshot, elapsed)
            if line is not None:
                log.info("%s", line)
            self._summarized, self._summarized_at = snapshot, time.monotonic()
