"""`python -m notifier status`: what the relay is doing, judged on delivery, not liveness.

A relay that is up but dropping, failing or not delivering is not healthy, and a
snapshot that stopped changing means the relay is dead or stuck; either way the summary
says so first, and the exit code tells scripts (0 healthy, 1 warnings, 2 critical).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from notifier import metrics, sexp

STALE_INTERVALS = 3
STALE_MIN_SEC = 15.0
"""A snapshot older than three metrics intervals, and at least 15 s, means the relay is
dead or stuck (the floor keeps a loaded machine's late snapshot from looking dead)."""

STUCK_AFTER_SEC = 120.0
"""Messages pending with no delivery for this long: deliveries have stopped. Also the
period in which rejections with no delivery mean producers send only refused envelopes
(with no delivery at all since the start, one rejection says so already)."""

FILES = {"store": ("the message store", "messages are held in memory only until it can be "
                   "written again"),
         "log": ("the log file", ""),
         "prometheus": ("the Prometheus text file", ""),
         "metrics": ("the metrics file", "status and the merge read an old snapshot"),
         "dead_letters": ("the dead-letter file", "messages that fail are not kept for replay")}
"""What each ``<name>_state`` of the snapshot is about, and what its failure means;
`status` names any that failed, known or not."""

FAILING_AFTER_SEC = 60.0
"""A webhook whose every request failed (network, 5xx, 401/403/404) for this long."""

FUTURE_TOLERANCE_SEC = 300.0
"""A snapshot dated further ahead than this is not in Unix time."""

TIMES = ("timestamp", "started_at", "last_delivery_at", "last_error_at", "last_rejected_at",
         "last_stop_at")
NUMBERS = ("pid", "uptime_sec", "metrics_interval_sec", "queue_len", "queue_max", "saved",
           "lost", "store_skipped", "last_stop_lost", "webhooks_left_out", "unparsed",
           "drops_webhook_unknown", "oversized_disconnects", *metrics.THREADS,
           *metrics.COUNTERS)
WEBHOOK_NUMBERS = ("pending", "delivered", "dropped", "failed", "last_success_at",
                   "failing_since")

OK, WARNING, CRITICAL = 0, 1, 2
LEVELS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL"}


@dataclass
class Report:
    level: int = OK
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    summary: str = ""  # the first line's text when there is no problem
    worst: str = ""  # the first problem of the highest level: the first line's text

    def problem(self, level: int, text: str) -> None:
        if level > self.level or not self.problems:
            self.worst = text
        self.level = max(self.level, level)
        self.problems.append(text)


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds // 86_400} days"


def _ago(seconds: float) -> str:
    """How long ago; a second or more ahead of this clock (the writer's clock is ahead)
    says how far ahead, never "0 s ago"."""
    if seconds <= -1:
        return f"in the future by {duration(-seconds)}"
    return f"{duration(seconds)} ago"


def when(unix: float | None, now: float) -> str:
    if unix is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))
    return f"{stamp} ({_ago(now - unix)})"


def _number(value: object, *, time_like: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return not time_like or 0 <= value < 1e11  # gmtime() takes it: before year 5000


def unusable(snapshot: object) -> str | None:
    """Why a parsed metrics file cannot be judged, or None: `judge` may then rely on the
    type of every value it reads."""
    if not isinstance(snapshot, sexp.Alist):
        return "not an alist"
    if snapshot.get("schema_version") != metrics.SCHEMA_VERSION:
        return (f"schema_version {sexp.quote(snapshot.get('schema_version'))} is not "
                f"{metrics.SCHEMA_VERSION}")
    if snapshot.get("timestamp") is None:
        return "no timestamp"
    for key in (*TIMES, *NUMBERS):
        value = snapshot.get(key)
        if value is not None and not _number(value, time_like=key in TIMES):
            return f"{key} is {str(value)[:40]!r}, not a number" + (
                " of Unix seconds" if key in TIMES else "")
    producers = snapshot.get("producers")
    if producers is not None and not (isinstance(producers, list) and all(
            isinstance(entry, sexp.Alist) for entry in producers)):
        return "producers is not a list of alists"
    webhooks = snapshot.get("webhooks")
    if webhooks is not None and not isinstance(webhooks, list):
        return "webhooks is not a list"
    for hook in webhooks or []:
        if not isinstance(hook, sexp.Alist):
            return "a webhook entry is not an alist"
        for key in WEBHOOK_NUMBERS:
            value = hook.get(key)
            if value is not None and not _number(value, time_like=key.endswith(("_at", "_since"))):
                return f"webhook {str(hook.get('id'))[:40]}: {key} is not a number"
    return None


def judge(snapshot: sexp.Alist, now: float) -> Report:
    """Turn a metrics snapshot (one that `unusable` accepts) into a verdict and the lines
    an operator reads."""
    report = Report()
    get = snapshot.get

    def count(key: str) -> int | float:
        return get(key) or 0
    stamp = get("timestamp")
    age = now - stamp
    interval = get("metrics_interval_sec") or 5
    stopped = get("state") == "stopped"
    lost = count("lost")
    if stopped and lost:
        report.problem(CRITICAL, f"stopped at {when(stamp, now)}: {lost} messages "
                                 f"LOST (the store could not take them: "
                                 f"{str(get('store_reason') or 'see the log')[:100]}), "
                                 f"{count('saved')} saved for the next start")
    elif stopped:
        report.problem(CRITICAL, f"stopped at {when(stamp, now)}, {count('saved')} saved "
                                 "for the next start")
    elif stamp > now + FUTURE_TOLERANCE_SEC:
        report.problem(CRITICAL, f"the snapshot is dated {duration(-age)} ahead: its "
                                 "timestamp is not Unix time")
    elif age > max(STALE_INTERVALS * interval, STALE_MIN_SEC):
        report.problem(CRITICAL, f"the snapshot is {duration(age)} old (written every "
                                 f"{interval:g} s): the relay is dead or stuck")
    pending, drops, failed = count("pending"), count("drops"), count("failed")
    last_delivery = get("last_delivery_at")
    quiet_for = now - (last_delivery if last_delivery is not None else get("started_at") or now)
    if pending and quiet_for > STUCK_AFTER_SEC and not stopped:
        report.problem(CRITICAL, f"{pending} messages pending and nothing delivered for "
                                 f"{duration(quiet_for)}")
    for hook in get("webhooks") or []:
        since = hook.get("failing_since")
        if since is not None and now - since > FAILING_AFTER_SEC:
            report.problem(CRITICAL, f"webhook {hook.get('id')}: every request failed for "
                                     f"{duration(now - since)} (see the log: grep "
                                     f"'webhook={hook.get('id')}')")
    last_rejected = get("last_rejected_at")
    if count("rejected") and last_rejected is not None and (
            last_delivery is None
            or now - last_rejected <= STUCK_AFTER_SEC < quiet_for):
        report.problem(WARNING, f"{count('rejected')} envelopes rejected and nothing "
                                + ("delivered since the start" if last_delivery is None
                                   else f"delivered for {duration(quiet_for)}")
                                + f"; the last {_ago(now - last_rejected)}: "
                                + str(get("last_rejected_reason") or "reason not recorded")[:200]
                                + " (producers send what the relay refuses: grep 'rejected')")
    if drops:
        report.problem(WARNING, f"{drops} messages dropped since the relay started "
                                f"({_crowd(snapshot)})")
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
    for key, value in snapshot.items():
        name = sexp.normalize_key(str(key))
        if name.endswith("_state") and value == "failed" and not stopped:
            name = name[:-len("_state")]
            what, meaning = FILES.get(name, (name, ""))
            reason = get(f"{name}_reason")
            report.problem(WARNING, f"{what} cannot be written"
                                    + (f": {str(reason)[:200]}" if reason else "")
                                    + (f"; {meaning}" if meaning else "") + " (see the log)")
    if count("last_stop_lost"):
        report.problem(WARNING, f"{count('last_stop_lost')} messages LOST at the last stop "
                                f"({when(get('last_stop_at'), now)}): the store could not "
                                "take them (see the log)")
    if get("store_moved_aside"):
        report.problem(WARNING, f"the store could not be used at start and was moved aside: "
                                f"{str(get('store_moved_aside'))[:300]}")
    if count("store_skipped"):
        report.problem(WARNING, f"{count('store_skipped')} unreadable entries in the store "
                                "were skipped at start (see the log)")
    senders, alive = get("senders"), get("senders_alive")
    if senders is not None and alive is not None and alive < senders and not stopped:
        report.problem(CRITICAL, f"only {alive} of {senders} sender threads alive (see the "
                                 "log: the relay stops itself for a restart when one dies)")
    if count("thread_errors"):
        report.problem(WARNING, f"{count('thread_errors')} unexpected errors in the relay's "
                                "threads, which carried on (see the log: grep 'unexpected "
                                "error')")
    if count("invalid_requests_10m") >= 100:
        report.problem(WARNING, f"{get('invalid_requests_10m')} invalid requests "
                                "(401/403/429) in 10 min: Discord bans an IP at 10,000")

    report.summary = (
        f"delivering: {count('delivered')} delivered, {pending} pending | "
        f"pending={pending};;;0;{get('queue_max') or ''} "
        + " ".join(f"{key}={count(key)}c" for key in ("delivered", "drops", "failed", "rejected")))
    held = (f"{count('saved')} saved for the next start" if stopped
            else f"{count('queue_len')} / {get('queue_max') or '?'} held")
    report.lines += [
        f"snapshot:  {when(stamp, now)}, {get('state') or 'running'}, pid {get('pid')}, "
        f"up {duration(count('uptime_sec'))}",
        f"queue:     {held}",
        "producers: " + ("CURVE, allowed keys only" if get("curve") else
                         "no CURVE, OFF LOOPBACK" if get("insecure_bind") else
                         "no CURVE (loopback)"),
        f"messages:  received {count('received')}, delivered {count('delivered')}, "
        f"pending {pending}, dropped {drops}, failed {failed}, rejected {count('rejected')}, "
        f"deduplicated {count('deduplicated')}, lost {lost}",
        f"store:     {get('store_state') or '?'}"
        + (f" ({get('store_reason')})" if get("store_reason") else "")
        + (", durable" if get("durable") else ", in memory until SIGTERM"),
        f"threads:   {'?' if alive is None else alive} of {senders or '?'} senders alive, "
        f"{count('thread_errors')} errors carried on",
        f"requests:  {count('requests')} sent, {count('errors')} errors, "
        f"{count('retries')} retries, {count('rate_limited')} rate-limited",
        f"delivered: last {when(last_delivery, now)}",
        f"error:     last {when(get('last_error_at'), now)}"
        + (f": {get('last_error')}" if get("last_error") else ""),
    ]
    for hook in get("webhooks") or []:
        report.lines.append(
            f"webhook {hook.get('id')}: {hook.get('state')}, delivered {hook.get('delivered')}, "
            f"pending {hook.get('pending')}, dropped {hook.get('dropped')}, failed "
            f"{hook.get('failed')}, last success {when(hook.get('last_success_at'), now)}")
    if count("webhooks_left_out"):
        report.lines.append(f"webhooks:  {count('webhooks_left_out')} more webhooks not listed "
                            "(the snapshot lists the 100 most relevant)")
    for producer in get("producers") or []:
        report.lines.append(
            f"producer {producer.get('name')}: received {producer.get('received')}, "
            f"rejected {producer.get('rejected')}, dropped {producer.get('drops')}")
    return report


HOOK_STATES = {"ok": "sending", "waiting": "held back by Discord's limits or a backoff",
               "quarantined": "quarantined"}


def _crowd(snapshot: sexp.Alist) -> str:
    """Why the queue was full, for the drops: whose messages fill it now (the webhooks
    holding most, and in what state; envelopes not parsed yet: a flood faster than
    parsing) and whose messages were dropped, rather than a guess at Discord."""
    get = snapshot.get
    hooks = [hook for hook in get("webhooks") or [] if hook.get("pending") or hook.get("dropped")]
    filling = [f"{hook.get('pending')} for webhook {str(hook.get('id'))[:25]} ("
               + HOOK_STATES.get(hook.get("state"), str(hook.get("state"))[:20]) + ")"
               for hook in sorted(hooks, key=lambda hook: -(hook.get("pending") or 0))[:3]
               if hook.get("pending")]
    if get("unparsed"):
        filling.append(f"{get('unparsed')} not parsed yet")
    dropped = [f"webhook {str(hook.get('id'))[:25]} {hook.get('dropped')}"
               for hook in sorted(hooks, key=lambda hook: -(hook.get("dropped") or 0))[:3]
               if hook.get("dropped")]
    if get("drops_webhook_unknown"):
        dropped.append(f"webhook unknown {get('drops_webhook_unknown')}")
    return (f"queue full at queue_max={get('queue_max')}; holding {get('queue_len') or 0} now"
            + (": " + ", ".join(filling) if filling else "")
            + ("; dropped from " + ", ".join(dropped) if dropped else ""))


def render(report: Report) -> str:
    """Monitoring-plugin output: ``NOTIFIER LEVEL - the worst problem (or a summary)``,
    then the other problems and the details."""
    head = f"NOTIFIER {LEVELS[report.level]} - {report.worst or report.summary}"
    problems = [f"  ! {text}" for text in report.problems if text != report.worst]
    return "\n".join([head, *problems, *report.lines])


def _cannot_judge(text: str) -> tuple[int, str]:
    report = Report()
    report.problem(CRITICAL, text)
    return CRITICAL, render(report)


def command(path: Path, now: float | None = None) -> tuple[int, str]:
    """The status command's exit code and text for the metrics file at `path`: never a
    hang (only a regular file is read, at most `sexp.MAX_BYTES`) and never a traceback
    (a file it cannot judge is CRITICAL, with the reason)."""
    try:
        snapshot = metrics.read(path)
    except FileNotFoundError:
        return _cannot_judge(f"no metrics file at {path}: is the relay running?")
    except (OSError, ValueError) as exc:
        return _cannot_judge(f"cannot read {path}: {str(exc)[:200]}")
    reason = unusable(snapshot)
    if reason is not None:
        return _cannot_judge(f"{path} is not a usable snapshot: {reason}")
    report = judge(snapshot, time.time() if now is None else now)
    return report.level, render(report)
