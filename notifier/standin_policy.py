"""What the Discord stand-in answers: Discord's rules for a webhook message, its rate
limits and the faults tests script.

Kept apart from the HTTP server in ``notifier/standin.py`` so that the answer is one
function of the request, the scripted mode and the limits' state (with the clock
injected), and the server only records requests and writes out what it is told.
Nothing here locks: the stand-in calls it under its own lock.
"""

import hashlib
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from urllib.parse import urlsplit

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



@dataclass(frozen=True)
class Answer:
    """What to answer one request: status, headers and body (JSON, text, or None for no
    body), and the forum thread it created as (thread id, name), if any."""

    status: int
    headers: dict
    body: object
    thread: tuple | None = None


class Modes:
    """How each webhook is scripted to answer: a mode from MODES with its parameters, for
    its next N requests or until changed."""

    def __init__(self):
        self._modes = {}  # webhook id, or None for all -> [mode, params, times left or None]

    def set(self, webhook_id, mode, times, params):
        """Script `mode` for a webhook, or for every webhook (dropping their own modes)
        when webhook_id is None; a bad mode, parameter or count raises before anything changes."""
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
        if webhook_id is None:
            self._modes.clear()
        else:
            webhook_id = str(webhook_id)
        self._modes[webhook_id] = [mode, {**MODES[mode], **params}, times]

    def take(self, webhook_id):
        """The (mode, params) for this request, counting it against a times=N limit."""
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


class Limits:
    """Discord's rate-limit accounting: each webhook's bucket (`rate_limit`, a fixed window
    from its first request), all webhooks together (`global_limit` per second) and each
    channel's hidden limit (`channel_limit`, a sliding window of accepted messages).

    `clock` gives monotonic seconds for the windows, `wall` the epoch seconds that
    X-RateLimit-Reset shows.
    """

    def __init__(self, rate_limit=None, global_limit=None, channel_limit=None, *,
                 clock=time.monotonic, wall=time.time):
        self.rate_limit = (int(rate_limit[0]), float(rate_limit[1])) if rate_limit else None
        self.global_limit = global_limit
        self.channel_limit = (int(channel_limit[0]), float(channel_limit[1])) if channel_limit else None
        self._clock, self._wall = clock, wall
        self._recent = []  # times of the requests of the last second
        self._accepted = {}  # channel -> times of the messages accepted in its window
        self._windows = {}  # bucket key -> (window start, requests counted)

    def global_wait(self):
        """Seconds until a request is allowed by the global limit (this one counted when
        it is), or None now."""
        if self.global_limit is None:
            return None
        now = self._clock()
        self._recent = [t for t in self._recent if t > now - _GLOBAL_WINDOW]
        if len(self._recent) >= self.global_limit:
            return self._recent[-self.global_limit] + _GLOBAL_WINDOW - now
        self._recent.append(now)
        return None

    def channel_wait(self, channel):
        """Seconds until the channel's hidden limit takes another message, or None now."""
        if self.channel_limit is None:
            return None
        count, window = self.channel_limit
        now = self._clock()
        accepted = self._accepted[channel] = [t for t in self._accepted.get(channel, ()) if t > now - window]
        return accepted[-count] + window - now if len(accepted) >= count else None

    def accept(self, channel, count=1):
        """Count `count` messages as posted into `channel` now: they take part of its hidden limit."""
        self._accepted.setdefault(channel, []).extend([self._clock()] * count)

    def count(self, webhook_id, consume):
        """Count a request in its bucket's window: (allowed, X-RateLimit-* headers, seconds to reset).

        With consume=False it only reports the window (used by channel_429, which
        shows Remaining above 0 and falls back to Discord's usual 5 per 2 s).
        """
        if self.rate_limit is None and consume:
            return True, {}, 0.0
        limit, window = self.rate_limit or _NOMINAL_LIMIT
        key = "webhook:" + webhook_id
        now = self._clock()
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
            "X-RateLimit-Reset": f"{self._wall() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": _BUCKET_HASH,
        }
        return allowed, headers, reset_after


def decide(mode, params, limits, *, webhook_id, payload, query, channel_of, forum, new_id):
    """The Answer to a webhook POST in a scripted mode, counting it in `limits`.

    The fault modes answer whatever the message says. Otherwise ("ok", "trickle",
    "reset", and "hang" once released) come the global limit, then the webhook's, then
    the channel's, as Discord counts invalid requests too; then the message's rules and,
    for a `forum` webhook, its thread. `channel_of(webhook_id)` names the channel (asked
    only once the limits before it pass); `new_id()` makes snowflakes for threads and messages.
    """
    if mode == "status":
        status = params["status"]
        body = params["body"]
        if body is None:
            body = _STATUS_BODIES.get(status, {"message": f"{status}: {_phrase(status)}", "code": 0})
        return Answer(status, {}, None if status == 204 else body)
    if mode == "global_429":
        retry = params["retry_after"]
        headers = {"Retry-After": str(math.ceil(retry)), "X-RateLimit-Global": "true",
                   "X-RateLimit-Scope": "global"}
        return Answer(429, headers, {"message": _RATE_LIMITED, "retry_after": retry, "global": True})
    if mode == "channel_429":
        retry = params["retry_after"]
        headers = limits.count(webhook_id, consume=False)[1]
        headers.update({"Retry-After": str(math.ceil(retry)), "X-RateLimit-Scope": "shared"})
        return Answer(429, headers, {"message": _RATE_LIMITED, "retry_after": retry, "global": False})
    if mode == "route_429":
        headers = {"Retry-After": str(params["retry_after_header"]),
                   "X-RateLimit-Reset-After": str(params["reset_after"]),
                   "X-RateLimit-Scope": "user"}
        body = {"message": _RATE_LIMITED, "global": False}
        if params["retry_after"] is not None:
            body["retry_after"] = params["retry_after"]
        return Answer(429, headers, body)
    if mode == "html_429":
        return Answer(429, {"Content-Type": "text/html; charset=UTF-8"}, _CLOUDFLARE_BAN_PAGE)
    wait = limits.global_wait()
    if wait is not None:
        headers = {"Retry-After": str(math.ceil(wait)), "X-RateLimit-Global": "true",
                   "X-RateLimit-Scope": "global"}
        return Answer(429, headers, {"message": _RATE_LIMITED, "retry_after": round(wait, 3), "global": True})
    allowed, headers, reset_after = limits.count(webhook_id, consume=True)
    if not allowed:
        headers.update({"Retry-After": str(math.ceil(reset_after)), "X-RateLimit-Scope": "user"})
        return Answer(429, headers, {"message": _RATE_LIMITED, "retry_after": round(reset_after, 3), "global": False})
    channel = channel_of(webhook_id)
    wait = limits.channel_wait(channel)
    if wait is not None:
        headers.update({"Retry-After": str(math.ceil(wait)), "X-RateLimit-Scope": "shared"})
        return Answer(429, headers, {"message": _RATE_LIMITED, "retry_after": round(wait, 3), "global": False})
    errors = validate(payload)
    if errors:
        return Answer(400, headers, {"code": 50035, "message": "Invalid Form Body", "errors": errors})
    thread, created = query.get("thread_id"), None
    if thread is None and forum:
        if not isinstance(payload.get("thread_name"), str) or not payload["thread_name"].strip():
            return Answer(400, headers, {"code": 220001, "message": "Webhooks posted to forum channels "
                                         "must have a thread_name or thread_id"})
        thread = new_id()
        created = (thread, payload["thread_name"])
    limits.accept(channel)
    if query.get("wait", "").lower() not in ("true", "1"):
        return Answer(204, headers, None, created)
    return Answer(200, headers, message_object(new_id(), webhook_id, payload, thread or channel), created)


def message_object(message_id, webhook_id, payload, channel):
    """The message object Discord returns for ?wait=true."""
    return {
        "id": message_id,
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
