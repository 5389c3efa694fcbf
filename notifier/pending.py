"""The pending file: what a relay stopped without durable mode leaves for the next start.

One S-expression (mode 0600: it holds webhook URLs), schema 2:

    ((schema_version . 2) (saved_at . 1764201597)
     (messages ((envelope . "<the envelope as received>") (part . 1) (attempts . 3)
                (in_flight . nil)) ...)
     (notices ((webhook . "<URL, or a webhook id>") (dropped . 2) (failed . 0)
               (since . 1764201500)) ...))

Each message is kept as the envelope it came in (so restoring never makes it bigger, or
refuses it for its size), with the requests of it already delivered (`part`), the
attempts made on the next one, and whether a request of it was still in flight. Schema
1 files (a list of envelopes) are still read.
"""

from __future__ import annotations

import time
from typing import Any

from notifier import sexp
from notifier.envelope import MAX_ENVELOPE_BYTES
from notifier.journal import Notices, Saved

SCHEMA = 2


def max_bytes(queue_max: int) -> int:
    """The largest pending file `queue_max` messages can make (each envelope escaped
    at worst to twice its size), past which a file is not believed."""
    return queue_max * (2 * MAX_ENVELOPE_BYTES + 256) + sexp.MAX_BYTES


def dumps(saved: list[Saved], notices: Notices, now: float | None = None) -> bytes:
    messages = [{"envelope": item.envelope.decode("utf-8"), "part": item.part,
                 "attempts": item.attempts, "in_flight": item.in_flight} for item in saved]
    notice_entries = [{"webhook": key, "dropped": dropped, "failed": failed, "since": since}
                      for key, (dropped, failed, since) in notices.items()]
    return sexp.dumps({"schema_version": SCHEMA, "saved_at": int(now or time.time()),
                       "messages": messages, "notices": notice_entries}).encode("utf-8")


def loads(data: bytes) -> tuple[list[Saved], Notices]:
    """Raises ValueError (`sexp.SexpError` included) for a file that is not one."""
    saved = sexp.loads(data, max_bytes=len(data), max_depth=8)
    if not isinstance(saved, dict):
        raise ValueError("not an alist")
    version = saved.get("schema_version")
    if version == 1 and _all(saved.get("envelopes"), str):
        return [Saved(text.encode("utf-8")) for text in saved["envelopes"]], {}
    if version != SCHEMA:
        raise ValueError(f"unknown schema_version {sexp.quote(version)}")
    messages, notices = saved.get("messages") or [], saved.get("notices") or []
    if not (_all(messages, dict) and _all(notices, dict)):
        raise ValueError("messages and notices must be lists of alists")
    return ([_message(entry) for entry in messages],
            {_text(entry.get("webhook"), "webhook"): (_count(entry.get("dropped")),
                                                       _count(entry.get("failed")),
                                                       _time(entry.get("since")))
             for entry in notices})


def _message(entry: dict) -> Saved:
    return Saved(_text(entry.get("envelope"), "envelope").encode("utf-8"),
                 _count(entry.get("part")), _count(entry.get("attempts")),
                 entry.get("in_flight") is True)


def _all(value: Any, kind: type) -> bool:
    return isinstance(value, list) and all(isinstance(item, kind) for item in value)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def _count(value: Any) -> int:
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise ValueError(f"{sexp.quote(value)} is not a count")
    return value


def _time(value: Any) -> float | None:
    if value is not None and type(value) not in (int, float):
        raise ValueError(f"{sexp.quote(value)} is not a time")
    return value
