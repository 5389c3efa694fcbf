"""Discord's answers read as decisions: pure functions, no I/O, no clock.

Each HTTP response (or network error) becomes an `Outcome` that says what the sender
should do next: count the messages as delivered, retry after a backoff, wait for a rate
limit (this webhook, or every webhook), quarantine a dead webhook, or give up on a
payload Discord will never accept. The rate-limit headers of every response become a
`RateLimit`, so the scheduler can wait *before* a limit bites instead of after a 429.

Facts relied on (Discord's rate-limit documentation): every response carries
``X-RateLimit-Limit/Remaining/Reset/Reset-After/Bucket`` with fractional seconds;
a 429 body is ``{"message", "retry_after", "global"}`` with ``X-RateLimit-Scope`` user,
global or shared; 401, 403 and 429 count toward 10,000 invalid requests per 10 minutes
(except 429s of scope shared), past which Cloudflare bans the IP for hours. With
``?wait=true`` a 2xx status means the message was saved, whatever happens to the body
after the status line.

`classify` is the table of answers (the README shows it row by row): the status line
says what happened, the headers and the body add what they can, and only a 429 that
carries no rate-limit evidence at all (no JSON body, no ``X-RateLimit-*`` header: a
Cloudflare page) is taken for a ban.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Mapping

MAX_WAIT_SEC = 900.0
"""Longest wait any header or body can impose: a wrong or hostile value must not stall a
webhook for days."""

BAN_COOLDOWN_SEC = 120.0
"""Pause of every webhook after a 429 without any rate-limit evidence (a Cloudflare ban
page)."""

UNKNOWN_WAIT_SEC = 5.0
"""Wait after a 429 from Discord (JSON or rate-limit headers) that gives no usable wait
anywhere: a few seconds, as for a network error."""

UNAUTHORIZED_PAUSE_SEC = 600.0
"""Quarantine after 401/403: the token may be restored, so try again after this."""

GONE_PAUSE_SEC = 3600.0
"""Quarantine after 404 (Unknown Webhook): it was deleted; probe only rarely."""

INVALID_WINDOW_SEC = 600.0
INVALID_SOFT_LIMIT = 1000
"""Discord bans an IP after 10,000 invalid requests in 10 minutes; the relay pauses all
sending once it has made a tenth of that, so it never comes close."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """The ``X-RateLimit-*`` headers of one response; None where a header is missing.
    `reset` (epoch seconds) names the window: answers within one window share it."""

    bucket: str | None = None
    limit: int | None = None
    remaining: int | None = None
    reset_after: float | None = None
    reset: float | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request came to.

    kind: ``delivered`` (`unconfirmed` when only the status line came whole);
    ``retry`` (network error, timeout, 5xx: back off and retry);
    ``rate_limited`` (wait `wait` seconds; `scope` ``route`` for this webhook, ``shared``
    for its channel, ``global`` or ``ban`` for every webhook); ``dead`` (401/403/404:
    quarantine the webhook, `gone` when Discord says it no longer exists);
    ``refused`` (400 and the other 4xx and 3xx that will not succeed unchanged: never
    send the same request again).
    """

    kind: str
    reason: str = ""
    wait: float = 0.0
    scope: str = ""
    gone: bool = False
    invalid: bool = False  # counts toward Discord's invalid-request limit
    rate: RateLimit = RateLimit()
    status: int | None = None  # HTTP status; None when no response came
    channel: str | None = None  # delivered: the channel_id of the message Discord saved
    unconfirmed: bool = False  # delivered on the status line's word: the body broke off


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def _int(text: str | None) -> int | None:
    value = _float(text)
    return int(value) if value is not None else None


def read_rate_limit(headers: Mapping[str, str]) -> RateLimit:
    """The rate-limit headers, tolerating missing or malformed ones (None)."""
    return RateLimit(bucket=headers.get("X-RateLimit-Bucket") or None,
                     limit=_int(headers.get("X-RateLimit-Limit")),
                     remaining=_int(headers.get("X-RateLimit-Remaining")),
                     reset_after=_capped(_float(headers.get("X-RateLimit-Reset-After"))),
                     reset=_float(headers.get("X-RateLimit-Reset")))


def _capped(seconds: float | None) -> float | None:
    return None if seconds is None else min(seconds, MAX_WAIT_SEC)


def _json_object(body: bytes) -> dict | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _discord_error(body: bytes) -> str:
    """Discord's own words for an error, shortened: its message, code and, for 400s,
    the first field it complains about."""
    error = _json_object(body)
    if error is None:
        return "no JSON error body"
    text = str(error.get("message", "no message"))[:120]
    if "code" in error:
        text += f" (code {error['code']})"
    field = _first_field_error(error.get("errors"))
    return f"{text}: {field}" if field else text


def _first_field_error(errors: object, path: str = "") -> str:
    if not isinstance(errors, dict):
        return ""
    for key, value in errors.items():
        if key == "_errors" and isinstance(value, list) and value:
            return f"{path or 'body'}: {str(value[0].get('message', ''))[:160]}"
        found = _first_field_error(value, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return ""


def classify(status: int, headers: Mapping[str, str], body: bytes,
             broken: str | None = None) -> Outcome:
    """Read one response. `headers` must look names up case-insensitively (as
    `requests`' headers do). `broken` says why the body did not come whole (the
    connection reset or the deadline passed after the status line): a 2xx is then
    delivered all the same (Discord saved the message; posting it again would post it
    twice), and any other status is read without its body."""
    rate = read_rate_limit(headers)
    if 200 <= status < 300:
        if broken is not None:
            return Outcome("delivered", reason=f"HTTP {status}, then {broken}", rate=rate,
                           status=status, unconfirmed=True)
        channel = (_json_object(body) or {}).get("channel_id") if body else None
        return Outcome("delivered", rate=rate, status=status,
                       channel=channel if isinstance(channel, str) else None)
    if broken is not None:
        body = b""
    if status == 429:
        return _rate_limited(headers, body, rate)
    if status in (401, 403, 404):
        return Outcome("dead", reason=f"HTTP {status}: {_discord_error(body)}",
                       gone=status == 404, invalid=status != 404, rate=rate, status=status)
    if 300 <= status < 500 and status != 408:  # 408: the server timed out; try again
        return Outcome("refused", reason=f"HTTP {status}: {_discord_error(body)}", rate=rate,
                       status=status)
    return Outcome("retry", reason=f"HTTP {status}", rate=rate, status=status)


def _rate_limited(headers: Mapping[str, str], body: bytes, rate: RateLimit) -> Outcome:
    """A 429: its wait from the best evidence present (the body's ``retry_after``, then
    ``X-RateLimit-Reset-After``, then ``Retry-After``), its scope from
    ``X-RateLimit-Scope`` and ``global``. Without any rate-limit evidence it is a ban."""
    error = _json_object(body)
    evidence = error is not None or any(name.lower().startswith("x-ratelimit-")
                                        for name in headers)
    header_wait = _capped(_float(headers.get("Retry-After")))
    if not evidence:  # a ban page: long, capped, for everyone
        return Outcome("rate_limited", reason="HTTP 429 without rate-limit headers or a "
                       "JSON body (banned?)", wait=max(header_wait or 0.0, BAN_COOLDOWN_SEC),
                       scope="ban", invalid=True, rate=rate, status=429)
    body_wait = _capped(_seconds(error.get("retry_after"))) if error else None
    wait = next((w for w in (body_wait, rate.reset_after, header_wait) if w is not None),
                None)
    scope = (headers.get("X-RateLimit-Scope") or "").lower()
    if (error or {}).get("global") is True or scope == "global" or \
            (headers.get("X-RateLimit-Global") or "").lower() == "true":
        scope = "global"
    elif scope != "shared":
        scope = "route"
    said = f"retry after {wait:g} s" if wait is not None else \
        f"no usable wait, waiting {UNKNOWN_WAIT_SEC:g} s"
    return Outcome("rate_limited", reason=f"HTTP 429 ({scope}), {said}",
                   wait=UNKNOWN_WAIT_SEC if wait is None else wait, scope=scope,
                   invalid=scope != "shared", rate=rate, status=429)


def _seconds(value: object) -> float | None:
    """A JSON number of seconds (or a numeric string), None unless finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    return _float(str(value))


def network_error(exc: BaseException) -> Outcome:
    """A request that got no response: connection refused, reset, timeout."""
    return Outcome("retry", reason=type(exc).__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with jitter for network errors, timeouts and 5xx.

    Error n in a row (1-based) waits between half and all of ``min(cap, base * 2**(n-1))``
    seconds: 0.5 s, 1 s, 2 s, 4 s, then 5 s, so an outage costs one probe per webhook
    every few seconds and its end is noticed within seconds. A request is given up
    after `max_attempts` errors of its own (while other webhooks delivered); errors
    during an outage do not count (see `notifier.limits`).
    """

    base: float = 0.5
    cap: float = 5.0
    max_attempts: int = 10

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(attempt - 1, 62))
        return ceiling * (0.5 + 0.5 * (rng or random).random())

    def gives_up(self, attempt: int) -> bool:
        return attempt >= self.max_attempts
