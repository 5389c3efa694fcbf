"""Envelopes: what producers send, turned into a validated `Message` or an `EnvelopeError`.

One ZeroMQ message is one UTF-8 envelope, an S-expression alist (canonical, what the Lisp
side prints) or a JSON object with the same keys:

    ((type . "NOTIFIER") (schema_version . 1) (action . "SEND")
     (webhook . "https://discord.com/api/webhooks/<id>/<token>")
     (payload_json . "{\\"content\\":\\"hello\\"}"))

``payload`` (an alist, converted to JSON) may replace ``payload_json``; legacy producers
send type ``"NOTIFY"`` or ``{"webhook": ..., "data": {...}}``. Keys match whatever their
spelling (``schema_version``, ``schema-version``, ``:schema-version``, any case, any
package prefix). See PROTOCOL.md for the whole contract.

Webhook URLs carry a secret token. Nothing here puts one into an error message, and
`redact` / `scrub` reduce URLs to the webhook id before anything reaches a log.
"""

from __future__ import annotations

import functools
import json
import re
from fractions import Fraction
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from notifier import payload as discord_payload
from notifier import message_fields, redaction, sexp

MAX_ENVELOPE_BYTES = 64 * 1024
"""Largest envelope accepted. A Discord message tops out near 6,000 characters of embed
text plus 2,000 of content (under 40 KiB even as 4-byte UTF-8 and escaped twice), so this
is never reached by a real notification and keeps the queue's worst case at
queue_max x 64 KiB."""

MAX_NESTING = 32
"""Deepest nesting of a payload, in every form: JSON objects and arrays, alists and
lists (the payload itself is level 1). A Discord message needs 4 (embeds, an embed, its
fields, a field); refusing deeper ones at the door means nothing later (json, the
dead-letter file's writer) can meet Python's recursion limit."""

DISCORD_HOSTS = frozenset(
    f"{prefix}{domain}" for domain in ("discord.com", "discordapp.com")
    for prefix in ("", "canary.", "ptb."))

DISCORD_ORIGIN = "https://discord.com"
"""Where every spelling of a Discord host (and API version) points: a webhook's key says
this whatever host the producer wrote."""

_WEBHOOK_PATH = re.compile(r"/api(?:/v\d{1,3})?/webhooks/([^/]+)/([^/]+)\Z")
_PATH_RULE = ("webhook path must be /api/webhooks/<id>/<token> (or "
              "/api/v<N>/webhooks/<id>/<token>)")
_SNOWFLAKE = re.compile(r"[1-9][0-9]{0,24}\Z")
"""A Discord id (webhook, thread): digits, no leading zero, so one id has one spelling."""
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,200}\Z")
"""Discord's webhook token alphabet (base64url): no dot, so no dot segment either."""
_DEFAULT_PORTS = {"http": 80, "https": 443}
_WEBHOOK_ID = re.compile(r"/webhooks/(\d+)")
_SLASH = r"(?:/|\\+/|\\+u002[fF]|%(?:25)*2[fF])"
_TOKEN_IN_TEXT = re.compile(
    rf"(webhooks{_SLASH}\d+{_SLASH})(?:[A-Za-z0-9_.-]|%(?:25)*[0-9A-Fa-f]{{2}}"
    r"|\\+u00[0-9A-Fa-f]{2})+", re.IGNORECASE)
"""A webhook token in any text, however it was escaped on the way: slashes as JSON
writes them (``\\/``, ``\\u002f``, doubled backslashes once a Lisp printer quotes
that), percent-encoded once or more (``%2F``, ``%252F``), and token characters
percent- or \\u-escaped too."""
_PAYLOAD_KEYS = ("payload", "payload_json", "data")


class EnvelopeError(ValueError):
    """A refused envelope; `reason` says what to fix and never contains a token or a
    control character (what it quotes of the envelope went through `_preview`)."""

    def __init__(self, reason: str):
        reason = redaction.escape_controls(reason)
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Message:
    """A validated notification: where to post it (the URL as `check_webhook` spells
    it), the JSON object to post, and what is worked out once, here: the requests that
    posting it takes (`payload.fit`), the webhook it goes to (`key`, see `webhook_key`)
    and the thread it goes into (the ``thread_id`` of its URL, or None)."""

    webhook: str
    payload: dict
    requests: tuple[dict, ...] = field(init=False, compare=False, repr=False)
    key: str = field(init=False, compare=False, repr=False)
    thread: str | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "requests", tuple(discord_payload.fit(self.payload)))
        key, thread = identify(self.webhook)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "thread", thread)

    @property
    def webhook_id(self) -> str:
        return webhook_id(self.webhook)


def webhook_id(url: str) -> str:
    """The numeric id of a webhook URL, the only part of it that may be logged."""
    match = _WEBHOOK_ID.search(url)
    return match.group(1) if match else "?"


def own_webhook_id(data: bytes) -> str | None:
    """The id of an envelope's own webhook: its `webhook` field's, never a URL quoted
    anywhere else in it (a JSON payload may come first and quote another webhook). None
    when the envelope cannot be read or its field is not a webhook URL. Reads the whole
    envelope: for the few envelopes dropped or counted before they are parsed."""
    try:
        url = _fields(data)[0].get("webhook")
    except (EnvelopeError, sexp.SexpError, RecursionError):
        return None
    if not isinstance(url, str):
        return None
    try:
        match = _WEBHOOK_PATH.match(urlsplit(url).path)
    except ValueError:
        return None
    return match.group(1) if match and _SNOWFLAKE.match(match.group(1)) else None


def redact(url: str) -> str:
    """The URL with its token replaced, for output an operator reads."""
    return scrub(url)


def scrub(text: str) -> str:
    """Replace every webhook token inside `text` (an exception message, a log line)."""
    return _TOKEN_IN_TEXT.sub(r"\1<token>", text)


def check_webhook(url: Any, allowed_hosts: tuple[tuple[str, int | None], ...] = ()) -> str:
    """Return the URL to post to if `url` is a Discord webhook URL the relay may post to,
    else raise `EnvelopeError`. `allowed_hosts` adds ``(host, port or None)`` pairs,
    which may also use plain http (local stand-ins, tests).

    The URL returned is `url` spelled the one way an HTTP client keeps it (scheme and
    host in lower case, no default port, no empty query or fragment), so what `check`
    shows is what is posted: the path and the thread stay as the producer wrote them."""
    if not isinstance(url, str) or not url:
        raise EnvelopeError("webhook must be a non-empty string URL")
    if not url.isascii() or not url.isprintable() or " " in url:
        raise EnvelopeError("webhook URL holds whitespace, a control character or a "
                            "non-ASCII character; send the URL alone, percent-encoded")
    return _check_url(url, allowed_hosts)


@functools.lru_cache(maxsize=256)
def _check_url(url: str, allowed_hosts: tuple[tuple[str, int | None], ...]) -> str:
    """(Memoized: a relay posts to a handful of webhooks, over and over.)"""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise EnvelopeError("webhook is not a valid URL") from None
    host = (parts.hostname or "").lower()
    extra = any(host == allowed and (allowed_port is None or port == allowed_port)
                for allowed, allowed_port in allowed_hosts)
    if not extra:
        if host not in DISCORD_HOSTS:
            raise EnvelopeError(
                f"webhook host {_preview(host) if host else '(none)'} is not Discord's; add it to "
                "SWIMMY_NOTIFIER_ALLOWED_HOSTS to allow it")
        if parts.scheme != "https" or port not in (None, 443):
            raise EnvelopeError("webhook must use https on Discord's default port")
    elif parts.scheme not in ("http", "https"):
        raise EnvelopeError("webhook must be an http or https URL")
    if parts.username is not None or parts.password is not None:
        raise EnvelopeError("webhook must not carry user credentials")
    if parts.path.endswith("/") and _WEBHOOK_PATH.match(parts.path.rstrip("/")):
        raise EnvelopeError(f"{_PATH_RULE}, without a trailing '/' (Discord answers 404 to it)")
    path = _WEBHOOK_PATH.match(parts.path)
    if path is None:
        raise EnvelopeError(f"{_PATH_RULE}: an id of digits, a token of letters, digits, '_' "
                            "and '-' (not '.' or '..'), no empty segment")
    webhook, token = path.groups()
    if not _SNOWFLAKE.match(webhook):
        raise EnvelopeError(f"{_PATH_RULE}: the id a Discord id (digits, without a leading 0)")
    if not _TOKEN.match(token):
        raise EnvelopeError(f"{_PATH_RULE}: the token of letters, digits, '_' and '-', up to "
                            "200 (not '.' or '..')")
    if parts.fragment or "#" in url:
        raise EnvelopeError("webhook URL may only carry a thread_id query, no fragment")
    if parts.query:
        name, _, thread = parts.query.partition("=")
        if name != "thread_id" or "&" in parts.query:
            raise EnvelopeError("webhook URL may only carry a thread_id query")
        if not _SNOWFLAKE.match(thread):
            raise EnvelopeError("thread_id must be a thread's id: digits, without a leading 0")
    if port == _DEFAULT_PORTS[parts.scheme]:
        port = None
    netloc = f"[{host}]" if ":" in host else host
    netloc += "" if port is None else f":{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"


def webhook_key(url: str) -> str:
    """The webhook a checked URL posts to, spelled one way: its (id, token) at its
    origin. Every spelling Discord accepts for one webhook (``discord.com`` or
    ``discordapp.com``, ``canary.`` or ``ptb.``, any API version, any
    thread) gives the same key, so everything kept per webhook (its rate limits, its
    order, its one request in flight, its quarantine, its losses) is kept once. The key
    is itself a URL of that webhook: `webhook_id`, `redact` and `scrub` work on it."""
    return identify(url)[0]


@functools.lru_cache(maxsize=256)
def identify(url: str) -> tuple[str, str | None]:
    """(`webhook_key`, thread id or None) of a URL `check_webhook` returned."""
    parts = urlsplit(url)
    path = _WEBHOOK_PATH.match(parts.path)
    if path is None:
        raise ValueError("not a webhook URL (check_webhook first)")
    webhook, token = path.groups()
    origin = f"{parts.scheme}://{parts.netloc}"
    if parts.hostname in DISCORD_HOSTS and parts.scheme == "https" and parts.port in (None, 443):
        origin = DISCORD_ORIGIN
    thread = parts.query.partition("=")[2] or None
    return f"{origin}/api/webhooks/{webhook}/{token}", thread


def post_url(webhook: str) -> str:
    """The URL a request to `webhook` (a checked URL) is posted to. ``wait=true``:
    Discord confirms the message was saved (without it, a message Discord drops still
    answers 204)."""
    return webhook + ("&" if "?" in webhook else "?") + "wait=true"


def too_large(size: int) -> str:
    """The reason for refusing an envelope of `size` bytes."""
    return f"envelope of {size} bytes is over the {MAX_ENVELOPE_BYTES}-byte limit"


PREVIEW_CHARS = 40
"""Most characters of a bad value a reason quotes."""


def _preview(value: Any) -> str:
    """A short, token-free rendering of a bad value for a reason: Lisp data as Lisp
    prints it."""
    lisp = isinstance(value, (sexp.Symbol, sexp.DottedList, Fraction))
    return redaction.shorten(sexp.dumps(value) if lisp else repr(value), PREVIEW_CHARS)


def _json_value(value: Any, path: str) -> Any:
    """The JSON form of a payload read from an S-expression; refuse what JSON lacks."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {key: _json_value(item, f"{path}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [_json_value(item, f"{path}[{i}]") for i, item in enumerate(value)]
    kind = ("a symbol" if isinstance(value, sexp.Symbol) else
            "a ratio" if isinstance(value, Fraction) else
            "a dotted list" if isinstance(value, sexp.DottedList) else type(value).__name__)
    raise EnvelopeError(f"{redaction.shorten(path, PREVIEW_CHARS)} is {kind} "
                        f"({_preview(value)}), which has no JSON form; send a string or a number")


def _too_deep() -> EnvelopeError:
    return EnvelopeError(f"nesting deeper than {MAX_NESTING} levels")


def _decode_json(data: bytes) -> Any:
    """JSON envelopes are UTF-8 (json.loads would guess UTF-16 from some garbage)."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"invalid UTF-8 at byte {exc.start}") from None
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:
        raise EnvelopeError(
            "not an S-expression (does not start with '(') and not JSON: "
            f"{getattr(exc, 'msg', exc)} at line {getattr(exc, 'lineno', '?')}, "
            f"column {getattr(exc, 'colno', '?')}") from None


def _fields(data: bytes) -> tuple[dict, bool]:
    """Read the envelope and index its values by normalized key (first one wins). Values
    of an S-expression envelope stay in the Lisp view until `_payload` converts one."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(too_large(len(data)))
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
        data = data[3:]
    if data.lstrip()[:1] == b"(":
        try:
            entries = sexp.read_alist(data, max_bytes=MAX_ENVELOPE_BYTES)
        except sexp.SexpError as exc:
            raise EnvelopeError(f"bad S-expression: {redaction.hide_tokens(str(exc))}") from None
        if entries is None:
            raise EnvelopeError("envelope must be an alist of (key . value) entries")
        fields: dict[str, Any] = {}
        for key, value in entries:
            fields.setdefault(sexp.normalize_key(key.text), value)
        return fields, True
    envelope = _decode_json(data)
    if not isinstance(envelope, dict):
        raise EnvelopeError("a JSON envelope must be an object")
    fields = {}
    for key, value in envelope.items():
        fields.setdefault(sexp.normalize_key(key), value)
    return fields, False


def _kind(value: Any) -> str:
    """A JSON value's type as a producer would name it."""
    return {str: "a string", bool: "a boolean", int: "a number", float: "a number",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _payload(fields: dict, is_sexp: bool) -> dict:
    present = [key for key in _PAYLOAD_KEYS if key in fields]
    if not present:
        raise EnvelopeError("no payload: send one of payload, payload_json or data")
    if len(present) > 1:
        raise EnvelopeError(f"both {' and '.join(present)} given: send exactly one")
    key = present[0]
    value = fields[key]
    if key == "payload_json":
        if not isinstance(value, str):
            raise EnvelopeError("payload_json must be a string holding a JSON object")
        if not value.strip():
            raise EnvelopeError("payload_json is empty")
        try:
            value = json.loads(value)
        except RecursionError:
            raise _too_deep() from None
        except ValueError as exc:
            raise EnvelopeError(f"payload_json is not valid JSON: {exc}") from None
    elif is_sexp:
        value = _json_value(sexp.to_python(value), key)
    if value is None or value == {} or value == "":
        raise EnvelopeError(f"{key} is empty")
    if not isinstance(value, dict):
        raise EnvelopeError(f"{key} must be an object (an alist), not {_kind(value)}")
    content, embeds = value.get("content"), value.get("embeds")
    if content is not None and not isinstance(content, str):
        raise EnvelopeError(f"{key}.content must be a string, not {_kind(content)}")
    if embeds is not None and not (isinstance(embeds, list)
                                   and all(isinstance(embed, dict) for embed in embeds)):
        raise EnvelopeError(f"{key}.embeds must be a list of objects (alists)")
    if not ((content and not content.isspace()) or embeds or value.get("poll")):
        raise EnvelopeError(f"{key} has no content, embeds or poll: Discord would refuse it")
    try:
        return message_fields.conform(value)
    except message_fields.FieldError as exc:
        raise EnvelopeError(f"{key}.{exc}") from None


def _check_depth(value: Any, data: bytes) -> None:
    """Refuse a payload nested deeper than MAX_NESTING (walked iteratively: it may be
    deep). Only an envelope with more brackets than that can nest so deep, so most
    envelopes skip the walk."""
    if data.count(b"[") + data.count(b"{") + data.count(b"(") <= MAX_NESTING:
        return
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_NESTING:
                raise _too_deep()
            items = value.values() if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)


def _check_encodable(message: Message, data: bytes) -> None:
    """Refuse a message whose requests do not encode as the UTF-8 JSON a sender writes.

    Only a JSON ``\\u`` escape can make an unpaired surrogate (UTF-8 input cannot hold
    one), and only ``NaN`` or ``Infinity`` a number JSON cannot carry (both readers
    refuse integers too long to print), so envelopes with neither skip the encoding."""
    if b"\\u" not in data and b"NaN" not in data and b"Infinity" not in data:
        return
    for request in message.requests:
        try:
            json.dumps(request, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EnvelopeError(
                f"payload holds text that is not valid Unicode (an unpaired surrogate, "
                f"U+{ord(exc.object[exc.start]):04X}); send whole characters") from None
        except ValueError:
            raise EnvelopeError("payload holds a number JSON cannot carry (NaN or "
                                "Infinity)") from None


def _expect(fields: dict, key: str, default: Any, accepted: tuple) -> None:
    """Refuse a `key` whose value is not one of `accepted` (strings in any case)."""
    value = fields.get(key, default)
    kind = type(value)
    if kind is str:
        value = value.upper()
    elif kind is not int:  # not bool: True == 1
        value = None
    if value not in accepted:
        raise EnvelopeError(f"unknown {key} {_preview(fields[key])}: expected "
                            + " or ".join(map(repr, accepted)))


def parse(data: bytes | str, allowed_hosts: tuple[tuple[str, int | None], ...] = ()) -> Message:
    """Validate one envelope. Raises `EnvelopeError` with a reason an operator can act on.
    What it returns can always be posted: the checks that need it run here, once."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    fields, is_sexp = _fields(data)
    if "type" in fields or is_sexp or "data" not in fields:
        if "type" not in fields:
            raise EnvelopeError("missing type (expected \"NOTIFIER\")")
        _expect(fields, "type", None, ("NOTIFIER", "NOTIFY"))
    _expect(fields, "schema_version", 1, (1,))
    _expect(fields, "action", "SEND", ("SEND",))
    if "webhook" not in fields:
        raise EnvelopeError("missing webhook")
    webhook = check_webhook(fields["webhook"], allowed_hosts)
    payload = _payload(fields, is_sexp)
    _check_depth(payload, data)
    message = Message(webhook, payload)
    _check_encodable(message, data)
    return message
