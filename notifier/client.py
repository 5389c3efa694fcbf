"""Producer client: hand notifications to the relay over ZeroMQ and move on at once.

A producer keeps one `NotifierClient`, a PUSH socket connected to the relay's PULL
socket, and calls `send` (or `notify`) for each notification. Every send is
non-blocking: ZeroMQ queues up to the high-water mark (SNDHWM) while the relay is slow
or briefly down (ZMQ_IMMEDIATE is deliberately not set, so a relay restart loses nothing
below that mark), and once that queue is full a notification is dropped and counted
instead of blocking the trading loop. Any other ZeroMQ error is counted and the socket
replaced on the next send. Mistakes of the caller (a payload with no JSON form, a
webhook the relay would refuse) raise at once, before anything is queued, and are not
counted.

Each notification is one canonical envelope, as the Lisp producer prints it::

    ((type . "NOTIFIER") (schema_version . 1) (action . "SEND")
     (webhook . "https://discord.com/api/webhooks/<id>/<token>")
     (payload_json . "{\\"content\\":\\"hello\\"}"))

With `server_key` and `client_key` (certificate files, see ``python -m notifier
keygen``) the socket is a CURVE client: encrypted, and admitted by a relay whose
clients directory holds this producer's public certificate.

`add_send_parser` adds ``python -m notifier send`` for operators and scripts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from notifier import config, curve, envelope, sexp

__all__ = ["NotifierClient", "DEFAULT_ENDPOINT", "DEFAULT_LINGER_MS", "WEBHOOK_ENV",
           "build_envelope", "message_payload", "add_send_parser", "send_command"]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5562"

DEFAULT_LINGER_MS = 500
"""How long `NotifierClient.close` lets queued notifications reach the relay before
discarding them. A local relay that is up takes them in well under a millisecond; one
that is down must not hold up a producer's shutdown for longer than this."""

WEBHOOK_ENV = "SWIMMY_DISCORD_WEBHOOK"
"""Environment variable ``python -m notifier send`` takes the webhook from when
``--webhook`` is not given (a flag is visible to every user through ``ps``)."""

_TIMER_SLACK = 0.01  # libzmq's linger timer may fire up to its 1 ms clock cache early

logger = logging.getLogger(__name__)


def message_payload(content: str | None = None, *, title: str | None = None,
                    description: str | None = None, color: int | None = None) -> dict:
    """A Discord message object: `content` as text, the rest as one embed."""
    payload: dict[str, Any] = {}
    if content is not None:
        payload["content"] = content
    if title is not None or description is not None:
        embed = {"title": title, "description": description, "color": color}
        payload["embeds"] = [{key: value for key, value in embed.items() if value is not None}]
    elif color is not None:
        raise ValueError("color needs a title or a description")
    return payload


def build_envelope(webhook: str, payload: dict) -> bytes:
    """The canonical envelope for `payload`. Raises TypeError or ValueError for a payload
    with no JSON form (a set, NaN...): the caller's bug, better seen now than never."""
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict (a Discord message object), "
                        f"not {type(payload).__name__}")
    try:
        payload_json = json.dumps(payload, ensure_ascii=False, allow_nan=False,
                                  separators=(",", ":"))
    except RecursionError:
        raise ValueError(f"payload nested deeper than {envelope.MAX_NESTING} levels") from None
    return sexp.dumps({"type": "NOTIFIER", "schema_version": 1, "action": "SEND",
                       "webhook": webhook, "payload_json": payload_json}).encode("utf-8")


def _bytes(data: bytes | str) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if not isinstance(data, bytes):
        raise TypeError(f"an envelope is bytes or str, not {type(data).__name__}")
    return data


class NotifierClient:
    """Push notifications to the relay at `endpoint` without ever blocking.

    `send` returns True when the notification is queued for the relay, False when it
    was dropped (the high-water mark `sndhwm` is full: the relay is down or far behind)
    or failed (any other ZeroMQ error; the socket is closed and the next send connects
    a new one). None of these raises. `sent`, `dropped` and `errors` count the outcomes, and
    every call lands in exactly one of them; `stats()` reads all three at once.

    `webhook` is the default destination; it and every per-call webhook are checked as
    the relay checks them (Discord's hosts only, plus `allowed_hosts` pairs such as
    ``(("127.0.0.1", 8099),)`` for local stand-ins), and the whole envelope is validated
    by the relay's own parser, so a notification the relay would refuse raises
    `ValueError` here instead, with the token left out of the message.

    Thread safety: one client may be shared by any number of threads. A lock guards the
    socket (ZeroMQ sockets must not be used by two threads at once) and the counters;
    each send holds it only for one non-blocking send, or after an error for creating
    and connecting a new socket, which does not wait for the network either.

    Without a `context`, the client owns one and `close` terminates it, waiting at most
    `linger_ms` for queued notifications to reach the relay. With a `context`, `close`
    only closes the socket, and terminating the context is the caller's (it then waits
    at most `linger_ms` too). The constructor connects at once, so a malformed endpoint
    raises `zmq.ZMQError` there.

    `server_key` (the relay's public certificate) and `client_key` (this producer's
    secret certificate, mode 0600) make it a CURVE client; a missing, unreadable or
    loosely protected file raises `curve.CurveError` here.

    `on_socket` is called with each new socket before it connects (the send command
    watches its handshake). `immediate` queues only on a completed connection (ZeroMQ's
    IMMEDIATE), for operator commands that must not queue for a relay that is not there.
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, webhook: str | None = None,
                 allowed_hosts: tuple[tuple[str, int | None], ...] = (),
                 context: zmq.Context | None = None, sndhwm: int = 1000,
                 linger_ms: int = DEFAULT_LINGER_MS, server_key: os.PathLike | str | None = None,
                 client_key: os.PathLike | str | None = None,
                 on_socket: Callable[[zmq.Socket], None] | None = None,
                 immediate: bool = False):
        if sndhwm < 1:  # 0 would mean no bound at all
            raise ValueError(f"sndhwm must be at least 1, got {sndhwm}")
        if linger_ms < 0:  # -1 would let close() wait forever for a dead relay
            raise ValueError(f"linger_ms must be 0 or more, got {linger_ms}")
        self.endpoint = endpoint
        self._allowed_hosts = tuple(allowed_hosts)
        self._webhook = (None if webhook is None
                         else envelope.check_webhook(webhook, self._allowed_hosts))
        self._sndhwm = sndhwm
        self._linger_ms = linger_ms
        self._on_socket = on_socket
        self._immediate = immediate
        if (server_key is None) != (client_key is None):
            raise ValueError("CURVE needs both server_key and client_key")
        self._curve = None if server_key is None else (
            curve.load_public(Path(server_key)), *curve.load_secret(Path(client_key)))
        self._owns_context = context is None
        self._context = zmq.Context() if context is None else context
        self._lock = threading.Lock()  # guards everything below
        self._sent = self._dropped = self._errors = 0
        self._dropping = False  # since the last drop, nothing was queued
        self._closed = False
        try:
            self._socket: zmq.Socket | None = self._open()
        except BaseException:
            if self._owns_context:
                self._context.term()
            raise

    def send(self, payload: dict, webhook: str | None = None) -> bool:
        """Queue `payload` (a Discord message object) for `webhook` or the default one."""
        webhook = self._webhook if webhook is None else webhook
        if webhook is None:
            raise ValueError("no webhook: pass webhook= to send() or to NotifierClient()")
        data = build_envelope(webhook, payload)
        envelope.parse(data, self._allowed_hosts)  # what the relay would refuse, refused now
        return self._push(data)

    def notify(self, content: str | None = None, *, title: str | None = None,
               description: str | None = None, color: int | None = None,
               webhook: str | None = None) -> bool:
        """Queue a text message and/or one embed (`title`, `description`, `color`)."""
        return self.send(message_payload(content, title=title, description=description,
                                         color=color), webhook)

    def send_envelope(self, data: bytes | str) -> bool:
        """Queue a ready-made envelope exactly as given, unchecked (relaying, tests)."""
        return self._push(_bytes(data))

    def send_envelope_waiting(self, data: bytes | str, timeout: float) -> bool:
        """`send_envelope`, but waiting up to `timeout` seconds for room in the queue
        instead of dropping at once: for operator commands (``replay``) that must hand
        over every envelope, never for a producer's loop. Other threads' sends wait
        meanwhile (the lock is held)."""
        return self._push(_bytes(data), timeout)

    def _push(self, data: bytes, timeout: float | None = None) -> bool:
        level, note = logging.WARNING, None
        with self._lock:
            if self._closed:
                raise ValueError("send on a closed NotifierClient")
            try:
                if self._socket is None:
                    self._socket = self._open()
                if timeout is None:
                    self._socket.send(data, zmq.NOBLOCK)
                else:
                    self._socket.setsockopt(zmq.SNDTIMEO, max(0, round(timeout * 1000)))
                    try:
                        self._socket.send(data)
                    finally:
                        self._socket.setsockopt(zmq.SNDTIMEO, -1)
            except zmq.Again:
                queued = False
                self._dropped += 1
                if not self._dropping:
                    self._dropping = True
                    note = (f"the relay at {self.endpoint} is not taking notifications "
                            f"(high-water mark of {self._sndhwm} reached): dropping them")
            except zmq.ZMQError as exc:
                queued = False
                self._errors += 1
                self._discard()
                note = f"sending to {self.endpoint} failed ({exc}); reconnecting on the next send"
            else:
                queued = True
                self._sent += 1
                if self._dropping:
                    self._dropping = False
                    level, note = logging.INFO, (
                        f"the relay at {self.endpoint} takes notifications again "
                        f"({self._dropped} dropped in all)")
        if note:  # logged outside the lock: a log handler may block
            logger.log(level, "%s", note)
        return queued

    def _open(self) -> zmq.Socket:
        """A new PUSH socket, connecting in the background (connect does not wait)."""
        socket = self._context.socket(zmq.PUSH)
        try:
            socket.setsockopt(zmq.SNDHWM, self._sndhwm)
            socket.setsockopt(zmq.LINGER, self._linger_ms)
            socket.setsockopt(zmq.IPV6, "[" in self.endpoint)  # tcp://[::1]:5562
            socket.setsockopt(zmq.IMMEDIATE, self._immediate)
            if self._curve is not None:
                curve.set_client(socket, *self._curve)
            if self._on_socket is not None:
                self._on_socket(socket)
            socket.connect(self.endpoint)
        except zmq.ZMQError:
            socket.close(linger=0)
            raise
        return socket

    def _discard(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    @property
    def sent(self) -> int:
        """Notifications queued for the relay."""
        with self._lock:
            return self._sent

    @property
    def dropped(self) -> int:
        """Notifications dropped because the high-water mark was full."""
        with self._lock:
            return self._dropped

    @property
    def errors(self) -> int:
        """Sends that failed with a ZeroMQ error other than a full queue."""
        with self._lock:
            return self._errors

    def stats(self) -> dict[str, int]:
        """The three counters, read together."""
        with self._lock:
            return {"sent": self._sent, "dropped": self._dropped, "errors": self._errors}

    def close(self) -> None:
        """Close the socket; queued notifications get at most `linger_ms` to leave.
        Sending afterwards raises ValueError. Closing twice does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            socket, self._socket = self._socket, None
        if socket is not None:
            socket.close()  # with the LINGER option set in _open
        if self._owns_context:
            self._context.term()  # returns once queued messages left, or linger ran out

    def __enter__(self) -> NotifierClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        webhook = envelope.redact(self._webhook) if self._webhook else None
        counts = " ".join(f"{key}={value}" for key, value in self.stats().items())
        return f"<NotifierClient {self.endpoint} webhook={webhook} {counts}>"


# ------------------------------------------------------------------------ command line

def _color(text: str) -> int:
    try:
        value = int(text[1:], 16) if text.startswith("#") else int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a colour (3447003, 0x3498db "
                                         "or #3498db)") from None
    if not 0 <= value <= 0xFFFFFF:
        raise argparse.ArgumentTypeError(f"{text!r} is not a 24-bit RGB colour")
    return value


def wait_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.1 <= value <= 600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0.1 to 600")
    return value


def add_send_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``send`` on `commands` (the object ``add_subparsers()`` returns)."""
    parser = commands.add_parser(
        "send", help="send one notification through the relay",
        description="Send one notification through the relay and wait (at most --wait-sec) "
                    "until the relay has taken it: exit 0 when it has, 1 when it has not "
                    "(the notification is then discarded), 2 for a usage or setting error. "
                    "CONTENT is the message text; --title, --description and --color make "
                    "an embed; --json gives the whole Discord message object instead; "
                    "--file sends a ready-made envelope as is, after checking it.")
    parser.add_argument("content", nargs="*", metavar="CONTENT",
                        help="message text (several words are joined with spaces)")
    parser.add_argument("--webhook", metavar="URL",
                        help=f"Discord webhook URL [{WEBHOOK_ENV}]; prefer the variable, "
                             "since a command line is visible to other users")
    parser.add_argument("--endpoint", metavar="tcp://HOST:PORT",
                        help="the relay's endpoint (default: from --bind-addr and --port)")
    config.add_arguments(parser, ("port", "bind_addr", "allowed_hosts", "curve_server_key",
                                  "curve_client_key"))
    parser.add_argument("--title", help="embed title")
    parser.add_argument("--description", help="embed text")
    parser.add_argument("--color", type=_color, metavar="RGB",
                        help="embed colour: 3447003, 0x3498db or #3498db")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--json", metavar="PAYLOAD_JSON",
                        help='the Discord message object as JSON, e.g. \'{"content": "hi"}\'')
    source.add_argument("--file", metavar="ENVELOPE_FILE",
                        help="send this envelope file ('-': standard input) exactly as it is")
    parser.add_argument("--wait-sec", type=wait_seconds, default=2.0, metavar="S",
                        help="how long to wait for the relay to take it (default: 2)")
    parser.set_defaults(run=send_command)
    return parser


_WILDCARDS = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def relay_endpoint(settings: config.Config) -> str:
    """Where the relay configured by `settings` listens; a relay bound to every
    interface is reached on loopback."""
    bind_addr = _WILDCARDS.get(settings.bind_addr, settings.bind_addr)
    return dataclasses.replace(settings, bind_addr=bind_addr).endpoint


def _read_envelope(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(envelope.MAX_ENVELOPE_BYTES + 1)
    with open(path, "rb") as handle:
        return handle.read(envelope.MAX_ENVELOPE_BYTES + 1)


def _cli_envelope(args: argparse.Namespace, webhook: str | None) -> bytes:
    """The envelope the command line asks for. Raises ValueError for a usage error."""
    text = " ".join(args.content) or None
    embed = (args.title, args.description, args.color) != (None, None, None)
    if args.file is not None:
        if text or embed or args.webhook:
            raise ValueError("--file sends the envelope as it is: no CONTENT, --webhook, "
                             "--title, --description or --color with it")
        return _read_envelope(args.file)
    if webhook is None:
        raise ValueError(f"no webhook: pass --webhook or set {WEBHOOK_ENV}")
    if args.json is not None:
        if text or embed:
            raise ValueError("--json is the whole message: no CONTENT, --title, "
                             "--description or --color with it")
        return build_envelope(webhook, json.loads(args.json))
    if not (text or embed):
        raise ValueError("nothing to send: give CONTENT, --title or --description, "
                         "--json or --file")
    return build_envelope(webhook, message_payload(
        text, title=args.title, description=args.description, color=args.color))


def _handshake(monitor: zmq.Socket, timeout: float) -> str | None:
    """"ok" once the connection's first handshake succeeded, why it failed, or None
    when nothing answered within `timeout` (no relay there)."""
    if not monitor.poll(timeout * 1000):
        return None
    event = recv_monitor_message(monitor)
    if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return "ok"
    return curve.handshake_failure(event["event"], event["value"])


def send_command(args: argparse.Namespace) -> int:
    """``python -m notifier send``: queue one notification, then wait (bounded) for the
    relay to take it, because ZeroMQ sends asynchronously and this process exits next."""
    def fail(message: Any, code: int) -> int:
        print(f"notifier send: {envelope.scrub(str(message))}", file=sys.stderr)
        return code

    try:
        settings = config.load(os.environ, vars(args))
    except config.ConfigError as exc:
        return fail(exc, 2)
    endpoint = args.endpoint or relay_endpoint(settings)
    try:
        data = _cli_envelope(args, args.webhook or os.environ.get(WEBHOOK_ENV) or None)
        message = envelope.parse(data, settings.allowed_hosts)
    except envelope.EnvelopeError as exc:
        return fail(f"rejected: {exc.reason}", 2)
    except RecursionError:  # json.loads of a deeply nested --json
        return fail(f"rejected: nesting deeper than {envelope.MAX_NESTING} levels", 2)
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        return fail(exc, 2)
    except OSError as exc:
        return fail(f"cannot read {args.file}: {exc.strerror}", 2)
    linger_ms = round(args.wait_sec * 1000)
    watched: list[tuple[zmq.Socket, zmq.Socket]] = []  # (socket, its monitor)

    def unwatch() -> None:  # before the context terminates, or termination hangs
        for socket, monitor in watched:
            if not socket.closed:
                socket.disable_monitor()
            monitor.close(linger=0)

    # The context is ours, not the client's, so that the monitors close before it ends.
    context = zmq.Context()
    try:
        client = NotifierClient(endpoint, allowed_hosts=settings.allowed_hosts,
                                context=context, linger_ms=linger_ms,
                                server_key=settings.curve_server_key,
                                client_key=settings.curve_client_key,
                                on_socket=lambda s: watched.append((s, s.get_monitor_socket(
                                    zmq.EVENT_HANDSHAKE_SUCCEEDED | curve.HANDSHAKE_FAILURES))))
    except (zmq.ZMQError, curve.CurveError, ValueError) as exc:
        unwatch()
        context.term()
        if isinstance(exc, zmq.ZMQError):
            return fail(f"cannot connect to {endpoint}: {exc}", 2)
        return fail(f"CURVE (SWIMMY_NOTIFIER_CURVE_SERVER_KEY, SWIMMY_NOTIFIER_CURVE_CLIENT_KEY"
                    f"): {exc}", 2)
    queued = client.send_envelope(data)
    handshake = _handshake(watched[-1][1], args.wait_sec) if queued else None
    unwatch()
    if handshake != "ok":
        client._discard()  # nothing will take it: do not linger
    started = time.monotonic()
    client.close()
    context.term()
    # Terminating the context returns as soon as every queued message has
    # left for the relay, or when the linger runs out and ZeroMQ discards them: ZeroMQ
    # says nothing else about delivery, so a close that took the whole linger means
    # the relay never took the notification.
    taken = time.monotonic() - started < args.wait_sec - _TIMER_SLACK
    if not queued:
        return fail(f"could not queue the notification for {endpoint}", 1)
    if handshake not in ("ok", None):
        return fail(f"the relay at {endpoint} refused the connection: {handshake}", 1)
    if handshake is None or not taken:
        return fail(f"the relay at {endpoint} did not take the notification within "
                    f"{args.wait_sec:g} s; it was discarded (is the relay running?)", 1)
    print(f"sent to the relay at {endpoint} for {envelope.redact(message.webhook)}")
    return 0
