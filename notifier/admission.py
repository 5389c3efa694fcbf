"""What comes in: envelopes held in the `Outbox`, parsed into messages or rejected, and
said in the log (bounded: a flood of bad input cannot flood it).

One `Admission` serves the thread that takes envelopes in: the receiver itself without
durable mode, the intake thread with it. Every envelope is given back to the outbox
parsed or rejected, whatever happens: one bad envelope, or a bug in the parser, costs
only itself.
"""

from __future__ import annotations

import logging
from collections import Counter
from itertools import repeat

from notifier import envelope, redaction
from notifier.arrivals import Verdict
from notifier.config import Config
from notifier.held import dedupe_key
from notifier.logs import Throttle
from notifier.outbox import Outbox

log = logging.getLogger("notifier.relay")  # the names operators grep: "notifier.relay rejected"

PARSE_WHEN_IDLE = 64  # envelopes parsed per turn when the socket is empty
PARSE_WHEN_BUSY = 2  # ... and when it is not, so delivery still makes progress
FLOOD_BATCH = 64
"""A batch this large says a flood is on: parsing (which takes the GIL from the
receiver) waits `FLOOD_PAUSE` for the next batch before it parses more than a few, so a
flood is taken off the socket first and parsed once it ends. A lone message is parsed at
once: idle latency does not move."""
FLOOD_PAUSE = 0.002
PREVIEW_CHARS = 80
VERDICTS_KEPT = 256
"""Parse results remembered by the envelope's bytes: a producer sending the same
envelope in a loop (a runaway alert, a broken frame) is parsed once, not at every copy."""
VERDICT_BYTES = 4096  # only envelopes this small are remembered: 1 MiB of them at most


def preview(data: bytes) -> str:
    """The start of a refused envelope for the log: one line (repr escapes every control
    character), token-free (hidden before the cut, and what the cut leaves of a run too:
    `redaction`)."""
    text = data[:PREVIEW_CHARS * 4].decode("utf-8", "replace")
    if len(data) > PREVIEW_CHARS * 4:
        text += redaction.CUT
    return repr(redaction.shorten(text, PREVIEW_CHARS))


class Admission:
    """Takes envelopes into the outbox and parses them, for one thread at a time."""

    def __init__(self, outbox: Outbox, settings: Config, remember: int = VERDICTS_KEPT):
        self.outbox = outbox
        self._allowed_hosts = settings.allowed_hosts
        self._dedupe = settings.dedupe_window > 0
        self._queue_max = settings.queue_max
        self._accept_log = Throttle(burst=20)
        self._reject_log = Throttle(burst=20)
        self._drop_log = Throttle(burst=1)
        self._unreported_drops = 0
        self._flood = False  # the last batch was FLOOD_BATCH or more
        self._parser_bugs: set[type] = set()  # kinds of parser exception logged already
        # What parsing gave for an envelope's bytes: parsing is a function of the bytes
        # and the settings alone, so the same bytes give the same message or reason.
        self._verdicts: dict[bytes, Verdict] = {}
        self._remember = remember  # how many (0: none, for tests to compare)

    def take_in(self, frames: list[bytes], producers: list[str] | None) -> None:
        """Hold `frames` (each from its producer, with CURVE); count and say what the
        outbox dropped to make room, or refused for its size. At the bound, parse before
        anything is dropped, so that junk never takes a valid message's place: first what
        is held unparsed (the junk leaves), then, if the newcomers still do not fit, the
        newcomers themselves (junk is never held; the valid ones make room by dropping
        the oldest waiting messages). Taking in slows to parsing speed while the queue is
        full; ZeroMQ's queues and the producers' own absorb that. A batch the outbox
        fails to take (a bug) is counted as rejected, and the error raised for the
        thread's supervisor to log."""
        if not frames:
            return
        outbox = self.outbox
        try:
            if self._verdicts:
                frames, producers = self._settle(frames, producers)
                if not frames:
                    return
            while outbox.room < len(frames) and outbox.unparsed:
                self.parse(PARSE_WHEN_IDLE)
            if outbox.room >= len(frames):
                dropped, oversized = outbox.accept(frames, producers)
            else:
                senders = producers or [None] * len(frames)
                dropped, oversized = outbox.accept_parsed(frames, producers, [
                    self._parse_one(data, producer)
                    for data, producer in zip(frames, senders)]), []
        except Exception as exc:  # a bug: the batch is counted, the thread says it
            outbox.refuse(producers or [None] * len(frames),
                          f"internal error while taking it in: {type(exc).__name__}")
            raise
        self._unreported_drops += dropped
        for size, producer in oversized:
            self.reject(envelope.too_large(size), b"", producer)

    def _settle(self, frames: list[bytes], producers: list[str] | None
                ) -> tuple[list[bytes], list[str] | None]:
        """Envelopes parsed before (the same bytes) that would be rejected or suppressed
        as duplicates are counted at once, alike ones together (`Outbox.settle`); the
        others are returned."""
        verdicts = self._verdicts
        if not any(map(verdicts.__contains__, frames)):  # (distinct envelopes' speed)
            return frames, producers
        alike = Counter(zip(frames, producers or repeat(None)))
        known = [(pair, verdict, count) for pair, count in alike.items()
                 if (verdict := verdicts.get(pair[0])) is not None]
        gone = set()
        for ((data, producer), verdict, count), settled in zip(known, self.outbox.settle(
                [(verdict, producer, count) for (_, producer), verdict, count in known])):
            if settled:
                gone.add((data, producer))
                if isinstance(verdict[0], str):
                    self.reject(verdict[0], data, producer, count)
        if len(gone) == len(alike):
            return [], producers and []
        keep = [i for i, pair in enumerate(zip(frames, producers or repeat(None)))
                if pair not in gone]
        return [frames[i] for i in keep], producers and [producers[i] for i in keep]

    def refuse(self, producers: list[str]) -> None:
        """Envelopes from producers whose keys were revoked (a connection admitted before
        still sends): counted as rejected, and said."""
        self.outbox.refuse(producers)
        for name in producers:
            self.reject("the producer's key is no longer allowed", b"", name)

    def idle_timeout(self, parsed: bool) -> float | None:
        """How long the thread that parses may wait for envelopes: not at all with some
        to parse (a moment during a flood), a second while drops wait to be reported,
        else for ever."""
        if not parsed:
            return FLOOD_PAUSE if self._flood else 0
        return 1.0 if self._unreported_drops else None

    def digest(self, busy: bool, taken: int) -> None:
        """After a batch of `taken` envelopes: parse a few (the socket is busy, or a
        flood is on) or more (it is idle), report drops."""
        self._flood = taken >= FLOOD_BATCH
        if self.outbox.unparsed:
            self.parse(PARSE_WHEN_BUSY if busy or self._flood else PARSE_WHEN_IDLE)
        self._report_drops()

    def digest_all(self) -> None:
        while self.outbox.unparsed:
            self.parse(PARSE_WHEN_IDLE)
        self._report_drops(final=True)

    def parse(self, limit: int) -> None:
        """Parse what the outbox lends and give every envelope back, parsed or rejected."""
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

    def _parse_one(self, data: bytes, producer: str | None) -> Verdict:
        """(message, dedupe key or None), or (rejection reason, None), said in the log;
        remembered for the same bytes (`VERDICTS_KEPT`)."""
        verdict = self._verdicts.get(data)
        if verdict is None:
            verdict = self._parse_new(data)
            verdicts = self._verdicts
            if len(data) <= VERDICT_BYTES and self._remember:
                if len(verdicts) >= self._remember:
                    del verdicts[next(iter(verdicts))]  # the oldest remembered
                verdicts[data] = verdict
        if isinstance(verdict[0], str):
            self.reject(verdict[0], data, producer)
        return verdict

    def _parse_new(self, data: bytes) -> Verdict:
        """`_parse_one` for bytes not seen lately. An unexpected exception is a bug in the
        parser: the envelope is rejected for it, and the first of each kind is logged
        with its traceback."""
        try:
            message = envelope.parse(data, self._allowed_hosts)
            return message, dedupe_key(message) if self._dedupe else None
        except envelope.EnvelopeError as exc:
            return exc.reason, None
        except Exception as exc:
            if type(exc) not in self._parser_bugs:
                self._parser_bugs.add(type(exc))
                log.exception("envelope rejected for a bug in the parser (further %s "
                              "errors are logged without a traceback); preview=%s",
                              type(exc).__name__, preview(data))
            return f"internal error while parsing: {type(exc).__name__}", None

    def reject(self, reason: str, data: bytes, producer: str | None = None,
               count: int = 1) -> None:
        """Say why an envelope was refused, or `count` alike ones (the outbox counts
        them)."""
        suppressed = self._reject_log.allow(count)
        if suppressed is not None:
            webhook = envelope.own_webhook_id(data)
            log.warning("rejected %s%sreason=%s preview=%s%s",
                        f"producer={producer} " if producer else "",
                        f"webhook={webhook} " if webhook else "", reason, preview(data),
                        f" ({suppressed} rejection lines left out)" if suppressed else "")

    def _report_drops(self, final: bool = False) -> None:
        if self._unreported_drops and (final or self._drop_log.allow() is not None):
            log.warning("dropped %d oldest messages: queue full (queue_max=%d)",
                        self._unreported_drops, self._queue_max)
            self._unreported_drops = 0
