"""``python -m telemetry show``: ``system_metrics.sexp`` for a person to read.

The Lisp side writes its ``timestamp`` in universal time (seconds since 1900); shown
here as a date, converted exactly (Unix = universal - 2208988800), not mistaken for Unix
time as the tool this replaces did, 70 years off, and a time ahead of this machine's
clock says by how much it is in the future. Values are shown as the file has them:
floats with the digits and marker SBCL printed (``117.73757`` a single float,
``1.5d0`` a double). The ``notifier_*`` keys the merge writes follow, with how old their
numbers are now.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from notifier import files, sexp
from notifier.status import duration, when

UNIVERSAL_TO_UNIX = 2_208_988_800
"""Seconds from 1900-01-01 (Common Lisp's universal time) to 1970-01-01 (Unix time)."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and 0 <= value < 1e11


def _value(name: str, value: Any, now: float) -> str:
    if name == "timestamp" and _number(value) and value >= UNIVERSAL_TO_UNIX:
        return f"{when(value - UNIVERSAL_TO_UNIX, now)}, universal time {sexp.dumps(value)}"
    if name == "notifier_snapshot_unix" and _number(value):
        return f"{when(value, now)}, Unix time {sexp.dumps(value)}"
    return sexp.dumps(value)  # floats read as written print as written


def render(metrics: sexp.Alist, path: Path, now: float) -> str:
    """The file's entries in order, the Lisp side's first, then the notifier's."""
    names = {key: sexp.normalize_key(key) for key in metrics}
    width = max(map(len, names), default=0)
    lisp = [key for key, name in names.items() if not name.startswith("notifier_")]
    notifier = [key for key, name in names.items() if name.startswith("notifier_")]
    lines = [f"{path}:"]
    lines += [f"  {key:<{width}}  {_value(names[key], metrics[key], now)}" for key in lisp]
    snapshot = metrics.get("notifier_snapshot_unix")
    if notifier:
        age = ("never merged" if not _number(snapshot)
               else f"dated {duration(snapshot - now)} in the future" if snapshot - now >= 1
               else f"{duration(now - snapshot)} old now")
        lines.append(f"notifier (merged by python -m telemetry merge; its numbers are {age}):")
        lines += [f"  {key:<{width}}  {_value(names[key], metrics[key], now)}"
                  for key in notifier]
    else:
        lines.append("notifier: no notifier_* keys yet (has python -m telemetry merge run?)")
    return "\n".join(lines)


def command(path: Path, now: float) -> tuple[int, str]:
    """Exit code and text: 0 shown, 8 (as for the merge) when the file cannot be read."""
    try:
        metrics = sexp.loads(files.read_regular(path, sexp.MAX_BYTES), written_floats=True)
    except (OSError, sexp.SexpError) as exc:
        return 8, f"telemetry show: cannot read {path}: {str(exc)[:200]}"
    if not isinstance(metrics, sexp.Alist):
        return 8, f"telemetry show: {path} is not an alist"
    return 0, render(metrics, path, now)
