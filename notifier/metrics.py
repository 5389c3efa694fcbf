"""The metrics file: the relay's counters as an S-expression alist, replaced atomically.

Readers (the Lisp side's safe reader, `python -m telemetry merge`, `python -m notifier
status`) see one complete snapshot or the previous one, never a torn file. Times are
Unix epoch seconds (the Lisp side's own files use universal time). Every key is
documented in the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from notifier import files, sexp

SCHEMA_VERSION = 1

# Counters in the order they are written, after the header keys.
COUNTERS = ("received", "delivered", "drops", "rejected", "deduplicated", "failed",
            "pending", "errors", "retries", "rate_limited", "requests", "notices",
            "restored", "invalid_requests_10m")


def _unix(value: float | None) -> int | None:
    return None if value is None else int(value)


def render(snapshot: dict[str, Any], *, now: float, started_at: float, pid: int,
           interval: float, curve: bool = False, insecure_bind: bool = False) -> str:
    """The metrics file's text for an `Outbox.snapshot`; `curve` and `insecure_bind`
    say how producers reach the relay."""
    entries: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "timestamp": int(now),
        "pid": pid,
        "started_at": int(started_at),
        "uptime_sec": int(now - started_at),
        "metrics_interval_sec": interval,
        "queue_len": snapshot["queue_len"],
        "queue_max": snapshot["queue_max"],
        "unparsed": snapshot["unparsed"],
    }
    entries.update((key, snapshot[key]) for key in COUNTERS)
    entries.update(
        last_delivery_at=_unix(snapshot["last_delivery_at"]),
        last_error_at=_unix(snapshot["last_error_at"]),
        last_error=snapshot["last_error"],
        webhooks=[{**hook, "last_success_at": _unix(hook["last_success_at"])}
                  for hook in snapshot["webhooks"]],
        curve=curve, insecure_bind=insecure_bind, producers=snapshot["producers"])
    return sexp.dumps(entries) + "\n"


def write(path: Path, text: str) -> None:
    files.write_atomic(path, text.encode("utf-8"))


def read(path: Path) -> sexp.Alist:
    """Read a metrics file; raises OSError or `sexp.SexpError` (or ValueError when it is
    not an alist)."""
    value = sexp.loads(path.read_bytes())
    if not isinstance(value, sexp.Alist):
        raise ValueError("the metrics file is not an alist")
    return value
