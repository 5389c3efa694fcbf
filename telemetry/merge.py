"""Merge the relay's metrics snapshot into the Lisp side's ``system_metrics.sexp``.

Cron runs this every minute. It reads ``notifier_metrics.sexp`` (written by the relay:
Unix timestamps, ``schema_version`` 1) with the safe reader, and writes into
``system_metrics.sexp`` (written by the Lisp side: universal time, package-qualified keys)
``notifier_status``, ``notifier_status_reason``, ``notifier_age_sec``, the `COUNTERS` as
``notifier_<name>`` and ``notifier_snapshot_unix``: each replaced in place where an
earlier merge left it, appended otherwise. Every other entry is put back exactly as the
Lisp side printed it, in order, on one line with no trailing newline, as Lisp writes it.

When the snapshot cannot be used (missing, unreadable, hostile, not a schema-1 snapshot),
only the status keys change: ``notifier_status``, ``notifier_status_reason`` and
``notifier_age_sec``, the age of the numbers still shown (those of the last good merge),
so a dashboard sees them grow old instead of looking fresh. The exit code (`Exit`) tells
cron or systemd what happened; the log says why, on one line.
"""

from __future__ import annotations

import enum
import logging
import math
from typing import Any, NamedTuple

from notifier import sexp
from notifier.files import read_regular
from telemetry import files
from telemetry.config import Config

log = logging.getLogger(__name__)


class Exit(enum.IntEnum):
    """Exit codes of ``python -m telemetry merge`` (1 is left to Python: a crash)."""

    OK = 0                  # merged a fresh snapshot
    CONFIG = 2              # bad setting or command line; nothing read or written
    STALE = 3               # merged, but the snapshot is older than --stale-after
    MISSING = 4             # no notifier metrics file: status written, numbers kept
    UNREADABLE = 5          # cannot be read or parsed (I/O, not a file, hostile or bad text)
    INVALID = 6             # parsed, but not a usable snapshot (keys, types, timestamp)
    UNSUPPORTED_SCHEMA = 7  # schema_version missing or not 1
    SYSTEM_UNREADABLE = 8   # system_metrics.sexp cannot be read or parsed: left untouched
    BUSY = 9                # system_metrics.sexp changed under every try: left as it was
    WRITE_FAILED = 10       # system_metrics.sexp could not be written: left as it was


REQUIRED_COUNTERS = ("queue_len", "drops", "errors")
"""The counters the plan defines: with ``schema_version`` and ``timestamp``, all that a
snapshot must have."""

COUNTERS = ("queue_len", "queue_max", "drops", "errors", "delivered", "failed",
            "rejected", "deduplicated", "pending", "received", "lost")
"""Every counter merged, as ``notifier_<name>``. One the snapshot does not have is
written as ``nil``, so that no number from an earlier snapshot is left looking current."""

MAX_REASON_CHARS = 300
"""Longest ``notifier_status_reason`` written: whatever a hostile snapshot holds, the
merged file stays far below the size that the next merge (and the Lisp side) reads."""

FUTURE_TOLERANCE_SEC = 300
"""A snapshot dated further ahead than this is refused: relay and merge share a clock, so
it is a wrong unit (universal time, milliseconds), not clock drift."""


class Reading(NamedTuple):
    """What the notifier snapshot gave: its status and, when usable, the values to merge."""

    exit: Exit
    status: str
    reason: str | None
    values: dict[str, Any]


def _failed(exit: Exit, reason: str) -> Reading:
    return Reading(exit, exit.name.lower(), _capped(reason), {})


def _capped(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS - 1] + "…"


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def read_notifier(config: Config, now: float) -> Reading:
    """Read and check the relay's snapshot; never raises for anything about the file."""
    path = config.notifier_metrics
    try:
        data = read_regular(path, sexp.MAX_BYTES)
    except FileNotFoundError:
        return _failed(Exit.MISSING, f"{path} does not exist (is the relay running?)")
    except OSError as exc:
        return _failed(Exit.UNREADABLE, f"cannot read {path}: {exc.strerror or exc}")
    try:
        snapshot = sexp.loads(data)
    except sexp.SexpError as exc:
        return _failed(Exit.UNREADABLE, f"{path}: {exc}")
    if not isinstance(snapshot, sexp.Alist):
        return _failed(Exit.INVALID, f"{path} is not an alist of (key . value) entries")
    version = snapshot.get("schema_version")
    if not (type(version) is int and version == 1):
        found = ("no schema_version" if version is None
                 else f"schema_version {sexp.quote(version)}")
        return _failed(Exit.UNSUPPORTED_SCHEMA, f"{path} has {found}; only 1 is known")
    bad = [name for name in COUNTERS if not _is_count(snapshot.get(name))
           and (name in REQUIRED_COUNTERS or snapshot.get(name) is not None)]
    if bad:
        return _failed(Exit.INVALID, f"{path}: {', '.join(bad)} missing or not a whole "
                                     f"number >= 0")
    timestamp = snapshot.get("timestamp")
    if type(timestamp) not in (int, float) or not math.isfinite(timestamp) or timestamp < 0:
        return _failed(Exit.INVALID,
                       f"{path}: timestamp {sexp.quote(timestamp)} is not Unix time")
    if timestamp > now + FUTURE_TOLERANCE_SEC:
        return _failed(Exit.INVALID, f"{path}: timestamp {timestamp:.0f} is "
                                     f"{timestamp - now:.0f} s in the future; it must be "
                                     f"Unix time")
    timestamp = math.floor(timestamp)  # whole seconds, like every age derived from it
    age = _age(timestamp, now)
    values = {f"notifier_{name}": snapshot.get(name) for name in COUNTERS}
    values["notifier_snapshot_unix"] = timestamp
    if age > config.stale_after:
        reason = (f"snapshot is {age} s old (stale after {config.stale_after:g} s): "
                  f"the relay is not writing {path}")
        return Reading(Exit.STALE, "stale", _capped(reason), values)
    return Reading(Exit.OK, "ok", None, values)


def _age(timestamp: float, now: float) -> int:
    return max(0, math.floor(now - timestamp))


def merged_text(current: bytes | None, reading: Reading, now: float) -> str:
    """The new system_metrics.sexp: `current` (None: no file yet) with the notifier keys.
    Raises `sexp.SexpError` if `current` is not an alist."""
    entries = sexp.read_entries(current) if current is not None else []
    owned = {"notifier_status": reading.status, "notifier_status_reason": reading.reason}
    if reading.values:
        owned["notifier_age_sec"] = _age(reading.values["notifier_snapshot_unix"], now)
        owned.update(reading.values)
    else:
        # The numbers left in the file are from the snapshot of the last good merge.
        shown = sexp.Alist((entry.key.text, entry.value) for entry in entries)
        timestamp = shown.get("notifier_snapshot_unix")
        owned["notifier_age_sec"] = _age(timestamp, now) if _is_count(timestamp) else None
    parts, replaced = [], set()
    for entry in entries:
        key = sexp.normalize_key(entry.key.text)
        if key in owned:
            parts.append(_entry_text(key, owned[key]))
            replaced.add(key)
        else:
            parts.append(entry.source)
    parts.extend(_entry_text(key, value) for key, value in owned.items() if key not in replaced)
    return "(" + " ".join(parts) + ")"


def _entry_text(key: str, value: Any) -> str:
    """``(key . value)``: `dumps` prints a one-entry alist, here without its outer list."""
    return sexp.dumps({key: value})[1:-1]


def run(config: Config, now: float) -> Exit:
    """One merge; logs one line saying what happened and returns the exit code."""
    reading = read_notifier(config, now)
    target = config.system_metrics
    try:
        files.rewrite(target, lambda current: merged_text(current, reading, now),
                      limit=sexp.MAX_BYTES)
    except (files.ReadError, sexp.SexpError) as exc:
        log.error("%s is unreadable, left untouched: %s (notifier status would have been "
                  "%s)", target, exc, reading.status)
        return Exit.SYSTEM_UNREADABLE
    except files.Busy as exc:
        log.error("not merged, %s left as it was: %s", target, exc)
        return Exit.BUSY
    except OSError as exc:
        log.error("cannot write %s, left as it was: %s", target, exc)
        return Exit.WRITE_FAILED
    values = reading.values
    if reading.exit is Exit.OK:
        numbers = " ".join(f"{name}={values[f'notifier_{name}']}" for name in COUNTERS
                           if values[f"notifier_{name}"] is not None)
        log.info("merged into %s: status=ok %s age_sec=%d", target, numbers,
                 _age(values["notifier_snapshot_unix"], now))
    elif values:
        log.warning("merged into %s: status=%s: %s", target, reading.status, reading.reason)
    else:
        log.warning("status=%s recorded in %s, earlier notifier numbers kept: %s",
                    reading.status, target, reading.reason)
    return reading.exit
