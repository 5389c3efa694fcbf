"""The hand-off from the receiver thread to the intake thread.

The receiver only takes envelopes off the socket; the intake thread commits them to the
store (in durable mode), holds them in the outbox and parses them. While it commits, with
the GIL released inside SQLite, the receiver goes on receiving, and what piled up
meanwhile is committed in one transaction. At most `most` batches, and MOST_BYTES of
envelopes (a batch of large frames weighs much more than one of notifications), wait
here: beyond that the receiver waits too, and ZeroMQ's queues hold the rest, as they
would for a slow receiver. A message counts as received once the intake thread holds it (committed).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from notifier.admission import Admission

MOST_BATCHES = 8
"""Batches of up to 512 envelopes waiting for the intake thread at most."""
MOST_BYTES = 16 << 20
"""Bytes of envelopes waiting for the intake thread at most (one batch is let in
whatever its size)."""


class Intake:
    """Batches of (envelopes, producers or None) from one thread to another, in order."""

    def __init__(self, most: int = MOST_BATCHES):
        self._most = most
        self._batches: deque[tuple[list[bytes], list[str] | None]] = deque()
        self._bytes = 0  # of the envelopes in `_batches`
        self._closed = False
        self._changed = threading.Condition()
        self.more = False  # the last batch was full: the socket had more

    def put(self, frames: list[bytes], producers: list[str] | None = None,
            more: bool = False) -> bool:
        """Queue a batch (`more`: it was full, more waits in the socket; an empty one only
        says the socket is empty now), waiting while `most` wait already. False once
        closed (nothing was queued: the caller holds the batch itself)."""
        with self._changed:
            if not frames:
                if self.more:
                    self.more = False
                    self._changed.notify_all()
                return True
            while self._batches and (len(self._batches) >= self._most
                                     or self._bytes >= MOST_BYTES) and not self._closed:
                self._changed.wait()
            if self._closed:
                return False
            self.more = more
            self._batches.append((frames, producers))
            self._bytes += sum(map(len, frames))
            self._changed.notify_all()
            return True

    def take(self, timeout: float | None) -> tuple[list[bytes], list[str] | None] | None:
        """Every batch waiting, joined into one, waiting up to `timeout` (None: for
        ever) for one to come or the socket to be said empty: ([], None) when none
        came; None once closed and empty."""
        with self._changed:
            if not self._batches and not self._closed:
                self._changed.wait(timeout)
            if not self._batches:
                return None if self._closed else ([], None)
            batches = list(self._batches)
            self._batches.clear()
            self._bytes = 0
            self._changed.notify_all()
        frames = [frame for batch, _ in batches for frame in batch]
        if batches[0][1] is None:
            return frames, None
        return frames, [producer for _, producers in batches for producer in producers]

    @property
    def busy(self) -> bool:
        """Batches wait, or the receiver's last one said the socket had more."""
        return bool(self._batches) or self.more

    def close(self) -> None:
        """No more batches: `take` returns what is left, then None; `put` refuses."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class IntakeWorker:
    """The intake thread's unit (durable mode): commit and hold what the receiver took
    (`Admission.take_in`: the outbox commits it to the store), and parse when the socket
    is empty (a few per batch while a flood keeps it full); False once the receiver is
    done and everything is parsed."""

    def __init__(self, intake: Intake, admission: "Admission"):
        self.intake, self.admission = intake, admission

    def loop(self) -> bool:
        intake, admission = self.intake, self.admission
        # While the socket is busy, wait for the next batch (parsing a few per batch).
        batch = intake.take(admission.idle_timeout(intake.busy
                                                   or not admission.outbox.unparsed))
        if batch is None:
            admission.digest_all()
            return False
        admission.take_in(*batch)
        admission.digest(intake.busy, len(batch[0]))
        return True

    def close(self) -> None:
        self.intake.close()
