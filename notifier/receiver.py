"""The door: the PULL socket producers push to, and the receiver thread's unit.

The receiver polls the socket (no timeout while idle: no CPU) and drains it with
non-blocking receives, in batches of up to `RECEIVE_BATCH`. In durable mode each batch
goes to the intake thread (`Intake`), which commits it to the store while the receiver
goes on receiving; without durable mode there is nothing to overlap, and the receiver
takes the batch in and parses it itself (`Admission`).

With CURVE (`notifier.curve`) the socket admits only the producers whose keys are in
the clients directory, and each envelope is counted under its producer's name. The
socket's monitor (`notifier.door`) says which connections libzmq dropped for a frame
over its bound, and which failed the CURVE handshake.
"""

from __future__ import annotations

import logging

import zmq

from notifier import curve, door
from notifier.admission import Admission
from notifier.config import Config
from notifier.intake import Intake
from notifier.logs import Throttle
from notifier.supervisor import CannotGoOn
from notifier.validate import OPERATOR, StartError, code_for

log = logging.getLogger("notifier.relay")  # the names operators grep

RECEIVE_BATCH = 512  # envelopes taken off the socket per lock acquisition


def open_socket(context: zmq.Context, settings: Config
                ) -> tuple[zmq.Socket, curve.Clients | None]:
    """The PULL socket bound to the relay's endpoint, a CURVE server with its
    authenticator answering before the bind when the settings ask; StartError if not."""
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.IPV6, settings.ipv6)
    door.configure(pull)
    clients = None
    try:
        if settings.curve:
            public, secret = curve.load_secret(settings.curve_secret_key)
            clients = curve.Clients(context, settings.curve_clients)
            curve.set_server(pull, public, secret)
            log.info("CURVE on: %d producers allowed from %s: %s", len(clients.names),
                     settings.curve_clients, ", ".join(sorted(clients.names.values())))
        pull.bind(settings.endpoint)
    except (curve.CurveError, zmq.ZMQError) as exc:
        pull.close()
        if clients is not None:
            clients.stop()
        if isinstance(exc, curve.CurveError):  # changed since the start check
            raise StartError(f"cannot set up CURVE: {exc}", OPERATOR) from None
        raise StartError(f"cannot bind {settings.endpoint}: {exc}", code_for(exc)) from None
    return pull, clients


class Receiver:
    """Takes envelopes off `pull` (see the module); `loop` is one turn, False once woken
    by `wake` (the relay's stop) and what had arrived by then is taken too."""

    def __init__(self, context: zmq.Context, pull: zmq.Socket, clients: curve.Clients | None,
                 admission: Admission, intake: Intake | None):
        self._pull, self._clients, self._admission, self._intake = pull, clients, admission, \
            intake
        self.door = door.Door(pull, clients.name_at if clients else door.unnamed)
        address = f"inproc://relay-wake-{id(self)}"
        self._waker = context.socket(zmq.PAIR)  # the main thread's end
        self._waker.bind(address)
        self._woken = context.socket(zmq.PAIR)  # the receiver thread's end
        self._woken.connect(address)
        self._poller = zmq.Poller()
        for sock in (pull, self._woken, self.door.socket):
            self._poller.register(sock, zmq.POLLIN)
        self._receive_batch = self._receive_curve_batch if clients else self._receive_plain
        self._refusal_log = Throttle(burst=10, interval=60.0)
        self._oversized_log = Throttle(burst=10, interval=60.0)
        self._full = False  # the last batch was full: the socket may hold more

    def loop(self) -> bool:
        try:
            return self._turn()
        except zmq.ZMQError as exc:  # the socket itself failed, or a frame came without
            # the User-Id ZAP gives every frame it admitted: nothing more can be taken
            raise CannotGoOn(f"its socket failed: {exc}") from exc

    def _turn(self) -> bool:
        admission, inline = self._admission, self._intake is None
        # Inline, never sleep with envelopes to parse, and wake once a second while drops
        # wait to be reported; otherwise block until something comes, once the intake
        # thread knows the socket is empty (it parses only then: after a full batch, an
        # empty one tells it).
        timeout = admission.idle_timeout(not admission.outbox.unparsed) if inline \
            else 0 if self._full else None
        events = dict(self._poller.poll(None if timeout is None else timeout * 1000))
        if self._woken in events:
            while self._receive_batch() == RECEIVE_BATCH:  # what already arrived too
                pass
            if inline:
                admission.digest_all()
            return False
        if self.door.socket in events:
            self._read_door()
        taken = self._receive_batch()
        self._full = taken == RECEIVE_BATCH
        if inline:
            admission.digest(taken == RECEIVE_BATCH, taken)
        return True

    def wake(self) -> None:
        """From the main thread: stop receiving (the relay's stop)."""
        try:
            self._waker.send(b"stop", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the receiver is gone already
        self._waker.close()

    def close(self) -> None:
        """When the receiver thread ends, however it ends."""
        if self._intake is not None:
            self._intake.close()
        self.door.close()
        self._pull.close()
        self._woken.close()

    def _receive_plain(self) -> int:
        """Take up to RECEIVE_BATCH envelopes; how many (all: more may be waiting)."""
        frames: list[bytes] = []
        receive, append = self._pull.recv, frames.append
        try:
            for _ in range(RECEIVE_BATCH):
                append(receive(zmq.NOBLOCK))
        except zmq.Again:
            pass
        self._hand_over(frames, None, len(frames) == RECEIVE_BATCH)
        return len(frames)

    def _receive_curve_batch(self) -> int:
        """`_receive_plain` on a CURVE socket: each frame's ZAP User-Id (its client's
        key) names its producer, and what a connection admitted before its key was
        revoked still sends is refused. (A Frame costs about 1.4 µs more than plain bytes
        in pyzmq 27, hence this loop only with CURVE. A frame without a User-Id would mean
        ZAP never ran: Frame.get raises, and the relay stops rather than take it.)"""
        frames, producers, refused = [], [], []
        clients = self._clients
        receive, name_of = self._pull.recv, clients.names.get
        try:
            for _ in range(RECEIVE_BATCH):
                frame = receive(zmq.NOBLOCK, copy=False)
                user_id = frame.get("User-Id")
                name = name_of(user_id)
                if name is None:
                    refused.append(clients.former.get(user_id, f"key {user_id[:8]}…"))
                else:
                    frames.append(frame.bytes)
                    producers.append(name)
        except zmq.Again:
            pass
        if refused:
            self._admission.refuse(refused)
        taken = len(frames) + len(refused)
        self._hand_over(frames, producers, taken == RECEIVE_BATCH)
        return taken

    def _hand_over(self, frames: list[bytes], producers: list[str] | None, full: bool) -> None:
        """To the intake thread (an empty batch: the socket is empty, parse ahead), or
        without durable mode (or once that thread is gone) into the outbox here."""
        if self._intake is None or not self._intake.put(frames, producers, more=full):
            self._admission.take_in(frames, producers)

    def _read_door(self) -> None:
        """What the PULL socket's monitor saw: a connection libzmq dropped for a frame
        over the bound (what that producer queued behind it is lost with it), or a
        failed CURVE handshake (nothing of that producer gets in)."""
        for found in self.door.read():
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
