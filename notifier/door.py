"""The relay's ZeroMQ door: the PULL socket's bound on a frame, and what its monitor says.

libzmq reads a whole frame into memory before anyone can look at it: without a bound, one
400 MiB frame costs 400 MiB. `configure` sets ZMQ_MAXMSGSIZE to MAX_FRAME_BYTES, the
envelope cap plus SLACK (an envelope a little over the cap still arrives, and is refused
with its reason and counted). A larger frame makes libzmq drop that producer's
connection as soon as it has read the frame's header, before allocating anything:
everything the producer had queued behind the frame (in its socket, and on the wire) is
lost with the connection, and its PUSH socket reconnects.

libzmq does not say why it dropped a connection: its monitor reports a disconnect either
way. `Door` tells them apart. When a connection is accepted it keeps a duplicate of its
file descriptor, so that at the disconnect it can look: a producer that closed its
socket has sent end-of-file; a connection libzmq dropped while the producer was still
sending is still open. The second kind, after a handshake that did not fail (the
monitor reports a failed one just before its disconnect: one I/O thread writes both),
is an oversized frame (the only other cause would be a producer writing broken ZMTP),
counted per producer as `oversized_disconnects`. A disconnect the relay saw too late to
keep the descriptor (the connection came and went before the receiver thread read the
monitor) is not counted: the count is a floor.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Callable, NamedTuple

import zmq
import zmq.utils.monitor

from notifier.curve import HANDSHAKE_FAILURES
from notifier.envelope import MAX_ENVELOPE_BYTES

SLACK_BYTES = 16 * 1024
MAX_FRAME_BYTES = MAX_ENVELOPE_BYTES + SLACK_BYTES
"""The largest frame libzmq takes (ZMQ_MAXMSGSIZE); CURVE's framing adds 33 bytes."""

MAX_TRACKED = 1024
"""Connections whose descriptor is kept at once; past this, new ones are not tracked."""
MAX_PRODUCERS = 256  # producers counted one by one; others together under "(others)"

EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILURES


class Refused(NamedTuple):
    """A handshake that failed (the monitor's event and value)."""

    event: int
    value: int


class Oversized(NamedTuple):
    """A connection libzmq dropped for a frame over MAX_FRAME_BYTES, and its producer."""

    producer: str


def unnamed(address: str) -> None:
    """Without CURVE a producer has no name: its address names it."""
    return None


def configure(pull: zmq.Socket) -> None:
    """Bound the frames `pull` takes to MAX_FRAME_BYTES."""
    pull.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)


class Door:
    """The monitor of the relay's PULL socket (`socket`, to poll): `read` drains it and
    returns what the relay logs; `oversized` counts per producer. `name_at` names the
    producer connected from an address (with CURVE), else the address names it."""

    def __init__(self, pull: zmq.Socket, name_at: Callable[[str], str | None] = unnamed):
        self._pull = pull
        self.socket = pull.get_monitor_socket(EVENTS)
        self._name_at = name_at
        self._kept: dict[int, socket.socket] = {}  # libzmq's descriptor -> our duplicate
        self.oversized: dict[str, int] = {}

    def read(self) -> list[Refused | Oversized]:
        """Drain the monitor. A connection accepted and gone within one drain is not
        tracked: its descriptor may be another connection's by now."""
        events = []
        while self.socket.poll(0):
            message = zmq.utils.monitor.recv_monitor_message(self.socket, zmq.NOBLOCK)
            events.append((message["event"], message["value"]))
        gone = {value for event, value in events if event == zmq.EVENT_DISCONNECTED}
        found: list[Refused | Oversized] = []
        refused = False
        for event, value in events:
            if event == zmq.EVENT_ACCEPTED:
                if value not in gone:
                    self._keep(value)
            elif event == zmq.EVENT_DISCONNECTED:
                producer = self._dropped(value, refused)
                if producer is not None:
                    self._count(producer)
                    found.append(Oversized(producer))
                refused = False
            else:
                refused = True
                found.append(Refused(event, value))
        return found

    def _keep(self, fd: int) -> None:
        old = self._kept.pop(fd, None)
        if old is not None:
            old.close()
        if len(self._kept) >= MAX_TRACKED:
            return
        try:
            self._kept[fd] = socket.socket(fileno=os.dup(fd))
        except OSError:  # gone already
            pass

    def _dropped(self, fd: int, refused: bool) -> str | None:
        """The producer of a connection libzmq dropped while it was still open (after a
        handshake that did not fail), else None."""
        kept = self._kept.pop(fd, None)
        if kept is None:
            return None
        try:
            if refused:
                return None
            try:
                still_open = kept.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
            except BlockingIOError:
                still_open = True
            except OSError as exc:  # reset by the producer: it went away itself
                still_open = exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)
            if not still_open:
                return None
            address = _peer(kept)
            return self._name_at(address) or address
        finally:
            kept.close()  # the producer now sees the connection end, and reconnects

    def _count(self, producer: str) -> None:
        if producer not in self.oversized and len(self.oversized) >= MAX_PRODUCERS:
            producer = "(others)"
        self.oversized[producer] = self.oversized.get(producer, 0) + 1

    def close(self) -> None:
        for kept in self._kept.values():
            kept.close()
        self._kept.clear()
        self._pull.disable_monitor()
        self.socket.close()


def _peer(kept: socket.socket) -> str:
    """The producer's address (its host: a producer reconnects from a new port)."""
    try:
        return str(kept.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return "unknown address"
