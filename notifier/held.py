"""The messages the relay holds, within its bound: which are dropped to make room, and
which are suppressed as duplicates.

Everything held counts against `queue_max`: envelopes not parsed yet (the newest),
those lent to the receiver for parsing, and the parsed messages waiting in the lanes or
being sent. When full, the oldest waiting message is dropped first (parsed ones are
older than raw ones); a message being sent or parsed is never dropped, so when nothing
else is left the newcomers are refused instead. (The relay parses what it holds, and
the newcomers, before it gets here at the bound: an envelope dropped unparsed is rare,
charged to the webhook its own field names, `envelope.own_webhook_id`.)
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict, deque
from typing import Iterable, NamedTuple

from notifier.envelope import Message

DEDUPE_MAX_ENTRIES = 10_000
"""Most payloads remembered for duplicate suppression; past this the oldest are
forgotten early, so a flood of distinct messages cannot grow memory."""


def dedupe_key(message: Message) -> bytes:
    """Same webhook and thread (however the URL spells them) and same payload (key order
    aside) give the same 16 bytes."""
    text = json.dumps(message.payload, sort_keys=True, separators=(",", ":"))
    where = f"{message.key}\0{message.thread}"
    return hashlib.blake2b(f"{where}\0{text}".encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


class Raw:
    """An envelope taken off the socket (or restored), and its progress."""

    __slots__ = ("data", "received_at", "sid", "part", "attempts", "in_flight", "producer")

    def __init__(self, data: bytes, received_at: float, sid: int | None = None,
                 part: int = 0, attempts: int = 0, producer: str | None = None):
        self.data = data  # kept as received: what the store keeps and a restart parses
        self.received_at = received_at  # monotonic
        self.sid = sid  # its id in the store, while the store has it
        self.part = part  # requests of it already delivered
        self.attempts = attempts  # attempts made on its next request
        self.in_flight = False  # a request of it is (or, after a crash, was) being posted
        self.producer = producer  # its CURVE certificate name, None without CURVE


class Held:
    """One accepted, parsed message and what the relay knows of it."""

    __slots__ = ("seq", "message", "key", "raw")

    def __init__(self, seq: int, message: Message, key: bytes | None, raw: Raw):
        self.seq = seq
        self.message = message
        self.key = key  # its dedupe key, forgotten if it is lost so a resend goes out
        self.raw = raw  # the envelope, its store id and its progress

    @property
    def received_at(self) -> float:
        return self.raw.received_at

    @property
    def remaining(self) -> tuple[dict, ...]:
        """The requests still to post (at least the last one, whatever a saved part
        number says)."""
        requests = self.message.requests
        return requests[min(self.raw.part, len(requests) - 1):]


class Room(NamedTuple):
    """What making room took: waiting messages dropped (with the queue each was in),
    raw envelopes dropped, and newcomers refused because nothing else could go."""

    dropped: list[tuple[object, Held]]
    dropped_raw: list[Raw]
    refused: list[Raw]


class Holding:
    """The bound and the messages not in a lane: raw envelopes and those lent for parsing.
    `count` is every message held, lanes included; the caller keeps it right with
    `release` as messages leave."""

    def __init__(self, queue_max: int):
        self.queue_max = queue_max
        self.count = 0
        self.raw: deque[Raw] = deque()
        self.lent: deque[Raw] = deque()  # taken by the receiver to parse, not back yet
        self._seq = 0

    def admit(self, raws: list[Raw], lanes: Iterable) -> Room:
        """Hold `raws` within the bound, dropping the oldest waiting messages of `lanes`
        (objects with a `waiting` deque of Held), then the oldest raw envelopes, to make
        room; newcomers are refused only when nothing else can go."""
        room = Room(*self.make_room(len(raws), lanes, drop_raw=True), [])
        short = self.count + len(raws) - self.queue_max
        if short > 0:
            room.refused.extend(raws[:short])
            raws = raws[short:]
        self.count += len(raws)
        self.raw.extend(raws)
        return room

    def make_room(self, newcomers: int, lanes: Iterable, drop_raw: bool = False
                  ) -> tuple[list[tuple[object, Held]], list[Raw]]:
        """Make room for `newcomers` within the bound: drop the oldest waiting messages
        of `lanes`, then (`drop_raw`) the oldest raw envelopes. Returns both; what room
        is still short, nothing else could give."""
        excess = self.count + newcomers - self.queue_max
        if excess <= 0:
            return [], []
        dropped = self._drop_waiting(excess, list(lanes))
        raw = self.raw
        dropped_raw = [raw.popleft() for _ in range(min(excess - len(dropped), len(raw)))] \
            if drop_raw else []
        self.count -= len(dropped) + len(dropped_raw)
        return dropped, dropped_raw

    @staticmethod
    def _drop_waiting(count: int, lanes: list) -> list[tuple[object, Held]]:
        dropped = []
        while len(dropped) < count:
            oldest = None
            for lane in lanes:
                if lane.waiting and (oldest is None
                                     or lane.waiting[0].seq < oldest.waiting[0].seq):
                    oldest = lane
            if oldest is None:
                break
            dropped.append((oldest, oldest.waiting.popleft()))
        return dropped

    def lend(self, limit: int) -> list[Raw]:
        """Up to `limit` raw envelopes, oldest first, to parse; held (and not droppable)
        until `give_back`."""
        raw = self.raw
        lent = [raw.popleft() for _ in range(min(limit, len(raw)))]
        self.lent.extend(lent)
        return lent

    def give_back(self) -> Raw:
        """The next envelope lent, in the order lent."""
        return self.lent.popleft()

    def parsed(self, message: Message, key: bytes | None, raw: Raw) -> Held:
        self._seq += 1
        return Held(self._seq, message, key, raw)

    def release(self, count: int) -> None:
        """`count` messages left (delivered, failed, rejected, suppressed)."""
        self.count -= count

    def unparsed(self) -> list[Raw]:
        """The raw envelopes held, oldest first."""
        return [*self.lent, *self.raw]


class Dedupe:
    """Payloads sent to each webhook within the last `window` seconds (16-byte keys, at
    most DEDUPE_MAX_ENTRIES)."""

    def __init__(self, window: float):
        self.window = window
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def seen(self, key: bytes, now: float) -> bool:
        """Whether an identical payload went to the same webhook within the window (and
        remember this one)."""
        if self.recent(key, now):
            return True
        self._seen[key] = now
        return False

    def recent(self, key: bytes, now: float) -> bool:
        """`seen` without remembering this one."""
        seen = self._seen
        horizon = now - self.window
        while seen and (next(iter(seen.values())) < horizon or len(seen) >= DEDUPE_MAX_ENTRIES):
            seen.popitem(last=False)
        return key in seen

    def forget(self, held: Held) -> None:
        """A lost message no longer counts as seen: the producer's resend must go out."""
        if held.key is not None:
            self._seen.pop(held.key, None)
