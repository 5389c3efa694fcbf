"""A local stand-in for Discord's webhook API, for tests, demos and producer checks.

It is a real HTTP server on loopback that answers ``POST /api/webhooks/<id>/<token>``
the way Discord does: 200 with a message object (``id``, ``channel_id``...) for
``?wait=true``, 204 without it, Discord's rate-limit headers and 429s when a rate limit
is configured, and 400 (code 50035) for payloads over Discord's limits. Like Discord,
every webhook reports the same bucket hash and is counted on its own. Optional, as on
Discord: a global limit per second with global 429s (``global_limit=50``), a hidden
per-channel limit with ``shared`` 429s while Remaining is above 0
(``channel_limit=(30, 60.0)``, ``channels={"900": ["1", "2"]}`` to put webhooks in one
channel; ``use_channel`` fills part of it as another poster would), and forum channels
(``forums={"7"}``), where a message needs ``thread_name`` (which creates a thread) or
``?thread_id=``. A webhook is one webhook whatever the URL says after its id and token:
its thread URLs (``webhook_url(1, thread=5)``) and its API-versioned paths share its
bucket (a trailing slash is answered 404, as Discord answers it). Tests script faults per webhook (error statuses, hangs, answers trickled or
broken off after the status line, route 429s with bad bodies, global, shared and
Cloudflare 429s) and simulate an outage by stopping it and starting a new one on the
same port::

    with DiscordStandIn(rate_limit=(5, 2.0)) as discord:
        url = discord.webhook_url(1)       # http://127.0.0.1:PORT/api/webhooks/1/tok
        discord.set_mode("1", "status", status=500, times=2)   # 500 twice, then OK
        ...                                # point the relay at url
        assert discord.wait_for(3, timeout=5)                  # 3 messages accepted
        discord.messages("1")              # their JSON bodies, in arrival order

From a shell, ``python -m notifier.standin --rate-limit 5/2`` prints its URL, then
one line per message, until Ctrl-C or SIGTERM.
"""

import argparse
import json
import math
import re
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

# What it answers is decided there; MODES, FRAMINGS and validate stay importable from here.
from notifier.standin_policy import FRAMINGS, MODES, Answer, Limits, Modes, decide, validate  # noqa: F401

_WEBHOOK_PATH = re.compile(r"^/api(?:/v\d+)?/webhooks/([^/]+)/([^/]+)$")  # no trailing slash: 404
_DISCORD_EPOCH_MS = 1420070400000
_CHANNEL_BASE = 1100000000000000000  # a webhook's own channel: this plus its id


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the stand-in saw it, and the status it answered."""

    webhook_id: str | None  # None when the path is not a webhook path
    token: str | None
    json: object  # parsed body, or None when it is not JSON
    status: int
    time: float  # time.monotonic() when its request line arrived
    headers: dict  # header names lowercased
    query: dict
    method: str = "POST"
    path: str = ""
    response: object = None  # JSON (or text) body answered, None for 204
    mode: str = "ok"  # the scripted mode it was answered in
    answered: float = 0.0  # time.monotonic() just before its status line was written


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # restart on the same port right after stop()

    def handle_error(self, request, client_address):
        """Stay quiet: clients hanging up mid-request are part of the tests."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like Discord
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

    def setup(self):
        super().setup()
        self.server.standin._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.standin._track(self.connection, False)

    def log_message(self, format, *args):
        """Stay quiet: tests and the command line report what matters."""

    def parse_request(self):
        # The request line has just arrived: that is when the message reached "Discord",
        # before this server spends its own time parsing headers.
        self.arrived = time.monotonic()
        return super().parse_request()

    def do_POST(self):
        standin = self.server.standin
        standin._busy(+1)
        try:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            record, extra_headers, data, mode, params = standin._answer(
                self.command, self.path, headers, body, self.arrived)
            framing = params["framing"] if mode == "trickle" else "length"
            self.send_response(record.status)
            for name, value in extra_headers.items():
                self.send_header(name, value)
            if record.status == 204:  # a 204 carries neither body nor Content-Length
                pass
            elif framing == "length":
                self.send_header("Content-Length", str(len(data)))
            elif framing == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
            else:  # the body ends where the connection does
                if framing == "close":
                    self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if mode == "trickle":
                standin._trickle(self.wfile, data, params["interval"], framing == "chunked")
            elif mode == "reset":
                self.wfile.write(data[:len(data) // 2])
                self.close_connection = True
                _reset(self.connection)
            else:
                self.wfile.write(data)
        finally:
            standin._busy(-1)
        if standin.on_request is not None:
            standin.on_request(record)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST  # answered 405, but recorded


def _reset(conn):
    """Close with a TCP reset (RST) instead of an orderly FIN: "connection reset by peer"."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class DiscordStandIn:
    """A Discord webhook endpoint on loopback, serving from a background thread.

    rate_limit=(count, seconds) limits each webhook to `count` requests per fixed window
    of `seconds` starting at the window's first request; without it nothing is limited
    and no X-RateLimit-* headers are sent. global_limit=N answers a global 429 to a
    request beyond N in any second, all webhooks together. channel_limit=(count,
    seconds) answers a shared 429 to a message beyond `count` accepted in any `seconds`
    in its channel; channels={"900": ["1", "2"]} puts webhooks in channel 900 (else each
    webhook has a channel of its own). forums: ids of webhooks whose channel is a
    forum. on_request(RecordedRequest) is called from the server thread after each
    answer.
    """

    def __init__(self, host="127.0.0.1", port=0, *, rate_limit=None, global_limit=None,
                 channel_limit=None, channels=None, forums=(), on_request=None):
        self.host, self.port = host, port
        self.on_request = on_request
        self._limits = Limits(rate_limit, global_limit, channel_limit)
        self._modes = Modes()
        self._channel_of = {str(w): str(name) for name, ids in (channels or {}).items() for w in ids}
        self._forums = {str(w) for w in forums}
        self._threads = []  # (webhook id, thread id, name) of the threads created
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._records = []
        self._release = threading.Event()
        self._hanging = 0
        self._active = 0
        self._connections = set()
        self._last_id = 0
        self._server = None
        self._thread = None
        self._stopping = False

    rate_limit = property(lambda self: self._limits.rate_limit, doc="(count, seconds) per webhook, or None")
    global_limit = property(lambda self: self._limits.global_limit, doc="requests per second in all, or None")
    channel_limit = property(lambda self: self._limits.channel_limit, doc="(count, seconds) per channel, or None")

    # Life cycle

    def start(self):
        """Bind and serve in a daemon thread; returns self."""
        server = _Server((self.host, self.port), _Handler)
        server.standin = self
        self.port = server.server_address[1]
        with self._lock:
            self._server, self._stopping = server, False
        # A short poll interval keeps stop() prompt.
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="discord-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop promptly: release hung requests, give answers in flight a moment, then close every connection.

        Open keep-alive connections are closed too, so clients see Discord go away
        (connection refused) rather than a server that still answers.
        """
        with self._lock:
            server, self._server = self._server, None
            if server is None:
                return
            self._stopping = True
            self._release_all()
        server.shutdown()
        with self._cond:
            self._cond.wait_for(lambda: self._active == 0, timeout=1.0)
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        self._thread.join()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def webhook_url(self, id=1, token="tok", *, thread=None, version=None):
        """A webhook's URL; `thread` adds ``?thread_id=``, `version` an API version
        (``/api/v10/...``): every such URL addresses the same webhook."""
        api = "/api" if version is None else f"/api/v{version}"
        query = "" if thread is None else f"?thread_id={thread}"
        return f"{self.url}{api}/webhooks/{id}/{token}{query}"

    # Scripting

    def set_mode(self, webhook_id, mode="ok", *, times=None, **params):
        """Script how a webhook answers from now on; webhook_id None means every webhook.

        Setting None also drops per-webhook modes. With times=N the mode applies to
        the next N requests only, then the webhook answers "ok" again.
        """
        with self._lock:
            self._modes.set(webhook_id, mode, times, params)

    def use_channel(self, channel, count):
        """Count `count` messages as posted into `channel` now by someone else (another
        poster, or this relay before a restart): they take part of its hidden limit."""
        with self._lock:
            self._limits.accept(str(channel), count)

    def release_hangs(self):
        """Let every request held by "hang" answer; later "hang" requests hang again."""
        with self._lock:
            self._release_all()

    # Inspection

    @property
    def requests(self):
        """Every request received so far, answered or refused, oldest first."""
        with self._lock:
            return list(self._records)

    @property
    def hanging(self):
        """How many requests "hang" is holding right now."""
        with self._lock:
            return self._hanging

    def messages(self, webhook_id=None):
        """JSON bodies accepted with a 2xx, in arrival order, optionally for one webhook."""
        with self._lock:
            return [r.json for r in self._matching(webhook_id) if 200 <= r.status < 300]

    def threads(self, webhook_id=None):
        """(thread id, name) of the forum threads created, in order, optionally by one webhook."""
        with self._lock:
            return [(thread, name) for hook, thread, name in self._threads
                    if webhook_id is None or hook == str(webhook_id)]

    def channel_of(self, webhook_id):
        """The channel a webhook posts into."""
        webhook_id = str(webhook_id)
        if webhook_id in self._channel_of:
            return self._channel_of[webhook_id]
        if webhook_id.isascii() and webhook_id.isdigit():
            return str(_CHANNEL_BASE + int(webhook_id))
        return f"channel-{webhook_id}"

    def most_in_flight(self, webhook_id, since=0.0, until=math.inf, deadline=math.inf):
        """The most requests to one webhook that were ever in flight at once, among those
        that arrived between `since` and `until`: a request is in flight from its
        request line until its status line is written, or until the client's `deadline`
        (seconds) gave it up."""
        with self._lock:
            records = [r for r in self._matching(webhook_id) if since <= r.time <= until]
        events = sorted([(r.time, 1) for r in records]
                        + [(min(r.answered, r.time + deadline), -1) for r in records])
        most = current = 0
        for _, step in events:  # at one instant an answer is counted before an arrival
            current += step
            most = max(most, current)
        return most

    def count_status(self, status, webhook_id=None):
        """How many requests were answered with `status`, optionally for one webhook."""
        with self._lock:
            return sum(1 for r in self._matching(webhook_id) if r.status == status)

    def wait_for(self, until, timeout=5.0):
        """Wait until `until` messages were accepted in all, or until(self) is true; False on timeout."""
        if callable(until):
            def check():
                return until(self)
        else:
            def check():
                return len(self.messages()) >= until
        with self._cond:
            return bool(self._cond.wait_for(check, timeout))

    def clear(self):
        """Forget recorded requests (modes and rate-limit windows stay)."""
        with self._lock:
            self._records.clear()

    # Internals, called from handler threads

    def _matching(self, webhook_id):
        if webhook_id is None:
            return self._records
        return [r for r in self._records if r.webhook_id == str(webhook_id)]

    def _track(self, conn, opened):
        with self._lock:
            (self._connections.add if opened else self._connections.discard)(conn)

    def _busy(self, delta):
        with self._cond:
            self._active += delta
            self._cond.notify_all()

    def _trickle(self, out, data, interval, chunked=False):
        """Write `data` a byte every `interval` seconds (each byte a chunk of its own
        when `chunked`), until done, released or stopped."""
        def write(piece):
            out.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)

        release = self._release
        for i in range(len(data)):
            write(data[i:i + 1])
            out.flush()
            if release.wait(interval) or self._stopping:
                if i + 1 < len(data):
                    write(data[i + 1:])
                break
        if chunked:
            out.write(b"0\r\n\r\n")

    def _release_all(self):
        self._release.set()
        self._release = threading.Event()

    def _answer(self, method, target, headers, body, received):
        """Decide the answer to one request and record it: (record, headers, body bytes)."""
        url = urlsplit(target)
        query = dict(parse_qsl(url.query))
        match = _WEBHOOK_PATH.match(url.path)
        webhook_id, token = match.groups() if match else (None, None)
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        mode, params, hold = "ok", {}, None
        if method == "POST" and match:
            with self._cond:
                mode, params = self._modes.take(webhook_id)
                if mode == "hang" and not self._stopping:
                    hold = self._release
                    self._hanging += 1
                    self._cond.notify_all()
        if hold is not None:
            hold.wait()
            with self._cond:
                self._hanging -= 1
                self._cond.notify_all()
        with self._cond:
            if method != "POST":
                answer = Answer(405, {}, {"message": "405: Method Not Allowed", "code": 0})
            elif not match:
                answer = Answer(404, {}, {"message": "404: Not Found", "code": 0})
            else:
                answer = decide(mode, params, self._limits, webhook_id=webhook_id, payload=payload, query=query,
                                channel_of=self.channel_of, forum=webhook_id in self._forums,
                                new_id=self._snowflake)
                if answer.thread is not None:
                    self._threads.append((webhook_id, *answer.thread))
            record = RecordedRequest(webhook_id, token, payload, answer.status, received, headers, query,
                                     method, url.path, answer.body, mode, time.monotonic())
            self._records.append(record)
            self._cond.notify_all()
        out, response = dict(answer.headers), answer.body
        if response is None:
            data = b""
        elif isinstance(response, str):
            data = response.encode()
            out.setdefault("Content-Type", "text/plain; charset=utf-8")
        else:
            data = json.dumps(response).encode()
            out["Content-Type"] = "application/json"
        return record, out, data, mode, params

    def _snowflake(self):
        """An increasing snowflake id, as Discord makes for messages and threads."""
        snowflake = (int(time.time() * 1000) - _DISCORD_EPOCH_MS) << 22
        self._last_id = max(snowflake, self._last_id + 1)
        return str(self._last_id)


def _rate_limit_arg(text):
    """Parse N/SECONDS, e.g. 5/2."""
    try:
        count, seconds = text.split("/")
        limit = (int(count), float(seconds))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N/SECONDS such as 5/2, got {text!r}") from None
    if limit[0] < 1 or not limit[1] > 0:
        raise argparse.ArgumentTypeError(f"need N >= 1 and SECONDS > 0, got {text!r}")
    return limit


def _print_request(record):
    """One line per request: webhook id and the start of its text, plus the status when refused."""
    payload = record.json if isinstance(record.json, dict) else {}
    text = payload.get("content")
    if not text and isinstance(payload.get("embeds"), list) and payload["embeds"]:
        first = payload["embeds"][0]
        text = first.get("title") if isinstance(first, dict) else None
    line = f"{record.webhook_id} {' '.join(str(text or '')[:80].split())}"
    if not 200 <= record.status < 300:
        line += f" -> {record.status} {json.dumps(record.response)[:200]}"
    print(line, flush=True)


def add_arguments(parser):
    """The stand-in's flags, shared by ``python -m notifier standin`` and this module."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default 0: a free port)")
    parser.add_argument("--rate-limit", type=_rate_limit_arg, metavar="N/SECONDS",
                        help="allow N requests per SECONDS per webhook, like Discord's 5/2 (default: no limit)")
    parser.add_argument("--global-limit", type=int, metavar="N",
                        help="allow N requests per second in all, like Discord's 50 (default: no limit)")
    parser.add_argument("--channel-limit", type=_rate_limit_arg, metavar="N/SECONDS",
                        help="a hidden limit of N messages per SECONDS per channel, like Discord's "
                             "30/60, answered with shared 429s (default: none)")


def serve(args):
    """Run the stand-in in the foreground until SIGINT or SIGTERM; return the exit code.
    It first prints what a relay needs to use it: a webhook URL and the allowed host."""
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    with DiscordStandIn(args.host, args.port, rate_limit=args.rate_limit, global_limit=args.global_limit,
                        channel_limit=args.channel_limit, on_request=_print_request) as standin:
        print(f"standin listening on {standin.url}\n"
              f"webhook URL: {standin.webhook_url(1)}\n"
              f"relay setting: SWIMMY_NOTIFIER_ALLOWED_HOSTS={standin.host}:{standin.port}", flush=True)
        stopping.wait()
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m notifier.standin",
                                     description="Serve a local stand-in for Discord webhooks.")
    add_arguments(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
