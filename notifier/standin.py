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
import hashlib
import json
import math
import re
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

_WEBHOOK_PATH = re.compile(r"^/api(?:/v\d+)?/webhooks/([^/]+)/([^/]+)$")  # no trailing slash: 404
_DISCORD_EPOCH_MS = 1420070400000
_CHANNEL_BASE = 1100000000000000000  # a webhook's own channel: this plus its id
_BUCKET_HASH = hashlib.sha1(b"webhook execute").hexdigest()[:32]  # one for all, as on Discord
_GLOBAL_WINDOW = 1.0
_NOMINAL_LIMIT = (5, 2.0)  # Discord's usual webhook limit, shown by channel_429 when none is set

# Mode name -> its parameters and their defaults.
MODES = {
    "ok": {},
    "status": {"status": 500, "body": None},
    "hang": {},
    "trickle": {"interval": 0.5, "framing": "length"},
    "reset": {},
    "route_429": {"retry_after": 1.0, "reset_after": 0.5, "retry_after_header": 1},
    "global_429": {"retry_after": 1.0},
    "channel_429": {"retry_after": 40.0},
    "html_429": {},
}
"""Answers a message is saved with but whose body does not come whole: "trickle" writes
it a byte every `interval` seconds, framed by a Content-Length, as chunks ("chunked") or
by closing the connection ("close", with ``Connection: close``; "none", with no header
at all); "reset" writes the
status line, the headers and half the body, then resets the connection. "route_429"
answers a 429 of scope user with ``Retry-After`` and ``X-RateLimit-Reset-After``
headers and a body whose ``retry_after`` is whatever is given (None leaves it out,
NaN is written as ``NaN``)."""

FRAMINGS = ("length", "chunked", "close", "none")

_STATUS_BODIES = {
    401: {"message": "Invalid Webhook Token", "code": 50027},
    403: {"message": "Missing Access", "code": 50001},
    404: {"message": "Unknown Webhook", "code": 10015},
    502: "error code: 502",  # Cloudflare answers bad gateways in plain text
}

_RATE_LIMITED = "You are being rate limited."

_CLOUDFLARE_BAN_PAGE = """<!DOCTYPE html>
<html lang="en-US"><head><title>Access denied | discord.com used Cloudflare to restrict access</title></head>
<body><div id="cf-wrapper"><h1>Error 1015</h1><h2>You are being rate limited</h2>
<p>The owner of this website (discord.com) has banned you temporarily from accessing this website.</p>
</div></body></html>
"""


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


def validate(payload):
    """Check a webhook message against Discord's limits; return Discord's "errors" tree, empty if valid.

    Lengths are counted in code points, as Discord does.
    """
    if not isinstance(payload, dict):
        return _errors("DICT_TYPE_CONVERT", "The body must be a JSON object.")
    errors = {}
    content, embeds = payload.get("content"), payload.get("embeds")
    if content is not None and not isinstance(content, str):
        errors["content"] = _errors("BASE_TYPE_STRING", "Must be a string.")
    elif content is not None and len(content) > 2000:
        errors["content"] = _too_long(2000, content)
    if embeds is not None and not isinstance(embeds, list):
        errors["embeds"] = _errors("BASE_TYPE_ARRAY", "Must be an array.")
    elif embeds and len(embeds) > 10:
        errors["embeds"] = _errors("BASE_TYPE_MAX_LENGTH", f"Must be 10 or fewer in length (got {len(embeds)}).")
    elif embeds:
        embed_errors, total = {}, 0
        for i, embed in enumerate(embeds):
            found, chars = _check_embed(embed)
            total += chars
            if found:
                embed_errors[str(i)] = found
        if total > 6000:
            embed_errors.update(_errors("MAX_EMBED_SIZE_EXCEEDED", f"Embed size exceeds maximum size of 6000 (got {total})."))
        if embed_errors:
            errors["embeds"] = embed_errors
    errors.update(_check_fields(payload))
    if (not errors and not (isinstance(content, str) and content.strip()) and not embeds
            and not payload.get("poll")):
        errors["content"] = _errors("BASE_TYPE_REQUIRED", "Cannot send an empty message: give non-empty content or embeds.")
    return errors


def _check_fields(payload):
    """Discord's errors for the fields of a webhook message besides content and embeds:
    the webhook name's length (after trimming) and words, the URL of its avatar, the
    thread's name, the flags a webhook may set, mentions, forum tags and polls."""
    errors = {}

    def text(path, value, low, high):
        if not isinstance(value, str):
            _put(errors, path, _errors("BASE_TYPE_STRING", "Must be a string."))
        elif not low <= len(value.strip()) <= high:
            _put(errors, path, _errors("BASE_TYPE_BAD_LENGTH", f"Must be between {low} and {high} in length."))

    def snowflakes(path, value, most):
        if not isinstance(value, list) or len(value) > most:
            _put(errors, path, _errors("BASE_TYPE_MAX_LENGTH", f"Must be {most} or fewer in length."))
        elif not all(re.fullmatch(r"\d{1,20}", str(item)) and not isinstance(item, bool) for item in value):
            _put(errors, path, _errors("NUMBER_TYPE_COERCE", "Value is not snowflake."))

    username, avatar = payload.get("username"), payload.get("avatar_url")
    if username is not None:
        text(("username",), username, 1, 80)
        if isinstance(username, str) and any(word in username.lower() for word in ("clyde", "discord")):
            _put(errors, ("username",), _errors("USERNAME_INVALID_CONTAINS", "Username cannot contain a word Discord reserves."))
    if avatar is not None:
        parts = urlsplit(avatar) if isinstance(avatar, str) and avatar.isprintable() and " " not in avatar else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            _put(errors, ("avatar_url",), _errors("URL_TYPE_INVALID_URL", "Not a well formed URL."))
    if payload.get("thread_name") is not None:
        text(("thread_name",), payload["thread_name"], 1, 100)
    if payload.get("tts") is not None and not isinstance(payload["tts"], bool):
        _put(errors, ("tts",), _errors("BASE_TYPE_BOOLEAN", "Must be either true or false."))
    flags = payload.get("flags")
    if flags is not None and (not isinstance(flags, int) or isinstance(flags, bool) or flags & ~(4 | 4096) or flags < 0):
        _put(errors, ("flags",), _errors("MESSAGE_FLAGS_INVALID", "Invalid flags for a webhook message."))
    if payload.get("applied_tags") is not None:
        snowflakes(("applied_tags",), payload["applied_tags"], 5)
    mentions = payload.get("allowed_mentions")
    if isinstance(mentions, dict):
        parse = mentions.get("parse") or []
        if not isinstance(parse, list) or not set(parse) <= {"roles", "users", "everyone"}:
            _put(errors, ("allowed_mentions", "parse"), _errors("BASE_TYPE_CHOICES", "Value must be one of ('roles', 'users', 'everyone')."))
            parse = []
        for kind in ("roles", "users"):
            if mentions.get(kind) is not None:
                snowflakes(("allowed_mentions", kind), mentions[kind], 100)
                if mentions[kind] and kind in parse:
                    _put(errors, ("allowed_mentions",), _errors("MESSAGE_ALLOWED_MENTIONS_PARSE_EXCLUSIVE", f"parse:[\"{kind}\"] and {kind}: [ids...] are mutually exclusive."))
    elif mentions is not None:
        _put(errors, ("allowed_mentions",), _errors("DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType"))
    poll = payload.get("poll")
    if isinstance(poll, dict):
        question, answers = poll.get("question"), poll.get("answers")
        text(("poll", "question", "text"), question.get("text") if isinstance(question, dict) else None, 1, 300)
        if not isinstance(answers, list) or not 1 <= len(answers) <= 10:
            _put(errors, ("poll", "answers"), _errors("BASE_TYPE_BAD_LENGTH", "Must be between 1 and 10 in length."))
        else:
            for i, answer in enumerate(answers):
                media = answer.get("poll_media") if isinstance(answer, dict) else None
                text(("poll", "answers", str(i), "poll_media", "text"), media.get("text") if isinstance(media, dict) else None, 1, 55)
        duration = poll.get("duration")
        if duration is not None and (not isinstance(duration, int) or isinstance(duration, bool) or not 1 <= duration <= 768):
            _put(errors, ("poll", "duration"), _errors("NUMBER_TYPE_MAX", "int value should be between 1 and 768."))
    elif poll is not None:
        _put(errors, ("poll",), _errors("DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType"))
    return errors


def _check_embed(embed):
    """Return (errors, characters counted towards the 6000 total) for one embed."""
    if not isinstance(embed, dict):
        return _errors("DICT_TYPE_CONVERT", "Each embed must be a JSON object."), 0
    errors, total = {}, 0
    checks = [(("title",), embed.get("title"), 256), (("description",), embed.get("description"), 4096)]
    footer, author, fields = embed.get("footer"), embed.get("author"), embed.get("fields")
    if isinstance(footer, dict):
        checks.append((("footer", "text"), footer.get("text"), 2048))
    if isinstance(author, dict):
        checks.append((("author", "name"), author.get("name"), 256))
    if isinstance(fields, list):
        if len(fields) > 25:
            errors["fields"] = _errors("BASE_TYPE_MAX_LENGTH", f"Must be 25 or fewer in length (got {len(fields)}).")
        for i, field in enumerate(fields):
            if isinstance(field, dict):
                checks.append((("fields", str(i), "name"), field.get("name"), 256))
                checks.append((("fields", str(i), "value"), field.get("value"), 1024))
    for path, text, limit in checks:
        if isinstance(text, str):
            total += len(text)
            if len(text) > limit:
                _put(errors, path, _too_long(limit, text))
    return errors, total


def _put(tree, path, value):
    """Nest an error the way Discord does: {"fields": {"3": {"value": ...}}}."""
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _phrase(status):
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _errors(code, message):
    return {"_errors": [{"code": code, "message": message}]}


def _too_long(limit, text):
    return _errors("BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length (got {len(text)}).")


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
        self.rate_limit = (int(rate_limit[0]), float(rate_limit[1])) if rate_limit else None
        self.global_limit = global_limit
        self.channel_limit = (int(channel_limit[0]), float(channel_limit[1])) if channel_limit else None
        self.on_request = on_request
        self._channel_of = {str(w): str(name) for name, ids in (channels or {}).items() for w in ids}
        self._forums = {str(w) for w in forums}
        self._recent = []  # time.monotonic() of the requests of the last second
        self._accepted = {}  # channel -> times of the messages accepted in its window
        self._threads = []  # (webhook id, thread id, name) of the threads created
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._records = []
        self._modes = {}  # webhook id, or None for all -> [mode, params, times left or None]
        self._windows = {}  # bucket key -> (window start, requests counted)
        self._release = threading.Event()
        self._hanging = 0
        self._active = 0
        self._connections = set()
        self._last_id = 0
        self._server = None
        self._thread = None
        self._stopping = False

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
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        unknown = set(params) - set(MODES[mode])
        if unknown:
            raise TypeError(f"mode {mode!r} takes no parameter(s) {', '.join(sorted(unknown))}")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1")
        if mode == "status" and not 200 <= params.get("status", 500) <= 599:
            raise ValueError("status must be between 200 and 599")
        if mode == "trickle" and params.get("framing", "length") not in FRAMINGS:
            raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}")
        with self._lock:
            if webhook_id is None:
                self._modes.clear()
            else:
                webhook_id = str(webhook_id)
            self._modes[webhook_id] = [mode, {**MODES[mode], **params}, times]

    def use_channel(self, channel, count):
        """Count `count` messages as posted into `channel` now by someone else (another
        poster, or this relay before a restart): they take part of its hidden limit."""
        with self._lock:
            self._accepted.setdefault(str(channel), []).extend([time.monotonic()] * count)

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
        return str(_CHANNEL_BASE + int(webhook_id)) if webhook_id.isdigit() else f"channel-{webhook_id}"

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
                mode, params = self._take_mode(webhook_id)
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
                status, out, response = 405, {}, {"message": "405: Method Not Allowed", "code": 0}
            elif not match:
                status, out, response = 404, {}, {"message": "404: Not Found", "code": 0}
            else:
                status, out, response = self._decide(webhook_id, payload, query, mode, params)
            record = RecordedRequest(webhook_id, token, payload, status, received, headers, query,
                                     method, url.path, response, mode, time.monotonic())
            self._records.append(record)
            self._cond.notify_all()
        if response is None:
            data = b""
        elif isinstance(response, str):
            data = response.encode()
            out.setdefault("Content-Type", "text/plain; charset=utf-8")
        else:
            data = json.dumps(response).encode()
            out["Content-Type"] = "application/json"
        return record, out, data, mode, params

    def _take_mode(self, webhook_id):
        """The mode for this request, counting it against a times=N limit."""
        key = webhook_id if webhook_id in self._modes else None
        entry = self._modes.get(key)
        if entry is None:
            return "ok", {}
        mode, params, times = entry
        if times is not None:
            if times <= 1:
                del self._modes[key]
            else:
                entry[2] = times - 1
        return mode, params

    def _decide(self, webhook_id, payload, query, mode, params):
        """(status, headers, response body) for a webhook POST in the given mode."""
        if mode == "status":
            status = params["status"]
            body = params["body"]
            if body is None:
                body = _STATUS_BODIES.get(status, {"message": f"{status}: {_phrase(status)}", "code": 0})
            return status, {}, None if status == 204 else body
        if mode == "global_429":
            retry = params["retry_after"]
            headers = {"Retry-After": str(math.ceil(retry)), "X-RateLimit-Global": "true",
                       "X-RateLimit-Scope": "global"}
            return 429, headers, {"message": _RATE_LIMITED, "retry_after": retry, "global": True}
        if mode == "channel_429":
            retry = params["retry_after"]
            headers = self._count(webhook_id, consume=False)[1]
            headers.update({"Retry-After": str(math.ceil(retry)), "X-RateLimit-Scope": "shared"})
            return 429, headers, {"message": _RATE_LIMITED, "retry_after": retry, "global": False}
        if mode == "route_429":
            headers = {"Retry-After": str(params["retry_after_header"]),
                       "X-RateLimit-Reset-After": str(params["reset_after"]),
                       "X-RateLimit-Scope": "user"}
            body = {"message": _RATE_LIMITED, "global": False}
            if params["retry_after"] is not None:
                body["retry_after"] = params["retry_after"]
            return 429, headers, body
        if mode == "html_429":
            return 429, {"Content-Type": "text/html; charset=UTF-8"}, _CLOUDFLARE_BAN_PAGE
        # "ok", "trickle", "reset", and "hang" once released: the global limit, then the webhook's, then the
        # channel's, as Discord counts invalid requests too.
        wait = self._global_wait()
        if wait is not None:
            headers = {"Retry-After": str(math.ceil(wait)), "X-RateLimit-Global": "true",
                       "X-RateLimit-Scope": "global"}
            return 429, headers, {"message": _RATE_LIMITED, "retry_after": round(wait, 3), "global": True}
        allowed, headers, reset_after = self._count(webhook_id, consume=True)
        if not allowed:
            headers.update({"Retry-After": str(math.ceil(reset_after)), "X-RateLimit-Scope": "user"})
            return 429, headers, {"message": _RATE_LIMITED, "retry_after": round(reset_after, 3), "global": False}
        channel = self.channel_of(webhook_id)
        wait = self._channel_wait(channel)
        if wait is not None:
            headers.update({"Retry-After": str(math.ceil(wait)), "X-RateLimit-Scope": "shared"})
            return 429, headers, {"message": _RATE_LIMITED, "retry_after": round(wait, 3), "global": False}
        errors = validate(payload)
        if errors:
            return 400, headers, {"code": 50035, "message": "Invalid Form Body", "errors": errors}
        thread = query.get("thread_id")
        if thread is None and webhook_id in self._forums:
            if not isinstance(payload.get("thread_name"), str) or not payload["thread_name"].strip():
                return 400, headers, {"code": 220001, "message": "Webhooks posted to forum channels "
                                      "must have a thread_name or thread_id"}
            thread = self._snowflake()
            self._threads.append((webhook_id, thread, payload["thread_name"]))
        self._accepted.setdefault(channel, []).append(time.monotonic())
        if query.get("wait", "").lower() not in ("true", "1"):
            return 204, headers, None
        return 200, headers, self._message(webhook_id, payload, thread or channel)

    def _global_wait(self):
        """Seconds until a request is allowed by the global limit (this one counted when
        it is), or None now."""
        if self.global_limit is None:
            return None
        now = time.monotonic()
        self._recent = [t for t in self._recent if t > now - _GLOBAL_WINDOW]
        if len(self._recent) >= self.global_limit:
            return self._recent[-self.global_limit] + _GLOBAL_WINDOW - now
        self._recent.append(now)
        return None

    def _channel_wait(self, channel):
        """Seconds until the channel's hidden limit takes another message, or None now."""
        if self.channel_limit is None:
            return None
        count, window = self.channel_limit
        now = time.monotonic()
        accepted = self._accepted[channel] = [t for t in self._accepted.get(channel, ()) if t > now - window]
        return accepted[-count] + window - now if len(accepted) >= count else None

    def _count(self, webhook_id, consume):
        """Count a request in its bucket's window: (allowed, X-RateLimit-* headers, seconds to reset).

        With consume=False it only reports the window (used by channel_429, which
        shows Remaining above 0 and falls back to Discord's usual 5 per 2 s).
        """
        if self.rate_limit is None and consume:
            return True, {}, 0.0
        limit, window = self.rate_limit or _NOMINAL_LIMIT
        key = "webhook:" + webhook_id
        now = time.monotonic()
        start, used = self._windows.get(key, (now, 0))
        if now >= start + window:
            start, used = now, 0
        allowed = used < limit
        if consume:
            used += 1 if allowed else 0
            self._windows[key] = (start, used)
        remaining = limit - used if consume else max(1, limit - used)
        reset_after = max(0.0, start + window - now)
        headers = {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": _BUCKET_HASH,
        }
        return allowed, headers, reset_after

    def _snowflake(self):
        """An increasing snowflake id, as Discord makes for messages and threads."""
        snowflake = (int(time.time() * 1000) - _DISCORD_EPOCH_MS) << 22
        self._last_id = max(snowflake, self._last_id + 1)
        return str(self._last_id)

    def _message(self, webhook_id, payload, channel):
        """The message object Discord returns for ?wait=true."""
        return {
            "id": self._snowflake(),
            "type": 0,
            "channel_id": channel,
            "webhook_id": webhook_id,
            "author": {"id": webhook_id, "username": payload.get("username") or "Stand-in", "bot": True},
            "content": payload.get("content") or "",
            "embeds": payload.get("embeds") or [],
            "attachments": [],
            "tts": bool(payload.get("tts")),
            "timestamp": datetime.now(timezone.utc).isoformat(),
        }


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
