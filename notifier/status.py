"""`python -m notifier status`: what the relay is doing, judged on delivery, not liveness.

A relay that is up but dropping, failing or not delivering is not healthy, and a
snapshot that stopped changing means the relay is dead or stuck; either way the summary
says so first, and the exit code tells scripts (0 healthy, 1 warnings, 2 critical).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from notifier import metrics, sexp

STALE_INTERVALS = 3
"""A snapshot older than this many metrics intervals means the relay is dead or stuck."""

STUCK_AFTER_SEC = 120.0
"""Messages pending with no delivery for this long: deliveries have stopped."""

OK, WARNING, CRITICAL = 0, 1, 2
LEVELS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL"}


@dataclass
class Report:
    level: int = OK
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def problem(self, level: int, text: str) -> None:
        self.level = max(self.level, level)
        self.problems.append(text)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def _ago(seconds: float) -> str:
    return f"{_duration(seconds)} ago"


def _when(unix: float | None, now: float) -> str:
    if unix is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))
    return f"{stamp} ({_ago(now - unix)})"


def judge(snapshot: sexp.Alist, now: float) -> Report:
    """Turn a metrics snapshot into a verdict and the lines an operator reads."""
    report = Report()
    get = snapshot.get
    age = now - get("timestamp", 0)
    interval = float(get("metrics_interval_sec") or 5)
    if age > max(STALE_INTERVALS * interval, 15):
        report.problem(CRITICAL, f"the snapshot is {_duration(age)} old (written every "
                                 f"{interval:g} s): the relay is dead or stuck")
    pending, drops, failed = get("pending", 0), get("drops", 0), get("failed", 0)
    last_delivery = get("last_delivery_at")
    quiet_for = now - (last_delivery if last_delivery is not None else get("started_at", now))
    if pending and quiet_for > STUCK_AFTER_SEC:
        report.problem(CRITICAL, f"{pending} messages pending and nothing delivered for "
                                 f"{_duration(quiet_for)}")
    if drops:
        report.problem(WARNING, f"{drops} messages dropped since the relay started "
                                "(queue full: Discord too slow or unreachable)")
    if failed:
        report.problem(WARNING, f"{failed} messages failed since the relay started "
                                "(see the log: grep 'failed webhook')")
    for hook in get("webhooks") or []:
        if hook.get("state") == "quarantined":
            report.problem(WARNING, f"webhook {hook.get('id')} is quarantined "
                                    "(401/403/404 from Discord): its messages fail")
    if get("insecure_bind"):
        report.problem(WARNING, "listening off loopback without CURVE "
                                "(SWIMMY_NOTIFIER_INSECURE_BIND=1): anyone who reaches the "
                                "port can post, and webhook tokens cross the network in the clear")
    if get("invalid_requests_10m", 0) >= 100:
        report.problem(WARNING, f"{get('invalid_requests_10m')} invalid requests "
                                "(401/403/429) in 10 min: Discord bans an IP at 10,000")

    report.lines += [
        f"snapshot:  {_when(get('timestamp'), now)}, pid {get('pid')}, up {_duration(get('uptime_sec', 0))}",
        f"queue:     {get('queue_len', 0)} / {get('queue_max', '?')} held",
        "producers: " + ("CURVE, allowed keys only" if get("curve") else
                         "no CURVE, OFF LOOPBACK" if get("insecure_bind") else
                         "no CURVE (loopback)"),
        f"messages:  received {get('received', 0)}, delivered {get('delivered', 0)}, "
        f"pending {pending}, dropped {drops}, failed {failed}, rejected {get('rejected', 0)}, "
        f"deduplicated {get('deduplicated', 0)}",
        f"requests:  {get('requests', 0)} sent, {get('errors', 0)} errors, "
        f"{get('retries', 0)} retries, {get('rate_limited', 0)} rate-limited",
        f"delivered: last {_when(last_delivery, now)}",
        f"error:     last {_when(get('last_error_at'), now)}"
        + (f": {get('last_error')}" if get("last_error") else ""),
    ]
    for hook in get("webhooks") or []:
        report.lines.append(
            f"webhook {hook.get('id')}: {hook.get('state')}, delivered {hook.get('delivered')}, "
            f"pending {hook.get('pending')}, dropped {hook.get('dropped')}, failed "
            f"{hook.get('failed')}, last success {_when(hook.get('last_success_at'), now)}")
    for producer in get("producers") or []:
        report.lines.append(
            f"producer {producer.get('name')}: received {producer.get('received')}, "
            f"rejected {producer.get('rejected')}, dropped {producer.get('drops')}")
    return report


def render(report: Report) -> str:
    head = f"notifier: {LEVELS[report.level]}"
    problems = [f"  ! {text}" for text in report.problems]
    return "\n".join([head, *problems, *report.lines])


def command(path: Path, now: float | None = None) -> tuple[int, str]:
    """The status command's exit code and text for the metrics file at `path`."""
    try:
        snapshot = metrics.read(path)
    except FileNotFoundError:
        return CRITICAL, f"notifier: CRITICAL\n  ! no metrics file at {path}: is the relay running?"
    except (OSError, ValueError) as exc:
        return CRITICAL, f"notifier: CRITICAL\n  ! cannot read {path}: {exc}"
    report = judge(snapshot, time.time() if now is None else now)
    return report.level, render(report)
